"""Atomic replacement of files and folders: a reader sees the old one or the complete new one, never a torn write."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it, rename it over ``path`` and fsync the folder.

    On any failure the temporary file is removed and ``path`` is left as it was. Temporary names are
    ``.NAME.PID.tmp``, so leftovers of a killed process can be found by that pattern.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success swap it in for ``path`` as a whole.

    The files are fsynced, then ``path`` is renamed to ``.NAME.reid-old``, the new folder to ``path``,
    and the old one is removed. A crash leaves either ``path`` (old or new, complete) or, between the
    two renames, only ``.NAME.reid-old``, which ``recover_dir`` renames back. On failure the temporary
    folder ``.NAME.reid-tmp`` is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp, old = _siblings(path)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                _fsync_file(f)
        _fsync_folder(tmp)
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_folder(path.parent)
    if old.exists():
        shutil.rmtree(old)


def _siblings(path: Path) -> tuple[Path, Path]:
    """The temporary and the old folder of an ``atomic_dir`` swap (hidden names no user picks)."""
    return path.with_name(f".{path.name}.reid-tmp"), path.with_name(f".{path.name}.reid-old")


def recover_dir(path: str | os.PathLike) -> bool:
    """Finish what a killed ``atomic_dir`` left: restore the old folder when ``path`` is gone, drop the
    temporary one. Returns True when ``path`` was restored. Call it from writers only (before writing ``path``).
    """
    path = Path(path)
    tmp, old = _siblings(path)
    restored = False
    if not path.exists() and old.exists():
        os.replace(old, path)
        restored = True
    if tmp.exists():
        shutil.rmtree(tmp)
    return restored
