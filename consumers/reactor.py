"""Reactor: the loop shared by consumers that act on the state after changes, and when a deadline passes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime

from ledger import cancellation
from ledger import events as ev
from ledger.errors import LedgerError
from projections.state import Change

from .follow import Follower, Item

log = logging.getLogger(__name__)


class Reactor:
    """Runs `step(now)` after every batch that changed one of `kinds`, and at least every `tick` seconds.

    The timer matters as much as the changes: deadlines (a start timeout, an agent turning unhealthy) pass
    without any event. A step costs what is due, not what is known: each change is handed to `changed` as
    it is applied (to note the entity), and a step looks only at what was noted or whose deadline passed,
    so a tick with nothing due is nearly free.

    The first step after the follower caught up starts from the fold as it stands (every entity it holds is
    judged once, from memory); `caught_up` is set once that step is done and its writes settled.
    """

    kinds: tuple[str, ...] = ()

    def __init__(self, follower: Follower, *, tick: float = 0.5) -> None:
        self.follower = follower
        self.tick = tick
        self.caught_up = asyncio.Event()
        """Set once the first step (the backlog found in the fold) is done: this consumer is acting live."""
        self.steps = 0
        self._wake = asyncio.Event()
        follower.listen(self._heard)

    def _heard(self, stream: str, batch: list[Item], changes: list[Change]) -> None:
        kinds, woken = self.kinds, False
        for c in changes:
            if c.kind in kinds and self.changed(c):
                woken = True
        if woken:
            self._wake.set()

    def changed(self, change: Change) -> bool:
        """Note an applied change of one of `kinds` (called as the follower applies it; must be cheap);
        whether it calls for a step now (False: the next tick will do)."""
        return True

    async def run(self) -> None:
        await self.follower.caught_up.wait()
        while True:
            cancellation.raise_if_cancelled()  # a cancel that nats-py swallowed in the last step still stops us
            self._wake.clear()
            try:
                await self.step(self.follower.clock.now(ev.utcnow))
            except LedgerError as e:
                log.warning("%s step failed: %s", type(self).__name__, e)
            self.steps += 1
            self.caught_up.set()
            with contextlib.suppress(TimeoutError):
                await cancellation.wait_for(self._wake.wait(), self.tick)

    async def step(self, now: datetime) -> object:
        raise NotImplementedError
