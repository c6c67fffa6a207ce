"""Lifecycle rules and per-entity folds: pure functions of an entity's events.

`evolve_agent`, `evolve_session` and `evolve_route` take the current state (or
None) and one stored event of that entity, and return the next state and,
when the event must not be applied, an Anomaly saying why (the state is then
returned unchanged). The SDK folds one entity's history with them to decide
what it may write; the projections fold the whole log with the very same
functions, so both sides agree on what every event means.

Two checks need more than the entity's own history, and are passed in as
lookups so that every caller applies them identically, as of the event's
position in the log:

* `incarnation_at(agent_id, seq)` - the agent's current incarnation just
  before `seq` (None if it never registered). A claim or owner write made by
  any other incarnation is flagged (superseded_incarnation), not applied.
* `session_at(session_id, seq)` - the session's state just before `seq`: its
  claim token (a route transition written under another one is flagged,
  stale_token) and its owner (the only agent that may write the route's events).
* `agent_at(agent_id, seq)` - the agent's state just before `seq` (None if it
  never registered). A take-over (a claim of an assigned session naming its
  token) applies only while the owner may be replaced (`owner_replaceable`):
  any agent can read the token, so naming it proves nothing (live_owner).

Without a lookup the check is skipped (a caller that has only one history).

Before anything else every fold asks `writer_problem`: whether the event's
producer token (the identity NATS permissions bind) may write that event at
all (`ledger.authority`). An event from a producer that may not is flagged
(unauthorized_producer) and changes nothing, so a goodbye for a2 published on
a subject a1 may use says nothing about a2.

Whether a session event applies is one predicate, `session_event_problem`
(claims: `claim_problem`, owner writes: `owner_write_problem`): the fold, the
SDK's decisions (`decide.check_owner`) and an Agent judging what its watch
delivers all call it, so none of them can act on an event another refuses.
"""

from __future__ import annotations

from datetime import datetime
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import msgspec

from . import authority
from . import events as ev
from .codec import Recorded

# --- routes -------------------------------------------------------------------

PENDING, STARTING, WARMING_UP = "PENDING", "STARTING", "WARMING_UP"
RUNNING, FAILED_TO_START = "RUNNING", "FAILED_TO_START"
TERMINATING, TERMINATED = "TERMINATING", "TERMINATED"
ROUTE_STATES = (PENDING, STARTING, WARMING_UP, RUNNING, FAILED_TO_START, TERMINATING, TERMINATED)

ROUTE_TRANSITIONS: dict[str, frozenset[str]] = {
    PENDING: frozenset({STARTING, TERMINATING}),
    STARTING: frozenset({WARMING_UP, FAILED_TO_START, TERMINATING}),
    WARMING_UP: frozenset({RUNNING, TERMINATING}),
    RUNNING: frozenset({RUNNING, TERMINATING}),  # RUNNING -> RUNNING changes traffic only
    FAILED_TO_START: frozenset({TERMINATING, TERMINATED}),
    TERMINATING: frozenset({TERMINATED}),
    TERMINATED: frozenset(),
}

TRAFFIC_ACTIVE, TRAFFIC_INACTIVE = "ACTIVE", "INACTIVE"


def route_status(state: str) -> tuple[str, str | None]:
    """(status, sub-status): the three provisioning steps share the status PROVISIONING."""
    if state in (PENDING, STARTING, WARMING_UP):
        return "PROVISIONING", state
    return state, None


def route_transition_error(current: str, requested: str) -> str | None:
    """Why `current -> requested` is illegal, or None when it is allowed."""
    if requested not in ROUTE_TRANSITIONS:
        return f"unknown route state {requested!r} (known: {', '.join(ROUTE_STATES)})"
    if requested not in ROUTE_TRANSITIONS.get(current, frozenset()):
        allowed = ", ".join(sorted(ROUTE_TRANSITIONS.get(current, ()))) or "none, it is final"
        return f"illegal route transition {current} -> {requested} (allowed from {current}: {allowed})"
    return None


# --- sessions -----------------------------------------------------------------

