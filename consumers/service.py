"""Run the consumers together: one Follower (one in-memory state), each consumer in the same TaskGroup."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ledger.client import Ledger
from ledger.events import Producer
from ledger.ids import check_token, new_id
from ledger.store import EventStore

from .follow import Follower
from .liveness_rules import LivenessSettings
from .monitor import LivenessMonitor
from .reclaimer import Reclaimer
from .watchdog import RouteWatchdog


@dataclass
class Consumers:
    """The consumers that run in this process (any may be left out; replicas elsewhere are fine)."""

    store: EventStore
    name: str = ""
    """A replica name, appended to each consumer's producer id (monitor-<name> ...)."""
    monitor: bool = True
    reclaimer: bool = True
    watchdog: bool = True
    liveness: LivenessSettings = field(default_factory=LivenessSettings)
    follower: Follower = field(init=False)
    parts: dict[str, object] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.name:
            check_token(self.name, "replica name")
        self.follower = Follower(self.store)
        if self.monitor:
            self.parts["monitor"] = LivenessMonitor(self._ledger("monitor"), self.follower, self.liveness)
        if self.reclaimer:
            self.parts["reclaimer"] = Reclaimer(self._ledger("reclaimer"), self.follower, policy=self.liveness.policy)
        if self.watchdog:
            self.parts["watchdog"] = RouteWatchdog(self._ledger("watchdog"), self.follower)

    def _ledger(self, role: str) -> Ledger:
        producer = f"{role}-{self.name}" if self.name else role
        return Ledger(self.store, Producer(id=producer, instance=new_id()))

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.follower.run(), name="follower")
            for role, part in self.parts.items():
                tasks.create_task(part.run(), name=role)  # type: ignore[attr-defined]
