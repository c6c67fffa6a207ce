"""Sessions: their statuses, their state, and the one rule of which session events apply.

Whether a session event applies is one predicate, `session_event_problem`
(claims: `claim_problem`, owner writes: `owner_write_problem`): the fold, the
SDK's decisions (`decide.check_owner`) and an Agent judging what its watch
delivers all call it, so none of them can act on an event another refuses.
Take-overs follow `owner_replaceable`, judged against the owner agent's state.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import msgspec

from ledger import events as ev
from ledger.codec import Recorded

from .agents import (
    A_DEAD,
    A_DRAINED,
    A_DRAINING,
    A_FENCED,
    A_GONE,
    AgentAt,
    AgentState,
    CurrentIncarnation,
    IncarnationAt,
    final_incarnation,
    incarnation_problem,
)
from .anomalies import (
    AFTER_FINAL,
    DUPLICATE,
    FINAL_CLAIMER,
    FINAL_OWNER,
    FOREIGN_PLACEMENT,
    ILLEGAL_TRANSITION,
    LIVE_OWNER,
    OVERLAPPING_CLAIM,
    STALE_TOKEN,
    SUPERSEDED_INCARNATION,
    UNKNOWN_ENTITY,
    Anomaly,
    Evolved,
    writer_problem,
)

S_PENDING, S_ASSIGNED, S_ORPHANED, S_RELEASED, S_TERMINATED = (
    "pending", "assigned", "orphaned", "released", "terminated")
SESSION_STATES = (S_PENDING, S_ASSIGNED, S_ORPHANED, S_RELEASED, S_TERMINATED)
CLAIMABLE = frozenset({S_PENDING, S_ORPHANED, S_RELEASED})
"""States in which a session has no owner and may be claimed."""
CLAIM_REASONS = ("initial", "failover", "drain", "rebalance", "manual")


class Checkpoint(msgspec.Struct, frozen=True, kw_only=True):
    """The newest progress checkpoint an owner recorded on a session (`session.checkpointed`)."""

    data: bytes
    seq: int
    """Stream sequence of the checkpoint event."""
    agent_id: str
    """The owner that wrote it."""
    token: int
    """The claim it was written under."""
    at: datetime
    """When the server stored it."""
    note: str = ""


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
    checkpoint: Checkpoint | None = None
    """The newest checkpoint of any owner: kept across releases, orphanings and claims (the next owner resumes from
    it), dropped by a termination."""


SessionAt = Callable[[str, int], "SessionState | None"]
"""(session id, seq) -> the session's state just before `seq` (None: it did not exist then)."""


_replace = msgspec.structs.replace


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

Placement = tuple[str, str, str]
"""(pool, platform, region): where an agent serves, and where a session must be served."""

RegisteredAt = Callable[[str, int], "AgentState | None"]
"""(agent id, seq) -> the agent's current registration just before `seq`, as registered (its pool, platform and
region; its status is not followed). None: it never registered before it."""


def placement_of(x: AgentState | SessionState) -> Placement:
    return x.pool, x.platform, x.region


def claim_problem(state: SessionState | None, agent_id: str, incarnation: int, previous_token: int | None,
                  current: CurrentIncarnation | None = None, owner: Any = NO_OWNER_STATE,
                  placement: Placement | None = None) -> Anomaly | None:
    """Why a claim of the session in `state` for `agent_id`/`incarnation` must not apply (None: it applies).

    Without `current` the registration check is skipped (the caller vouches for the incarnation). `owner`: the
    state of the session's owner agent as of the claim (AgentState, or None if it is not registered); left out,
    a take-over naming the current token is not judged against it (a caller that cannot tell). `placement`: the
    claimer's (pool, platform, region) as registered by that incarnation; None, the caller vouches.
    """
    return _claim_problem(state, agent_id, incarnation, previous_token, current, lambda: owner, lambda: placement,
                          lambda: None)


