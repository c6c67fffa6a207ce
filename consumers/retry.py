"""What a consumer does when the store fails it: read with a bound on concurrency, and retry later, not at once.

    reads = BoundedReads(limit=8)
    state, last = await reads.run(lambda: ledger.route(route_id))   # at most 8 at once; Unavailable retried

    backoff = Backoff[str]()
    backoff.failed("r-1", now)        # -> when "r-1" may be tried again (2 s, 4 s, 8 s ... up to 30 s)
    backoff.blocked("r-1", now)       # True until then
    backoff.succeeded("r-1")          # forgotten: the next failure waits the shortest delay again

A consumer decides from the in-memory fold and reads an entity's history only when a compare-and-set says the
fold was behind; the reads that remain must not all go at once (thousands of histories requested together time
out together, and are requested again together), and an entity whose write failed must not be tried again on
every tick. Times are plain floats on the caller's clock, as in `Deadlines`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from ledger.errors import Unavailable

from .deadlines import Deadlines

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)

READ_LIMIT = 8
"""Histories read at once by one consumer: enough to keep a round trip busy, few enough that none times out."""
READ_ATTEMPTS = 4
FIRST_DELAY = 2.0
MAX_DELAY = 30.0


def delay(failures: int, first: float = FIRST_DELAY, most: float = MAX_DELAY) -> float:
    """Seconds to wait after the `failures`-th failure in a row (1, 2, ...): doubling, capped."""
    return float(min(most, first * 2 ** max(0, failures - 1)))


class BoundedReads:
    """Runs reads at most `limit` at a time, retrying an unanswered one (`Unavailable`) with a doubling pause."""

    def __init__(self, limit: int = READ_LIMIT, *, attempts: int = READ_ATTEMPTS, first: float = FIRST_DELAY) -> None:
        self._slots = asyncio.Semaphore(limit)
        self.attempts = attempts
        self.first = first
        self.reads = 0
        """Reads started (retries included): counted for status and tests."""

    async def run(self, read: Callable[[], Awaitable[T]]) -> T:
        for attempt in range(1, self.attempts + 1):
            async with self._slots:
                self.reads += 1
                try:
                    return await read()
                except Unavailable:
                    if attempt == self.attempts:
                        raise
            await asyncio.sleep(delay(attempt, self.first))  # outside the slot: others read meanwhile
        raise AssertionError("unreachable")  # pragma: no cover


class Backoff(Generic[K]):
    """Per key, how many times in a row it failed and when it may be tried again; due keys come out of `pop_due`."""

    def __init__(self, *, first: float = FIRST_DELAY, most: float = MAX_DELAY) -> None:
        self.first = first
        self.most = most
        self._failures: dict[K, int] = {}
        self._until = Deadlines[K]()

    def __len__(self) -> int:
        return len(self._failures)

    def __contains__(self, key: object) -> bool:
        return key in self._failures

    def failed(self, key: K, now: float) -> float:
        n = self._failures[key] = self._failures.get(key, 0) + 1
        at = now + delay(n, self.first, self.most)
        self._until.set(key, at)
        return at

    def succeeded(self, key: K) -> None:
        self._failures.pop(key, None)
        self._until.discard(key)

    forget = succeeded
    """The key is gone (retired, final): nothing to retry."""

    def blocked(self, key: K, now: float) -> bool:
        at = self._until.get(key)
        return at is not None and at > now

    def until(self, key: K) -> float | None:
        return self._until.get(key)

    def pop_due(self, now: float) -> list[K]:
        """Keys whose wait ended (they keep their failure count until they succeed)."""
        return self._until.pop_due(now)

    def next_at(self) -> float | None:
        return self._until.next_at()

    def waiting(self, now: float) -> set[K]:
        """The keys still waiting for their retry."""
        return {k for k in self._failures if self.blocked(k, now)}
