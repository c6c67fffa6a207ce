"""What queries return: frozen, JSON-serialisable Structs, and the pure functions that build them.

The same builders serve "now" (state read from SQLite) and "as of" (state
rebuilt in memory from a snapshot and the stream), so both answer alike.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Generic, TypeVar

import msgspec

from ledger.codec import from_ns
from ledger.lifecycle import S_ASSIGNED, S_ORPHANED, AgentState, PoolState, RouteState, SessionState, route_status

from .beats import Beat, of_incarnation
from .health import ALIVE, DEFAULT_POLICY, HealthPolicy, agent_health, beat_time, route_health, seconds_between

T = TypeVar("T")


class Position(msgspec.Struct, frozen=True, kw_only=True):
    """Where in the log an answer stands, and the `now` its health was judged at."""

    ledger_seq: int
    ledger_time: datetime | None
    heartbeat_seq: int
    heartbeat_time: datetime | None
    now: datetime
    source: str
    """"projection" (the SQLite checkpoint), or the snapshot and replay an as-of answer was rebuilt from."""
    notes: list[str] = []
    """Caveats, e.g. heartbeats older than the heartbeat stream's retention."""


class Page(msgspec.Struct, Generic[T], frozen=True):
    position: Position
    items: list[T]
    total: int | None = None
    """How many items match the filters: `items` may be one page of them (None: not counted)."""


def paged(items: list[T], key: Callable[[T], str], *, limit: int | None = None, offset: int = 0,
          after: str | None = None) -> list[T]:
    """One page of `items` (sorted by `key`): those after the key `after`, less the first `offset`, at most `limit`.

    The in-memory twin of the SQL `WHERE key > after ORDER BY key LIMIT limit OFFSET offset` (reads.py)."""
    if after is not None:
        items = [i for i in items if key(i) > after]
    return items[offset:] if limit is None else items[offset:offset + limit]


class AgentView(msgspec.Struct, frozen=True, kw_only=True):
    agent_id: str
    incarnation: int
    instance_id: str
    pool: str
    platform: str
    region: str
    labels: dict[str, str]
    health: str
    rule: str
    """Why: the lifecycle event or the time rule that gave `health`."""
    status: str
    """The lifecycle status from events alone (alive, draining, drained, dead, gone)."""
    status_since: datetime
    registered_at: datetime
    last_heartbeat_at: datetime | None
    last_heartbeat_seq: int | None
    heartbeat_age: float | None
    load: int | None
    capacity: int
    sessions: int
    """Sessions this agent owns now."""
    heartbeat_interval: float
    ttl: float
    suspected_at: datetime | None
    suspect_reason: str | None
    drain_deadline: datetime | None
    unreachable_reports: int
    last_seq: int


