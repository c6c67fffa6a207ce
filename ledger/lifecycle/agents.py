"""Agents: their lifecycle statuses, their state, and the fold of one agent's lifecycle events."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from typing import TypeGuard

import msgspec

from ledger import events as ev
from ledger.codec import Recorded

from .anomalies import (
    ILLEGAL_TRANSITION,
    SUPERSEDED_INCARNATION,
    UNKNOWN_ENTITY,
    UNKNOWN_INCARNATION,
    Anomaly,
    Evolved,
    writer_problem,
)

A_ALIVE, A_DRAINING, A_DRAINED, A_DEAD, A_GONE = "alive", "draining", "drained", "dead", "gone"
A_FENCED = "fenced"
"""Lifecycle status from events; `suspect` is derived (see projections) from a suspicion and later beats."""
FINAL_AGENT_STATUSES = frozenset({A_GONE, A_DEAD, A_FENCED})
"""An incarnation in one of these never serves again: a claim for it does not apply (`sessions._claim_problem`),
and the whole-log fold lets go of the agent once it has been so for `retain` (so the two agree)."""


def final_incarnation(state: AgentState | None, incarnation: int) -> TypeGuard[AgentState]:
    """Whether an agent's state (None: not registered) says this incarnation is gone, dead or fenced."""
    return state is not None and state.incarnation == incarnation and state.status in FINAL_AGENT_STATUSES


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
    drain_requested_at: datetime | None = None
    """When an operator last asked this incarnation to drain (`agent.drain_requested`); the agent answers with
    `draining`, which sets `status` - the request alone never does (an agent that cannot answer stays alive)."""
    drain_requested_by: str | None = None
    drain_request_deadline: datetime | None = None
    drain_request_id: str | None = None
    """Event id of the request: the cause the agent's `draining` names."""
    unreachable_reports: int = 0
    last_report_at: datetime | None = None
    last_seq: int = 0


IncarnationAt = Callable[[str, int], "int | None"]


AgentAt = Callable[[str, int], "AgentState | None"]
"""(agent id, seq) -> the agent's state just before `seq` (None: it never registered before it)."""


_replace = msgspec.structs.replace


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
        case ev.AgentDrainRequested(deadline=deadline):
            # Only an agent that can still drain; a request for an older incarnation was flagged above, so it
            # never drains the process that registered since.
            if status in (A_ALIVE, A_DRAINING):
                return _replace(state, drain_requested_at=at, drain_requested_by=e.producer.id,
                                drain_request_deadline=deadline, drain_request_id=e.event_id, last_seq=seq), None
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


def superseded_by(registrations: Iterable[tuple[int, str]], incarnation: int, instance_id: str) -> int | None:
    """The registration (sequence) that supersedes `incarnation` of process `instance_id`, or None.

    Only a registration with a higher sequence by another process supersedes. A
    read whose newest registration is lower (a replica that lags behind our own
    registration) proves nothing: it must never fence a healthy agent.
    """
    newer = [seq for seq, instance in registrations if seq > incarnation and instance != instance_id]
    return max(newer) if newer else None
