"""One process at a time: an exclusive flock on a file, released by the OS however the holder dies.

The projector locks `<db>.lock` (one writer per projection file); `ledger server`
and `ledger up` lock the embedded server's data directory (two nats-servers on
one store corrupt it). Both lock here.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .errors import DatabaseBusy


def try_lock(path: Path) -> int | None:
    """The open fd of `path` (created if missing) holding an exclusive lock, or None while another holds it.

    Never waits. The lock lasts while the fd is open - in this process, or in a child it was passed to.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def write_holder(fd: int, text: str) -> None:
    """Say in the locked file who holds it (pids), for the message of whoever is refused next."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode(), 0)


class FileLock:
    """An exclusive lock on `<db>.lock`, so two projectors never write one file (released by the OS on kill)."""

    def __init__(self, db: Path) -> None:
        self.path = db.with_name(db.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = try_lock(self.path)
        if fd is None:
            raise DatabaseBusy(f"another projector or rebuild is using {self.path.with_suffix('')}")
        write_holder(fd, str(os.getpid()))
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
