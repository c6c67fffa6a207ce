"""Hostile tests of the replay's deliveries straight from nats-py's parser (`wire.deliver_messages_directly`),
`EventStore.close` on a connection that cannot send, and partitions by named pools.

The replay must hand out every message exactly once, in order, through gaps, consumer deletions, tiny
pulls, huge headers, several replays and the appender on one connection, and a reader that walks away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import nats
import pytest
from helpers import eventually
from histories import CLI
from store_contract import created

from ledger import codec, subjects, wire
from ledger import events as ev
from ledger.codec import Recorded
from ledger.errors import LedgerError
from ledger.ids import new_id
from ledger.settings import Settings
from ledger.store import EventStore
from ledger.writer import Writer
from ledgerctl.server import EmbeddedServer
from projections.state import LedgerState

# --- the replay's deliveries straight from the parser -------------------------------------------------------------


async def _fill(store: EventStore, uid: str, count: int, tag: str = "") -> list[int]:
    futures = [await store.submit(_created(uid, f"{uid}-{tag}{n}")) for n in range(count)]
    await store.flush()
    return [f.result() for f in futures]


def _filter(uid: str) -> str:
    return subjects.type_filter("session", "created", uid)


def _created(uid: str, sid: str) -> ev.SessionCreated:
    """A creation under the test's own producer token, so a filter picks out this test's messages alone."""
    return ev.SessionCreated(producer=ev.Producer(id=uid, instance="i"), session_id=sid, pool="p")


async def _follow_until(replay: Any, count: int, seen: list[int]) -> None:
    async for batch in replay:
        seen.extend(r.seq for r in batch)
        if len(seen) >= count:
            return


async def test_a_replay_one_message_a_pull_delivers_every_message_once_in_order(store: EventStore, uid: str):
    seqs = await _fill(store, uid, 300)
    replay = store.replay(_filter(uid), batch=1)
    seen = [item.seq async for batch in replay for item in batch]
    assert seen == seqs
    assert replay.buffered == 0 or replay._finished


async def test_two_replays_and_the_appender_on_one_connection(store: EventStore, uid: str):
    """Two following replays and a stream of appends share one connection (and its one `_process_msg` stand-in):
    each replay sees every message once, in order; closing them leaves the appender's handler in place."""
    appender_sids = set(store.nc._process_msg.handlers)  # type: ignore[attr-defined]
    assert appender_sids, "the appender hands its acknowledgements over directly"
    one, two = store.replay(_filter(uid), follow=True, batch=7), store.replay(_filter(uid), follow=True, batch=50)
    seen1: list[int] = []
    seen2: list[int] = []
    tasks = [asyncio.create_task(_follow_until(one, 600, seen1)), asyncio.create_task(_follow_until(two, 600, seen2))]
    seqs = []
    for n in range(6):  # appends while both read
        seqs += await _fill(store, uid, 100, tag=f"{n}-")
    await asyncio.wait_for(asyncio.gather(*tasks), 20)
    assert seen1 == seqs and seen2 == seqs
    direct = store.nc.__dict__.get("_process_msg")
    assert isinstance(direct, wire._Direct) and set(direct.handlers) == appender_sids
    assert await store.append(created(f"{uid}-after")) > seqs[-1]  # the appender's path still works


async def test_a_reader_that_walks_away_with_messages_still_arriving(store: EventStore, uid: str,
                                                                    caplog: pytest.LogCaptureFixture):
    """A reader stops after the first batch while two batches are on their way (in the parser's buffer, in the
    socket): the replay unsubscribes, what still arrives is dropped quietly, and the connection serves the next
    replay and the appender."""
    seqs = await _fill(store, uid, 6000)
    caplog.set_level(logging.WARNING)
    replay = store.replay(_filter(uid), batch=2000)
    iterator = replay.__aiter__()
    first = await iterator.__anext__()
    assert [r.seq for r in first] == seqs[:len(first)]
    await iterator.aclose()  # what `break` does once the generator is finalized
    assert replay._sub is None
    again = [item.seq async for batch in store.replay(_filter(uid), batch=500) for item in batch]
    assert again == seqs
    assert await store.append(created(f"{uid}-after")) > seqs[-1]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_a_gap_in_deliveries_makes_a_new_consumer_without_loss_or_repeat(store: EventStore, uid: str):
    """A delivery numbered past the next one (a lost message - forged here, onto the replay's inbox) starts a new
    consumer after the last message received; the forged one is never handed out."""
    seqs = await _fill(store, uid, 20)
    replay = store.replay(_filter(uid), follow=True, batch=10)
    seen: list[int] = []
    task = asyncio.create_task(_follow_until(replay, 60, seen))
    await eventually(lambda: len(seen) >= 20, what="the first messages")
    consumer, delivery = replay._consumer, replay._delivery
    forged = codec.encode(_created(uid, f"{uid}-forged"))
    # The server refuses a publish with a JetStream ack subject as reply (a permissions violation): handed to the
    # connection's parser stand-in as the parser would hand it.
    reply = f"$JS.ACK.{subjects.LEDGER_STREAM}.{consumer}.1.999999999.{delivery + 2}.{time.time_ns()}.0"
    assert replay._sub is not None
    await store.nc._process_msg(replay._sub._id, forged.subject.encode(), reply.encode(), forged.payload, None)
    await eventually(lambda: replay._consumer not in (None, consumer), what="a new consumer")
    seqs += await _fill(store, uid, 40, tag="b")
    await asyncio.wait_for(task, 20)
    assert seen == seqs and 999999999 not in seen


