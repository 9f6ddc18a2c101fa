"""Extract CUHK03's images from ``cuhk-03.mat`` (MATLAB v7.3) once, atomically, into ``images_{variant}/``.

Names are ``{pair}_{pid:03d}_{view}_{n:02d}.png`` (all 1-based; n runs 1..10 over both views), the names
the new-protocol config files list. The images are written into a temp folder that is renamed into place
with a marker file inside, so a folder under the final name is always complete; an interrupted run
leaves only the temp folder, which the next run removes before starting again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import h5py
import numpy as np

from reid.datasets.matlab import cell_refs, is_mat73, read_ref
from reid.errors import DatasetError

log = logging.getLogger(__name__)

MARKER = ".extracted.json"
VIEWS_PER_ROW = 10  # columns 1-5: view 1, columns 6-10: view 2


@dataclass(frozen=True)
class ClassicInfo:
    """What the classic protocol needs from ``cuhk-03.mat``: identities per camera pair and the 20 test splits."""

    ids_per_pair: tuple[int, ...]
    testsets: tuple[tuple[tuple[int, int], ...], ...]  # per split: (pair, pid) pairs, 1-based


def image_name(pair: int, pid: int, view: int, n: int) -> str:
    """The extracted file name, e.g. ``1_001_1_01.png`` (all arguments 1-based)."""
    return f"{pair}_{pid:03d}_{view}_{n:02d}.png"


def _open(mat_path: Path) -> h5py.File:
    if not is_mat73(mat_path):
        raise DatasetError(
            f"{mat_path}: not a MATLAB v7.3 (HDF5) file; CUHK03's cuhk-03.mat from its owners is v7.3"
        )
    try:
        return h5py.File(mat_path, "r")
    except OSError as e:
        raise DatasetError(f"{mat_path}: cannot read ({e}); the file may be truncated, download it again") from None


def read_classic_info(mat_path: Path, variant: str) -> ClassicInfo:
    """Identities per camera pair (from ``variant``'s cells) and the classic test splits (``testsets``)."""
    with _open(mat_path) as f:
        try:
            pair_refs = cell_refs(f, variant).reshape(-1)
            ids = tuple(int(f[r].shape[-1]) for r in pair_refs)  # an M x 10 cell is stored 10 x M
            splits = []
            for ref in cell_refs(f, "testsets").reshape(-1):
                arr = read_ref(f, ref)
                if arr is None or arr.ndim != 2 or arr.shape[1] != 2:
                    raise ValueError(f"a testsets entry has shape {None if arr is None else arr.shape}, not N x 2")
                splits.append(tuple((int(a), int(b)) for a, b in np.rint(arr).astype(np.int64)))
        except (KeyError, ValueError) as e:
            raise DatasetError(f"{mat_path}: not CUHK03's layout ({e}); "
                               "expected cells 'labeled', 'detected', 'testsets'") from None
    return ClassicInfo(ids, tuple(splits))


def _write_png(path: Path, rgb: np.ndarray) -> None:
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise DatasetError(f"{path}: cannot write the extracted image (disk full or no permission?)")


def _extract_into(mat_path: Path, variant: str, out: Path) -> dict:
    """Write every non-empty image of ``variant`` into ``out``; returns the marker's content."""
    count = 0
    ids_per_pair = []
    with _open(mat_path) as f:
        if variant not in f:
            raise DatasetError(f"{mat_path}: no {variant!r} cell array; is this CUHK03's cuhk-03.mat?")
        for pair, pair_ref in enumerate(cell_refs(f, variant).reshape(-1), start=1):
            cells = read_ref(f, pair_ref)
            if cells is None:
                ids_per_pair.append(0)
                continue
            if cells.ndim != 2 or cells.shape[1] != VIEWS_PER_ROW:
                raise DatasetError(f"{mat_path}: camera pair {pair} holds {cells.shape} cells, expected M x 10")
            ids_per_pair.append(int(cells.shape[0]))
            for pid in range(1, cells.shape[0] + 1):
                for col in range(VIEWS_PER_ROW):
                    img = read_ref(f, cells[pid - 1, col])
                    # Empty cells are stored as a tiny 2-element shape array, never as a 3-D image.
                    if img is None or img.ndim != 3 or img.shape[2] != 3 or min(img.shape[:2]) < 2:
                        continue
                    if img.dtype != np.uint8:
                        img = np.clip(img, 0, 255).astype(np.uint8)
                    view = 1 if col < 5 else 2
                    _write_png(out / image_name(pair, pid, view, col + 1), np.ascontiguousarray(img))
                    count += 1
            log.info("cuhk03 %s: extracted camera pair %d (%d identities)", variant, pair, cells.shape[0])
    return {
        "source": str(mat_path),
        "source_bytes": mat_path.stat().st_size,
        "variant": variant,
        "images": count,
        "ids_per_pair": ids_per_pair,
        "names": "{pair}_{pid:03d}_{view}_{n:02d}.png",
    }


@contextlib.contextmanager
def _locked(lock_path: Path):
    """An exclusive advisory lock, so two processes never extract into the same place at once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: extraction is still atomic, just not serialised
        yield
        return
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_marker(images_dir: Path) -> dict | None:
    """The extraction marker of a complete folder, or None when there is none."""
    try:
        return json.loads((images_dir / MARKER).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None


def ensure_extracted(base: Path, variant: str) -> Path:
    """``base/images_{variant}``, extracted from ``base/cuhk03_release/cuhk-03.mat`` first if it is not there yet.

    A folder that exists without a marker (extracted by another tool) is used as it is.
    """
    dest = base / f"images_{variant}"
    if read_marker(dest) is not None:
        return dest
    mat_path = base / "cuhk03_release" / "cuhk-03.mat"
    if dest.is_dir():
        log.info("cuhk03: using %s as found (not extracted by reid)", dest)
        return dest
    if not mat_path.is_file():
        raise DatasetError(
            f"cuhk03: neither {dest} nor {mat_path} exists; put CUHK03's cuhk03_release/cuhk-03.mat in {base}"
        )
    tmp = base / f".images_{variant}.partial"
    try:
        with _locked(base / f".images_{variant}.lock"):
            if dest.is_dir():  # another process finished while we waited for the lock
                return dest
            if tmp.exists():
                log.warning("cuhk03: removing an interrupted extraction at %s", tmp)
                shutil.rmtree(tmp)
            tmp.mkdir()
            log.warning("cuhk03: extracting %s images from %s (once) ...", variant, mat_path)
            try:
                marker = _extract_into(mat_path, variant, tmp)
                (tmp / MARKER).write_text(json.dumps(marker, indent=1))
                os.rename(tmp, dest)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except PermissionError as e:
        raise DatasetError(f"cuhk03: cannot write the extracted images next to {mat_path} ({e})") from None
    log.info("cuhk03: %d %s images in %s", marker["images"], variant, dest)
    return dest
