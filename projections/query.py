"""The query API: agents, sessions, routes, pools, anomalies and entity histories - now, or as of the past.

    async with Query.open("ledger-data/projection.sqlite3", store) as q:
        page = await q.agents(pool="gpu", health="alive")
        before = await q.sessions(owner="a-17", as_of=datetime(2026, 11, 1, 14, 3, tzinfo=timezone.utc))
        why = await q.history("session", "s-42")

"Now" reads the projection's SQLite file (as of its checkpoints) and judges
health at the current time. `as_of` (an int: a LEDGER sequence; a datetime: a
moment) reads the state of that moment from the file's version rows and judges
health at that moment: the same SQL reads as now, a page at a time (`_Frame`),
so a page of the past costs about what a page of now does. Without a file, or
past what it has committed, the moment is rebuilt from the nearest snapshot
plus JetStream and paged in memory (`_Snapshot`). Moments are cached (where
the streams stood; a rebuilt state whole), so a dashboard asking for agents,
sessions and pools of one moment maps it once. Every answer is a msgspec
Struct (`msgspec.json.encode` gives the JSON the CLI, the NATS query service
and the HTTP API return).
"""

from __future__ import annotations

import contextlib
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

from ledger.events import utcnow
from ledger.lifecycle import ROUTE_STATES, SESSION_STATES, AgentState, PoolState, RouteState, SessionState, route_status
from ledger.store import EventStore
from ledger.subjects import HEARTBEAT_STREAM, LEDGER_STREAM

from .beats import Beat
from .db import DeadLetterCount, ProjectionDB
from .errors import InvalidQuery, NeedsEventStore, UnknownEntity
from .health import AGENT_HEALTH, DEFAULT_POLICY, HealthPolicy, agent_health
from .history import EntityHistory, entity_history
from .state import AnomalyRecord
from .timespec import aware
from .timetravel import Past, Rebuilt, beats_kept, past_as_of, past_beats, state_as_of
from .views import (
    AgentView,
    Page,
    PoolView,
    Position,
    RouteView,
    SessionView,
    agent_view,
    owned_counts,
    paged,
    pool_views,
    position_time,
    route_view,
    session_view,
)

AsOf = int | datetime | None
"""None: now; an int: a LEDGER stream sequence; a datetime: a moment."""

MAX_LIMIT = 2**63 - 1
"""SQLite's largest INTEGER: a larger LIMIT is not an integer to it (a datatype mismatch, not an answer)."""

ROUTE_STATUSES = ("PROVISIONING", "RUNNING", "FAILED_TO_START", "TERMINATING", "TERMINATED")


def _check_page(limit: int | None, offset: int) -> None:
    if limit is not None and not 1 <= limit <= MAX_LIMIT:
        raise InvalidQuery(f"limit must be 1 to {MAX_LIMIT}, got {limit}")
    if not 0 <= offset <= MAX_LIMIT:
        raise InvalidQuery(f"offset must be 0 to {MAX_LIMIT}, got {offset}")


MMAP_BYTES = 2**31
"""How much of the projection file a reader maps (SQLite caps it at its own maximum, 2 GiB by default)."""

SMALL_PAGE = 500
"""A page at most this long reads its agents' beats and owned counts by id; a longer one reads them all at once
(cheaper than a huge IN list, and within SQLite's bound on parameters)."""


def _ids(ids: list[str]) -> list[str] | None:
    return ids if len(ids) <= SMALL_PAGE else None


def _check(value: str | None, allowed: Iterable[str], what: str) -> None:
    allowed = tuple(allowed)
    if value is not None and value not in allowed:
        raise InvalidQuery(f"unknown {what} {value!r} (one of: {', '.join(allowed)})")