def _claim_problem(state: SessionState | None, agent_id: str, incarnation: int, previous_token: int | None,
                   current: CurrentIncarnation | None, owner_of: Callable[[], Any],
                   placement_of_claimer: Callable[[], Placement | None],
                   claimer_of: Callable[[], AgentState | None]) -> Anomaly | None:
    """`claim_problem`, asking for the owner's state, the claimer's placement and its state only when it needs them.

    The checks that need the session's state alone come first, then the owner's state (a take-over), then the
    claimer's registration, then its state: a claim flagged whatever its claimer (overlapping, of a live owner)
    costs a reader who holds only the session's history no read of the claimer's registrations - claims for
    made-up agents are cheap to forge, and every later read of the session would pay for them - and only a claim
    for a registered incarnation of the session's placement costs a read of its claimer's history.

    A claim for an incarnation that is gone, dead or fenced at the claim does not apply (`FINAL_CLAIMER`): it
    would hand the session to an agent that never serves it. It is also what keeps every fold alike once the
    whole-log fold has let go of such an agent (`retain`): there the claim names an agent it no longer knows, a fold of
    one history reads the agent's registrations from the log and finds it, and both must leave the session as it
    was, or the SDK and the projections disagree on its owner and the reclaimer's claims are refused for ever.
    """
    if state is None:
        return Anomaly(UNKNOWN_ENTITY, "session.claimed for an unknown session")
    if state.status == S_TERMINATED:
        return Anomaly(AFTER_FINAL, "session.claimed after the session was terminated")
    if state.status == S_ASSIGNED and previous_token != state.token:
        return Anomaly(OVERLAPPING_CLAIM,
                       f"{agent_id} claimed while {state.owner} owns it under token {state.token} "
                       f"(claim names previous token {previous_token})")
    if state.status == S_ASSIGNED:
        owner = owner_of()
        if owner is not NO_OWNER_STATE and owner_replaceable(state, owner) is None:
            return Anomaly(LIVE_OWNER,
                           f"take-over for {agent_id} of token {state.token} while its owner {state.owner} "
                           f"(incarnation {state.owner_incarnation}) is {owner.status}; a take-over applies only "
                           f"from an owner that is gone, dead, fenced, draining, drained or superseded")
    if current is not None:
        problem = incarnation_problem("session.claimed", agent_id, incarnation, current(agent_id))
        if problem:
            return problem
    placement = placement_of_claimer()
    if placement is not None and placement != placement_of(state):
        return Anomaly(FOREIGN_PLACEMENT,
                       f"claim for {agent_id} (pool/platform/region {'/'.join(placement)}) of a session of "
                       f"{'/'.join(placement_of(state))}: only an agent of the session's own pool, platform and "
                       f"region may own it")
    claimer = claimer_of()
    if final_incarnation(claimer, incarnation):
        return Anomaly(FINAL_CLAIMER,
                       f"claim for {agent_id} (incarnation {incarnation}), which is {claimer.status} since "
                       f"#{claimer.status_seq}: an incarnation gone, dead or fenced never serves a session again")
    return None


def owner_write_problem(state: SessionState | None, agent_id: str, incarnation: int, token: int | None,
                        current: CurrentIncarnation | None = None, what: str = "owner write",
                        writer_of: Callable[[], AgentState | None] | None = None) -> Anomaly | None:
    """Why an owner write (release, resource report, checkpoint) by `agent_id`/`incarnation` under `token` must not
    apply.

    The one rule for both sides: the fold flags such a write, and `decide.check_owner`
    refuses it before it is written. The write must carry the session's current
    token, come from its owner, and from the very incarnation that claimed it (a
    new incarnation of the same agent does not inherit its predecessor's claims).
    With `current`, the writer must also still be the agent's current incarnation - asked last, so that a
    write by anyone but the owner's claiming incarnation costs a reader no read of the writer's registrations.
    With `writer_of` (its state at the write), it must not be gone, dead or fenced (`FINAL_OWNER`); left out, the
    caller vouches (`decide`: an agent writes for itself while it runs).
    """
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
    if current is not None:
        problem = incarnation_problem(what, agent_id, incarnation, current(agent_id))
        if problem:
            return problem
    writer = writer_of() if writer_of is not None else None
    if final_incarnation(writer, incarnation):
        # As for claims (FINAL_CLAIMER), and for the same reason: once the whole-log fold has let go of the owner,
        # it cannot apply the write, so no fold may (or the SDK sees it released, the projections assigned).
        return Anomaly(FINAL_OWNER, f"{what} by {agent_id} (incarnation {incarnation}), which is {writer.status} "
                                    f"since #{writer.status_seq}: its sessions are for others to take over")
    return None