async def test_a_consumer_deleted_mid_replay_is_replaced_without_loss_or_repeat(store: EventStore, uid: str):
    """Someone deletes the replay's consumer while it follows (409 to the waiting pull, through nats-py's path):
    a new one picks up after the last message received."""
    seqs = await _fill(store, uid, 30)
    replay = store.replay(_filter(uid), follow=True, batch=8)
    seen: list[int] = []
    task = asyncio.create_task(_follow_until(replay, 90, seen))
    await eventually(lambda: len(seen) >= 30, what="the first messages")
    consumer = replay._consumer
    assert consumer is not None
    await store.nc.jsm().delete_consumer(subjects.LEDGER_STREAM, consumer)
    await eventually(lambda: replay._consumer not in (None, consumer), what="a new consumer")
    seqs += await _fill(store, uid, 60, tag="b")
    await asyncio.wait_for(task, 20)
    assert seen == seqs


@pytest.mark.parametrize("header", ["huge", "status", "empty-body"])
async def test_messages_with_odd_headers_are_replayed_by_their_body(store: EventStore, uid: str, header: str):
    """Messages published with headers the ledger never writes (60 kB of them, a `Status: 409` that a status
    reader would take for trouble, no body at all) are handed out as what their body is, in order."""
    seqs = await _fill(store, uid, 5)
    encoded = codec.encode(_created(uid, f"{uid}-odd"))
    headers = {"huge": {"X-Big": "x" * 60_000}, "status": {"Status": "409", "Description": "Consumer Deleted"},
               "empty-body": {"X-Note": "nothing"}}[header]
    payload = b"" if header == "empty-body" else encoded.payload
    ack = await store.nc.jetstream().publish(encoded.subject, payload, headers=headers)
    seqs.append(ack.seq)
    seqs += await _fill(store, uid, 5, tag="b")
    items = [item async for batch in store.replay(_filter(uid), batch=3) for item in batch]
    assert [i.seq for i in items] == seqs
    odd = next(i for i in items if i.seq == ack.seq)
    assert isinstance(odd, Recorded) == (header != "empty-body")


async def _seqs(replay: Any) -> list[int]:
    return [i.seq async for b in replay for i in b]


async def test_replays_on_a_plain_connection_leave_its_parser_as_they_found_it(settings: Settings, uid: str):
    """No appender on the connection: the first replay puts the direct-delivery stand-in in place, the last one to
    close takes it away again (the class's own `_process_msg`), and replays after that still deliver."""
    from ledger.replay import Replay

    async with EventStore.connect(settings) as store:
        seqs = await _fill(store, uid, 50)
    nc = await nats.connect(settings.nats_url)
    try:
        for _ in range(2):
            one, two = Replay(nc, subjects.LEDGER_STREAM, [_filter(uid)], batch=4), \
                Replay(nc, subjects.LEDGER_STREAM, [_filter(uid)], batch=16)
            got = await asyncio.gather(_seqs(one), _seqs(two))
            assert got == [seqs, seqs]
            assert "_process_msg" not in nc.__dict__
    finally:
        await nc.close()


