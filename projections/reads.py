"""The read side of the projection's SQLite file: one connection, consistent reads, and every query on it.

Nothing here writes. A reader opens its own connection (`ProjectionDB.open(path, readonly=True)`) and reads
inside one transaction (`reading`), so a query sees a single committed batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import aiosqlite
import msgspec

from ledger.codec import from_ns
from ledger.lifecycle import AgentState, PoolState, RouteState, SessionState
from ledger.subjects import HEARTBEAT_STREAM, LEDGER_STREAM

from . import rows
from .beats import Beat
from .state import AnomalyRecord


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


# Per entity that existed at #{n} (its creating version is at or before it), its newest version at or before
# #{n}: a range of the partial index on creations, then one seek each on (id, seq). It has the columns of the
# table of current rows.
_AS_OF = """(
SELECT * FROM {kind}_versions WHERE seq IN (
    SELECT (SELECT v.seq FROM {kind}_versions AS v WHERE v.{key} = f.{key} AND v.seq <= {n} ORDER BY v.seq DESC
            LIMIT 1)
    FROM {kind}_versions AS f WHERE f.first = 1 AND f.seq <= {n}))"""
_SESSIONS_AS_OF = """(
SELECT v.seq, v.session_id, v.first, v.pool, v.status, v.owner, v.checkpoint,
       iif(v.checkpoint IS NULL, v.doc, json_set(v.doc, '$.checkpoint', json(c.doc))) AS doc
FROM session_versions AS v LEFT JOIN session_checkpoints AS c ON c.seq = v.checkpoint
WHERE v.seq IN (
    SELECT (SELECT w.seq FROM session_versions AS w WHERE w.session_id = f.session_id AND w.seq <= {n}
            ORDER BY w.seq DESC LIMIT 1)
    FROM session_versions AS f WHERE f.first = 1 AND f.seq <= {n}))"""
"""The same for sessions, each version's document given back its checkpoint (kept once, by the sequence that
wrote it: `session_checkpoints`). A view that does not read `doc` (a count) joins nothing."""
# One page as of #n, by id: walk the ids in order (each step one seek on (id, seq): the next id after the last,
# whether or not it existed at #n), take each one's newest version at or before #n (one more seek; none: it did
# not exist yet - an entity's oldest version is always the one that created it), and stop as soon as the page is
# full, so a page costs its rows and the ids it passed over, not every entity. SQLite yields a recursive table's
# rows in the order it queues them, and the walk is the outer loop of the join: the rows come in id order. With
# given ids (`_LISTED`: a sorted JSON array) it is the same, without the walk.
_WALK = """WITH RECURSIVE walk(id) AS (
    SELECT (SELECT min({key}) FROM {kind}_versions{after})
    UNION ALL
    SELECT (SELECT min({key}) FROM {kind}_versions WHERE {key} > walk.id) FROM walk WHERE walk.id IS NOT NULL)
"""
_LISTED = "WITH walk(id) AS (SELECT value FROM json_each(CAST(? AS TEXT)))\n"
_LATEST = """SELECT {doc} FROM walk CROSS JOIN {kind}_versions AS v ON v.seq = (
    SELECT max(w.seq) FROM {kind}_versions AS w WHERE w.{key} = walk.id AND w.seq <= ?){join}
