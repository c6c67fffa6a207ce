"""An in-memory view of agents and sessions, folded from the log, for agents that claim for themselves.

It answers one question: which sessions of my pool need an owner right now?
A session needs one when it is pending (never claimed), orphaned, or owned by
an agent that said goodbye, was declared dead, or was superseded by a newer
incarnation (the goodbye fast path: no waiting for a TTL).
"""

from __future__ import annotations

import msgspec

from . import events as ev
from . import lifecycle as lc
from .codec import Recorded


class Candidate(msgspec.Struct, frozen=True):
    session_id: str
    reason: str
    previous_token: int | None
    previous_owner: str | None


class FleetView:
    def __init__(self) -> None:
        self.agents: dict[str, lc.AgentState] = {}
        self.sessions: dict[str, lc.SessionState] = {}
        self.last_seq = 0

    def _incarnation_at(self, agent_id: str, seq: int) -> int | None:
        agent = self.agents.get(agent_id)
        return agent.incarnation if agent else None

    def apply(self, rec: Recorded) -> None:
        self.last_seq = rec.seq
        e = rec.event
        if isinstance(e, ev.AgentEvent) and not isinstance(e, ev.AgentHeartbeat):
            state, _ = lc.evolve_agent(self.agents.get(e.agent_id), rec)
            if state is not None:
                self.agents[e.agent_id] = state
        elif isinstance(e, ev.SessionEvent):
            state, _ = lc.evolve_session(self.sessions.get(e.session_id), rec, self._incarnation_at)
            if state is None:
                return
            if state.status == lc.S_TERMINATED:
                self.sessions.pop(e.session_id, None)  # final: keeps memory bounded by live sessions
            else:
                self.sessions[e.session_id] = state

    def owner_gone(self, session: lc.SessionState) -> str | None:
        """Why the session's owner can no longer hold it, or None while it can."""
        if session.owner is None:
            return None
        agent = self.agents.get(session.owner)
        if agent is None:
            return "owner_unknown"
        if agent.incarnation != session.owner_incarnation:
            return "owner_superseded"
        if agent.status == lc.A_GONE:
            return "owner_gone"
        if agent.status == lc.A_DEAD:
            return "owner_dead"
        return None

    def candidates(self, pool: str, platform: str, region: str) -> list[Candidate]:
        """Sessions of this pool, platform and region that need an owner, oldest first."""
        out = []
        for s in self.sessions.values():
            if (s.pool, s.platform, s.region) != (pool, platform, region):
                continue
            if s.status == lc.S_PENDING:
                out.append(Candidate(s.session_id, "initial", None, None))
            elif s.status == lc.S_ORPHANED:
                out.append(Candidate(s.session_id, "failover", None, None))
            elif s.status == lc.S_ASSIGNED and self.owner_gone(s):
                out.append(Candidate(s.session_id, "failover", s.token, s.owner))
        return out