S_PENDING, S_ASSIGNED, S_ORPHANED, S_RELEASED, S_TERMINATED = "pending", "assigned", "orphaned", "released", "terminated"
SESSION_STATES = (S_PENDING, S_ASSIGNED, S_ORPHANED, S_RELEASED, S_TERMINATED)
CLAIMABLE = frozenset({S_PENDING, S_ORPHANED, S_RELEASED})
"""States in which a session has no owner and may be claimed."""
CLAIM_REASONS = ("initial", "failover", "drain", "rebalance", "manual")

# --- agents -------------------------------------------------------------------

A_ALIVE, A_DRAINING, A_DRAINED, A_DEAD, A_GONE = "alive", "draining", "drained", "dead", "gone"
A_FENCED = "fenced"
"""Lifecycle status from events; `suspect` is derived (see projections) from a suspicion and later beats."""


class Anomaly(msgspec.Struct, frozen=True):
    """An event that reached the log but must not change state: flagged, never applied."""

    kind: str
    detail: str


# Anomaly kinds
ILLEGAL_TRANSITION = "illegal_transition"
SUPERSEDED_INCARNATION = "superseded_incarnation"
UNKNOWN_INCARNATION = "unknown_incarnation"
STALE_TOKEN = "stale_token"
OVERLAPPING_CLAIM = "overlapping_claim"
UNKNOWN_ENTITY = "unknown_entity"
DUPLICATE = "duplicate"
AFTER_FINAL = "after_final"
UNAUTHORIZED_PRODUCER = "unauthorized_producer"
LIVE_OWNER = "live_owner"
"""A take-over (a claim naming the current token) while the log says the owner may keep the session."""


class AgentState(msgspec.Struct, frozen=True, kw_only=True):
    agent_id: str
    incarnation: int
    """Stream sequence of the registration this state belongs to."""
    instance_id: str
    pool: str
    platform: str
    region: str
    labels: dict[str, str]
    capacity: int
    heartbeat_interval: float
    ttl: float
    registered_at: datetime
    status: str
    reason: str
    """The rule or event that set `status`, e.g. "registered", "goodbye: shutdown"."""
    status_since: datetime
    status_seq: int
    cause_id: str | None = None
    """Event id of the event that set `status` (what a decision taken on it names as its cause)."""
    suspected_at: datetime | None = None
    suspect_reason: str | None = None
    drain_deadline: datetime | None = None
    unreachable_reports: int = 0
    last_report_at: datetime | None = None
    last_seq: int = 0


