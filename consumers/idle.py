"""Idle sessions (seed 001): release sessions idle past their TTL - never a busy one.

Only the owning agent knows whether work is in flight, so the reaper runs
beside the agent (in its process) on the agent's own activity book-keeping:
`Agent.busy(session_id)` marks work in flight, `Agent.touch` notes activity.
The selection is a pure function; the release re-checks idleness and blocks
new work on the session before it writes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from ledger.agent import Activity, Agent
from ledger.errors import LedgerError

log = logging.getLogger(__name__)

RECENT_RELEASES = 1000


def select_idle(activity: dict[str, Activity]) -> list[str]:
    """Sessions with an idle TTL, nothing in flight, idle at least that long (longest idle first)."""
    idle = [(a.idle_for, sid) for sid, a in activity.items()
            if a.idle_ttl is not None and a.in_flight == 0 and a.idle_for >= a.idle_ttl]
    return [sid for _, sid in sorted(idle, reverse=True)]


class IdleReaper:
    """Checks an agent's sessions every `every` seconds and releases the idle ones."""

    def __init__(self, agent: Agent, *, every: float = 1.0) -> None:
        self.agent = agent
        self.every = every
        self.released: deque[str] = deque(maxlen=RECENT_RELEASES)
        """The sessions it released most recently (bounded: an agent may run for months)."""

    async def run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self.every)

    async def check(self) -> list[str]:
        agent = self.agent
        for sid in agent.needs_idle_ttl():
            try:
                state, _ = await agent.ledger.session(sid)
            except LedgerError as e:
                log.debug("cannot read session %s yet: %s", sid, e)
                continue
            agent.learn_idle_ttl(sid, state.idle_ttl if state else None)
        released = []
        for sid in select_idle(agent.activity()):
            if await agent.release_if_idle(sid):
                released.append(sid)
        self.released.extend(released)
        return released