class SessionView(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    pool: str
    platform: str
    region: str
    labels: dict[str, str]
    state: str
    owner: str | None
    owner_incarnation: int | None
    owner_instance: str | None
    owner_health: str | None
    """The owner's health at `now`: an assigned session whose owner is dead is about to be orphaned."""
    token: int | None
    claim_reason: str | None
    claims: int
    """How many claims the session has had."""
    orphaned: bool
    reason: str | None
    """Why it is orphaned, released or terminated."""
    platform_resource_id: str | None
    state_since: datetime | None
    created_at: datetime
    last_seq: int
    checkpoint_seq: int | None = None
    """Sequence of the newest checkpoint an owner recorded (`ledger session show` prints its data)."""
    checkpoint_bytes: int | None = None


class RouteView(msgspec.Struct, frozen=True, kw_only=True):
    route_id: str
    session_id: str
    endpoint: str
    deployment: str
    state: str
    status: str
    sub_status: str | None
    traffic: str
    reason: str
    address: str | None
    health: str
    health_stale: bool
    health_checked_at: datetime | None
    health_age: float | None
    health_detail: str
    state_since: datetime
    created_at: datetime
    last_seq: int


class PoolView(msgspec.Struct, frozen=True, kw_only=True):
    pool: str
    agents: dict[str, int]
    """Health -> number of agents."""
    sessions: dict[str, int]
    """State -> number of sessions."""
    capacity: int
    """Capacity of the alive agents that take work (not draining)."""
    load: int
    free_capacity: int
    breaker_open: bool = False
    """The mass-failure breaker: while open, the pool's sessions are not orphaned."""
    breaker_since: datetime | None = None
    breaker_reason: str = ""
    breaker_trips: int = 0


def agent_view(agent: AgentState, beat: Beat | None, now: datetime, owned: int = 0,
               policy: HealthPolicy = DEFAULT_POLICY, beats_known: bool = True) -> AgentView:
    health, rule = agent_health(agent, beat, now, policy, beats_known=beats_known)
    current = of_incarnation(beat, agent.incarnation)
    last = beat_time(current) if current is not None else None
    return AgentView(
        agent_id=agent.agent_id, incarnation=agent.incarnation, instance_id=agent.instance_id, pool=agent.pool,
        platform=agent.platform, region=agent.region, labels=agent.labels, health=health, rule=rule,
        status=agent.status, status_since=agent.status_since, registered_at=agent.registered_at,
        last_heartbeat_at=last, last_heartbeat_seq=current.seq if current else None,
        heartbeat_age=seconds_between(last, now) if last is not None else None,
        load=current.load if current else None, capacity=current.capacity if current else agent.capacity,
        sessions=owned, heartbeat_interval=agent.heartbeat_interval, ttl=agent.ttl,
        suspected_at=agent.suspected_at, suspect_reason=agent.suspect_reason, drain_deadline=agent.drain_deadline,
        unreachable_reports=agent.unreachable_reports, last_seq=agent.last_seq,
    )


def session_view(session: SessionState, owner_health: str | None = None) -> SessionView:
    return SessionView(
        session_id=session.session_id, pool=session.pool, platform=session.platform, region=session.region,
        labels=session.labels, state=session.status, owner=session.owner, owner_incarnation=session.owner_incarnation,
        owner_instance=session.owner_instance, owner_health=owner_health if session.owner else None,
        token=session.token, claim_reason=session.claim_reason, claims=session.claims,
        orphaned=session.status == S_ORPHANED, reason=session.reason,
        platform_resource_id=session.platform_resource_id, state_since=session.status_since,
        created_at=session.created_at, last_seq=session.last_seq,
        checkpoint_seq=session.checkpoint.seq if session.checkpoint else None,
        checkpoint_bytes=len(session.checkpoint.data) if session.checkpoint else None,
    )


def route_view(route: RouteState, now: datetime) -> RouteView:
    status, sub_status = route_status(route.state)
    h = route_health(route, now)
    return RouteView(
        route_id=route.route_id, session_id=route.session_id, endpoint=route.endpoint, deployment=route.deployment,
        state=route.state, status=status, sub_status=sub_status, traffic=route.traffic, reason=route.reason,
        address=route.address, health=h.health, health_stale=h.stale, health_checked_at=route.health_checked_at,
        health_age=h.age, health_detail=route.health_detail, state_since=route.state_since,
        created_at=route.created_at, last_seq=route.last_seq,
    )


def owned_counts(sessions: Iterable[SessionState]) -> Counter[str]:
    return Counter(s.owner for s in sessions if s.status == S_ASSIGNED and s.owner)


def pool_views(agents: Iterable[AgentView], session_states: Mapping[str, Mapping[str, int]],
               breakers: Mapping[str, PoolState] | None = None) -> list[PoolView]:
    """Pools from agent views, {pool: {session state: count}} and breakers; free capacity counts alive agents."""
    breakers = breakers or {}
    by_pool: dict[str, list[AgentView]] = {}
    for a in agents:
        by_pool.setdefault(a.pool, []).append(a)
    out = []
    for pool in sorted(set(by_pool) | set(session_states) | set(breakers)):
        breaker = breakers.get(pool)
        members = by_pool.get(pool, [])
        working = [a for a in members if a.health == ALIVE]  # draining agents have their own health
        capacity = sum(a.capacity for a in working)
        load = sum(a.load or 0 for a in working)
        free = sum(max(0, a.capacity - (a.load or 0)) for a in working)
        out.append(PoolView(pool=pool, agents=dict(sorted(Counter(a.health for a in members).items())),
                            sessions=dict(sorted(session_states.get(pool, {}).items())), capacity=capacity,
                            load=load, free_capacity=free, breaker_open=breaker.breaker_open if breaker else False,
                            breaker_since=breaker.since if breaker else None,
                            breaker_reason=breaker.reason if breaker else "",
                            breaker_trips=breaker.trips if breaker else 0))
    return out


def position_time(stored_ns: int) -> datetime | None:
    return from_ns(stored_ns) if stored_ns else None