async def test_a_message_whose_subject_is_not_utf8_is_dead_lettered_not_a_poison_pill(server: EmbeddedServer,
                                                                                     uid: str):
    """Any client with publish rights may put any bytes in a subject token (the entity id): the server stores it.
    The replay hands it out as Unreadable in its place - decoding it in the parser's handler raised, the message was
    lost, the next delivery looked like a gap, and every new consumer delivered it again: each replay of the
    stream stuck there for ever (an ERROR a heartbeat). Not a regression: through nats-py's own Msg path it failed
    too (in nats-py's read loop)."""
    async with EventStore.connect(Settings(nats_url=server.url)) as store:
        seqs = await _fill(store, uid, 2)
        host, port = server.url.removeprefix("nats://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            await reader.readline()  # INFO
            bad = b"ledger.session.x\xff." + b"created." + uid.encode()
            # And a valid event whose header value is not UTF-8 either (the direct path never parses headers).
            event = codec.encode(_created(uid, f"{uid}-hdr"))
            block = b"NATS/1.0\r\nX-Bad: \xff\xfe\r\n\r\n"
            writer.write(b'CONNECT {"verbose":false,"headers":true}\r\nPUB ' + bad + b" 2\r\n{}\r\n"
                         + b"HPUB " + event.subject.encode() + b" %d %d\r\n" % (len(block), len(block)
                                                                                + len(event.payload))
                         + block + event.payload + b"\r\nPING\r\n")
            await writer.drain()
            assert await reader.readline() == b"PONG\r\n"
        finally:
            writer.close()
        seqs += await _fill(store, uid, 2, tag="b")
        items = await asyncio.wait_for(_items(store.replay(_filter(uid), batch=2)), 10)
        assert [i.seq for i in items] == list(range(seqs[0], seqs[-1] + 1))
        odd = items[2]
        assert isinstance(odd, codec.Unreadable) and "not UTF-8" in odd.reason and odd.data == b"{}"
        assert [type(i) for i in items].count(Recorded) == 5 and isinstance(items[3], Recorded)
        history = await store.history("session", f"{uid}-hdr")  # Direct Get reads it too
        assert [type(i) for i in history] == [Recorded]


async def _items(replay: Any) -> list[Any]:
    return [i async for b in replay for i in b]


async def test_an_interrupted_replay_resumes_exactly_where_it_stopped(store: EventStore, uid: str):
    seqs = await _fill(store, uid, 500)
    replay = store.replay(_filter(uid), follow=True, batch=64)
    seen: list[int] = []
    async for batch in replay:
        seen += [r.seq for r in batch]
        if len(seen) >= 100:
            replay.interrupt()  # ends after what was delivered already
    assert seen == seqs[:len(seen)]
    rest = [i.seq async for b in store.replay(_filter(uid), start_seq=seen[-1] + 1) for i in b]
    assert seen + rest == seqs


def test_a_fleet_of_named_pools_on_one_hash_slot_still_judges_routes_of_no_known_pool():
    from consumers.partition import Partition, pool_slot

    fleet = [Partition(pools=frozenset({p}), replica=1, replicas=2) for p in ("a", "b")]
    assert all(pool_slot(p, 2) == 1 for p in ("a", "b")) and all(part.off_slot() == {} for part in fleet)
    assert any(part.owns_unplaced() for part in fleet)


# --- closing a store that cannot send -------------------------------------------------------------------------------


async def test_closing_twice_and_while_reconnecting_returns(fresh_server: EmbeddedServer, uid: str):
    """The server goes away with appends pending; the store, reconnecting, is closed: close returns within its
    bounds, every append settles, and a second close is harmless."""
    async with EventStore.connect(Settings(nats_url=fresh_server.url, request_timeout=1.0), ensure=True) as store:
        await store.append(created(f"{uid}-0"))
        fresh_server.stop()
        await eventually(lambda: store.nc.is_reconnecting, what="reconnecting")
        pending = [await store.submit(created(f"{uid}-{n}")) for n in range(1, 50)]
        await asyncio.wait_for(store.close(), 15)
        assert store.nc.is_closed
        await asyncio.wait_for(asyncio.wait(pending), 5)
        assert all(f.done() for f in pending)
        await asyncio.wait_for(store.close(), 5)
    # (and the context's own close, a third)


async def test_a_following_replay_ends_when_its_store_is_closed(settings: Settings, uid: str):
    """A follower whose connection is closed under it (the process shutting down) must end, not wait forever for
    a consumer it can never create again."""
    async with EventStore.connect(settings) as store:
        replay = store.replay(_filter(uid), follow=True, batch=10)
        seen: list[int] = []
        task = asyncio.create_task(_follow_until(replay, 10**9, seen))
        await _fill(store, uid, 5)
        await eventually(lambda: len(seen) >= 5, what="the first messages")
        await store.close()
        with contextlib.suppress(LedgerError):
            await asyncio.wait_for(task, 15)


async def _mine(store: EventStore, filters: list[str], after: int) -> list[Recorded]:
    return [i async for b in store.replay(filters, start_seq=after + 1) for i in b if isinstance(i, Recorded)]


async def test_a_trickle_through_short_lived_pulls_is_delivered_promptly_once_in_order(
        store: EventStore, uid: str, monkeypatch: pytest.MonkeyPatch):
    """Pulls that expire every half second (408, with what they did not deliver), statuses handled after the direct
    deliveries that followed them, tiny batches: the outstanding count must neither stall the replay (no pull on
    its way while it thinks there is) nor lose a message."""
    from ledger import replay as replay_module

    monkeypatch.setattr(replay_module, "PULL_EXPIRES", 0.5)
    monkeypatch.setattr(replay_module, "PULL_HEARTBEAT", 0.1)
    replay = store.replay(_filter(uid), follow=True, batch=3)
    statuses: list[str | None] = []
    on_status = replay._on_status
    replay._on_status = lambda h: (statuses.append(h.get("Status")), on_status(h))[1]  # type: ignore[method-assign]
    seen: list[int] = []
    task = asyncio.create_task(_follow_until(replay, 40, seen))
    seqs: list[int] = []
    for n in range(8):  # bursts between expiries: some pulls fill, some expire half-filled, some empty
        seqs += await _fill(store, uid, 5, tag=f"{n}-")
        want = len(seqs)
        await eventually(lambda: len(seen) >= want, timeout=2.0, what=f"burst {n} within a pull's life")  # noqa: B023
        await asyncio.sleep(0.7 * (n % 2))  # load shaping, not synchronisation: lets pulls expire between bursts
    await asyncio.wait_for(task, 10)
    assert seen == seqs
    # Pulls did expire, their statuses handled beside the direct deliveries.
    assert "408" in statuses, sorted(set(map(str, statuses)))


async def test_a_follower_through_a_stream_leader_stepdown(cluster_store: EventStore, uid: str):
    """The stream's leader steps down while a replay follows: every message once, in order. (On the servers tested
    the replay's R1 consumer outlives the stepdown - its deliveries go on numbered - so this pins exactly-once
    across it; a leader killed is test_cluster's.)"""
    store = cluster_store
    seqs = await _fill(store, uid, 20)
    replay = store.replay(_filter(uid), follow=True, batch=8)
    seen: list[int] = []
    task = asyncio.create_task(_follow_until(replay, 60, seen))
    await eventually(lambda: len(seen) >= 20, what="the first messages")
    await store.nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{subjects.LEDGER_STREAM}", b"", timeout=5)
    seqs += await _fill(store, uid, 40, tag="b")
    await asyncio.wait_for(task, 30)
    assert seen == seqs


async def test_a_reclaimer_whose_claims_are_refused_for_their_producer_does_not_write_in_a_loop(
        store: EventStore, uid: str):
    """The other side of the fix above: a refusal that says nothing of the claimer (a reclaimer misconfigured under
    an agent's producer token) must not make it plan and write again every step. The SDK's writer refuses such a
    claim at the edge (the folds would flag it unauthorized_producer, which is not a claimer refusal either), so
    the session backs off."""
    from consumers.follow import Follower
    from consumers.reclaimer import Reclaimer

    pool, sid, a = f"{uid}-pool", f"{uid}-s", f"{uid}-a"
    filters = [subjects.entity_filter("agent", a), subjects.entity_filter("session", sid)]
    start = (await store.stream_facts()).last_seq
    await store.append(ev.AgentRegistered(producer=ev.Producer(id=a, instance="i"), agent_id=a, instance_id="i",
                                          pool=pool, capacity=4, heartbeat_interval=5.0, ttl=30.0))
    await store.append(ev.SessionCreated(producer=CLI, session_id=sid, pool=pool))
    follower = Follower(store, LedgerState())
    reclaimer = Reclaimer(Writer(store, ev.Producer(id=f"{uid}-rogue", instance=new_id())), follower)
    items = await _mine(store, filters, start)
    follower._apply(subjects.LEDGER_STREAM, items)
    assert len(await reclaimer.step(ev.utcnow())) == 1
    assert await _mine(store, filters, items[-1].seq) == [] and reclaimer.writes == 0  # refused before the wire
    assert await reclaimer.step(ev.utcnow()) == []  # backed off, not planned again at once
