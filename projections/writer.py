"""The writer of the projection's SQLite file: each batch - rows and checkpoints - in one transaction.

One writer (the projector) commits each batch - dirty rows, new anomalies,
dead-letter counters, checkpoints and any snapshot - in one transaction, so
rows and checkpoint can never disagree; `load_state` reads back exactly the
state the last checkpoints name.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType
from typing import Any, NamedTuple

from ledger.lifecycle import AgentState, PoolState, RouteState, SessionState

from . import rows, snapshots
from .beats import Beat, merged
from .reads import ProjectionReads
from .state import HEARTBEAT, SESSION, LedgerState
from .versions import Version

_compressor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="projection-snapshots")
"""One thread for zlib (which releases the GIL): one malloc arena, not one per default-executor thread."""


class Batch(NamedTuple):
    """Everything one transaction writes. Entity states are immutable, so they are kept by reference."""

    agents: dict[str, AgentState]
    sessions: dict[str, SessionState]
    routes: dict[str, RouteState]
    pools: dict[str, PoolState]
    beats: dict[str, Beat]
    anomalies: list[tuple[Any, ...]]
    """(stream, seq, stored_ns, entity_kind, entity_id, event_type, producer, kind, detail)"""
    dead_letters: list[tuple[Any, ...]]
    checkpoints: list[tuple[Any, ...]]
    snapshots: list[tuple[Any, ...]]
    """(stream, seq, stored_ns, created_ns, encoded state, ledger seq, ledger stored ns): compressed on the way in."""
    drop_snapshots: list[tuple[str, int]]
    versions: Mapping[str, Sequence[Version]] = MappingProxyType({})
    """Kind -> every state the batch's changes made, by sequence (`projections.versions`)."""
    prune_beats_below: int = 0
    """Now and then, the first LEDGER_HB sequence of the kept beat history: older beat versions go (each agent
    keeps its beat there), and the file notes from where its beats answer (`beats_from`)."""
    beat_slots: Sequence[tuple[int, str, Beat]] = ()
    """The batch's accepted beats in order: (seq, agent id, slot). Their rows and versions are folded here onto
    each agent's stored record, as the heartbeat stream alone folds them (`beats.merged`)."""


class ProjectionWriter(ProjectionReads):
    """Commits batches to the file and loads the committed state back (it reads what it wrote)."""

    async def set_meta(self, key: str, value: str) -> None:
        await self.conn.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                                (key, value))

    async def commit(self, b: Batch) -> None:
        """Write one batch, atomically. Encoding and compression happen here, a piece at a time."""
        loop = asyncio.get_running_loop()
        packed = [(*row[:4], await loop.run_in_executor(_compressor, snapshots.compress, row[4]), *row[5:])
                  for row in b.snapshots]
        c = self.conn
        async with self.transaction():
            beat_rows, beat_versions = await self._beats(b)
            for sql, table in ((rows.UPSERT_AGENTS, b.agents), (rows.UPSERT_SESSIONS, b.sessions),
                               (rows.UPSERT_ROUTES, b.routes), (rows.UPSERT_POOLS, b.pools),
                               (rows.UPSERT_BEATS, beat_rows)):
                for doc in rows.chunks(table):
                    await c.execute(sql, (doc,))
            if b.anomalies:
                await c.execute(rows.INSERT_ANOMALIES, (rows.anomalies(b.anomalies),))
            if b.dead_letters:
                await c.executemany(rows.UPSERT_DEAD_LETTERS, b.dead_letters)
            await c.executemany(rows.UPSERT_CHECKPOINT, b.checkpoints)
            for kind, versions in (*b.versions.items(), (HEARTBEAT, beat_versions)):
                for chunk in rows.version_chunks(kind, versions):
                    await c.execute(rows.INSERT_VERSIONS[kind], chunk)
                if kind == SESSION:
                    for cps in rows.checkpoint_chunks(versions):
                        await c.execute(rows.INSERT_CHECKPOINTS, (cps,))
            if b.prune_beats_below > 1:  # below #1 nothing goes, and nothing is noted (a rebuild would not note it)
                await c.execute(rows.PRUNE_BEAT_VERSIONS, {"below": b.prune_beats_below})
                await c.execute(rows.NOTE_BEATS_FROM, {"below": b.prune_beats_below})
            for snapshot in packed:
                await c.execute("INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?, ?, ?, ?)", snapshot)
            if b.drop_snapshots:
                await c.executemany("DELETE FROM snapshots WHERE stream = ? AND seq = ?", b.drop_snapshots)

    async def _beats(self, b: Batch) -> tuple[dict[str, Beat], list[Version]]:
        """The beat rows and versions of a batch: its beats folded onto each agent's stored record. Read back, not
        taken from the fold in memory: retirement trims that one, and it cannot tell what it lost (a record
        dropped, then begun again by the agent's next life) - one indexed read per beating agent and batch."""
        if not b.beat_slots:
            return dict(b.beats), []
        bases: dict[str, Beat | None] = {}
        found = await self.conn.execute_fetchall(
            "SELECT agent_id, doc FROM beats WHERE agent_id IN (SELECT value FROM json_each(CAST(? AS TEXT)))",
            (rows.ids({agent_id for _, agent_id, _ in b.beat_slots}),))
        for key, doc in found:
            bases[key] = rows.beat_of(doc)
        records, versions = merged(bases, list(b.beat_slots))
        return {**b.beats, **records}, versions

    async def load_state(self) -> LedgerState:
        """The folded state as committed: exactly what the fold had at the checkpoints, once settled with the
        fold's retain (`LedgerState.settle`: the rows keep the entities the fold retired)."""
        state = LedgerState()
        async with self.reading():
            for key, doc in await self.conn.execute_fetchall("SELECT agent_id, doc FROM agents"):
                state.ledger.agents[key] = rows.agent_of(doc)
            for key, doc in await self.conn.execute_fetchall("SELECT session_id, doc FROM sessions"):
                state.ledger.sessions[key] = rows.session_of(doc)
            for key, doc in await self.conn.execute_fetchall("SELECT route_id, doc FROM routes"):
                state.ledger.routes[key] = rows.route_of(doc)
            for key, doc in await self.conn.execute_fetchall("SELECT pool, doc FROM pools"):
                state.ledger.pools[key] = rows.pool_of(doc)
            for key, doc in await self.conn.execute_fetchall("SELECT agent_id, doc FROM beats"):
                state.heartbeats.beats[key] = rows.beat_of(doc)
            agents, lives = state.ledger.agents, state.ledger.lives  # the version that made each agent known
            for key, seq in await self.conn.execute_fetchall(
                    "SELECT agent_id, max(seq) FROM agent_versions WHERE first = 1 GROUP BY agent_id"):
                if key in agents:
                    lives[key] = seq
            for cp in await self.checkpoints():
                part = state.part(cp.stream)
                part.seq, part.stored_ns, part.anomalies = cp.seq, cp.stored_ns, cp.anomalies
            for d in await self.dead_letters():
                state.part(d.stream).dead_letters[d.reason] = d.count
        state.trim_beats()  # the rows are the heartbeat stream's fold; the fold in memory lets go of the past
        return state

    async def snapshot_seqs(self, stream: str) -> list[int]:
        rows_ = await self.conn.execute_fetchall("SELECT seq FROM snapshots WHERE stream = ? ORDER BY seq", (stream,))
        return [r[0] for r in rows_]
