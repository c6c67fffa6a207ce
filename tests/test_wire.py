"""ledger.wire: the appender's frames are the bytes nats-py's publish would send, queued as it queues them, only
while connected; its acknowledgements come straight from the parser, everything else the usual way; and the
nats-py internals this leans on are the ones pinned (an upgrade fails here, loudly)."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from typing import Any

import pytest
from helpers import eventually
from nats.aio import client as nats_client
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.protocol.parser import Parser

from ledger import codec, wire
from ledger import events as ev
from ledger.appender import _Window
from ledger.codec import Unreadable
from ledger.settings import Settings
from ledger.store import EventStore

PRODUCER = ev.Producer(id="operator-wire", instance="i")


def test_the_nats_py_internals_the_fast_paths_lean_on_are_the_pinned_ones() -> None:
    assert nats_client.__version__ == wire.NATS_PY_VERSION  # pyproject pins it; a new release: re-read its client
    nc = NATS()
    for name, kind in (("_status", int), ("_pending", list), ("_pending_data_size", int), ("_max_pending_size", int),
                       ("_max_payload", int), ("_subs", dict), ("stats", dict)):
        assert isinstance(getattr(nc, name), kind), name
    assert nc._flush_queue is None  # set by connect
    assert {"out_msgs", "out_bytes", "in_msgs", "in_bytes"} <= set(nc.stats)
    assert NATS.CONNECTED == 1 and nc._status != NATS.CONNECTED
    assert list(inspect.signature(nc._flush_pending).parameters) == ["force_flush"]
    assert list(inspect.signature(nc._process_msg).parameters) == ["sid", "subject", "reply", "data", "headers"]
    # What enqueue + kick repeat, and what the parser calls per message (looked up on the instance).
    send_publish = inspect.getsource(NATS._send_publish)
    assert "prot_command.hpub_cmd(subject, reply, hdr, payload)" in send_publish
    assert 'self.stats["out_msgs"] += 1' in send_publish and 'self.stats["out_bytes"] += payload_size' in send_publish
    assert "self._flush_queue.empty()" in send_publish and "await self._flush_pending()" in send_publish
    send_command = inspect.getsource(NATS._send_command)
    assert "self._pending.append(cmd)" in send_command and "self._pending_data_size += len(cmd)" in send_command
    assert "await self._flush_pending(force_flush=True)" in send_command
    assert "await self.nc._process_msg(sid, subject, reply, payload, hdr)" in inspect.getsource(Parser.parse)
    process_msg = inspect.getsource(NATS._process_msg)
    assert 'self.stats["in_msgs"] += 1' in process_msg and "sub._received += 1" in process_msg
    sub_params = inspect.signature(Subscription.__init__).parameters
    assert {"id", "max_msgs"} <= set(sub_params)
    assert "self._id = id" in inspect.getsource(Subscription.__init__)
    assert "self._received = 0" in inspect.getsource(Subscription.__init__)


def _offline_client() -> NATS:
    """A client that publishes into its pending buffer and nowhere else (its flusher queue is never empty)."""
    nc = NATS()
    nc._status = NATS.CONNECTED
    nc._flush_queue = asyncio.Queue()
    nc._flush_queue.put_nowait(asyncio.get_running_loop().create_future())
    nc._max_pending_size = 1 << 30
    return nc


SUBJECT = "ledger.session.s-1.created.cli"
REPLY = "_INBOX.abc.17"
CAS = {codec.MSG_ID: "evt-1", "Nats-Expected-Last-Subject-Sequence": "41",
       "Nats-Expected-Last-Subject-Sequence-Subject": "ledger.session.s-1.>"}
FRAMED: list[dict[str, str]] = [{codec.MSG_ID: "evt-1"}, CAS, {}, {"X-Key": "a value with spaces inside"}]
NOT_FRAMED: list[dict[str, str]] = [{" Padded ": "x"}, {"": "x"}, {"Bad Key": "x"}, {"K": " padded "},
                                    {"K": "two\r\nlines"}, {"K": "é"}, {"K:": "x"}]


@pytest.mark.parametrize("headers", FRAMED, ids=str)
async def test_a_frame_is_the_command_nats_py_would_send_and_queueing_it_does_what_publish_does(
        headers: dict[str, str]) -> None:
    payload = b'{"type":"session.created"}'
    via_publish, via_wire = _offline_client(), _offline_client()
    await via_publish.publish(SUBJECT, payload, reply=REPLY, headers=headers)
    frame = wire.frame(SUBJECT, REPLY, headers, payload)
    assert frame is not None and [frame] == via_publish._pending
    assert wire.enqueue(via_wire, frame, len(payload))
    assert not wire.kick_due(via_wire)
    for name in ("_pending", "_pending_data_size", "stats"):
        assert getattr(via_wire, name) == getattr(via_publish, name), name


@pytest.mark.parametrize("headers", NOT_FRAMED, ids=str)
def test_headers_nats_py_would_change_or_refuse_are_left_to_it(headers: dict[str, str]) -> None:
    assert wire.frame(SUBJECT, REPLY, headers, b"{}") is None


@pytest.mark.parametrize("subject", ["", "has space", "tab\tbed", "new\r\nline"])
def test_a_subject_nats_py_would_refuse_is_left_to_it(subject: str) -> None:
    assert wire.frame(subject, REPLY, {codec.MSG_ID: "e"}, b"{}") is None
    assert not wire.subject_ok(subject)


@pytest.mark.parametrize("status", [NATS.RECONNECTING, NATS.DISCONNECTED, NATS.CLOSED, NATS.DRAINING_SUBS,
                                    NATS.DRAINING_PUBS, NATS.CONNECTING])
async def test_only_a_connected_client_is_written_to_directly(status: int) -> None:
    nc = _offline_client()
    nc._status = status
    assert not wire.enqueue(nc, b"HPUB x y 0 0\r\n\r\n", 0)
    assert nc._pending == [] and nc.stats["out_msgs"] == 0


async def test_a_payload_over_max_payload_is_left_to_nc_publish() -> None:
    nc = _offline_client()
    nc._max_payload = 10
    assert not wire.enqueue(nc, b"frame", 11)
    assert wire.enqueue(nc, b"frame", 10)


async def test_past_the_pending_limit_or_with_the_flusher_idle_the_client_is_kicked_as_publish_would() -> None:
    nc = _offline_client()
    flushes: list[bool] = []

    async def flush_pending(force_flush: bool = False) -> None:
        flushes.append(force_flush)

    nc._flush_pending = flush_pending  # type: ignore[method-assign]
    nc._max_pending_size = 100
    assert wire.enqueue(nc, b"x" * 60, 10)
    assert not wire.kick_due(nc)
    assert wire.enqueue(nc, b"x" * 60, 10)
    assert wire.kick_due(nc)
    await wire.kick(nc)
    assert flushes == [True]  # the flusher queue is not empty: no second, plain kick
    nc._flush_queue = asyncio.Queue()
    nc._pending_data_size = 0
    assert wire.kick_due(nc)
    await wire.kick(nc)
    assert flushes == [True, False]


async def _stored(nc: NATS, seq: int) -> tuple[str, dict[str, str], bytes]:
    msg = await nc.jetstream().get_msg("LEDGER", seq)
    return msg.subject, dict(msg.headers or {}), msg.data or b""


async def test_an_append_is_stored_as_through_nc_publish_with_its_cas_headers(store: EventStore, uid: str) -> None:
    created = ev.SessionCreated(producer=PRODUCER, session_id=uid, pool="p")
    claimed = ev.SessionTerminated(producer=PRODUCER, session_id=uid, reason="done")
    s1 = await store.append(created, expect=0)
    s2 = await store.append(claimed, expect=s1)
    for seq, event, expect in ((s1, created, 0), (s2, claimed, s1)):
        out = codec.encode(event)
        subject, headers, data = await _stored(store.nc, seq)
        assert (subject, data) == (out.subject, out.payload)
        assert headers == {codec.MSG_ID: event.event_id, "Nats-Expected-Last-Subject-Sequence": str(expect),
                           "Nats-Expected-Last-Subject-Sequence-Subject": f"ledger.session.{uid}.>"}
    # The same append through nc.publish (another id: a duplicate would not be stored) is stored the same way.
    other = ev.SessionTerminated(producer=PRODUCER, session_id=uid, reason="done")
    out = codec.encode(other)
    reply = store.nc.new_inbox()
    sub = await store.nc.subscribe(reply, max_msgs=1)
    await store.nc.publish(out.subject, out.payload, reply=reply, headers={
        **out.headers, "Nats-Expected-Last-Subject-Sequence": str(s2),
        "Nats-Expected-Last-Subject-Sequence-Subject": f"ledger.session.{uid}.>"})
    ack = await sub.next_msg(timeout=5)
    s3 = json.loads(ack.data)["seq"]
    via_publish = await _stored(store.nc, s3)
    assert via_publish[0] == out.subject and via_publish[2] == out.payload
    assert set(via_publish[1]) == set((await _stored(store.nc, s2))[1])


async def test_acknowledgements_come_from_the_parser_and_other_messages_the_usual_way(settings: Settings,
                                                                                       uid: str) -> None:
    async with EventStore.connect(settings, name="wire-test") as store:
        nc = store.nc
        sub = store._appender._sub
        assert sub is not None and isinstance(nc.__dict__.get("_process_msg"), wire._Direct)
        heard: list[Msg] = []

        async def other(msg: Msg) -> None:
            heard.append(msg)

        inbox = nc.new_inbox()
        other_sub = await nc.subscribe(inbox, cb=other)
        futures = [await store.submit(ev.SessionCreated(producer=PRODUCER, session_id=f"{uid}-{i}", pool="p"))
                   for i in range(50)]
        await nc.publish(inbox, b"plain")
        await nc.publish(inbox, b"with headers", headers={"K": "v"})
        seqs = [await f for f in futures]
        assert len(set(seqs)) == 50
        assert sub._received >= 50 and sub._pending_queue.qsize() == 0
        await eventually(lambda: len(heard) == 2, timeout=10, what="the other subscription's two messages")
        assert [m.data for m in heard] == [b"plain", b"with headers"] and heard[1].headers == {"K": "v"}
        await other_sub.unsubscribe()
    assert "_process_msg" not in nc.__dict__  # closed: the connection's own method again


async def test_a_replay_reads_its_messages_from_the_parser_and_its_statuses_the_usual_way(settings: Settings,
                                                                                          uid: str) -> None:
    """Every event a replay delivers bypasses nats-py's Msg, header parse and queue (nothing waits in the
    subscription's queue, nothing calls its callback for a message); statuses still come as a Msg."""
    from ledger import replay as replay_module

    async with EventStore.connect(settings, name="wire-replay") as store:
        sids = [f"{uid}-{i}" for i in range(300)]
        for f in [await store.submit(ev.SessionCreated(producer=PRODUCER, session_id=s, pool="p")) for s in sids]:
            await f
        statuses: list[dict[str, str]] = []
        messages: list[str] = []
        to_msg = replay_module.Replay._on_msg

        async def spy(self: replay_module.Replay, msg: Msg) -> None:
            if msg.reply:
                messages.append(msg.subject)  # (asserted below: nats-py swallows a callback's failure)
            statuses.append(dict(msg.headers or {}))
            await to_msg(self, msg)

        replay = store.replay("ledger.session.*.created.>", batch=64)
        replay._on_msg = spy.__get__(replay)  # type: ignore[method-assign]
        got = [item.event.entity_id for batch in [b async for b in replay] for item in batch
               if not isinstance(item, Unreadable) and item.event.entity_id.startswith(f"{uid}-")]
        assert got == sids  # in order, none lost or repeated, across pull requests of 64
        assert messages == []
        assert all(s.get("Status") in ("100", "404", "408") for s in statuses), statuses


