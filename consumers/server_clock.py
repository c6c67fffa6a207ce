"""The server's clock, as seen from here: liveness is judged against the time JetStream stored things.

Heartbeats, registrations and reports carry the time the stream leader stored
them. Comparing those with this machine's wall clock would turn any clock
skew into early (or late) deaths: a monitor whose clock runs 30 s ahead would
declare every agent dead at once.

A message is stored before it is received, so `receipt - stored` is the offset
between our clock and the server's plus the delivery delay - never less than
the offset. The smallest recent value is therefore an estimate that can only
err on the side of the past (by the fastest delivery, about a millisecond):
`now()` is never ahead of the server, so skew can delay a verdict but never
hasten one. Receipt times come from the monotonic clock, so stepping this
machine's wall clock changes nothing. Only the smallest offsets of the last
`window` seconds count, so the estimate follows a drifting server clock, and
one that is stepped (back: then, for up to a window, it runs ahead by the step).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from datetime import datetime

from ledger.codec import from_ns


class ServerClock:
    def __init__(self, *, window: float = 30.0, buckets: int = 3,
                 monotonic_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self._bucket_ns = int(window / buckets * 1e9)
        self._keep = buckets
        self._monotonic_ns = monotonic_ns
        self._mins: deque[list[int]] = deque()
        """[bucket number, smallest receipt - stored seen in it], oldest first."""

    def observe(self, stored_ns: int, received_ns: int | None = None) -> None:
        """A message stored at `stored_ns` (server clock) was received now (or at monotonic `received_ns`)."""
        received = self._monotonic_ns() if received_ns is None else received_ns
        offset, bucket = received - stored_ns, received // self._bucket_ns
        if self._mins and self._mins[-1][0] == bucket:
            if offset < self._mins[-1][1]:
                self._mins[-1][1] = offset
            return
        self._mins.append([bucket, offset])
        while len(self._mins) > 1 and self._mins[0][0] <= bucket - self._keep:
            self._mins.popleft()  # the newest bucket always stays, however quiet the stream has been

    def now_ns(self) -> int | None:
        """The server's time now (never ahead of it), or None before any message was observed."""
        if not self._mins:
            return None
        return self._monotonic_ns() - min(m for _, m in self._mins)

    def now(self, fallback: Callable[[], datetime]) -> datetime:
        """The server's time now; `fallback()` (this machine's clock) before any message was observed."""
        ns = self.now_ns()
        return fallback() if ns is None else from_ns(ns)
