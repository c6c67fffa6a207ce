"""The orphan reclaimer's rules: pure, from sessions, agents and free capacity to claims and orphanings.

A session needs a (new) owner when it is pending, orphaned, or owned by an
agent that is gone, dead, fenced, superseded or unknown; a draining agent's
sessions are handed off. Each goes to an eligible agent of the same pool,
platform and region - alive, not draining, not suspect, with free capacity -
least loaded first. Without an eligible agent, a session whose owner is lost
is recorded as orphaned (with the reason) and waits; a pending or orphaned one
just waits. While a pool's breaker is open, sessions of its dead agents are
held where they are (goodbyes, which are deliberate, still move at once).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

import msgspec

from ledger import lifecycle as lc
from ledger.decide import AgentRef
from projections.beats import Beat, of_incarnation
from projections.health import ALIVE, DEFAULT_POLICY, HealthPolicy, agent_health, beat_time
from projections.health import turns as health_turns

OWNER_GONE, OWNER_DEAD, OWNER_FENCED = lc.OWNER_GONE, lc.OWNER_DEAD, lc.OWNER_FENCED
OWNER_SUPERSEDED, OWNER_UNKNOWN, OWNER_DRAINING = lc.OWNER_SUPERSEDED, lc.OWNER_UNKNOWN, lc.OWNER_DRAINING


class ClaimFor(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    agent: AgentRef
    reason: str
    previous_token: int | None
    previous_owner: str | None
    why: str
    cause_id: str | None


class Orphan(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    reason: str
    previous_token: int
    previous_owner: str | None
    cause_id: str | None


class Hold(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    why: str


Action = ClaimFor | Orphan | Hold


def owner_problem(session: lc.SessionState, agents: Mapping[str, lc.AgentState]) -> tuple[str, str | None] | None:
    """(why the owner cannot keep the session, the event that says so), or None while it can.

    The fold's own rule (`lifecycle.owner_replaceable`): the take-overs planned here are exactly those it applies.
    """
    if session.status != lc.S_ASSIGNED or session.owner is None:
        return None
    return lc.owner_replaceable(session, agents.get(session.owner))


def ineligible(agent: lc.AgentState | None, beat: Beat | None, now: datetime, *,
               incarnation: int | None = None, policy: HealthPolicy = DEFAULT_POLICY) -> str | None:
    """Why this agent may not be given sessions now, or None when it may.

    The one rule for both kinds of claimer: the reclaimer asks it of every
    candidate, a self-claiming agent of itself (passing its own `incarnation`).
    An agent may take sessions only while the log says it is alive - not gone,
    dead, fenced, draining or drained - its health is alive (it beats, it is
    not suspect) and, asking for itself, the incarnation asking is the one
    registered. Were the two sides to judge differently, one would give an
    agent what the other takes away, for ever: a goodbye forged for a live
    agent alone in its pool made the reclaimer orphan its sessions and the
    agent claim them back, dozens of times a second. Both judge health with
    the operator's one `policy`, the monitor's.
    """
    if agent is None:
        return "not registered"
    if incarnation is not None and incarnation != agent.incarnation:
        return f"incarnation {incarnation} is not the registered one ({agent.incarnation})"
    if agent.status != lc.A_ALIVE:
        return f"{agent.status} ({agent.reason})"
    health, rule = agent_health(agent, beat, now, policy)
    return None if health == ALIVE else f"{health} ({rule})"


def eligible_until(agent: lc.AgentState, beat: Beat | None, policy: HealthPolicy = DEFAULT_POLICY) -> datetime:
    """For an agent `ineligible` passes now: the moment after which its silence alone (no new event) makes it
    ineligible - suspect once `suspect_after_missed` intervals passed since its newest beat (or registration),
    dead after `dead_after` - whichever comes first: `projections.health.turns`, the moments `assess` itself
    turns (the monitor wakes by them too); the reclaimer judges the agent again (with `ineligible`) only then,
    or when it changes.
    """
    own = of_incarnation(beat, agent.incarnation)
    turns = [t for t in health_turns(agent, beat_time(own) if own is not None else None, policy) if t is not None]
    return min(turns) if turns else NEVER


NEVER = datetime.max.replace(tzinfo=UTC)
"""An agent that no silence makes ineligible (no heartbeat interval and a ttl beyond the calendar)."""


class Capacity(msgspec.Struct):
    """An eligible agent and how many more sessions it can take."""

    agent: AgentRef
    load: int
    capacity: int

    @property
    def free(self) -> int:
        return self.capacity - self.load


def plan(sessions: Iterable[lc.SessionState], agents: Mapping[str, lc.AgentState],
         eligible: Mapping[tuple[str, str, str], list[Capacity]], pools: Mapping[str, lc.PoolState],
         skip: frozenset[str] | set[str] = frozenset()) -> list[Action]:
    """What to write now. `eligible` maps (pool, platform, region) to agents that may take sessions.

    The capacities in `eligible` are consumed as sessions are placed (pass copies).
    """
    failover: list[tuple[lc.SessionState, str, str | None]] = []
    waiting: list[lc.SessionState] = []
    for s in sessions:
        if s.session_id in skip or s.status == lc.S_TERMINATED:
            continue
        if s.status in (lc.S_PENDING, lc.S_ORPHANED):
            waiting.append(s)
            continue
        problem = owner_problem(s, agents)
        if problem is not None:
            failover.append((s, *problem))
    actions: list[Action] = []
    # Sessions that lost a live owner first, then those already waiting (orphaned before pending).
    for s, why, cause in sorted(failover, key=lambda f: f[0].last_seq):
        pool = pools.get(s.pool)
        if why == OWNER_DEAD and pool is not None and pool.breaker_open:
            actions.append(Hold(session_id=s.session_id, why=f"pool {s.pool} breaker open: {pool.reason}"))
            continue
        target = _least_loaded(eligible.get((s.pool, s.platform, s.region), []), exclude=s.owner)
        if target is not None:
            reason = "drain" if why == OWNER_DRAINING else "failover"
            actions.append(ClaimFor(session_id=s.session_id, agent=target.agent, reason=reason,
                                    previous_token=s.token, previous_owner=s.owner, why=why, cause_id=cause))
        elif why != OWNER_DRAINING:
            assert s.token is not None
            actions.append(Orphan(session_id=s.session_id, reason=why, previous_token=s.token,
                                  previous_owner=s.owner, cause_id=cause))
    waiting.sort(key=lambda s: (s.status != lc.S_ORPHANED, s.last_seq))
    for s in waiting:
        target = _least_loaded(eligible.get((s.pool, s.platform, s.region), []), exclude=None)
        if target is not None:
            actions.append(ClaimFor(session_id=s.session_id, agent=target.agent,
                                    reason="failover" if s.status == lc.S_ORPHANED else "initial",
                                    previous_token=None, previous_owner=None, why=s.status, cause_id=s.cause_id))
    return actions


def _least_loaded(candidates: list[Capacity], exclude: str | None) -> Capacity | None:
    best: Capacity | None = None
    for c in candidates:
        if c.free <= 0 or c.agent.agent_id == exclude:
            continue
        if best is None or (c.load / c.capacity, c.agent.agent_id) < (best.load / best.capacity, best.agent.agent_id):
            best = c
    if best is not None:
        best.load += 1
    return best