def session_event_problem(state: SessionState | None, rec: Recorded,
                          incarnation_at: IncarnationAt | None = None,
                          agent_at: AgentAt | None = None,
                          registered_at: RegisteredAt | None = None) -> Anomaly | None:
    """Why this stored session event must not change `state` (None when it applies).

    The one rule: `evolve_session` applies exactly the events this accepts, and an
    Agent judges what its watch delivers with it, so an agent never gains or loses
    a session on an event the projections flag. A claimer's placement comes from `registered_at`, or else from
    `agent_at` (the whole-log fold's agent table holds each agent's current registration); with neither, it is
    not judged. The lookups are asked only when the rule needs them (`_claim_problem`).
    """
    e, seq = rec.event, rec.seq
    unauthorized = writer_problem(e, state.owner if state is not None else None)
    if unauthorized is not None:
        return unauthorized
    current: CurrentIncarnation | None = None
    if incarnation_at is not None:
        def current(agent_id: str) -> int | None:
            return incarnation_at(agent_id, seq)

    def state_of(agent_id: str) -> Callable[[], AgentState | None]:
        """The agent's state just before this event, asked only when the rule needs it (None: not told)."""
        def at() -> AgentState | None:
            return agent_at(agent_id, seq) if agent_at is not None else None
        return at
    match e:
        case ev.SessionCreated():
            if state is not None:
                return Anomaly(DUPLICATE, f"session {e.session_id} was already created at #{state.last_seq}")
            return None
        case ev.SessionClaimed():
            claim = e

            def owner() -> Any:
                if agent_at is None or state is None or state.owner is None:
                    return NO_OWNER_STATE
                return agent_at(state.owner, seq)

            def placement() -> Placement | None:
                lookup = registered_at or agent_at
                claimer = lookup(claim.agent_id, seq) if lookup is not None else None
                # Another incarnation's registration says nothing of this one's (the incarnation check flags it).
                return placement_of(claimer) if claimer is not None and claimer.incarnation == claim.incarnation \
                    else None

            return _claim_problem(state, e.agent_id, e.incarnation, e.previous_token, current, owner, placement,
                                  state_of(e.agent_id))
        case ev.SessionReleased() | ev.SessionResourceReported() | ev.SessionCheckpointed():
            return owner_write_problem(state, e.agent_id, e.incarnation, e.token, current, e.type_tag(),
                                       state_of(e.agent_id))
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


def evolve_session(state: SessionState | None, rec: Recorded, incarnation_at: IncarnationAt | None = None,
                   agent_at: AgentAt | None = None,
                   registered_at: RegisteredAt | None = None) -> Evolved[SessionState | None]:
    """Next state of one session after one of its events (`session_event_problem` decides whether it applies).

    Its times are when the server stored the events, as for agents: they compare with the agents' times, and
    a writer's own `time` (skewed, or forged into the year 9999) must not date a claim or an owner's activity.
    """
    problem = session_event_problem(state, rec, incarnation_at, agent_at, registered_at)
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
        case ev.SessionCheckpointed():
            return _replace(state, checkpoint=Checkpoint(data=e.data, seq=seq, agent_id=e.agent_id, token=e.token,
                                                         at=at, note=e.note),
                            last_owner_write_at=at, last_seq=seq), None
        case ev.SessionOrphaned():
            return _replace(state, status=S_ORPHANED, owner=None, owner_instance=None, owner_incarnation=None,
                            token=None, reason=e.reason, status_since=at, cause_id=e.event_id, last_seq=seq), None
        case ev.SessionTerminated():
            return _replace(state, status=S_TERMINATED, owner=None, owner_instance=None, owner_incarnation=None,
                            token=None, reason=e.reason or "terminated", status_since=at, cause_id=e.event_id,
                            checkpoint=None, last_seq=seq), None
    return state, Anomaly(ILLEGAL_TRANSITION, f"{e.type_tag()} does not apply to a session")


def owns(state: SessionState | None, agent_id: str, incarnation: int) -> bool:
    """Whether this incarnation of the agent owns the session in `state`: may write as its owner now."""
    return state is not None and owner_write_problem(state, agent_id, incarnation, state.token) is None
