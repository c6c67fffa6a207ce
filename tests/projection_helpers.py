"""Helpers shared by the projection tests: fold into a real SQLite file, read a file back for comparison."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from projections.db import ProjectionDB
from projections.snapshots import Plan
from projections.state import LedgerState
from projections.uncommitted import Uncommitted

STATE_TABLES = {
    "agents": "SELECT * FROM agents ORDER BY agent_id",
    "beats": "SELECT * FROM beats ORDER BY agent_id",
    "sessions": "SELECT * FROM sessions ORDER BY session_id",
    "routes": "SELECT * FROM routes ORDER BY route_id",
    "pools": "SELECT * FROM pools ORDER BY pool",
    "anomalies": "SELECT * FROM anomalies ORDER BY stream, seq",
    "dead_letters": "SELECT * FROM dead_letters ORDER BY stream, reason",
    "checkpoints": "SELECT stream, seq, stored_ns, anomalies FROM checkpoints ORDER BY stream",
    "meta": "SELECT * FROM meta ORDER BY key",
    **{f"{kind}_versions": f"SELECT * FROM {kind}_versions ORDER BY seq" for kind in ("agent", "session", "route",
                                                                                      "pool", "beat")},
    "session_checkpoints": "SELECT * FROM session_checkpoints ORDER BY seq",
}
"""Everything a projection holds (checkpoints without their wall-clock commit time)."""

NOT_COMPARED = {"snapshots": "a cache of the fold, taken where batches happened to end"}


def dump(path: Path | str) -> dict[str, list[tuple[Any, ...]]]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return {table: conn.execute(sql).fetchall() for table, sql in STATE_TABLES.items()}


async def commit_batches(path: Path, batches: Sequence[Sequence[Any]], *, snapshot_every: int = 0,
                         state: LedgerState | None = None) -> LedgerState:
    """Fold each batch and commit it, as the projector does; returns the folded state."""
    state = state if state is not None else LedgerState()
    async with await ProjectionDB.open(path) as db:
        plan = Plan(snapshot_every, 4, {s: await db.snapshot_seqs(s) for s in ("LEDGER", "LEDGER_HB")})
        for items in batches:
            pending = Uncommitted()
            for item in items:
                pending.note(state.apply(item), item)
            await db.commit(pending.batch(state, plan))
    return state


async def load(path: Path) -> LedgerState:
    async with await ProjectionDB.open(path) as db:
        return await db.load_state()


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll `check` until it holds (tests never sleep to synchronise)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not hold within {timeout} s")
        await asyncio.sleep(0.02)
