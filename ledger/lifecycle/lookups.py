"""Folding one entity's history, and the lookups a fold of one history needs from the others, as of a position.

A whole-log fold has every entity at hand; a caller holding a few histories
(the SDK deciding what it may write, time travel, `ledger history`) builds
`incarnation_at`, `agent_at` and `session_at` from them with these, so its
fold applies exactly the checks the whole-log fold applies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from ledger import events as ev
from ledger.codec import Recorded

from .agents import AgentAt, AgentState, IncarnationAt, evolve_agent
from .anomalies import Anomaly, Evolved, writer_problem
from .sessions import SessionAt, SessionState, evolve_session


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
            if isinstance(e, (ev.SessionClaimed, ev.SessionReleased, ev.SessionResourceReported,
                              ev.SessionCheckpointed))
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