class _Snapshot(NamedTuple):
    """A moment rebuilt in memory (snapshot + replay): every state of it at hand."""

    agents: dict[str, AgentState]
    beats: dict[str, Beat]
    position: Position
    beats_known: bool
    sessions: dict[str, SessionState]
    routes: dict[str, RouteState]
    rebuilt: Rebuilt
    pools: dict[str, PoolState]

    def owned_counts(self) -> Counter[str]:
        return owned_counts(self.sessions.values())

    def session_counts(self) -> dict[str, dict[str, int]]:
        """Pool -> session state -> sessions."""
        counts: dict[str, dict[str, int]] = {}
        for s in self.sessions.values():
            by_state = counts.setdefault(s.pool, {})
            by_state[s.status] = by_state.get(s.status, 0) + 1
        return counts


class _Frame(NamedTuple):
    """Where the file's rows answer from, inside one reading transaction: now (`past` None: the current rows), or a
    moment its version rows cover (`at`: its LEDGER sequence), read alike, a page at a time."""

    position: Position
    at: int | None
    past: Past | None

    @property
    def beats_known(self) -> bool:
        return self.past.beats_known if self.past is not None else True

    async def beats(self, db: ProjectionDB, ids: list[str], by_id: bool = True) -> dict[str, Beat]:
        """The beats of these agents (now, `by_id` False: read them all, cheaper than a long IN list)."""
        if self.past is not None:
            return await past_beats(db, self.past, ids)
        return await db.beats(_ids(ids) if by_id else None)


