"""Replay: every message exactly once, however slow the reader, and always an end (regressions)."""

from __future__ import annotations

import asyncio
import time

from ledger import subjects
from ledger.events import Producer, SessionCreated
from ledger.store import EventStore


async def test_a_slow_reader_still_gets_every_message_in_order(store: EventStore, uid: str):
    me = Producer(id=uid, instance="test")
    futures = [await store.submit(SessionCreated(producer=me, session_id=f"{uid}-{n}", pool="p"))
               for n in range(20_000)]
    await store.flush()
    seqs = [f.result() for f in futures]
    seen: list[int] = []
    async for batch in store.replay(subjects.type_filter("session", "created", uid), batch=100):
        seen.extend(item.seq for item in batch)
        time.sleep(0.001)  # a reader that does real work: the server outpaces it and its queue fills
    assert seen == seqs


async def test_a_replay_of_a_filter_with_no_messages_ends(store: EventStore, uid: str):
    me = Producer(id=uid, instance="test")
    for n in range(2000):  # messages the filters below skip: the consumer scans past them
        await store.submit(SessionCreated(producer=me, session_id=f"{uid}-{n}", pool="p"))
    await store.flush()
    for n in range(40):
        absent = subjects.entity_filter("session", f"{uid}-absent-{n}")
        assert await asyncio.wait_for(collect(store.replay(absent)), 10) == []


async def collect(replay) -> list:  # type: ignore[no-untyped-def]
    return [item async for batch in replay for item in batch]
