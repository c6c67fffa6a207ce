"""Deadlines: keys with the moment each is next due, so a timer wakes only what is due.

    due = Deadlines[str]()
    due.set("a1", 12.5)         # (re)schedule: the newest time for a key wins
    due.discard("a2")           # no longer watched
    for key in due.pop_due(now):
        ...                     # judge only these; set() them again if they stay watched

A consumer that judged every entity on every tick costs O(entities) per tick, whether or not anything
changed; with a deadline per entity a tick costs O(due), and a change O(log n). Times are plain floats on
whatever clock the caller uses (seconds), compared, never interpreted.

The heap keeps superseded entries until they surface (a reschedule is one push, not a search); when they
outnumber the live ones the heap is rebuilt, so memory stays within a constant of the keys watched.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class Deadlines(Generic[K]):
    def __init__(self) -> None:
        self._at: dict[K, float] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._order = itertools.count()
        """Breaks ties between equal times (keys need not be comparable) and keeps pops in scheduling order."""

    def __len__(self) -> int:
        return len(self._at)

    def __contains__(self, key: object) -> bool:
        return key in self._at

    def __iter__(self) -> Iterator[K]:
        return iter(self._at)

    def get(self, key: K) -> float | None:
        """When `key` is due, or None if it is not scheduled."""
        return self._at.get(key)

    def set(self, key: K, at: float) -> None:
        """Schedule `key` at `at`, replacing any earlier schedule of it."""
        if self._at.get(key) == at:
            return
        self._at[key] = at
        heapq.heappush(self._heap, (at, next(self._order), key))
        if len(self._heap) > 2 * len(self._at) + 64:
            self._compact()

    def discard(self, key: K) -> None:
        self._at.pop(key, None)

    def next_at(self) -> float | None:
        """The earliest time anything is due (None when nothing is scheduled)."""
        heap, at = self._heap, self._at
        while heap and at.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)  # superseded or discarded
        return heap[0][0] if heap else None

    def pop_due(self, now: float) -> list[K]:
        """Unschedule and return every key due at or before `now`, earliest first."""
        heap, at = self._heap, self._at
        out: list[K] = []
        while heap and heap[0][0] <= now:
            when, _, key = heapq.heappop(heap)
            if at.get(key) == when:
                del at[key]
                out.append(key)
        return out

    def clear(self) -> None:
        self._at.clear()
        self._heap.clear()

    def _compact(self) -> None:
        self._heap = [(when, next(self._order), key) for key, when in self._at.items()]
        heapq.heapify(self._heap)