async def test_a_reply_filter_sees_every_acknowledgement_as_a_msg(settings: Settings, uid: str) -> None:
    async with EventStore.connect(settings, name="wire-test") as store:
        seen: list[str] = []

        def keep(msg: Msg) -> bool:
            seen.append(msg.subject)
            return True

        store.drop_replies(keep)
        assert await store.append(ev.SessionCreated(producer=PRODUCER, session_id=uid, pool="p")) > 0
        assert len(seen) == 1 and seen[0].startswith(store._appender._prefix)


class _Spy:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    async def __call__(self, *args: Any) -> None:
        self.calls.append(args)


async def test_direct_delivery_takes_only_registered_header_less_messages_and_survives_its_handler(
        caplog: pytest.LogCaptureFixture) -> None:
    nc = NATS()
    spy = _Spy()
    nc._process_msg = spy  # type: ignore[method-assign] # stands for nats-py's own delivery
    sub = Subscription(nc, id=7, subject="_INBOX.x.*")
    nc._subs[7] = sub
    nc._subs[8] = Subscription(nc, id=8, subject="elsewhere")
    got: list[tuple[bytes, bytes]] = []

    def handler(subject: bytes, data: bytes) -> bool:
        if data == b"boom":
            raise RuntimeError("a bug")
        got.append((subject, data))
        return data != b"decline"

    wire.deliver_directly(nc, 7, handler)
    await nc._process_msg(7, b"_INBOX.x.1", b"", b"ack", None)
    await nc._process_msg(7, b"_INBOX.x.2", b"", b"status", b"NATS/1.0 503\r\n\r\n")
    await nc._process_msg(8, b"elsewhere", b"", b"other", None)
    await nc._process_msg(7, b"_INBOX.x.3", b"", b"decline", None)
    with caplog.at_level(logging.ERROR, logger="ledger.wire"):
        await nc._process_msg(7, b"_INBOX.x.4", b"", b"boom", None)
    assert got == [(b"_INBOX.x.1", b"ack"), (b"_INBOX.x.3", b"decline")]
    assert [c[3] for c in spy.calls] == [b"status", b"other", b"decline"]
    assert "a bug" in caplog.text
    assert sub._received == 2 and nc.stats["in_msgs"] == 2  # the handled ones (nats-py counts the others)
    del nc._subs[7]  # unsubscribed: no longer the handler's
    await nc._process_msg(7, b"_INBOX.x.5", b"", b"late", None)
    assert spy.calls[-1][3] == b"late"
    wire.stop_delivering(nc, 7)
    assert nc._process_msg is spy  # what the instance had before


async def test_the_window_hands_places_over_in_order_and_a_cancelled_waiter_passes_its_turn_on() -> None:
    window = _Window(1)
    assert window.free() and not window.free()
    first = asyncio.create_task(window.wait())
    second = asyncio.create_task(window.wait())
    await asyncio.sleep(0)
    assert not first.done() and not second.done()
    window.release()  # handed to the first waiter...
    first.cancel()  # ...which is cancelled before it runs: the place goes on to the second
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert first.cancelled() and second.done()
    assert window.room == 0 and not window.free()
    window.release()
    assert window.room == 1 and window.free()
    third = asyncio.create_task(window.wait())
    await asyncio.sleep(0)
    third.cancel()  # cancelled while waiting: no place taken, none lost
    await asyncio.sleep(0)
    window.release()
    assert window.room == 1
