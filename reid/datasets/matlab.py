"""MATLAB v7.3 MAT-files (HDF5 with a 512-byte MATLAB header): read cells and arrays, and write them.

MATLAB stores arrays column-major, so an M x N array is an N x M HDF5 dataset (an H x W x 3 image is
3 x W x H); a cell array is a dataset of object references into the ``#refs#`` group; an empty cell is
a tiny uint64 dataset holding the empty shape, flagged with a ``MATLAB_empty`` attribute.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from reid.atomic import atomic_path

USERBLOCK_SIZE = 512
DEFAULT_CREATED = "Mon Jan  1 00:00:00 2018"

_CLASS_OF_DTYPE = {
    np.dtype(np.float64): "double",
    np.dtype(np.float32): "single",
    np.dtype(np.uint8): "uint8",
    np.dtype(np.int8): "int8",
    np.dtype(np.uint16): "uint16",
    np.dtype(np.int16): "int16",
    np.dtype(np.uint32): "uint32",
    np.dtype(np.int32): "int32",
    np.dtype(np.uint64): "uint64",
    np.dtype(np.int64): "int64",
}


def is_mat73(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a MATLAB v7.3 (HDF5) MAT-file rather than a v5 file scipy reads."""
    with open(path, "rb") as fh:
        head = fh.read(128)
    return head.startswith(b"MATLAB 7.3") or h5py.is_hdf5(path)


def cell_refs(f: h5py.File, name: str) -> np.ndarray:
    """A top-level cell array as an object array of references, in MATLAB's shape (transposed back)."""
    ds = f[name]
    if ds.dtype != h5py.ref_dtype:
        raise ValueError(f"{name!r} is not a cell array (dtype {ds.dtype})")
    return ds[()].T


def read_ref(f: h5py.File, ref: h5py.Reference) -> np.ndarray | None:
    """The array a reference points at, in MATLAB's shape; None for an empty cell."""
    ds = f[ref]
    if is_empty(ds):
        return None
    return ds[()].T


def is_empty(ds: h5py.Dataset) -> bool:
    """Whether a dataset is MATLAB's encoding of an empty array."""
    return bool(ds.attrs.get("MATLAB_empty", 0)) or ds.size == 0


class _RefNamer:
    """MATLAB's names for objects in ``#refs#``: a, b, ..., z, A, ..., Z, 0..9, then two letters."""

    _ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> str:
        n, k = self.n, len(self._ALPHABET)
        self.n += 1
        name = ""
        while True:
            name = self._ALPHABET[n % k] + name
            n = n // k - 1
            if n < 0:
                return name


def _set_class(ds: h5py.Dataset | h5py.Group, cls: str) -> None:
    ds.attrs.create("MATLAB_class", np.bytes_(cls))


def _write_value(parent: h5py.Group, name: str, value, refs: h5py.Group, namer: _RefNamer, compress: bool):
    """Write one numeric array or cell array (numpy object array) under ``parent[name]``."""
    arr = value if isinstance(value, np.ndarray) else np.asarray(value)
    if arr.dtype == object:
        out = np.empty(arr.T.shape, dtype=h5py.ref_dtype)
        flat_src = arr.T.reshape(-1)
        flat_dst = out.reshape(-1)
        for i, item in enumerate(flat_src):
            child = namer()
            if item is None:
                item = np.zeros((0, 0))
            flat_dst[i] = _write_value(refs, child, item, refs, namer, compress).ref
        ds = parent.create_dataset(name, data=out, dtype=h5py.ref_dtype)
        _set_class(ds, "cell")
        return ds
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
        cls = "logical"
    else:
        cls = _CLASS_OF_DTYPE.get(arr.dtype)
        if cls is None:
            raise TypeError(f"cannot write dtype {arr.dtype} to a MAT-file")
    if arr.ndim < 2:
        arr = arr.reshape(1, -1) if arr.ndim == 1 else arr.reshape(1, 1)
    if arr.size == 0:
        ds = parent.create_dataset(name, data=np.array(arr.shape, dtype=np.uint64))
        _set_class(ds, cls)
        ds.attrs.create("MATLAB_empty", np.uint8(1))
        return ds
    data = np.ascontiguousarray(arr.T)
    kwargs = {"compression": "gzip", "compression_opts": 3} if compress and data.size > 4096 else {}
    ds = parent.create_dataset(name, data=data, **kwargs)
    _set_class(ds, cls)
    if cls == "logical":
        ds.attrs.create("MATLAB_int_decode", np.int32(1))
    return ds


def write_mat73(
    path: str | os.PathLike, variables: dict, *, created: str = DEFAULT_CREATED, compress: bool = False
) -> Path:
    """Write ``variables`` (numeric arrays; object arrays = cell arrays, None = empty cell) as a v7.3 MAT-file.

    Written to a temp name and renamed, so a reader never sees half a file.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        _write_v73(tmp, variables, created, compress)
    return path


def _write_v73(tmp: Path, variables, created: str, compress: bool) -> None:
    with h5py.File(tmp, "w", userblock_size=USERBLOCK_SIZE, libver="earliest") as f:
        refs = f.create_group("#refs#")
        namer = _RefNamer()
        # MATLAB keeps one canonical empty array first in #refs#.
        canon = refs.create_dataset(namer(), data=np.array([0, 0], dtype=np.uint64))
        _set_class(canon, "canonical empty")
        canon.attrs.create("MATLAB_empty", np.uint8(1))
        for name, value in variables.items():
            _write_value(f, name, value, refs, namer, compress)
    text = f"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: {created} HDF5 schema 1.00 .".encode()
    header = text.ljust(116, b" ") + b"\x00" * 8 + (0x0200).to_bytes(2, "little") + b"IM"
    with open(tmp, "r+b") as fh:
        fh.write(header.ljust(USERBLOCK_SIZE, b"\x00"))
