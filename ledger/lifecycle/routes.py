"""Routes: their states and legal transitions, their state, and the fold of one route's events."""

from __future__ import annotations

from datetime import datetime

import msgspec

from ledger import events as ev
from ledger.codec import Recorded

from .anomalies import (
    AFTER_FINAL,
    DUPLICATE,
    ILLEGAL_TRANSITION,
    STALE_TOKEN,
    UNKNOWN_ENTITY,
    Anomaly,
    Evolved,
    writer_problem,
)
from .sessions import SessionAt

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


_replace = msgspec.structs.replace


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
            illegal = route_transition_error(state.state, e.to_state)
            if illegal:
                return state, Anomaly(ILLEGAL_TRANSITION, illegal)
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
