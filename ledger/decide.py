"""Pure decisions: given an entity's current state, may this write happen, and as what event?

Each function raises a typed LedgerError that says why a write is refused, or
returns the event to append. The caller appends it with a compare-and-set on
the entity's last sequence, so the decision and the write cannot be split by
another writer.
"""

from __future__ import annotations

from typing import Any

import msgspec

from . import events as ev
from . import lifecycle as lc
from .errors import IllegalTransition, InvalidInput, NotAuthorized, NotClaimable, NotFound, StaleToken, Superseded


class AgentRef(msgspec.Struct, frozen=True):
    """One incarnation of an agent: who a claim is for, or who is writing as owner."""

    agent_id: str
    instance_id: str
    incarnation: int
    placement: tuple[str, str, str] | None = None
    """Where this incarnation registered (pool, platform, region): a claim is only for an agent of the session's
    own (`lifecycle.claim_problem`). None: the caller cannot tell, and vouches."""


def decide_claim(state: lc.SessionState | None, session_id: str, who: AgentRef, *, producer: ev.Producer,
                 reason: str, previous_token: int | None = None, causation_id: str | None = None,
                 correlation_id: str | None = None, owner: Any = lc.NO_OWNER_STATE) -> ev.SessionClaimed:
    """A claim of `session_id` for `who`.

    An unowned session (pending, orphaned, released) can be claimed by anyone - for itself, or by the
    reclaimer for another agent (`lifecycle.writer_problem`: NotAuthorized otherwise).
    An owned one only by naming its current token in `previous_token` - a
    deliberate take-over (failover from a dead owner, drain hand-off) - and only
    while its owner may be replaced (`lifecycle.owner_replaceable`, judged on
    `owner`, the owner agent's current state; left out, the caller vouches).
    Only for an agent of the session's pool, platform and region (`who.placement`).
    """
    if reason not in lc.CLAIM_REASONS:
        raise InvalidInput(f"claim reason must be one of {', '.join(lc.CLAIM_REASONS)}, got {reason!r}")
    if state is None:
        raise NotFound(f"session {session_id} does not exist")
    previous_owner = state.owner
    if state.status == lc.S_ASSIGNED and lc.owns(state, who.agent_id, who.incarnation):
        # The fold would apply it, but it would only move the token: refuse the no-op.
        raise NotClaimable(f"session {session_id} is already owned by {who.agent_id} (token {state.token})")
    if state.status != lc.S_ASSIGNED:
        previous_token = None
    # The fold's own rule (the caller vouches for `who` being its agent's current incarnation).
    problem = lc.claim_problem(state, who.agent_id, who.incarnation, previous_token, owner=owner,
                               placement=who.placement)
    if problem is not None and problem.kind == lc.AFTER_FINAL:
        raise NotClaimable(f"session {session_id} is terminated")
    if problem is not None and problem.kind in (lc.LIVE_OWNER, lc.FOREIGN_PLACEMENT):
        raise NotClaimable(f"session {session_id}: {problem.detail}")
    if problem is not None:
        raise NotClaimable(
            f"session {session_id} is owned by {state.owner} under token {state.token}; "
            "a take-over must name that token"
        )
    claim = ev.SessionClaimed(
        producer=producer, session_id=session_id, agent_id=who.agent_id, instance_id=who.instance_id,
        incarnation=who.incarnation, reason=reason, previous_owner=previous_owner, previous_token=previous_token,
        causation_id=causation_id, correlation_id=correlation_id,
    )
    unauthorized = lc.writer_problem(claim)  # an agent claims for itself, the reclaimer for others
    if unauthorized is not None:
        raise NotAuthorized(unauthorized.detail)
    return claim


def check_owner(state: lc.SessionState | None, session_id: str, who: AgentRef, token: int,
                current: lc.CurrentIncarnation | None = None) -> None:
    """Refuse an owner write unless `who` holds the session under `token` right now.

    The rule is `lifecycle.owner_write_problem`, the one the fold applies to the
    written event, so a write this lets through is never flagged. Without
    `current` the writer vouches for being its agent's current incarnation.
    """
    problem = lc.owner_write_problem(state, who.agent_id, who.incarnation, token, current)
    if problem is None:
        return
    if state is None:
        raise NotFound(f"session {session_id} does not exist")
    if problem.kind in (lc.SUPERSEDED_INCARNATION, lc.UNKNOWN_ENTITY):
        raise Superseded(f"session {session_id}: {problem.detail}")
    same_claim = token == state.token and who.agent_id == state.owner  # then only the incarnation differs
    raise StaleToken(session_id, token, state.token, state.owner, why=problem.detail if same_claim else None)


def check_checkpoint_size(data: bytes) -> None:
    """Refuse a checkpoint too large to record, before anything is read or appended."""
    if len(data) > ev.MAX_CHECKPOINT_BYTES:
        raise InvalidInput(f"checkpoint of {len(data)} bytes is larger than the {ev.MAX_CHECKPOINT_BYTES} bytes a "
                           f"checkpoint may hold (record progress, not state: put large state elsewhere and "
                           f"checkpoint where it is)")


def decide_orphan(state: lc.SessionState | None, session_id: str, *, producer: ev.Producer, reason: str,
                  previous_token: int, previous_owner: str | None = None,
                  causation_id: str | None = None) -> ev.SessionOrphaned:
    """An orphaning of `session_id` from the claim `previous_token` (its owner is lost, nobody can take it).

    The fold's own rule (`lifecycle.orphan_problem`): refused (StaleToken, IllegalTransition) exactly when
    the fold would flag it - the session is no longer assigned under that token.
    """
    if state is None:
        raise NotFound(f"session {session_id} does not exist")
    if state.status == lc.S_TERMINATED:
        raise IllegalTransition(f"session {session_id} is terminated", current=state.status, requested=lc.S_ORPHANED)
    problem = lc.orphan_problem(state, previous_token)
    if problem is not None and problem.kind == lc.STALE_TOKEN:
        raise StaleToken(session_id, previous_token, state.token, state.owner)
    if problem is not None:
        raise IllegalTransition(f"session {session_id}: {problem.detail}", current=state.status,
                                requested=lc.S_ORPHANED)
    return ev.SessionOrphaned(producer=producer, session_id=session_id, reason=reason, previous_owner=previous_owner,
                              previous_incarnation=state.owner_incarnation, previous_token=previous_token,
                              causation_id=causation_id)


def excess_sessions(tokens: dict[str, int], capacity: int) -> list[str]:
    """Which sessions an agent holding more than `capacity` gives up: its newest claims (highest tokens).

    The newest are the ones least likely to have started work; the same holdings
    always give the same answer, so repeated checks name the same sessions.
    """
    extra = len(tokens) - capacity
    if extra <= 0:
        return []
    return sorted(tokens, key=lambda sid: (tokens[sid], sid), reverse=True)[:extra]


def decide_transition(state: lc.RouteState | None, route_id: str, to_state: str) -> None:
    """Refuse an illegal route transition with a message naming both states."""
    if state is None:
        raise NotFound(f"route {route_id} does not exist")
    problem = lc.route_transition_error(state.state, to_state)
    if problem:
        raise IllegalTransition(f"route {route_id}: {problem}", current=state.state, requested=to_state)
