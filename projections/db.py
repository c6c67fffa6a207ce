"""The projection's SQLite file, through aiosqlite: open, load, commit a batch, read.

One writer (the projector) commits each batch - dirty rows, new anomalies,
dead-letter counters, checkpoints and any snapshot - in one transaction, so
rows and checkpoint can never disagree. Readers open their own connection and
read inside one transaction, so a query sees a single committed batch.

WAL with synchronous=NORMAL: a killed process loses nothing that committed; a
power cut may lose the last commits, but rows and checkpoint go back together.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import aiosqlite
import msgspec

from ledger.codec import from_ns
from ledger.lifecycle import AgentState, PoolState, RouteState, SessionState
from ledger.subjects import HEARTBEAT_STREAM, LEDGER_STREAM

from . import rows, snapshots
from .beats import Beat
from .errors import DatabaseMissing, ProjectionError
from .schema import PROJECTION_SCHEMA_VERSION, TABLES, statements
from .state import AnomalyRecord, LedgerState


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
    """(stream, seq, stored_ns, created_ns, encoded state): compressed on the way in."""
    drop_snapshots: list[tuple[str, int]]


class Checkpoint(msgspec.Struct, frozen=True):
    stream: str
    seq: int
    stored_ns: int
    anomalies: int
    updated_ns: int


class DeadLetterCount(msgspec.Struct, frozen=True, kw_only=True):
    stream: str
    reason: str
    count: int
    last_seq: int
    last_subject: str
    last_detail: str


class SnapshotRow(NamedTuple):
    stream: str
    seq: int
    stored_ns: int
    data: bytes


def _in(column: str, values: Iterable[str] | None) -> tuple[str, list[Any]]:
    if values is None:
        return "", []
    values = list(values)
    return f" AND {column} IN ({','.join('?' * len(values))})", values


class ProjectionDB:
    """One aiosqlite connection to a projection file; `open` for the writer, `open(readonly=True)` for queries."""

    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path
        self.reset = False
        """True when `open` found another schema version and dropped everything (a rebuild follows)."""

    @classmethod
    async def open(cls, path: str | Path, *, readonly: bool = False, cache_mb: int = 32) -> ProjectionDB:
        path = Path(path)
        if readonly and not path.exists():
            raise DatabaseMissing(f"no projection at {path}: run `ledger project` (or `ledger rebuild`) first")
        if not readonly:
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = await aiosqlite.connect(path, isolation_level=None)
        except Exception as e:  # sqlite3.OperationalError: a directory, no permission, ...
            raise ProjectionError(f"cannot open the projection at {path}: {e}") from None
        db = cls(conn, path)
        try:
            await conn.execute_fetchall(f"PRAGMA cache_size = {-1024 * cache_mb}")
            if readonly:
                await conn.execute_fetchall("PRAGMA query_only = ON")
                await db._check_version()
            else:
                await conn.execute_fetchall("PRAGMA journal_mode = WAL")
                await conn.execute_fetchall("PRAGMA synchronous = NORMAL")
                await db._ensure_schema()
        except sqlite3.DatabaseError as e:
            await conn.close()
            raise ProjectionError(f"{path} is not a projection database: {e}") from None
        except BaseException:
            await conn.close()
            raise
        return db

    async def close(self) -> None:
        await self.conn.close()

    async def __aenter__(self) -> ProjectionDB:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _version(self) -> int | None:
        if not await self.conn.execute_fetchall("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'meta'"):
            return None
        value = await self.meta("schema_version")
        return int(value) if value is not None else None

    async def _check_version(self) -> None:
        version = await self._version()
        if version != PROJECTION_SCHEMA_VERSION:
            raise ProjectionError(
                f"{self.path} holds projection schema {version}; this version reads {PROJECTION_SCHEMA_VERSION}: "
                "start the projector (`ledger project`), it rebuilds the file")

    async def _ensure_schema(self) -> None:
        version = await self._version()
        if version == PROJECTION_SCHEMA_VERSION:
            return
        async with self.transaction():
            for table in TABLES:
                await self.conn.execute(f"DROP TABLE IF EXISTS {table}")
            for statement in statements():
                await self.conn.execute(statement)
            await self.conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(PROJECTION_SCHEMA_VERSION),))
        self.reset = version is not None

    @contextlib.asynccontextmanager
    async def transaction(self, mode: str = "IMMEDIATE") -> AsyncIterator[None]:
        await self.conn.execute(f"BEGIN {mode}")
        try:
            yield
        except BaseException:
            with contextlib.suppress(Exception):
                await self.conn.execute("ROLLBACK")
            raise
        await self.conn.execute("COMMIT")

    def reading(self) -> contextlib.AbstractAsyncContextManager[None]:
        """One consistent view of the file across several SELECTs."""
        return self.transaction("DEFERRED")

    async def meta(self, key: str) -> str | None:
        found = list(await self.conn.execute_fetchall("SELECT value FROM meta WHERE key = ?", (key,)))
        return found[0][0] if found else None

    async def set_meta(self, key: str, value: str) -> None:
        await self.conn.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                                (key, value))

    # --- the writer ---------------------------------------------------------------

    async def commit(self, b: Batch) -> None:
        """Write one batch, atomically. Encoding and compression happen here, a piece at a time."""
        loop = asyncio.get_running_loop()
        packed = [(*row[:4], await loop.run_in_executor(_compressor, snapshots.compress, row[4]))
                  for row in b.snapshots]
        c = self.conn
        async with self.transaction():
            for sql, table in ((rows.UPSERT_AGENTS, b.agents), (rows.UPSERT_SESSIONS, b.sessions),
                               (rows.UPSERT_ROUTES, b.routes), (rows.UPSERT_POOLS, b.pools),
                               (rows.UPSERT_BEATS, b.beats)):
                for doc in rows.chunks(table):
                    await c.execute(sql, (doc,))
            if b.anomalies:
                await c.execute(rows.INSERT_ANOMALIES, (rows.anomalies(b.anomalies),))
            if b.dead_letters:
                await c.executemany(rows.UPSERT_DEAD_LETTERS, b.dead_letters)
            await c.executemany(rows.UPSERT_CHECKPOINT, b.checkpoints)
            for snapshot in packed:
                await c.execute("INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?, ?)", snapshot)
            if b.drop_snapshots:
                await c.executemany("DELETE FROM snapshots WHERE stream = ? AND seq = ?", b.drop_snapshots)

    async def load_state(self) -> LedgerState:
        """The folded state as committed: exactly what the fold had at the checkpoints."""
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
            for cp in await self.checkpoints():
                part = state.part(cp.stream)
                part.seq, part.stored_ns, part.anomalies = cp.seq, cp.stored_ns, cp.anomalies
            for d in await self.dead_letters():
                state.part(d.stream).dead_letters[d.reason] = d.count
        return state

    async def snapshot_seqs(self, stream: str) -> list[int]:
        rows_ = await self.conn.execute_fetchall("SELECT seq FROM snapshots WHERE stream = ? ORDER BY seq", (stream,))
        return [r[0] for r in rows_]

    # --- readers --------------------------------------------------------------------

    async def checkpoints(self) -> list[Checkpoint]:
        found = await self.conn.execute_fetchall("SELECT stream, seq, stored_ns, anomalies, updated_ns FROM checkpoints")
        by_stream = {r[0]: Checkpoint(*r) for r in found}
        return [by_stream.get(s, Checkpoint(s, 0, 0, 0, 0)) for s in (LEDGER_STREAM, HEARTBEAT_STREAM)]

    async def nearest_snapshot(self, stream: str, *, seq: int | None = None,
                               stored_ns: int | None = None) -> SnapshotRow | None:
        """The newest snapshot at or before a sequence or a stored time."""
        if seq is not None:
            where, arg = "seq <= ?", seq
        elif stored_ns is not None:
            where, arg = "stored_ns <= ?", stored_ns
        else:
            where, arg = "1 = ?", 1
        found = list(await self.conn.execute_fetchall(
            f"SELECT stream, seq, stored_ns, data FROM snapshots WHERE stream = ? AND {where} ORDER BY seq DESC LIMIT 1",
            (stream, arg)))
        return SnapshotRow(*found[0]) if found else None

    async def agent_states(self, *, pool: str | None = None, ids: Iterable[str] | None = None) -> list[AgentState]:
        sql, args = "SELECT doc FROM agents WHERE 1=1", []
        if pool is not None:
            sql, args = sql + " AND pool = ?", [pool]
        clause, more = _in("agent_id", ids)
        found = await self.conn.execute_fetchall(sql + clause + " ORDER BY agent_id", args + more)
        return [rows.agent_of(r[0]) for r in found]

    async def beats(self, ids: Iterable[str] | None = None) -> dict[str, Beat]:
        clause, args = _in("agent_id", ids)
        found = await self.conn.execute_fetchall("SELECT doc FROM beats WHERE 1=1" + clause, args)
        return {b.agent_id: b for b in (rows.beat_of(r[0]) for r in found)}

    async def session_states(self, *, pool: str | None = None, state: str | None = None, owner: str | None = None,
                             ids: Iterable[str] | None = None) -> list[SessionState]:
        sql, args = "SELECT doc FROM sessions WHERE 1=1", []
        for column, value in (("pool", pool), ("status", state), ("owner", owner)):
            if value is not None:
                sql += f" AND {column} = ?"
                args.append(value)
        clause, more = _in("session_id", ids)
        found = await self.conn.execute_fetchall(sql + clause + " ORDER BY session_id", args + more)
        return [rows.session_of(r[0]) for r in found]

    async def route_states(self, *, session_id: str | None = None, state: str | None = None,
                           ids: Iterable[str] | None = None) -> list[RouteState]:
        sql, args = "SELECT doc FROM routes WHERE 1=1", []
        for column, value in (("session_id", session_id), ("state", state)):
            if value is not None:
                sql += f" AND {column} = ?"
                args.append(value)
        clause, more = _in("route_id", ids)
        found = await self.conn.execute_fetchall(sql + clause + " ORDER BY route_id", args + more)
        return [rows.route_of(r[0]) for r in found]

    async def pool_states(self) -> dict[str, PoolState]:
        found = await self.conn.execute_fetchall("SELECT pool, doc FROM pools")
        return {key: rows.pool_of(doc) for key, doc in found}

    async def owned_counts(self) -> dict[str, int]:
        found = await self.conn.execute_fetchall(
            "SELECT owner, count(*) FROM sessions WHERE owner IS NOT NULL AND status = 'assigned' GROUP BY owner")
        return dict(found)  # type: ignore[arg-type]

    async def session_counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for pool, status, n in await self.conn.execute_fetchall(
                "SELECT pool, status, count(*) FROM sessions GROUP BY pool, status"):
            out.setdefault(pool, {})[status] = n
        return out

    async def anomalies(self, *, kind: str | None = None, entity_kind: str | None = None,
                        entity_id: str | None = None, upto: dict[str, int] | None = None,
                        limit: int | None = None) -> list[AnomalyRecord]:
        """Flagged events, newest first; `upto` = {stream: last sequence to include}."""
        sql, args = "SELECT * FROM anomalies WHERE 1=1", []
        for column, value in (("kind", kind), ("entity_kind", entity_kind), ("entity_id", entity_id)):
            if value is not None:
                sql += f" AND {column} = ?"
                args.append(value)
        if upto is not None:
            parts = " OR ".join("(stream = ? AND seq <= ?)" for _ in upto)
            sql += f" AND ({parts})"
            for stream, seq in upto.items():
                args += [stream, seq]
        sql += " ORDER BY stored_ns DESC, stream, seq DESC"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        found = await self.conn.execute_fetchall(sql, args)
        return [AnomalyRecord(stream=r[0], seq=r[1], stored_at=from_ns(r[2]), entity_kind=r[3], entity_id=r[4],
                              event_type=r[5], producer=r[6], kind=r[7], detail=r[8]) for r in found]

    async def dead_letters(self) -> list[DeadLetterCount]:
        found = await self.conn.execute_fetchall("SELECT * FROM dead_letters ORDER BY stream, reason")
        return [DeadLetterCount(stream=r[0], reason=r[1], count=r[2], last_seq=r[3], last_subject=r[4],
                                last_detail=r[5]) for r in found]


def now_ns() -> int:
    return time.time_ns()
