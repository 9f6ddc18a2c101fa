"""The writer lock of an index folder: ``fcntl.flock`` on ``writer.lock``.

The kernel drops a flock when its holder dies, even by ``kill -9``, so a crashed run never
leaves a stale lock behind. The holder's pid is written into the file for the error message.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from reid.errors import GalleryBusyError

LOCK_NAME = "writer.lock"


class WriterLock:
    """An exclusive, non-reentrant lock on one index folder."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if it is free; never waits."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return True

    def acquire(self, wait: float = 0.0) -> None:
        """Take the lock, waiting up to ``wait`` seconds; GalleryBusyError naming the holder otherwise."""
        deadline = time.monotonic() + max(wait, 0.0)
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                holder = self.holder()
                who = f"process {holder}" if holder else "another process"
                where = str(self.path.parent)
                if wait > 0:
                    raise GalleryBusyError(where, f"index {where} is still being written by {who} after "
                                           f"waiting {wait:g} s; try again when it has finished", wait)
                raise GalleryBusyError(where, f"index {where} is being written by {who}; wait for it to finish")
            time.sleep(0.1)

    def holder(self) -> int | None:
        """The pid written by the current holder, when readable."""
        try:
            return int(self.path.read_text().strip() or 0) or None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        """Release the lock (idempotent)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
