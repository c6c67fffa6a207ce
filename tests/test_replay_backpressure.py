"""Replay must never lose a message, however slowly its reader goes (regression: nats-py dropped them)."""

from __future__ import annotations

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
