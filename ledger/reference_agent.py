"""The reference agent process behind `ledger agent`: an Agent that claims its pool's sessions itself.

It folds agent and session events into a FleetView, and whenever something
changes (or every heartbeat interval) claims sessions of its pool, platform
and region that need an owner, up to its capacity. Claims race with other
agents' claims; the compare-and-set picks one winner, the losers move on. A
more loaded agent waits a moment before claiming, so the least loaded tends
to win.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable

from . import subjects
from .agent import Agent
from .client import Ledger
from .codec import Recorded
from .errors import CapacityExhausted, Conflict, Draining, Fenced, LedgerError, NotClaimable, NotFound
from .fleet import FleetView

log = logging.getLogger(__name__)

STAGGER_PER_SESSION = 0.01
"""Seconds a claimer waits per session it already owns before claiming more."""


class SelfClaimer:
    def __init__(self, agent: Agent, say: Callable[[str], None]) -> None:
        self.agent = agent
        self.view = FleetView()
        self.say = say
        self._changed = asyncio.Event()

    async def follow(self) -> None:
        """Keep the view current (from the start of the log, then live)."""
        filters = [subjects.family_filter("agent"), subjects.family_filter("session")]
        start = 1
        while True:
            try:
                async for batch in self.agent.store.replay(filters, start_seq=start, follow=True):
                    for item in batch:
                        start = item.seq + 1
                        if isinstance(item, Recorded):
                            self.view.apply(item)
                    self._changed.set()
            except LedgerError as e:
                log.debug("fleet view interrupted (%s); resuming at #%d", e, start)
                await asyncio.sleep(0.5)

    async def claim_loop(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self.agent.heartbeat)
            self._changed.clear()
            await self.claim_what_needs_an_owner()

    async def claim_what_needs_an_owner(self) -> None:
        agent = self.agent
        if agent.fenced or agent.draining:
            return
        candidates = [c for c in self.view.candidates(agent.pool, agent.platform, agent.region)
                      if c.session_id not in agent.owned]
        random.shuffle(candidates)
        for c in candidates:
            if agent.load >= agent.capacity:
                return
            if agent.load:
                await asyncio.sleep(min(0.2, STAGGER_PER_SESSION * agent.load))
            try:
                claim = await agent.claim(c.session_id, reason=c.reason, previous_token=c.previous_token)
            except (NotClaimable, Conflict, NotFound):
                continue  # another claimer was faster, or the session moved on
            except (Fenced, Draining, CapacityExhausted):
                return
            except LedgerError as e:
                log.warning("claim of %s failed: %s", c.session_id, e)
                continue
            origin = f" from {c.previous_owner}" if c.previous_owner else ""
            self.say(f"claimed {c.session_id} (token {claim.token}, {c.reason}{origin}); "
                     f"load {agent.load}/{agent.capacity}")


async def run(ledger: Ledger, *, agent_id: str, pool: str, platform: str, region: str, capacity: int,
              heartbeat: float, ttl: float, say: Callable[[str], None]) -> None:
    """Run until SIGTERM or SIGINT, then say goodbye once."""
    agent = Agent(ledger, agent_id=agent_id, pool=pool, platform=platform, region=region, capacity=capacity,
                  heartbeat=heartbeat, ttl=ttl, handle_signals=True,
                  on_fenced=lambda why: say(f"fenced: {why}"),
                  on_lost=lambda sid, why: say(f"lost {sid}: {why}"))
    async with agent:
        say(f"registered {agent_id} (incarnation {agent.incarnation}) in pool {pool}/{platform}/{region}, "
            f"capacity {capacity}, heartbeat {heartbeat:g} s, ttl {ttl:g} s")
        claimer = SelfClaimer(agent, say)
        tasks = [asyncio.create_task(claimer.follow()), asyncio.create_task(claimer.claim_loop())]
        try:
            await agent.wait_stopped()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        say(f"stopping: saying goodbye (owned {agent.load} session(s))")
    say("goodbye written; bye")