class Query:
    """Answers from a projection file (`db`) and, for the past and histories, from JetStream (`store`)."""

    def __init__(self, db: ProjectionDB | None, store: EventStore | None = None, *,
                 policy: HealthPolicy = DEFAULT_POLICY, cache: int = 4) -> None:
        self.db = db
        self.store = store
        self.policy = policy
        self._cache: OrderedDict[tuple[str, int], Past | Rebuilt] = OrderedDict()
        self._cache_size = cache

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, path: str | Path, store: EventStore | None = None, *,
                   policy: HealthPolicy = DEFAULT_POLICY) -> AsyncIterator[Query]:
        """Open the projection file read-only; DatabaseMissing if the projector never ran."""
        db = await ProjectionDB.open(path, readonly=True)
        try:
            # A view of the past that counts (a filtered total, owned sessions, the pools) reads each entity's
            # newest version as of the moment: rows spread over the whole file, mostly outside the page cache.
            # Mapped, they are read from the OS's cache without a copy each (20-30 % of such a view at 1 M events).
            # Only a reader maps: nothing truncates the file under it (a rebuild replaces it: os.replace).
            await db.conn.execute_fetchall(f"PRAGMA mmap_size = {MMAP_BYTES}")
            yield cls(db, store, policy=policy)
        finally:
            await db.close()

    # --- where answers come from ----------------------------------------------------

    def _key(self, as_of: int | datetime) -> tuple[str, int]:
        return ("seq", as_of) if isinstance(as_of, int) else ("time", int(aware(as_of).timestamp() * 1e6))

    async def _past(self, as_of: int | datetime) -> Past | Rebuilt:
        """The moment from the version rows when the file covers it, else rebuilt by a replay."""
        if self.store is None:
            raise NeedsEventStore("a view of the past replays the stream: connect to NATS (--nats-url)")
        if isinstance(as_of, bool) or not isinstance(as_of, (int, datetime)):
            raise InvalidQuery(f"as_of is a LEDGER sequence (int) or a datetime, not {as_of!r}")
        if isinstance(as_of, datetime):
            as_of = aware(as_of)
        key = self._key(as_of)
        found = self._cache.get(key)
        if found is None:
            seq, time = (as_of, None) if isinstance(as_of, int) else (None, as_of)
            if self.db is not None:
                found = await past_as_of(self.store, self.db, seq=seq, time=time)
            if found is None:
                found = await state_as_of(self.store, self.db, seq=seq, time=time)
            self._cache[key] = found
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return found

    @contextlib.asynccontextmanager
    async def _source(self, as_of: AsOf, now: datetime | None) -> AsyncIterator[_Frame | _Snapshot]:
        """What a view answers from: the file's rows (now, or a moment its version rows cover), inside one reading
        transaction; or a moment rebuilt in memory."""
        if as_of is None:
            db = self._need_db()
            async with db.reading():
                yield _Frame(await self.position(now), None, None)
            return
        for again in (False, True):
            r = await self._past(as_of)
            moment = now or (as_of if isinstance(as_of, datetime) else position_time(r.cut_ns)) or utcnow()
            if isinstance(r, Rebuilt):
                yield self._rebuilt(r, moment)
                return
            db = self._need_db()
            async with db.reading():
                if again or await beats_kept(db, r):
                    position = Position(ledger_seq=r.ledger_seq, ledger_time=position_time(r.ledger_ns),
                                        heartbeat_seq=r.hb_seq, heartbeat_time=position_time(r.hb_ns), now=moment,
                                        source=f"the projection's versions as of {LEDGER_STREAM} #{r.ledger_seq}",
                                        notes=r.notes)
                    yield _Frame(position, r.ledger_seq, r)
                    return
            # The file pruned the moment's beat versions since it was cached: ask again. The moment now lies
            # before the kept beat history, so its beats are rebuilt into the Past and nothing is pruned under it.
            self._cache.pop(self._key(as_of), None)

    @staticmethod
    def _rebuilt(r: Rebuilt, moment: datetime) -> _Snapshot:
        led, hb = r.state.ledger, r.state.heartbeats
        starts = [f"{s} #{r.snapshots[s]}" for s in (LEDGER_STREAM, HEARTBEAT_STREAM) if r.snapshots[s]]
        source = (f"snapshots {', '.join(starts)} + {r.replayed} events replayed" if starts
                  else f"a replay of {r.replayed} events from the start")
        position = Position(ledger_seq=led.seq, ledger_time=position_time(led.stored_ns), heartbeat_seq=hb.seq,
                            heartbeat_time=position_time(hb.stored_ns), now=moment, source=source, notes=r.notes)
        return _Snapshot(led.agents, hb.beats, position, r.beats_known, led.sessions, led.routes, r, led.pools)

    def _need_db(self) -> ProjectionDB:
        if self.db is None:
            raise InvalidQuery("no projection file: pass as_of (answered from JetStream) or open one")
        return self.db

    async def position(self, now: datetime | None = None) -> Position:
        """Where the projection file stands."""
        led, hb = await self._need_db().checkpoints()
        return Position(ledger_seq=led.seq, ledger_time=position_time(led.stored_ns), heartbeat_seq=hb.seq,
                        heartbeat_time=position_time(hb.stored_ns), now=now or utcnow(), source="projection")

    # --- the views ------------------------------------------------------------------

    async def agents(self, *, pool: str | None = None, health: str | None = None, platform: str | None = None,
                     region: str | None = None, as_of: AsOf = None, now: datetime | None = None,
                     limit: int | None = None, offset: int = 0, after: str | None = None) -> Page[AgentView]:
        """Agents by id; `limit`/`offset`/`after` (an agent id) pick one page, `total` counts every match."""
        _check(health, AGENT_HEALTH, "health")
        _check_page(limit, offset)
        judged = health is not None or platform is not None or region is not None  # filters SQL cannot apply
        total: int | None = None
        async with self._source(as_of, now) as src:
            if isinstance(src, _Snapshot):
                agents = [a for a in src.agents.values() if pool is None or a.pool == pool]
                beats, owned = src.beats, src.owned_counts()
            else:
                db, at = self._need_db(), src.at
                if judged:
                    agents = await db.agent_states(pool=pool, as_of=at)
                else:
                    agents = await db.agent_states(pool=pool, limit=limit, offset=offset, after=after, as_of=at)
                    total = await db.count_agents(pool=pool, as_of=at)
                ids = [a.agent_id for a in agents]
                beats = await src.beats(db, ids, bool(pool) or total is not None)
                owned = Counter(await db.owned_counts(_ids(ids) if total is not None else None, as_of=at))
        position, known = src.position, src.beats_known
        views = [agent_view(a, beats.get(a.agent_id), position.now, owned.get(a.agent_id, 0), self.policy, known)
                 for a in sorted(agents, key=lambda a: a.agent_id)]
        if total is not None:  # SQL paged and counted
            return Page(position, views, total)
        views = [v for v in views if (health is None or v.health == health) and
                 (platform is None or v.platform == platform) and (region is None or v.region == region)]
        return Page(position, paged(views, _agent_id, limit=limit, offset=offset, after=after), len(views))

    async def agent(self, agent_id: str, *, as_of: AsOf = None, now: datetime | None = None) -> AgentView:
        async with self._source(as_of, now) as src:
            if isinstance(src, _Snapshot):
                found = [src.agents[agent_id]] if agent_id in src.agents else []
                beats, owned = src.beats, src.owned_counts()
            else:
                db = self._need_db()
                found = await db.agent_states(ids=[agent_id], as_of=src.at)
                beats = await src.beats(db, [agent_id])
                owned = Counter(await db.owned_counts([agent_id], as_of=src.at))
        if found:
            return agent_view(found[0], beats.get(agent_id), src.position.now, owned.get(agent_id, 0), self.policy,
                              src.beats_known)
        raise UnknownEntity(f"no agent {agent_id} in the projection")

    async def sessions(self, *, pool: str | None = None, state: str | None = None, owner: str | None = None,
                       as_of: AsOf = None, now: datetime | None = None, limit: int | None = None, offset: int = 0,
                       after: str | None = None) -> Page[SessionView]:
        """Sessions by id; `limit`/`offset`/`after` (a session id) pick one page, `total` counts every match."""
        _check(state, SESSION_STATES, "session state")
        _check_page(limit, offset)
        async with self._source(as_of, now) as src:
            if isinstance(src, _Snapshot):
                matching = sorted((s for s in src.sessions.values()
                                   if (pool is None or s.pool == pool) and (state is None or s.status == state)
                                   and (owner is None or s.owner == owner)), key=_session_id)
                total = len(matching)
                sessions = paged(matching, _session_id, limit=limit, offset=offset, after=after)
                agents = {k: src.agents[k] for k in {s.owner for s in sessions if s.owner} if k in src.agents}
                beats = src.beats
            else:
                db, at = self._need_db(), src.at
                sessions = await db.session_states(pool=pool, state=state, owner=owner, limit=limit, offset=offset,
                                                   after=after, as_of=at)
                total = await db.count_sessions(pool=pool, state=state, owner=owner, as_of=at)
                owners = sorted({s.owner for s in sessions if s.owner})
                agents = {a.agent_id: a for a in await db.agent_states(ids=owners, as_of=at)}
                beats = await src.beats(db, owners)
        position = src.position
        health = {k: agent_health(a, beats.get(k), position.now, self.policy,  # the owner's view less the rest
                                  beats_known=src.beats_known)[0] for k, a in agents.items()}
        views = [session_view(s, health.get(s.owner) if s.owner else None)
                 for s in sorted(sessions, key=_session_id)]
        return Page(position, views, total)

    async def routes(self, *, session: str | None = None, status: str | None = None, state: str | None = None,
                     as_of: AsOf = None, now: datetime | None = None, limit: int | None = None, offset: int = 0,
                     after: str | None = None) -> Page[RouteView]:
        """Routes by id; `limit`/`offset`/`after` (a route id) pick one page, `total` counts every match."""
        _check(status, ROUTE_STATUSES, "route status")
        _check(state, ROUTE_STATES, "route state")
        _check_page(limit, offset)
        states = [s for s in ROUTE_STATES if route_status(s)[0] == status] if status is not None else None
        async with self._source(as_of, now) as src:
            if isinstance(src, _Snapshot):
                matching = sorted((r for r in src.routes.values()
                                   if (session is None or r.session_id == session)
                                   and (state is None or r.state == state) and (states is None or r.state in states)),
                                  key=_route_id)
                total = len(matching)
                routes = paged(matching, _route_id, limit=limit, offset=offset, after=after)
            else:
                db, at = self._need_db(), src.at
                routes = await db.route_states(session_id=session, state=state, states=states, limit=limit,
                                               offset=offset, after=after, as_of=at)
                total = await db.count_routes(session_id=session, state=state, states=states, as_of=at)
        position = src.position
        return Page(position, [route_view(r, position.now) for r in sorted(routes, key=_route_id)], total)

    async def pools(self, *, as_of: AsOf = None, now: datetime | None = None) -> Page[PoolView]:
        async with self._source(as_of, now) as src:
            if isinstance(src, _Snapshot):
                counts, agents, beats, breakers = src.session_counts(), list(src.agents.values()), src.beats, src.pools
            else:
                db, at = self._need_db(), src.at
                agents = await db.agent_states(as_of=at)
                beats = await src.beats(db, [a.agent_id for a in agents], False)
                counts = await db.session_counts(as_of=at)
                breakers = await db.pool_states(as_of=at)
        position = src.position
        views = [agent_view(a, beats.get(a.agent_id), position.now, 0, self.policy, src.beats_known) for a in agents]
        found = pool_views(views, counts, breakers)
        return Page(position, found, len(found))

    async def anomalies(self, *, kind: str | None = None, entity_kind: str | None = None,
                        entity_id: str | None = None, limit: int | None = 100, offset: int = 0,
                        as_of: AsOf = None) -> Page[AnomalyRecord]:
        """Events flagged and not applied, newest first; `total` counts every match (None: all of them)."""
        _check_page(limit, offset)
        async with self._source(as_of, None) as src:
            db = self.db
            if isinstance(src, _Frame) and src.past is None:
                assert db is not None
                found = await db.anomalies(kind=kind, entity_kind=entity_kind, entity_id=entity_id, limit=limit,
                                           offset=offset)
                total = await db.count_anomalies(kind=kind, entity_kind=entity_kind, entity_id=entity_id)
                return Page(src.position, found, total)
            if isinstance(src, _Frame):  # the version rows' moment
                assert src.past is not None
                upto = {LEDGER_STREAM: src.past.ledger_seq, HEARTBEAT_STREAM: src.past.hb_seq}
                replayed = src.past.lagged
            else:
                upto, replayed = src.rebuilt.snapshots, src.rebuilt.anomalies
            # Anomalies up to `upto` are in the table; the replayed stretch found the rest.
            older, counted = [], 0
            if db is not None and any(upto.values()):
                older = await db.anomalies(kind=kind, entity_kind=entity_kind, entity_id=entity_id, upto=upto,
                                           limit=None if limit is None else offset + limit)
                counted = await db.count_anomalies(kind=kind, entity_kind=entity_kind, entity_id=entity_id,
                                                   upto=upto)
        newer = [a for a in replayed
                 if (kind is None or a.kind == kind) and (entity_kind is None or a.entity_kind == entity_kind)
                 and (entity_id is None or a.entity_id == entity_id)]
        merged = sorted(newer + older, key=lambda a: (a.stored_at, a.stream, a.seq), reverse=True)
        return Page(src.position, merged[offset:] if limit is None else merged[offset:offset + limit],
                    counted + len(newer))

    async def dead_letters(self) -> list[DeadLetterCount]:
        return await self._need_db().dead_letters()

    async def history(self, kind: str, entity_id: str, *, as_of: AsOf = None) -> EntityHistory:
        """Every event of one entity with its producer, causation and effect (needs the event store)."""
        if self.store is None:
            raise NeedsEventStore("an entity's history is read from JetStream: connect to NATS (--nats-url)")
        if isinstance(as_of, datetime):
            return await entity_history(self.store, kind, entity_id, time=as_of)
        return await entity_history(self.store, kind, entity_id, seq=as_of)


def _agent_id(a: AgentView) -> str:
    return a.agent_id


def _session_id(s: SessionState | SessionView) -> str:
    return s.session_id


def _route_id(r: RouteState) -> str:
    return r.route_id
