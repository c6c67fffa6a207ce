"""Reactor: the loop shared by consumers that act on the state after changes, and on a timer."""

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

    The timer matters as much as the changes: deadlines (a start timeout, an
    agent turning unhealthy) pass without any event.
    """

    kinds: tuple[str, ...] = ()

    def __init__(self, follower: Follower, *, tick: float = 0.5) -> None:
        self.follower = follower
        self.tick = tick
        self._wake = asyncio.Event()
        follower.listen(self._heard)

    def _heard(self, stream: str, batch: list[Item], changes: list[Change]) -> None:
        if any(c.kind in self.kinds for c in changes):
            self._wake.set()

    async def run(self) -> None:
        await self.follower.caught_up.wait()
        while True:
            cancellation.raise_if_cancelled()  # a cancel that nats-py swallowed in the last step still stops us
            with contextlib.suppress(TimeoutError):
                await cancellation.wait_for(self._wake.wait(), self.tick)
            self._wake.clear()
            try:
                await self.step(self.follower.clock.now(ev.utcnow))
            except LedgerError as e:
                log.warning("%s step failed: %s", type(self).__name__, e)

    async def step(self, now: datetime) -> object:
        raise NotImplementedError
