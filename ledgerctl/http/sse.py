"""Server-sent events: one per stored item the process's follower applies, for live pages.

    feed = EventFeed()
    follower.listen(feed.heard, recall=False)   # every applied batch, told once
    async for message in feed.subscribe(): ...  # a client's stream

Each subscriber has a queue bounded in events and in bytes (one event may be nearly
the server's max_payload); a client too slow to drain it is dropped
(its stream ends, the browser's EventSource reconnects and re-fetches) rather
than buffered without bound in the server. Heartbeats are told only to
subscribers that ask for them: a fleet beats many times a second, a page
wants to hear lifecycle changes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import msgspec

from ledger.codec import Item, Recorded
from ledger.subjects import HEARTBEAT_STREAM
from projections.state import Change


class StoredEvent(msgspec.Struct, frozen=True, kw_only=True):
    """What a live page hears of one stored item."""

    stream: str
    seq: int
    subject: str
    stored_at: datetime
    type: str
    """The event type, or `dead_letter` for a stored message that is not an event."""
    entity: str | None = None
    """kind/id of the entity the item concerned (agent/a1, session/s1)."""
    anomaly: str | None = None
    """Why the item was flagged and not applied."""
    body: dict[str, Any] | None = None


def stored_event(item: Item, change: Change) -> StoredEvent:
    anomaly = change.anomaly.kind if change.anomaly is not None else None
    entity = f"{change.kind}/{change.id}"
    if isinstance(item, Recorded):
        return StoredEvent(stream=item.stream, seq=item.seq, subject=item.subject, stored_at=item.stored_at,
                           type=item.event.type_tag(), entity=entity, anomaly=anomaly,
                           body=msgspec.to_builtins(item.event))
    return StoredEvent(stream=item.stream, seq=item.seq, subject=item.subject, stored_at=item.stored_at,
                       type="dead_letter", entity=None, anomaly=item.reason)


_encoder = msgspec.json.Encoder()


class _Subscriber:
    def __init__(self, size: int, budget: int, heartbeats: bool) -> None:
        self.queue: asyncio.Queue[tuple[StoredEvent, int] | None] = asyncio.Queue(size)
        self.budget = budget
        """Bytes (JSON-encoded) the queue may hold: one event may be nearly the server's max_payload."""
        self.held = 0
        self.heartbeats = heartbeats
        self.dropped = False

    def offer(self, event: StoredEvent, size: int) -> None:
        if self.dropped:
            return
        if self.held + size > self.budget:
            self.end(dropped=True)
            return
        try:
            self.queue.put_nowait((event, size))
        except asyncio.QueueFull:
            self.end(dropped=True)
            return
        self.held += size

    def taken(self, size: int) -> None:
        self.held -= size

    def end(self, *, dropped: bool = False) -> None:
        """Empty the queue and leave the end mark in it: the client's stream stops at once."""
        self.dropped = self.dropped or dropped
        while not self.queue.empty():
            self.queue.get_nowait()
        self.held = 0
        self.queue.put_nowait(None)


class EventFeed:
    """Fans the follower's applied items out to subscribers; keeps the newest for a page's first view."""

    def __init__(self, *, queue_size: int = 1000, queue_bytes: int = 8 * 2**20, recent: int = 50) -> None:
        self.queue_size = queue_size
        self.queue_bytes = queue_bytes
        """A subscriber holding more than this (JSON-encoded) is dropped, whatever the count."""
        self.recent: deque[StoredEvent] = deque(maxlen=recent)
        """The newest lifecycle items applied since this process started."""
        self.dropped = 0
        """Subscribers dropped for not keeping up."""
        self._subscribers: set[_Subscriber] = set()
        self._closed = False

    def heard(self, stream: str, items: list[Item], changes: list[Change]) -> None:
        """A follower listener (listen with recall=False: a recalled item is not new)."""
        beats = stream == HEARTBEAT_STREAM
        if beats and not any(s.heartbeats for s in self._subscribers):
            return
        for item, change in zip(items, changes, strict=True):
            event = stored_event(item, change)
            if not beats:
                self.recent.append(event)
            size = len(_encoder.encode(event)) if self._subscribers else 0
            for sub in list(self._subscribers):
                if sub.heartbeats or not beats:
                    sub.offer(event, size)
                    if sub.dropped:
                        self._subscribers.discard(sub)
                        self.dropped += 1

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    async def subscribe(self, *, heartbeats: bool = False) -> AsyncIterator[StoredEvent]:
        """The items applied from now on, until the client goes, falls behind, or the feed closes."""
        if self._closed:
            return
        sub = _Subscriber(self.queue_size, self.queue_bytes, heartbeats)
        self._subscribers.add(sub)
        try:
            while True:
                queued = await sub.queue.get()
                if queued is None:
                    return
                event, size = queued
                sub.taken(size)
                yield event
        finally:
            self._subscribers.discard(sub)

    def close(self) -> None:
        """End every stream (the server is stopping: open streams would hold its shutdown)."""
        self._closed = True
        for sub in list(self._subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                sub.end()
        self._subscribers.clear()
