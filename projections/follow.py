"""Follower: one in-memory LedgerState kept current from both streams, each batch applied once and told.

    follower = Follower(store)          # or Follower(store, committed_state) to resume
    follower.listen(on_batch)           # before run(): (stream, items, changes) after each batch
    await follower.run()

The lifecycle stream is read from the state's position to the end, then live;
so is the heartbeat stream. Every listener hears every batch, after it was
applied, with only the items that changed the state (`changes[i]` is what
`items[i]` did) - so whatever a process keeps beside the state (a projection's
dirty rows, a consumer's wake-up, a narration) is fed by the one fold instead
of folding the log again. This is the fold a whole process shares: `ledger up`
runs one, whose state the projector commits and the consumers act on.

Resumed from a state that already holds part of the log (a projection's), the
state needs nothing again - but a listener may keep memory of recent events
beside it (the liveness monitor: unreachable reports and deaths inside its
windows). With `recall`, such listeners first hear the lifecycle items stored
in the `recall` seconds before the resume point again, with no changes (they
are in the state already); a listener that keeps rows (the projector) listens
with `recall=False` and hears each item exactly once.

A follower that only judges liveness may skip history it does not need:
`newest_beats` starts the heartbeat stream at each agent's newest beat (last
per subject) when the state has none yet, `heartbeats_of` follows one agent's
beats, and `heartbeats=False` none. A projection needs every item: `complete`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import timedelta

from ledger import cancellation, subjects
from ledger.codec import Item, from_ns
from ledger.errors import LedgerError
from ledger.replay import Replay
from ledger.store import EventStore

from .errors import ProjectionError
from .state import Change, LedgerState

log = logging.getLogger(__name__)

Listener = Callable[[str, list[Item], list[Change]], None]
"""(stream, items, changes) after the items were applied to the state; changes[i] is what items[i] did."""


class Follower:
    def __init__(self, store: EventStore, state: LedgerState | None = None, *, heartbeats: bool = True,
                 heartbeats_of: str | None = None, newest_beats: bool = False, batch: int = 2000,
                 recall: float = 0.0) -> None:
        self.store = store
        self.state = state if state is not None else LedgerState()
        self.heartbeats = heartbeats
        self.heartbeats_of = heartbeats_of
        """Follow only this agent's heartbeats (an agent judging itself need not hear the whole fleet beat).
        `heartbeats_caught_up` then means nothing: the stream's end is other agents' beats."""
        self.newest_beats = newest_beats
        self.batch = batch
        self.recall = recall
        """Seconds of lifecycle items before the resume point told again to the listeners that recall."""
        self.caught_up = asyncio.Event()
        """Set once the lifecycle stream was read to the end it had when following began."""
        self.heartbeats_caught_up = asyncio.Event()
        self.behind: dict[str, int | None] = {}
        """Per stream, the messages after the last batch told (0: at the end; None: not known yet)."""
        self.running = False
        self._listeners: list[Listener] = []
        self._recalling: list[Listener] = []
        self._recalled = 0
        """The lifecycle sequence recalled up to (a recall interrupted by a reconnect goes on from there)."""
        self._replays: dict[str, Replay] = {}
        # After a reconnect the server may have lost our consumers (a restart); nats-py would only
        # notice after two missed idle heartbeats. Start again from our positions at once instead.
        store.add_connection_listener(self._connection)

    @property
    def complete(self) -> bool:
        """Whether every item of both streams is applied and told (what a projection needs)."""
        return self.heartbeats and self.heartbeats_of is None and not self.newest_beats

    def resume(self, state: LedgerState) -> None:
        """Start from `state` (a projection's committed state) instead: only before `run`."""
        if self.running:
            raise ProjectionError("the follower is running: its state can no longer be replaced")
        self.state = state

    def _connection(self, kind: str) -> None:
        if kind == "reconnected":
            for replay in list(self._replays.values()):
                replay.interrupt()

    def listen(self, listener: Listener, *, recall: bool = True) -> None:
        """Hear every batch applied from now on (listeners are called in the order they listened); with `recall`,
        first the recalled items too (changes empty), if the follower resumes with a `recall`."""
        self._listeners.append(listener)
        if recall:
            self._recalling.append(listener)

    async def run(self) -> None:
        self.running = True
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._follow(subjects.LEDGER_STREAM, [subjects.family_filter("*")], self.caught_up))
            if self.heartbeats:
                hb = subjects.HEARTBEAT_FAMILY
                only = [subjects.entity_filter(hb, self.heartbeats_of)] if self.heartbeats_of else None
                tg.create_task(self._follow(subjects.HEARTBEAT_STREAM, only or [subjects.family_filter(hb)],
                                            self.heartbeats_caught_up, last_per_subject=self.newest_beats))

    def _received(self, batch: list[Item]) -> None:
        """A batch arrived (before it is applied): for what learns from arrivals, such as a clock."""

    def _apply(self, stream: str, batch: list[Item]) -> None:
        """Apply the batch and tell every listener what changed, even if applying or a listener fails.

        A listener that keeps something beside the state (the projector's dirty rows) must hear every
        item applied, or a later commit would checkpoint a position whose rows it never wrote.
        """
        apply = self.state.apply
        items: list[Item] = []
        changes: list[Change] = []
        try:
            for item in batch:
                change = apply(item)
                if change is not None:  # None: already applied (redelivered)
                    items.append(item)
                    changes.append(change)
        finally:
            if items:
                self._tell(stream, items, changes)

    def _tell(self, stream: str, items: list[Item], changes: list[Change]) -> None:
        self._tell_some(self._listeners, stream, items, changes)

    @staticmethod
    def _tell_some(listeners: list[Listener], stream: str, items: list[Item], changes: list[Change]) -> None:
        failed: list[Exception] = []
        for listener in listeners:
            try:
                listener(stream, items, changes)
            except Exception as e:  # noqa: BLE001 - the others must still hear the batch; raised below
                failed.append(e)
        if failed:
            raise failed[0]

    async def _recall(self, filters: list[str], upto: int) -> None:
        """Tell the recalling listeners the items stored within `recall` seconds before #`upto` (in the state).

        Measured from when the server stored #`upto`, on its clock: whatever a window judged later still holds
        was stored after that instant minus the window, whatever the skew of this machine's clock.
        """
        since = from_ns(self.state.ledger.stored_ns) - timedelta(seconds=self.recall)
        again = self._recalled + 1 if self._recalled else None
        replay = self.store.replay(filters, stream=subjects.LEDGER_STREAM, start_seq=again,
                                   start_time=None if again else since, end_seq=upto, batch=self.batch)
        async for batch in replay:
            self._recalled = batch[-1].seq
            self._tell_some(self._recalling, subjects.LEDGER_STREAM, batch, [])
        self._recalled = upto

    async def _follow(self, stream: str, filters: list[str], caught_up: asyncio.Event, *,
                      last_per_subject: bool = False) -> None:
        start = self.state.position(stream) + 1
        fresh = start == 1
        # Recalled: what the state held when following began (a reconnect later must not recall what it applied).
        recall_upto = start - 1 if stream == subjects.LEDGER_STREAM and self.recall > 0 and self._recalling else 0
        while True:
            cancellation.raise_if_cancelled()
            try:
                if self._recalled < recall_upto:
                    await self._recall(filters, recall_upto)
                end = await self.store.last_seq(stream)
                if end < start:
                    caught_up.set()
                replay = self.store.replay(filters, stream=stream, start_seq=start, follow=True,
                                           last_per_subject=last_per_subject and fresh, batch=self.batch)
                self._replays[stream] = replay
                async for batch in replay:
                    start = batch[-1].seq + 1
                    self.behind[stream] = replay.remaining
                    if batch[-1].seq >= end:
                        caught_up.set()  # before the listeners hear it: they may act on a state that is current
                    self._received(batch)
                    self._apply(stream, batch)
                fresh = False
            except LedgerError as e:
                log.warning("following %s interrupted (%s); resuming at #%d", stream, e, start)
                fresh = False
                await asyncio.sleep(0.5)
