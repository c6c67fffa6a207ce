"""Where a stream stood at a moment: the last sequence stored at or before it, by bisection on stored times."""

from __future__ import annotations

from ledger.store import EventStore


async def last_stored_by(store: EventStore, stream: str, time_ns: int, first: int, last: int) -> tuple[int, int]:
    """(seq, stored_ns) of the last message of `stream` in first..last stored at or before `time_ns`; (first - 1,
    0) if none. Bisection on the leader's stored times, which rise with the sequence: where a replay with
    `end_time` stops. A few direct gets (log2 of the range)."""
    return await store.last_stored_by(stream, time_ns, first, last)
