"""Rebuild a projection from zero: fold both streams into a new file, then swap it in.

The old file stays readable until the new one is complete; the swap is one
rename. The target's lock is held throughout, so a projector cannot write the
old file meanwhile (stop it first; it refuses to start while a rebuild runs).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from ledger.store import EventStore

from .filelock import FileLock
from .projector import Progress, Projector
from .settings import ProjectionSettings
from .state import STREAMS


class RebuildResult(msgspec.Struct, frozen=True):
    path: str
    positions: dict[str, int]
    events: int
    seconds: float


def _remove(path: Path) -> None:
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}.lock")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


async def rebuild(store: EventStore, settings: ProjectionSettings,
                  progress: Callable[[Progress], None] | None = None) -> RebuildResult:
    """Fold both streams from zero into `settings.db`; the state equals what a projector maintains."""
    target = Path(settings.db)
    lock = FileLock(target)
    lock.acquire()
    scratch = target.with_name(target.name + ".rebuild")
    started = time.monotonic()
    try:
        _remove(scratch)
        projector = Projector(store, settings.replace(db=str(scratch)), name="rebuild", on_progress=progress)
        await projector.open()
        try:
            await projector.catch_up()
            assert projector.db is not None
            # One self-contained file to move: fold the write-ahead log back in.
            await projector.db.conn.execute_fetchall("PRAGMA wal_checkpoint(TRUNCATE)")
            await projector.db.conn.execute_fetchall("PRAGMA journal_mode = DELETE")
        finally:
            await projector.close()
        # A leftover -wal of the old file would be replayed into the new one: remove it first.
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                Path(f"{target}{suffix}").unlink()
        os.replace(scratch, target)
        _remove(scratch)
        return RebuildResult(str(target), {s: projector.state.position(s) for s in STREAMS}, projector.events,
                             time.monotonic() - started)
    finally:
        lock.release()
