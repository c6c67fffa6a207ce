"""Replay: every message exactly once, however slow the reader, and always an end (regressions)."""

from __future__ import annotations

import asyncio
import time

import pytest
from test_store import created, submit_beats

from ledger import subjects
from ledger.events import Producer, SessionCreated
from ledger.settings import Settings
from ledger.store import EventStore
from ledgerctl.server import EmbeddedServer


async def test_a_slow_reader_still_gets_every_message_in_order(store: EventStore, uid: str):
    me = Producer(id=uid, instance="test")
    futures = [await store.submit(SessionCreated(producer=me, session_id=f"{uid}-{n}", pool="p"))
               for n in range(20_000)]
    await store.flush()
    seqs = [f.result() for f in futures]
    seen: list[int] = []
    async for batch in store.replay(subjects.type_filter("session", "created", uid), batch=100):
        seen.extend(item.seq for item in batch)
        # a reader that does real work, blocking the loop on purpose: the server outpaces it and its queue fills
        time.sleep(0.001)  # noqa: ASYNC251
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


async def test_a_slow_reader_holds_at_most_three_batches(store: EventStore, uid: str):
    agent = f"{uid}-slow"
    await submit_beats(store, agent, 3000)
    replay = store.replay(subjects.entity_filter("hb", agent), batch=100)
    seen: list[int] = []
    async for batch in replay:
        seen += [r.event.beat for r in batch]
        assert replay.buffered <= 300  # asked for only while fewer than two batches wait
        await asyncio.sleep(0.002)  # a reader slower than the stream
    assert seen == list(range(3000))


@pytest.mark.parametrize("crash", [False, True], ids=["restart", "kill-9"])
async def test_a_following_replay_outlives_a_server_restart(fresh_server: EmbeddedServer, uid: str, crash: bool):
    async with EventStore.connect(Settings(nats_url=fresh_server.url, request_timeout=1.0), ensure=True) as store:
        seen: list[int] = []
        more = asyncio.Event()

        async def follow() -> None:
            async for batch in store.replay(subjects.family_filter("session"), follow=True, batch=50):
                seen.extend(r.seq for r in batch)
                if len(seen) >= 20:
                    more.set()
                    return

        task = asyncio.create_task(follow())
        before = [await store.append(created(f"{uid}-{n}")) for n in range(10)]
        if crash:  # no "409 Server Shutdown" then: the missing idle heartbeats tell
            fresh_server.kill()
            await asyncio.to_thread(fresh_server.start)
        else:
            await asyncio.to_thread(fresh_server.restart)  # the replay's consumer is gone with it
        after = [await store.append(created(f"{uid}-b{n}")) for n in range(10)]
        await asyncio.wait_for(more.wait(), 30)
        await task
        assert seen == before + after  # each once, in order, across the restart
