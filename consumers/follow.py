"""Follower: one in-memory LedgerState kept current from both streams, shared by the consumers.

The lifecycle stream is read from the state's position to the end, then live;
the heartbeat stream starts from each agent's newest beat (last per subject:
the history is not needed to judge liveness) and then goes live. After every
batch the consumers hear what changed, in log order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ledger import subjects, tasks
from ledger.codec import Recorded, Unreadable
from ledger.errors import LedgerError
from ledger.reader import Replay
from ledger.store import EventStore
from projections.state import Change, LedgerState

from .server_clock import ServerClock

log = logging.getLogger(__name__)

Item = Recorded | Unreadable
Listener = Callable[[str, list[Item], list[Change]], None]
"""(stream, batch, changes) after the batch was applied to the state."""


class Follower:
    def __init__(self, store: EventStore, state: LedgerState | None = None, *, heartbeats: bool = True,
                 heartbeats_of: str | None = None) -> None:
        self.store = store
        self.state = state or LedgerState()
        self.heartbeats = heartbeats
        self.heartbeats_of = heartbeats_of
        """Follow only this agent's heartbeats (an agent judging itself need not hear the whole fleet beat).
        `heartbeats_caught_up` then means nothing: the stream's end is other agents' beats."""
        self.caught_up = asyncio.Event()
        """Set once the lifecycle stream was read to the end it had when following began."""
        self.heartbeats_caught_up = asyncio.Event()
        self.clock = ServerClock()
        """The server's time, learnt from what arrives: what every consumer judges ages against."""
        self._listeners: list[Listener] = []
        self._replays: dict[str, Replay] = {}
        # After a reconnect the server may have lost our consumers (a restart); nats-py would only
        # notice after two missed idle heartbeats. Start again from our positions at once instead.
        store.add_connection_listener(self._connection)

    def _connection(self, kind: str) -> None:
        if kind == "reconnected":
            for replay in list(self._replays.values()):
                replay.interrupt()

    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._follow(subjects.LEDGER_STREAM, [subjects.family_filter("*")], self.caught_up))
            if self.heartbeats:
                hb = subjects.HEARTBEAT_FAMILY
                only = [subjects.entity_filter(hb, self.heartbeats_of)] if self.heartbeats_of else None
                tasks.create_task(self._follow(subjects.HEARTBEAT_STREAM, only or [subjects.family_filter(hb)],
                                               self.heartbeats_caught_up, last_per_subject=True))

    async def _follow(self, stream: str, filters: list[str], caught_up: asyncio.Event, *,
                      last_per_subject: bool = False) -> None:
        start = self.state.position(stream) + 1
        fresh = start == 1
        while True:
            tasks.raise_if_cancelled()
            try:
                end = await self.store.last_seq(stream)
                if end < start:
                    caught_up.set()
                replay = self.store.replay(filters, stream=stream, start_seq=start, follow=True,
                                           last_per_subject=last_per_subject and fresh)
                self._replays[stream] = replay
                async for batch in replay:
                    self.clock.observe(batch[-1].timestamp_ns)  # the newest: the smallest offset
                    changes = self.state.apply_all(batch)
                    start = batch[-1].seq + 1
                    if batch[-1].seq >= end:
                        caught_up.set()
                    for listener in self._listeners:
                        listener(stream, batch, changes)
                fresh = False
            except LedgerError as e:
                log.warning("following %s interrupted (%s); resuming at #%d", stream, e, start)
                fresh = False
                await asyncio.sleep(0.5)