WHERE 1=1"""
_DOC = {"session": ("iif(v.checkpoint IS NULL, v.doc, json_set(v.doc, '$.checkpoint', json(c.doc)))",
                    " LEFT JOIN session_checkpoints AS c ON c.seq = v.checkpoint")}
"""Kind -> how a version's document is read, and the join it needs (a session's checkpoint, kept apart)."""
_BEATS_AS_OF = """
SELECT (SELECT doc FROM beat_versions AS v WHERE v.agent_id = ids.value AND v.seq <= :n ORDER BY v.seq DESC LIMIT 1)
FROM json_each(CAST(:ids AS TEXT)) AS ids
"""


def _table(name: str, as_of: int | None) -> str:
    """The table of current rows, or (`as_of` a LEDGER sequence) the same rows as they were right after it."""
    if as_of is None:
        return name
    kind = name.removesuffix("s")
    if kind == "session":
        return _SESSIONS_AS_OF.format(n=int(as_of))
    return _AS_OF.format(kind=kind, key=rows.VERSION_COLUMNS[kind][0], n=int(as_of))


def _in(column: str, values: Iterable[str] | None) -> tuple[str, list[Any]]:
    if values is None:
        return "", []
    values = list(values)
    return f" AND {column} IN ({','.join('?' * len(values))})", values


def _page(key: str, limit: int | None, offset: int, after: str | None) -> tuple[str, str, list[Any], list[Any]]:
    """(where clause, ORDER BY/LIMIT tail, their args) for one page by `key`: the SQL twin of views.paged."""
    where, args = (f" AND {key} > ?", [after]) if after is not None else ("", [])
    tail = f" ORDER BY {key}" + (" LIMIT ? OFFSET ?" if limit is not None or offset else "")
    return where, tail, args, ([-1 if limit is None else limit, offset] if limit is not None or offset else [])


def _counted(kind: str, filtered: bool) -> str | None:
    """Without a filter, how many entities existed at #`as_of`: the distinct ids created by then (a range of the
    partial index on creations; an id created again counts once), not a newest version per id."""
    if filtered:
        return None
    return f"SELECT count(DISTINCT {rows.VERSION_COLUMNS[kind][0]}) FROM {kind}_versions WHERE first = 1 AND seq <= ?"


def _equal(filters: Iterable[tuple[str, str | None]]) -> tuple[str, list[Any]]:
    sql, args = "", []
    for column, value in filters:
        if value is not None:
            sql += f" AND {column} = ?"
            args.append(value)
    return sql, args


class ProjectionReads:
    """Queries over one aiosqlite connection to a projection file."""

    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path
        self._one_transaction = asyncio.Lock()
        """A connection holds one transaction at a time: two callers (an HTTP request and a query-service request,
        say) each beginning one would fail ("cannot start a transaction within a transaction") or read inside the
        other's. They take turns."""

    @contextlib.asynccontextmanager
    async def transaction(self, mode: str = "IMMEDIATE") -> AsyncIterator[None]:
        async with self._one_transaction:
            await self.conn.execute(f"BEGIN {mode}")
            try:
                yield
            except BaseException:
                with contextlib.suppress(sqlite3.Error):  # no transaction left to roll back (SQLite ended it)
                    await self.conn.execute("ROLLBACK")
                raise
            await self.conn.execute("COMMIT")

    def reading(self) -> contextlib.AbstractAsyncContextManager[None]:
        """One consistent view of the file across several SELECTs."""
        return self.transaction("DEFERRED")

    async def meta(self, key: str) -> str | None:
        found = list(await self.conn.execute_fetchall("SELECT value FROM meta WHERE key = ?", (key,)))
        return found[0][0] if found else None

    async def checkpoints(self) -> list[Checkpoint]:
        found = await self.conn.execute_fetchall(
            "SELECT stream, seq, stored_ns, anomalies, updated_ns FROM checkpoints")
        by_stream = {r[0]: Checkpoint(*r) for r in found}
        return [by_stream.get(s, Checkpoint(s, 0, 0, 0, 0)) for s in (LEDGER_STREAM, HEARTBEAT_STREAM)]

    async def nearest_snapshot(self, stream: str, *, seq: int | None = None, stored_ns: int | None = None,
                               with_data: bool = True, ledger_seq: int | None = None,
                               ledger_ns: int | None = None) -> SnapshotRow | None:
        """The newest snapshot at or before a sequence or a stored time (`with_data=False`: data is b""), taken
        while the lifecycle fold stood at or before `ledger_seq` and `ledger_ns` (if given)."""
        if seq is not None:
            where, args = "seq <= ?", [seq]
        elif stored_ns is not None:
            where, args = "stored_ns <= ?", [stored_ns]
        else:
            where, args = "1 = ?", [1]
        for column, bound in (("ledger_seq", ledger_seq), ("ledger_ns", ledger_ns)):
            if bound is not None:
                where, args = where + f" AND {column} <= ?", [*args, bound]
        data = "data" if with_data else "x''"
        found = list(await self.conn.execute_fetchall(
            f"SELECT stream, seq, stored_ns, {data} FROM snapshots "
            f"WHERE stream = ? AND {where} "
            "ORDER BY seq DESC LIMIT 1",
            (stream, *args)))
        return SnapshotRow(*found[0]) if found else None

    async def beats_from(self) -> int:
        """The first LEDGER_HB sequence `beats_as_of` answers exactly (older beat versions are pruned; 0: none)."""
        value = await self.meta(rows.BEATS_FROM)
        return int(value) if value is not None else 0

    async def beats_as_of(self, hb_seq: int, ids: Iterable[str]) -> dict[str, Beat]:
        """The kept beats of these agents as of LEDGER_HB #`hb_seq` (agents without any are left out), for
        `hb_seq` at or after `beats_from()`."""
        found = await self.conn.execute_fetchall(_BEATS_AS_OF, {"n": hb_seq, "ids": rows.ids(ids)})
        return {b.agent_id: b for b in (rows.beat_of(r[0]) for r in found if r[0] is not None)}

    # Each read below is of the current rows, or with `as_of` (a LEDGER sequence) of the version rows: the
    # state the fold had right after applying it.

    async def _latest(self, kind: str, as_of: int, equal: list[tuple[str, str | None]], *,
                      among: tuple[str, Iterable[str] | None] = ("", None), ids: Iterable[str] | None = None,
                      limit: int | None = None, offset: int = 0, after: str | None = None) -> list[str]:
        """The documents of one page (or of these ids) as of #`as_of`, in id order (`_WALK`, `_LISTED`), of the
        versions whose columns equal `equal` and have `among`'s column among its values."""
        key = rows.VERSION_COLUMNS[kind][0]
        start: list[Any]
        if ids is not None:
            head, start = _LISTED, [rows.ids(sorted({i for i in ids if after is None or i > after}))]
        else:
            head = _WALK.format(key=key, kind=kind, after=f" WHERE {key} > ?" if after is not None else "")
            start = [after] if after is not None else []
        doc, join = _DOC.get(kind, ("v.doc", ""))
        sql, args = _equal((f"v.{column}", value) for column, value in equal)
        clause, more = _in(f"v.{among[0]}", among[1])
        tail, bounds = (" LIMIT ? OFFSET ?", [-1 if limit is None else limit, offset]) if limit is not None or offset \
            else ("", [])
        found = await self.conn.execute_fetchall(
            head + _LATEST.format(doc=doc, kind=kind, key=key, join=join) + sql + clause + tail,
            [*start, int(as_of), *args, *more, *bounds])
        return [r[0] for r in found]

    async def has_agents(self, *, as_of: int) -> bool:
        """Whether any agent had registered by LEDGER #`as_of` (one seek on the partial index on creations)."""
        found = list(await self.conn.execute_fetchall(
            "SELECT EXISTS (SELECT 1 FROM agent_versions WHERE first = 1 AND seq <= ?)", (int(as_of),)))
        return bool(found[0][0])

    async def agent_states(self, *, pool: str | None = None, ids: Iterable[str] | None = None,
                           limit: int | None = None, offset: int = 0, after: str | None = None,
                           as_of: int | None = None) -> list[AgentState]:
        if as_of is not None and (limit is not None or offset or ids is not None):
            return [rows.agent_of(d) for d in await self._latest("agent", as_of, [("pool", pool)], ids=ids,
                                                                 limit=limit, offset=offset, after=after)]
        sql, args = _equal([("pool", pool)])
        clause, more = _in("agent_id", ids)
        where, tail, page, bounds = _page("agent_id", limit, offset, after)
        found = await self.conn.execute_fetchall(f"SELECT doc FROM {_table('agents', as_of)} WHERE 1=1" + sql + clause
                                                 + where + tail,
                                                 args + more + page + bounds)
        return [rows.agent_of(r[0]) for r in found]

    async def count_agents(self, *, pool: str | None = None, as_of: int | None = None) -> int:
        """How many agents `agent_states` would give without a page (one COUNT on the same filters)."""
        sql, args = _equal([("pool", pool)])
        return await self._count("agents", sql, args, as_of)

    async def _count(self, name: str, where: str, args: list[Any], as_of: int | None = None) -> int:
        """count(*) of table `name`'s rows (as of LEDGER #`as_of`: of the entities then) that match `where`."""
        fast = _counted(name.removesuffix("s"), bool(where)) if as_of is not None else None
        sql = fast or f"SELECT count(*) FROM {_table(name, as_of)} WHERE 1=1" + where
        found = list(await self.conn.execute_fetchall(sql, [as_of] if fast else args))
        return int(found[0][0])

    async def beats(self, ids: Iterable[str] | None = None) -> dict[str, Beat]:
        clause, args = _in("agent_id", ids)
        found = await self.conn.execute_fetchall("SELECT doc FROM beats WHERE 1=1" + clause, args)
        return {b.agent_id: b for b in (rows.beat_of(r[0]) for r in found)}

    async def session_states(self, *, pool: str | None = None, state: str | None = None, owner: str | None = None,
                             ids: Iterable[str] | None = None, limit: int | None = None, offset: int = 0,
                             after: str | None = None, as_of: int | None = None) -> list[SessionState]:
        if as_of is not None and (limit is not None or offset or ids is not None):
            return [rows.session_of(d) for d in await self._latest(
                "session", as_of, [("pool", pool), ("status", state), ("owner", owner)], ids=ids, limit=limit,
                offset=offset, after=after)]
        sql, args = _equal([("pool", pool), ("status", state), ("owner", owner)])
        clause, more = _in("session_id", ids)
        where, tail, page, bounds = _page("session_id", limit, offset, after)
        found = await self.conn.execute_fetchall(f"SELECT doc FROM {_table('sessions', as_of)} WHERE 1=1" + sql
                                                 + clause + where + tail,
                                                 args + more + page + bounds)
        return [rows.session_of(r[0]) for r in found]

    async def count_sessions(self, *, pool: str | None = None, state: str | None = None,
                             owner: str | None = None, as_of: int | None = None) -> int:
        """How many sessions `session_states` would give without a page (one COUNT, indexed by pool or owner)."""
        sql, args = _equal([("pool", pool), ("status", state), ("owner", owner)])
        return await self._count("sessions", sql, args, as_of)

    async def route_states(self, *, session_id: str | None = None, state: str | None = None,
                           ids: Iterable[str] | None = None, states: Iterable[str] | None = None,
                           limit: int | None = None, offset: int = 0, after: str | None = None,
                           as_of: int | None = None) -> list[RouteState]:
        if as_of is not None and (limit is not None or offset or ids is not None):
            return [rows.route_of(d) for d in await self._latest(
                "route", as_of, [("session_id", session_id), ("state", state)], among=("state", states), ids=ids,
                limit=limit, offset=offset, after=after)]
        sql, args = _equal([("session_id", session_id), ("state", state)])
        clause, more = _in("route_id", ids)
        among, of = _in("state", states)
        where, tail, page, bounds = _page("route_id", limit, offset, after)
        found = await self.conn.execute_fetchall(f"SELECT doc FROM {_table('routes', as_of)} WHERE 1=1" + sql + clause
                                                 + among + where
                                                 + tail, args + more + of + page + bounds)
        return [rows.route_of(r[0]) for r in found]

    async def count_routes(self, *, session_id: str | None = None, state: str | None = None,
                           states: Iterable[str] | None = None, as_of: int | None = None) -> int:
        """How many routes `route_states` would give without a page (one COUNT on the same filters)."""
        sql, args = _equal([("session_id", session_id), ("state", state)])
        among, of = _in("state", states)
        return await self._count("routes", sql + among, args + of, as_of)

    async def pool_states(self, *, as_of: int | None = None) -> dict[str, PoolState]:
        found = await self.conn.execute_fetchall(f"SELECT pool, doc FROM {_table('pools', as_of)}")
        return {key: rows.pool_of(doc) for key, doc in found}

    async def owned_counts(self, owners: Iterable[str] | None = None, *, as_of: int | None = None) -> dict[str, int]:
        clause, args = _in("owner", owners)
        found = await self.conn.execute_fetchall(
            f"SELECT owner, count(*) FROM {_table('sessions', as_of)} WHERE owner IS NOT NULL AND status = 'assigned'"
            + clause + " GROUP BY owner", args)
        return dict(found)  # type: ignore[arg-type]

    async def session_counts(self, *, as_of: int | None = None) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for pool, status, n in await self.conn.execute_fetchall(
                f"SELECT pool, status, count(*) FROM {_table('sessions', as_of)} GROUP BY pool, status"):
            out.setdefault(pool, {})[status] = n
        return out

    async def anomalies(self, *, kind: str | None = None, entity_kind: str | None = None,
                        entity_id: str | None = None, upto: dict[str, int] | None = None,
                        limit: int | None = None, offset: int = 0) -> list[AnomalyRecord]:
        """Flagged events, newest first; `upto` = {stream: last sequence to include}."""
        where, args = _anomalies_where(kind, entity_kind, entity_id, upto)
        sql = "SELECT * FROM anomalies WHERE 1=1" + where + " ORDER BY stored_ns DESC, stream, seq DESC"
        if limit is not None or offset:
            sql += " LIMIT ? OFFSET ?"
            args += [-1 if limit is None else limit, offset]
        found = await self.conn.execute_fetchall(sql, args)
        return [AnomalyRecord(stream=r[0], seq=r[1], stored_at=from_ns(r[2]), entity_kind=r[3], entity_id=r[4],
                              event_type=r[5], producer=r[6], kind=r[7], detail=r[8]) for r in found]

    async def count_anomalies(self, *, kind: str | None = None, entity_kind: str | None = None,
                              entity_id: str | None = None, upto: dict[str, int] | None = None) -> int:
        """How many flagged events `anomalies` would give without a limit (one COUNT on the same filters)."""
        where, args = _anomalies_where(kind, entity_kind, entity_id, upto)
        return await self._count("anomalies", where, args)

    async def anomaly_counts(self) -> dict[str, int]:
        """Kind -> flagged events of that kind (what /metrics exports)."""
        return dict(await self.conn.execute_fetchall("SELECT kind, count(*) FROM anomalies GROUP BY kind"))  # type: ignore[arg-type]

    async def dead_letters(self) -> list[DeadLetterCount]:
        found = await self.conn.execute_fetchall("SELECT * FROM dead_letters ORDER BY stream, reason")
        return [DeadLetterCount(stream=r[0], reason=r[1], count=r[2], last_seq=r[3], last_subject=r[4],
                                last_detail=r[5]) for r in found]


def _anomalies_where(kind: str | None, entity_kind: str | None, entity_id: str | None,
                     upto: dict[str, int] | None) -> tuple[str, list[Any]]:
    sql, args = _equal([("kind", kind), ("entity_kind", entity_kind), ("entity_id", entity_id)])
    if upto is not None:
        sql += " AND (" + " OR ".join("(stream = ? AND seq <= ?)" for _ in upto) + ")"
        for stream, seq in upto.items():
            args += [stream, seq]
    return sql, args
