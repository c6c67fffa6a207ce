"""What a projector process needs from its host: one writer per file, and a collector tuned for folding."""

from __future__ import annotations

import gc
import os
from pathlib import Path

from .errors import DatabaseBusy
from .filelock import try_lock, write_holder


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


def tune_gc() -> None:
    """Fewer garbage collections for a process that folds a stream; call once at its start.

    Folding allocates a new frozen struct per event; with CPython's default
    young-generation threshold (700 allocations) the collector costs a catch-up
    10-15 %. Collections still happen, only less often; what is alive at the
    call (modules, a loaded state) is moved out of the collector's way.
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
