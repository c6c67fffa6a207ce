"""Run the consumers together: one Follower (one in-memory state), each consumer in the same TaskGroup.

Given a follower (`ledger up`: the one the projector is fed by too), they act on its state and leave running it
to whoever gave it; without one they follow the log with their own.
"""

from __future__ import annotations

import asyncio
from dataclasses import InitVar, dataclass, field

from ledger.events import Producer
from ledger.ids import check_token, new_id
from ledger.store import EventStore
from ledger.writer import Writer

from .follow import Follower
from .liveness_rules import LivenessSettings
from .monitor import LivenessMonitor
from .partition import EVERYTHING, Partition
from .reactor import Reactor
from .reclaimer import Reclaimer
from .retry import BoundedReads
from .watchdog import RouteWatchdog


@dataclass
class ConsumerGroup:
    """The consumers that run in this process (any may be left out; replicas elsewhere are fine)."""

    store: EventStore
    name: str = ""
    """A replica name, appended to each consumer's producer id (monitor-<name> ...)."""
    monitor: bool = True
    reclaimer: bool = True
    watchdog: bool = True
    liveness: LivenessSettings = field(default_factory=LivenessSettings)
    partition: Partition = EVERYTHING
    """The pools this replica acts on (`consumers.partition`); every replica still folds the whole log."""
    shared: InitVar[Follower | None] = None
    """A follower whose state to act on, run by whoever gave it; None: one of their own, run with them."""
    follower: Follower = field(init=False)
    parts: dict[str, object] = field(init=False, default_factory=dict)
    _own_follower: Follower | None = field(init=False, default=None)

    def __post_init__(self, shared: Follower | None) -> None:
        if self.name:
            check_token(self.name, "replica name")
        if shared is None:
            shared = self._own_follower = Follower(self.store)
        self.follower = shared
        if self.monitor:
            self.parts["monitor"] = LivenessMonitor(self._ledger("monitor"), self.follower, self.liveness,
                                                    partition=self.partition)
        # The reclaimer's and the watchdog's history reads (only when a compare-and-set on the fold lost) share one
        # bound: they go over the monitor's connection, whose reads before a death must not wait behind thousands.
        reads = BoundedReads()
        if self.reclaimer:
            self.parts["reclaimer"] = Reclaimer(self._ledger("reclaimer"), self.follower, policy=self.liveness.policy,
                                                reads=reads, partition=self.partition)
        if self.watchdog:
            self.parts["watchdog"] = RouteWatchdog(self._ledger("watchdog"), self.follower, reads=reads,
                                                   partition=self.partition)

    def _ledger(self, role: str) -> Writer:
        producer = f"{role}-{self.name}" if self.name else role
        return Writer(self.store, Producer(id=producer, instance=new_id()))

    def catching_up(self) -> list[str]:
        """The parts not yet acting live: each waits for the follower to catch up with the log, and the reclaimer
        and the watchdog then work off what they found in the fold (their first step)."""
        follower = self.follower
        folded = follower.caught_up.is_set() and (not follower.heartbeats or follower.heartbeats_caught_up.is_set())
        return [role for role, part in self.parts.items()
                if not folded or (isinstance(part, Reactor) and not part.caught_up.is_set())]

    async def ready(self) -> None:
        """Return once every part is acting live (`catching_up` is empty)."""
        await self.follower.caught_up.wait()
        if self.follower.heartbeats:
            await self.follower.heartbeats_caught_up.wait()
        for part in self.parts.values():
            if isinstance(part, Reactor):
                await part.caught_up.wait()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            if self._own_follower is not None:
                tasks.create_task(self._own_follower.run(), name="follower")
            for role, part in self.parts.items():
                tasks.create_task(part.run(), name=role)  # type: ignore[attr-defined]