class SessionState(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    pool: str
    platform: str
    region: str
    labels: dict[str, str]
    idle_ttl: float | None
    status: str
    created_at: datetime
    owner: str | None = None
    owner_instance: str | None = None
    owner_incarnation: int | None = None
    token: int | None = None
    """Stream sequence of the current claim: the fencing token every owner write must carry."""
    claim_reason: str | None = None
    claims: int = 0
    reason: str | None = None
    """Why the session is orphaned, released or terminated."""
    cause_id: str | None = None
    """Event id of the event that set `status`."""
    platform_resource_id: str | None = None
    address: str | None = None
    """host:port where the session serves, as its owner reported it."""
    status_since: datetime | None = None
    last_owner_write_at: datetime | None = None
    last_seq: int = 0


class RouteState(msgspec.Struct, frozen=True, kw_only=True):
    route_id: str
    session_id: str
    endpoint: str
    deployment: str
    probe: ev.Probe | None
    start_timeout: float
    stop_timeout: float
    state: str
    state_since: datetime
    state_seq: int
    created_at: datetime
    traffic: str = TRAFFIC_INACTIVE
    reason: str = ""
    address: str | None = None
    healthy: bool | None = None
    health_checked_at: datetime | None = None
    """When the server stored the latest health report (its own `checked_at` is the reporter's word, in history)."""
    health_detail: str = ""
    last_seq: int = 0


S = TypeVar("S")
Evolved = tuple[S, Anomaly | None]
IncarnationAt = Callable[[str, int], "int | None"]
SessionAt = Callable[[str, int], "SessionState | None"]
"""(session id, seq) -> the session's state just before `seq` (None: it did not exist then)."""
AgentAt = Callable[[str, int], "AgentState | None"]
"""(agent id, seq) -> the agent's state just before `seq` (None: it never registered before it)."""

_replace = msgspec.structs.replace

UNKNOWN_OWNER: Any = object()
"""`writer_problem`'s owner when the caller cannot tell who owns the session concerned."""


def writer_problem(e: ev.Event, owner: object = UNKNOWN_OWNER) -> Anomaly | None:
    """Why the event's producer may not write it (None: it may) - `authority.writer_refusal` as an anomaly.

    The producer is the subject's last token (the codec checks `e.producer.id` equals it): what NATS
    permissions bind. `owner`: the agent owning the session concerned just before the event (None: nobody),
    for the event types its owner may write; left out, an agent passes as a possible owner (a caller holding
    one history cannot tell; the folds that can, pass it).
    """
    refusal = authority.writer_refusal(e.type_tag(), e.producer.id, subject_agent=getattr(e, "agent_id", None),
                                       owner=owner if isinstance(owner, str) else None,
                                       owner_known=owner is not UNKNOWN_OWNER)
    return Anomaly(UNAUTHORIZED_PRODUCER, refusal) if refusal is not None else None


def evolve_agent(state: AgentState | None, rec: Recorded) -> Evolved[AgentState | None]:
    """Next state of one agent after one of its lifecycle events (heartbeats are folded apart).

    Every time here is when the server stored the event, never the event's own `time`: liveness is judged
    against these (from a registration, since a suspicion), and a self-declared time - skewed, or forged
    into the future - would make an agent undying or suspect for as long as it likes.
    """
    e, seq, at = rec.event, rec.seq, rec.stored_at
    problem = writer_problem(e)
    if problem is not None:
        return state, problem
    if isinstance(e, ev.AgentRegistered):
        return AgentState(
            agent_id=e.agent_id, incarnation=seq, instance_id=e.instance_id, pool=e.pool, platform=e.platform,
            region=e.region, labels=e.labels, capacity=e.capacity, heartbeat_interval=e.heartbeat_interval,
            ttl=e.ttl, registered_at=at, status=A_ALIVE, reason="registered", status_since=at, status_seq=seq,
            cause_id=e.event_id, last_seq=seq,
        ), None
    if state is None:
        return state, Anomaly(UNKNOWN_ENTITY, f"{e.type_tag()} for unregistered agent {e.entity_id}")
    incarnation = getattr(e, "incarnation", None)
    if incarnation is not None and incarnation != state.incarnation:
        kind = SUPERSEDED_INCARNATION if incarnation < state.incarnation else UNKNOWN_INCARNATION
        return state, Anomaly(kind, f"{e.type_tag()} from incarnation {incarnation}; current is {state.incarnation}")

    def moved(status: str, reason: str, **more: object) -> AgentState:
        return _replace(state, status=status, reason=reason, status_since=at, status_seq=seq, cause_id=e.event_id,
                        last_seq=seq, **more)

    status = state.status
    match e:
        case ev.AgentUnreachableReported():
            return _replace(state, unreachable_reports=state.unreachable_reports + 1, last_report_at=at,
                            last_seq=seq), None
        case ev.AgentSuspected(reason=reason):
            if status in (A_ALIVE, A_DRAINING):
                return _replace(state, suspected_at=at, suspect_reason=reason, last_seq=seq), None
        case ev.AgentDeclaredDead(reason=reason):
            if status in (A_ALIVE, A_DRAINING):
                return moved(A_DEAD, f"declared dead: {reason}"), None
        case ev.AgentDraining(deadline=deadline, reason=reason):
            if status in (A_ALIVE, A_DRAINING):
                return moved(A_DRAINING, f"draining: {reason}" if reason else "draining",
                             drain_deadline=deadline), None
        case ev.AgentDrained(reason=reason):
            if status == A_DRAINING:
                return moved(A_DRAINED, f"drained: {reason}" if reason else "drained"), None
        case ev.AgentGoodbye(reason=reason):
            if status != A_GONE:
                return moved(A_GONE, f"goodbye: {reason}"), None
        case ev.AgentFenced(reason=reason):
            if status in (A_ALIVE, A_DRAINING, A_DEAD):
                return moved(A_FENCED, f"fenced itself: {reason}"), None
    return state, Anomaly(ILLEGAL_TRANSITION, f"{e.type_tag()} while agent is {status}")


def incarnation_problem(what: str, agent_id: str, incarnation: int, current: int | None) -> Anomaly | None:
    """Why `incarnation` of `agent_id` may not act, given its current one (None: it never registered)."""
    if current is None:
        return Anomaly(UNKNOWN_ENTITY, f"{what} by unregistered agent {agent_id}")
    if current != incarnation:
        return Anomaly(SUPERSEDED_INCARNATION, f"{what} by {agent_id} incarnation {incarnation}; current is {current}")
    return None


CurrentIncarnation = Callable[[str], "int | None"]
"""agent id -> its current incarnation at the moment in question (None if it never registered)."""


# Why an owner may be replaced (`owner_replaceable`): reason codes the reclaimer writes too.
OWNER_GONE, OWNER_DEAD, OWNER_FENCED = "owner_gone", "owner_dead", "owner_fenced"
OWNER_SUPERSEDED, OWNER_UNKNOWN, OWNER_DRAINING = "owner_superseded", "owner_unknown", "owner_draining"

_REPLACEABLE = {A_GONE: OWNER_GONE, A_DEAD: OWNER_DEAD, A_FENCED: OWNER_FENCED, A_DRAINING: OWNER_DRAINING,
                # A drained agent owns nothing - unless a claim landed after it said so: hand it on as a
                # draining one's.
                A_DRAINED: OWNER_DRAINING}


def owner_replaceable(session: SessionState, owner: AgentState | None) -> tuple[str, str | None] | None:
    """(why the owner of the assigned `session` may be replaced, the event that says so), or None while it may
    keep it. `owner` is the owner agent's state at the moment in question (None: not registered).

    The one rule of take-overs: the fold applies a claim naming the current token only when this says the owner
    may go, and the reclaimer and self-claiming agents take over exactly the sessions it names. It reads the log
    alone (gone, dead, fenced, draining, drained, superseded or unknown): an owner that is only silent or
    suspect keeps its sessions until the monitor declares it dead.
    """
    if session.status != S_ASSIGNED or session.owner is None:
        return None
    if owner is None:
        return OWNER_UNKNOWN, None
    if owner.incarnation != session.owner_incarnation:
        return OWNER_SUPERSEDED, None
    why = _REPLACEABLE.get(owner.status)
    return (why, owner.cause_id) if why is not None else None


NO_OWNER_STATE: Any = object()
"""`claim_problem`'s owner state when the caller cannot tell the owner's state (the take-over check is skipped)."""


def claim_problem(state: SessionState | None, agent_id: str, incarnation: int, previous_token: int | None,
                  current: CurrentIncarnation | None = None, owner: Any = NO_OWNER_STATE) -> Anomaly | None:
    """Why a claim of the session in `state` for `agent_id`/`incarnation` must not apply (None: it applies).

    Without `current` the registration check is skipped (the caller vouches for the incarnation). `owner`: the
    state of the session's owner agent as of the claim (AgentState, or None if it is not registered); left out,
    a take-over naming the current token is not judged against it (a caller that cannot tell).
    """
    if current is not None:
        problem = incarnation_problem("session.claimed", agent_id, incarnation, current(agent_id))
        if problem:
            return problem
    if state is None:
        return Anomaly(UNKNOWN_ENTITY, "session.claimed for an unknown session")
    if state.status == S_TERMINATED:
        return Anomaly(AFTER_FINAL, "session.claimed after the session was terminated")
    if state.status == S_ASSIGNED and previous_token != state.token:
        return Anomaly(OVERLAPPING_CLAIM,
                       f"{agent_id} claimed while {state.owner} owns it under token {state.token} "
                       f"(claim names previous token {previous_token})")
    if state.status == S_ASSIGNED and owner is not NO_OWNER_STATE and owner_replaceable(state, owner) is None:
        return Anomaly(LIVE_OWNER,
                       f"take-over for {agent_id} of token {state.token} while its owner {state.owner} "
                       f"(incarnation {state.owner_incarnation}) is {owner.status}; a take-over applies only from "
                       f"an owner that is gone, dead, fenced, draining, drained or superseded")
    return None


def owner_write_problem(state: SessionState | None, agent_id: str, incarnation: int, token: int | None,
                        current: CurrentIncarnation | None = None, what: str = "owner write") -> Anomaly | None:
    """Why an owner write (release, resource report) by `agent_id`/`incarnation` under `token` must not apply.

    The one rule for both sides: the fold flags such a write, and `decide.check_owner`
    refuses it before it is written. The write must carry the session's current
    token, come from its owner, and from the very incarnation that claimed it (a
    new incarnation of the same agent does not inherit its predecessor's claims).
    With `current`, the writer must also still be the agent's current incarnation.
    """
    if current is not None:
        problem = incarnation_problem(what, agent_id, incarnation, current(agent_id))
        if problem:
            return problem
    if state is None:
        return Anomaly(UNKNOWN_ENTITY, f"{what} for an unknown session")
    if state.status == S_TERMINATED:
        return Anomaly(AFTER_FINAL, f"{what} after the session was terminated")
    if state.status != S_ASSIGNED or token != state.token:
        return Anomaly(STALE_TOKEN, f"write under token {token}; current is {state.token} ({state.status})")
    if agent_id != state.owner:
        return Anomaly(STALE_TOKEN, f"write by {agent_id} under token {token}, which belongs to {state.owner}")
    if incarnation != state.owner_incarnation:
        # An older incarnation is a zombie; a newer one carries a token of its predecessor's.
        kind = SUPERSEDED_INCARNATION if incarnation < (state.owner_incarnation or 0) else STALE_TOKEN
        return Anomaly(kind, f"write by {agent_id} incarnation {incarnation} under token {token}, "
                             f"which incarnation {state.owner_incarnation} holds")
    return None


def session_event_problem(state: SessionState | None, rec: Recorded,
                          incarnation_at: IncarnationAt | None = None,
                          agent_at: AgentAt | None = None) -> Anomaly | None:
    """Why this stored session event must not change `state` (None when it applies).

    The one rule: `evolve_session` applies exactly the events this accepts, and an
    Agent judges what its watch delivers with it, so an agent never gains or loses
    a session on an event the projections flag.
    """
    e, seq = rec.event, rec.seq
    unauthorized = writer_problem(e, state.owner if state is not None else None)
    if unauthorized is not None:
        return unauthorized
    current: CurrentIncarnation | None = None
    if incarnation_at is not None:
        def current(agent_id: str) -> int | None:
            return incarnation_at(agent_id, seq)
    match e:
        case ev.SessionCreated():
            if state is not None:
                return Anomaly(DUPLICATE, f"session {e.session_id} was already created at #{state.last_seq}")
            return None
        case ev.SessionClaimed():
            owner: Any = NO_OWNER_STATE
            if agent_at is not None and state is not None and state.owner is not None:
                owner = agent_at(state.owner, seq)
            return claim_problem(state, e.agent_id, e.incarnation, e.previous_token, current, owner)
        case ev.SessionReleased() | ev.SessionResourceReported():
            return owner_write_problem(state, e.agent_id, e.incarnation, e.token, current, e.type_tag())
    if state is None:
        return Anomaly(UNKNOWN_ENTITY, f"{e.type_tag()} for unknown session {e.entity_id}")
    if state.status == S_TERMINATED:
        return Anomaly(AFTER_FINAL, f"{e.type_tag()} after the session was terminated")
    match e:
        case ev.SessionOrphaned():
            return orphan_problem(state, e.previous_token)
        case ev.SessionTerminated():
            return terminate_problem(state, e.token)
    return Anomaly(ILLEGAL_TRANSITION, f"{e.type_tag()} does not apply to a session")


def orphan_problem(state: SessionState, previous_token: int | None) -> Anomaly | None:
    """Why orphaning the live session in `state` from the claim `previous_token` must not apply."""
    if state.status != S_ASSIGNED:
        return Anomaly(ILLEGAL_TRANSITION, f"session.orphaned while session is {state.status}")
    if previous_token != state.token:
        return Anomaly(STALE_TOKEN, f"orphaned under token {previous_token}; current is {state.token}")
    return None


def terminate_problem(state: SessionState, token: int | None) -> Anomaly | None:
    """Why a termination under `token` (None: an operator's, unguarded) must not apply to a live session."""
    if token is not None and token != state.token:
        return Anomaly(STALE_TOKEN, f"terminated under token {token}; current is {state.token}")
    return None


def superseded_by(registrations: Iterable[tuple[int, str]], incarnation: int, instance_id: str) -> int | None:
    """The registration (sequence) that supersedes `incarnation` of process `instance_id`, or None.

    Only a registration with a higher sequence by another process supersedes. A
    read whose newest registration is lower (a replica that lags behind our own
    registration) proves nothing: it must never fence a healthy agent.
    """
    newer = [seq for seq, instance in registrations if seq > incarnation and instance != instance_id]
    return max(newer) if newer else None


def evolve_session(state: SessionState | None, rec: Recorded, incarnation_at: IncarnationAt | None = None,
                   agent_at: AgentAt | None = None) -> Evolved[SessionState | None]:
    """Next state of one session after one of its events (`session_event_problem` decides whether it applies).

    Its times are when the server stored the events, as for agents: they compare with the agents' times, and
    a writer's own `time` (skewed, or forged into the year 9999) must not date a claim or an owner's activity.
    """
    problem = session_event_problem(state, rec, incarnation_at, agent_at)
    if problem is not None:
        return state, problem
    e, seq, at = rec.event, rec.seq, rec.stored_at
    if isinstance(e, ev.SessionCreated):
        return SessionState(session_id=e.session_id, pool=e.pool, platform=e.platform, region=e.region,
                            labels=e.labels, idle_ttl=e.idle_ttl, status=S_PENDING, created_at=at,
                            status_since=at, cause_id=e.event_id, last_seq=seq), None
    assert state is not None  # session_event_problem refuses anything else for an unknown session
    match e:
        case ev.SessionClaimed():
            return _replace(state, status=S_ASSIGNED, owner=e.agent_id, owner_instance=e.instance_id,
                            owner_incarnation=e.incarnation, token=seq, claim_reason=e.reason,
                            claims=state.claims + 1, reason=None, status_since=at, last_owner_write_at=at,
                            platform_resource_id=None, address=None, cause_id=e.event_id, last_seq=seq), None
        case ev.SessionReleased():
            return _replace(state, status=S_RELEASED, owner=None, owner_instance=None, owner_incarnation=None,
                            token=None, reason=e.reason or "released", status_since=at, cause_id=e.event_id,
                            last_seq=seq), None
        case ev.SessionResourceReported():
            return _replace(state, platform_resource_id=e.platform_resource_id,
                            address=e.address if e.address is not None else state.address,
                            last_owner_write_at=at, last_seq=seq), None
        case ev.SessionOrphaned():
            return _replace(state, status=S_ORPHANED, owner=None, owner_instance=None, owner_incarnation=None,
                            token=None, reason=e.reason, status_since=at, cause_id=e.event_id, last_seq=seq), None
        case ev.SessionTerminated():
            return _replace(state, status=S_TERMINATED, owner=None, owner_instance=None, owner_incarnation=None,
                            token=None, reason=e.reason or "terminated", status_since=at, cause_id=e.event_id,
                            last_seq=seq), None
    return state, Anomaly(ILLEGAL_TRANSITION, f"{e.type_tag()} does not apply to a session")


def owns(state: SessionState | None, agent_id: str, incarnation: int) -> bool:
    """Whether this incarnation of the agent owns the session in `state`: may write as its owner now."""
    return state is not None and owner_write_problem(state, agent_id, incarnation, state.token) is None


def evolve_route(state: RouteState | None, rec: Recorded,
                 session_at: SessionAt | None = None) -> Evolved[RouteState | None]:
    """Next state of one route after one of its events.

    Every time here is when the server stored the event: the watchdog times starts, stops and health against
    them. A transition's own `time` dated ahead would postpone its timeout (behind: fire it at once), and a
    health report "checked" in the year 9999 would keep a route fresh forever - so a report is as fresh as
    its arrival, never fresher, and a reporter's clock running behind does not make it stale either.

    With `session_at`, the route's session as of the event decides who owns it (the one agent that may write
    the route's events) and which claim token a transition must carry; without, both checks are skipped.
    """
    e, seq, at = rec.event, rec.seq, rec.stored_at
    session_id = e.session_id if isinstance(e, ev.RouteCreated) else state.session_id if state else None
    session = session_at(session_id, seq) if session_at is not None and session_id is not None else None
    problem = writer_problem(e, session.owner if session is not None else None) if session_at is not None \
        else writer_problem(e)
    if problem is not None:
        return state, problem
    if isinstance(e, ev.RouteCreated):
        if state is not None:
            return state, Anomaly(DUPLICATE, f"route {e.route_id} was already created at #{state.last_seq}")
        return RouteState(route_id=e.route_id, session_id=e.session_id, endpoint=e.endpoint,
                          deployment=e.deployment, probe=e.probe, start_timeout=e.start_timeout,
                          stop_timeout=e.stop_timeout, state=PENDING,
                          state_since=at, state_seq=seq, created_at=at, last_seq=seq), None
    if state is None:
        return state, Anomaly(UNKNOWN_ENTITY, f"{e.type_tag()} for unknown route {e.entity_id}")
    match e:
        case ev.RouteTransitioned():
            if e.token is not None and session_at is not None:
                current = session.token if session is not None else None
                if current != e.token:
                    return state, Anomaly(STALE_TOKEN, f"route transition under token {e.token}; session "
                                                       f"{state.session_id} is claimed under {current}")
            if e.from_state != state.state:
                return state, Anomaly(ILLEGAL_TRANSITION,
                                      f"transition {e.from_state} -> {e.to_state} but the route is {state.state}")
            problem = route_transition_error(state.state, e.to_state)
            if problem:
                return state, Anomaly(ILLEGAL_TRANSITION, problem)
            traffic = TRAFFIC_ACTIVE if e.to_state == RUNNING else TRAFFIC_INACTIVE
            if e.to_state == RUNNING and e.traffic:
                traffic = e.traffic
            return _replace(state, state=e.to_state, traffic=traffic, reason=e.reason,
                            address=e.address if e.address is not None else state.address,
                            state_since=at if e.to_state != state.state else state.state_since,
                            state_seq=seq, last_seq=seq), None
        case ev.RouteHealthReported():
            if state.state == TERMINATED:
                return state, Anomaly(AFTER_FINAL, "health report after the route was terminated")
            return _replace(state, healthy=e.healthy, health_checked_at=at, health_detail=e.detail,
                            last_seq=seq), None
    return state, Anomaly(ILLEGAL_TRANSITION, f"{e.type_tag()} does not apply to a route")


class PoolState(msgspec.Struct, frozen=True, kw_only=True):
    pool: str
    breaker_open: bool = False
    since: datetime | None = None
    reason: str = ""
    trips: int = 0
    agents_at_trip: int = 0
    """Agents the pool had when the breaker last tripped (recovery is measured against it)."""
    last_seq: int = 0


def evolve_pool(state: PoolState | None, rec: Recorded) -> Evolved[PoolState | None]:
    """A pool's mass-failure breaker: open (orphaning stopped) or closed."""
    e, seq, at = rec.event, rec.seq, rec.stored_at
    problem = writer_problem(e)
    if problem is not None:
        return state, problem
    current = state or PoolState(pool=e.entity_id)
    match e:
        case ev.PoolBreakerTripped(reason=reason, agents=agents) if not current.breaker_open:
            return _replace(current, breaker_open=True, since=at, reason=reason, trips=current.trips + 1,
                            agents_at_trip=agents, last_seq=seq), None
        case ev.PoolBreakerReset(reason=reason) if current.breaker_open:
            return _replace(current, breaker_open=False, since=at, reason=reason, last_seq=seq), None
    return state, Anomaly(ILLEGAL_TRANSITION, f"{e.type_tag()} while the breaker is "
                                              f"{'open' if current.breaker_open else 'closed'}")


def fold(evolve: Callable[..., Evolved[Any]], records: Iterable[Recorded],
         *lookups: Any) -> tuple[Any, list[tuple[int, Anomaly]]]:
    """Fold one entity's records with its evolve function; returns (state, [(seq, anomaly), ...])."""
    state = None
    anomalies = []
    for rec in records:
        state, anomaly = evolve(state, rec, *lookups)
        if anomaly is not None:
            anomalies.append((rec.seq, anomaly))
    return state, anomalies


def agents_acting(records: Iterable[Recorded]) -> set[str]:
    """The agents whose registrations a session history's fold needs: those it names as claimers or owners, in
    events their producers may write (the fold flags any other before it looks at a registration)."""
    return {e.agent_id for e in (r.event for r in records)
            if isinstance(e, (ev.SessionClaimed, ev.SessionReleased, ev.SessionResourceReported))
            and writer_problem(e) is None}


def owners_judged(records: Iterable[Recorded], incarnation_at: IncarnationAt | None = None) -> set[str]:
    """The agents whose states a session history's fold needs (`agent_at`): none without a take-over (a claim
    naming a previous token); otherwise those that may have owned it - named by a claim their producer may write
    and, with `incarnation_at`, by their incarnation current at the claim (the fold applies no other claim).
    Claims for made-up agents, cheap to forge, must not make every read of the session read their histories."""
    records = list(records)
    if not any(isinstance(r.event, ev.SessionClaimed) and r.event.previous_token is not None for r in records):
        return set()
    return {e.agent_id for e, seq in ((r.event, r.seq) for r in records)
            if isinstance(e, ev.SessionClaimed) and writer_problem(e) is None
            and (incarnation_at is None or incarnation_at(e.agent_id, seq) == e.incarnation)}


def agents_lookup(histories: dict[str, list[Recorded]]) -> AgentAt:
    """agent_at from each agent's own history (its LEDGER events, oldest first), folded with `evolve_agent` - as
    the whole-log fold has them, since an agent's state depends on its own events alone."""
    from bisect import bisect_left

    timelines: dict[str, tuple[list[int], list[AgentState | None]]] = {}
    for agent_id, records in histories.items():
        seqs: list[int] = []
        states: list[AgentState | None] = []
        state: AgentState | None = None
        for rec in records:
            state, _ = evolve_agent(state, rec)
            seqs.append(rec.seq)
            states.append(state)
        timelines[agent_id] = (seqs, states)

    def agent_at(agent_id: str, seq: int) -> AgentState | None:
        timeline = timelines.get(agent_id)
        if timeline is None:
            return None
        i = bisect_left(timeline[0], seq)
        return timeline[1][i - 1] if i else None

    return agent_at


def registrations_lookup(registrations: dict[str, list[int]]) -> IncarnationAt:
    """incarnation_at from each agent's registration sequences (ascending)."""
    from bisect import bisect_left

    def incarnation_at(agent_id: str, seq: int) -> int | None:
        seqs = registrations.get(agent_id)
        if not seqs:
            return None
        i = bisect_left(seqs, seq)
        return seqs[i - 1] if i else None

    return incarnation_at


def claims_lookup(session_id: str, records: Iterable[Recorded], incarnation_at: IncarnationAt | None = None,
                  agent_at: AgentAt | None = None) -> SessionAt:
    """session_at for one session (its claim token and owner as of any point), from its history."""
    from bisect import bisect_left

    seqs: list[int] = []
    states: list[SessionState | None] = []
    state: SessionState | None = None
    for rec in records:
        state, _ = evolve_session(state, rec, incarnation_at, agent_at)
        seqs.append(rec.seq)
        states.append(state)

    def session_at(sid: str, seq: int) -> SessionState | None:
        if sid != session_id:
            return None
        i = bisect_left(seqs, seq)
        return states[i - 1] if i else None

    return session_at
