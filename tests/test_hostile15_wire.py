"""Hostile tests of the append fast path (ledger/wire.py, the appender's _Window and frames, codec's twin read-back):
faults while thousands of frames are queued or in flight, the fast path beside other users of one connection,
and encode() against the read-back it replaced."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC
from pathlib import Path

import msgspec
import nats
import pytest
from helpers import eventually
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from nats.aio.msg import Msg
from samples import all_samples
from test_codec_validation import _old_encode, _outcome, _set

from ledger import codec, wire
from ledger import events as ev
from ledger.codec import Recorded
from ledger.errors import AppendTimeout, InvalidInput, PermissionDenied, Unavailable
from ledger.ids import TOKEN_PATTERN, new_id
from ledger.settings import Settings
from ledger.store import EventStore
from ledgerctl.server import EmbeddedServer, ServerConfig, free_port

CLI = ev.Producer(id="cli", instance="i")


def _report(sid: str, n: int) -> ev.SessionResourceReported:
    return ev.SessionResourceReported(producer=ev.Producer(id="a1", instance="i"), session_id=sid, agent_id="a1",
                                      incarnation=1, token=1, platform_resource_id=f"r-{n}")


def _own_server(base: Path, extra: str = "") -> EmbeddedServer:
    """A server of the test's own that fsyncs (a kill -9 then loses nothing the server acknowledged)."""
    return EmbeddedServer(ServerConfig(data_dir=base, port=free_port(), name=f"h15-{uuid.uuid4().hex[:6]}",
                                       sync_always=True, extra=extra)).start()


@pytest.fixture
async def crashable(tmp_path: Path) -> AsyncIterator[EmbeddedServer]:
    s = _own_server(tmp_path / "nats")
    try:
        yield s
    finally:
        if s.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(s.pid, signal.SIGCONT)
        s.stop()


async def _settled(futures: list[asyncio.Future[int]], timeout: float) -> None:
    """Every future done within `timeout` (the appender's deadline plus slack), else the test fails naming how many."""
    if futures:
        _, not_done = await asyncio.wait(futures, timeout=timeout)
        assert not not_done, f"{len(not_done)} of {len(futures)} appends never settled"


def _outcomes(futures: list[asyncio.Future[int]]) -> tuple[dict[int, int], list[BaseException]]:
    """{index: seq} of the acknowledged appends, and the errors of the others."""
    acked: dict[int, int] = {}
    errors: list[BaseException] = []
    for i, f in enumerate(futures):
        if f.exception() is None:
            acked[i] = f.result()
        else:
            errors.append(f.exception())  # type: ignore[arg-type]
    return acked, errors


async def _check_log(store: EventStore, sid: str, events: list[ev.SessionResourceReported],
                     acked: dict[int, int]) -> None:
    """Nothing acknowledged is lost (each at the sequence its future gave), nothing is stored twice."""
    history = await store.history("session", sid)
    recorded = [r for r in history if isinstance(r, Recorded)]
    assert len(recorded) == len(history)
    ids = [r.event.event_id for r in recorded]
    assert len(ids) == len(set(ids)), "an event was stored twice"
    by_seq = {r.seq: r.event.event_id for r in recorded}
    for i, seq in acked.items():
        assert by_seq.get(seq) == events[i].event_id, f"append {i} acknowledged as #{seq}, which is not it"


def _at_least(count: Callable[[], int], n: int) -> Callable[[], bool]:
    return lambda: count() >= n


def _done_at_least(futures: list[asyncio.Future[int]], n: int) -> Callable[[], bool]:
    return lambda: sum(f.done() for f in futures) >= n


# --- faults -----------------------------------------------------------------------------------------------------

async def test_kill_9_and_restart_mid_pipeline_loses_nothing_acknowledged_and_writes_nothing_twice(
        crashable: EmbeddedServer) -> None:
    settings = Settings(nats_url=crashable.url, request_timeout=0.5, append_deadline=30)
    sid = f"s-{uuid.uuid4().hex[:8]}"
    events = [_report(sid, n) for n in range(1500)]
    async with EventStore.connect(settings, ensure=True) as store:
        futures: list[asyncio.Future[int]] = []
        for n, event in enumerate(events):
            futures.append(await store.submit(event))
            if n == 700:
                crashable.kill()  # frames queued in nats-py's pending buffer and on the wire, acks outstanding
        await eventually(lambda: not store.nc.is_connected, timeout=10, what="the crash noticed")
        await asyncio.to_thread(crashable.start)
        await _settled(futures, 45)
        acked, errors = _outcomes(futures)
        assert all(isinstance(e, AppendTimeout | Unavailable) for e in errors), errors[:3]
        assert len(acked) == len(events)  # a 30 s deadline rides out a restart of a few seconds
        await _check_log(store, sid, events, acked)
        assert store.appends_in_flight == 0


async def test_a_frozen_server_then_thawed_settles_every_append_once(crashable: EmbeddedServer) -> None:
    settings = Settings(nats_url=crashable.url, request_timeout=0.3, append_deadline=30)
    sid = f"s-{uuid.uuid4().hex[:8]}"
    events = [_report(sid, n) for n in range(800)]
    async with EventStore.connect(settings, ensure=True) as store:
        assert crashable.pid is not None
        futures = [await store.submit(e) for e in events[:200]]
        os.kill(crashable.pid, signal.SIGSTOP)
        try:
            futures += [await store.submit(e) for e in events[200:]]
            # Re-sent at least once while frozen (the ack timeout is 0.3 s): retries queue behind first attempts.
            await eventually(lambda: store.nc.stats["out_msgs"] > len(events) + 100, timeout=20,
                             what="re-sends while the server is frozen")
        finally:
            os.kill(crashable.pid, signal.SIGCONT)
        await _settled(futures, 45)
        acked, errors = _outcomes(futures)
        assert all(isinstance(e, AppendTimeout | Unavailable) for e in errors), errors[:3]
        assert len(acked) == len(events)
        await _check_log(store, sid, events, acked)


async def test_acks_dropped_and_restored_mid_stream_settle_every_append_once(settings: Settings) -> None:
    """drop_replies toggled while appends are in flight: the late acks of retried attempts go to the direct path
    or nats-py's as the seam says, each append is settled once, at its own sequence."""
    sid = f"s-{uuid.uuid4().hex[:8]}"
    events = [_report(sid, n) for n in range(600)]
    async with EventStore.connect(settings.replace(request_timeout=0.3, append_deadline=30)) as store:
        seen: list[Msg] = []

        def drop_odd(msg: Msg) -> bool:
            seen.append(msg)
            return int(msg.subject.rsplit(".", 1)[1]) % 2 == 0  # tokens count from 1: odd ones lose their ack

        futures: list[asyncio.Future[int]] = []
        for b in range(6):
            dropping = b % 2 == 0
            store.drop_replies(drop_odd if dropping else None)
            seen_before = len(seen)
            batch = [await store.submit(e) for e in events[b * 100:(b + 1) * 100]]
            futures += batch
            if dropping:  # every first ack of the batch through the seam (half dropped), then the seam goes
                await eventually(_at_least(lambda: len(seen), seen_before + 100), timeout=20, what="the acks seen")
            else:  # the retried ones of the batch before are acked the direct way now
                await eventually(_done_at_least(batch, 50), timeout=20, what="half done")
        store.drop_replies(None)
        await _settled(futures, 45)
        acked, errors = _outcomes(futures)
        assert not errors, errors[:3]
        assert seen  # the seam did see Msgs while set
        await _check_log(store, sid, events, acked)
        assert wire._Direct is type(store.nc.__dict__["_process_msg"])


async def test_an_event_over_max_payload_fails_alone_and_the_appender_lives_on(tmp_path: Path) -> None:
    """A payload over the server's max_payload (a server configured below the ledger's 64 KiB): nc.publish raised
    MaxPayloadError, which escaped submit leaving the append in flight (its place in the window taken) for the
    sweeper to re-send - raising again inside the sweeper, which died: no append timed out or was re-sent again.
    Now the append's future fails with InvalidInput and nothing is left behind."""
    server = _own_server(tmp_path / "nats", extra="max_payload: 8192\n")
    try:
        settings = Settings(nats_url=server.url, request_timeout=0.3, append_deadline=2)
        async with EventStore.connect(settings, ensure=True) as store:
            sid = f"s-{uuid.uuid4().hex[:8]}"
            big = ev.SessionCreated(producer=CLI, session_id=sid, pool="p",
                                    labels={"a": "x" * 4000, "b": "y" * 4000, "c": "z" * 4000})
            assert len(codec.encode(big).payload) > store.nc.max_payload
            refused = await store.submit(big)
            await _settled([refused], 10)
            assert isinstance(refused.exception(), InvalidInput), refused.exception()  # the SDK's, not nats-py's
            assert "max_payload" in str(refused.exception())
            assert store.appends_in_flight == 0, "the refused append stays in flight"
            # Another append whose ack is lost must still time out (the sweeper alive), not hang.
            store.drop_replies(lambda msg: False)
            lost = await store.submit(_report(sid, 1))
            await _settled([lost], 10)
            assert isinstance(lost.exception(), AppendTimeout)
    finally:
        server.stop()


async def test_draining_the_connection_with_appends_in_flight_settles_them_all(crashable: EmbeddedServer) -> None:
    """nc.drain() while acks are outstanding and the server is frozen: the subscriptions' drain times out, the
    connection sits in DRAINING_PUBS while its final flush waits, and a re-send then gets ConnectionDrainingError
    from nc.publish - which the appender must turn into a failed append, not let kill its sweeper."""
    settings = Settings(nats_url=crashable.url, request_timeout=0.2, append_deadline=5)
    nc = await nats.connect(crashable.url, drain_timeout=0.5, max_reconnect_attempts=1, reconnect_time_wait=0.2)
    async with EventStore.connect(settings, ensure=True):
        pass  # the streams
    store = EventStore(nc, settings)
    await store.start()
    try:
        sid = f"s-{uuid.uuid4().hex[:8]}"
        store.drop_replies(lambda msg: False)  # every append stays in flight
        futures = [await store.submit(_report(sid, n)) for n in range(50)]
        assert crashable.pid is not None
        os.kill(crashable.pid, signal.SIGSTOP)
        drain = asyncio.create_task(nc.drain())
        try:
            await _settled(futures, 20)
        finally:
            os.kill(crashable.pid, signal.SIGCONT)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(drain, 20)
        _, errors = _outcomes(futures)
        assert len(errors) == len(futures)
        assert all(isinstance(e, AppendTimeout | Unavailable) for e in errors), errors[:3]
    finally:
        await store.close()
        if not nc.is_closed:
            await nc.close()


# --- one connection, several users ------------------------------------------------------------------------------

async def test_two_stores_and_a_plain_subscriber_on_one_connection_each_get_theirs(settings: Settings) -> None:
    nc = await nats.connect(settings.nats_url)
    try:
        a, b = EventStore(nc, settings), EventStore(nc, settings)
        await a.start()
        await b.start()
        subject = f"h15.{uuid.uuid4().hex[:8]}"
        got: list[Msg] = []

        async def on_msg(msg: Msg) -> None:
            got.append(msg)

        other = await nc.subscribe(subject, cb=on_msg)
        sid = f"s-{uuid.uuid4().hex[:8]}"
        events = [_report(sid, n) for n in range(400)]
        in_before = nc.stats["in_msgs"]
        futures: list[asyncio.Future[int]] = []
        for n, event in enumerate(events):
            futures.append(await (a if n % 2 else b).submit(event))
            if n % 10 == 0:  # another part of the program's traffic, with and without headers, replies too
                await nc.publish(subject, f"m{n}".encode(), reply=f"{subject}.r",
                                 headers={"K": str(n)} if n % 20 == 0 else None)
        await _settled(futures, 30)
        acked, errors = _outcomes(futures)
        assert not errors, errors[:3]
        await _check_log(a, sid, events, acked)
        await eventually(lambda: len(got) == 40, what="the plain subscriber's 40 messages")
        assert [m.data for m in got] == [f"m{n}".encode() for n in range(0, 400, 10)]
        assert [m.headers for m in got[::2]] == [{"K": str(n)} for n in range(0, 400, 20)]
        assert all(m.headers is None for m in got[1::2])
        assert nc.stats["in_msgs"] - in_before >= len(events) + 40  # the direct acks are counted as nats-py counts
        await a.close()
        # b's acks still come straight from the parser; a's subscription is gone from the wrapper
        direct = nc.__dict__["_process_msg"]
        assert isinstance(direct, wire._Direct) and len(direct.handlers) == 1
        more = [_report(sid, n) for n in range(400, 450)]
        futs = [await b.submit(e) for e in more]
        await _settled(futs, 30)
        assert all(f.exception() is None for f in futs)
        await b.close()
        assert "_process_msg" not in nc.__dict__  # the class's method again
        await other.unsubscribe()
    finally:
        await nc.close()


async def test_fast_path_compare_and_set_conflicts_and_duplicates(store: EventStore, uid: str) -> None:
    """CAS through the frames: one of many racing expect=0 appends wins, the rest are Conflicts; the same event
    again is a duplicate resolved as ours; an expect_filter narrower than the entity."""
    from ledger.errors import Conflict

    first = ev.SessionCreated(producer=CLI, session_id=uid, pool="p")
    rivals = [ev.SessionCreated(producer=CLI, session_id=uid, pool="p") for _ in range(20)]
    futs = [await store.submit(e, expect=0) for e in [first, *rivals]]
    await _settled(futs, 30)
    wins = [f for f in futs if f.exception() is None]
    assert len(wins) == 1 and futs[0] in wins  # queued in order: the first frame lands first
    assert all(isinstance(f.exception(), Conflict) for f in futs[1:])
    seq = wins[0].result()
    assert await store.append(first) == seq  # the same id again: de-duplicated, known to be ours
    claim = ev.SessionClaimed(producer=ev.Producer(id="a1", instance="i"), session_id=uid, agent_id="a1",
                              instance_id="i", incarnation=1)
    filt = f"ledger.session.{uid}.claimed.*"
    s2 = await (await store.submit(claim, expect=0, expect_filter=filt))
    assert s2 > seq
    with pytest.raises(Conflict):
        await (await store.submit(msgspec_replace(claim), expect=0, expect_filter=filt))


def msgspec_replace(event: ev.Event) -> ev.Event:
    return msgspec.structs.replace(event, event_id=new_id())


# --- the codec ---------------------------------------------------------------------------------------------------

_LOOKALIKES = ["\u0430", "\uff41", "\u200b", "\u00a0", "\n", "\r", "\t", " ", ".", "*", ">", "\x00", "\u212a", "\u0131",
               "\U0001d41a", "-", "_"]
_token_text = st.one_of(
    st.text(alphabet=st.sampled_from("aZ09_-:@=+~"), min_size=0, max_size=130),
    st.builds(lambda n, tail: "a" * n + tail, st.integers(125, 129), st.sampled_from(["", *_LOOKALIKES])),
    st.builds(lambda head, body: head + body, st.sampled_from(["a", *_LOOKALIKES]),
              st.text(alphabet=st.sampled_from(["b", *_LOOKALIKES]), max_size=8)),
)


class _Sub(str):
    pass


SAMPLES = {type(s): s for s in all_samples()}
PATHS = [(cls, path) for cls in ev.EVENT_TYPES for path, _ in codec.twin_of(cls)[1]]


@hsettings(max_examples=400, deadline=None)
@given(st.sampled_from(PATHS), _token_text, st.booleans(), st.sampled_from(PATHS), st.booleans())
def test_encode_accepts_and_refuses_what_the_old_read_back_did(where: tuple[type[ev.Event], tuple[str, ...]],
                                                              value: str, subclass: bool,
                                                              elsewhere: tuple[type[ev.Event], tuple[str, ...]],
                                                              huge: bool) -> None:
    cls, path = where
    if huge:
        value = "x" * 20_000 + value  # (under MAX_EVENT_BYTES, whose check comes before either read-back)
    v: str = _Sub(value) if subclass else value
    event = _set(SAMPLES[cls], path, v)
    for _ in range(2):  # the second time through the memo
        assert _outcome(codec.encode, event) == _outcome(_old_encode, event)
    # The value, remembered or not, in another field (of another type) is judged as the old read-back judged it.
    other_cls, other_path = elsewhere
    other = _set(SAMPLES[other_cls], other_path, value)
    assert _outcome(codec.encode, other) == _outcome(_old_encode, other)


def test_the_memo_is_only_ever_for_the_one_token_pattern_and_several_patterns_read_back_the_slow_way() -> None:
    for s in all_samples():
        codec.encode(s)
    assert set(codec._token_memo) <= {TOKEN_PATTERN}
    assert codec._pattern_check([(("a",), r"^x\Z"), (("b",), r"^y\Z")]) is codec._never


async def test_an_event_whose_headers_take_it_over_max_payload_fails_alone_and_the_connection_lives_on(
        tmp_path: Path) -> None:
    """nats-py checks only the payload against max_payload; the server counts headers too, answers
    'Maximum Payload Violation' and closes the connection - which nats-py then closes for good (no reconnect):
    every later append of the store fails. An append whose payload fits but not with its headers must fail alone."""
    server = _own_server(tmp_path / "nats", extra="max_payload: 8192\n")
    try:
        settings = Settings(nats_url=server.url, request_timeout=0.3, append_deadline=3)
        async with EventStore.connect(settings, ensure=True) as store:
            sid = f"s-{uuid.uuid4().hex[:8]}"
            base = ev.SessionCreated(producer=CLI, session_id=sid, pool="p", labels={"a": "x" * 4000, "b": ""})
            room = store.nc.max_payload - len(codec.encode(base).payload)
            edge = msgspec.structs.replace(base, labels={"a": "x" * 4000, "b": "y" * (room - 10)})
            out = codec.encode(edge)
            assert len(out.payload) <= store.nc.max_payload < len(out.payload) + 40  # the headers do not fit beside
            f = await store.submit(edge, expect=0)
            await _settled([f], 10)
            assert isinstance(f.exception(), InvalidInput), f.exception()
            assert not store.nc.is_closed
            assert await store.append(_report(sid, 1)) > 0
    finally:
        server.stop()


def _registered(agent: str) -> ev.AgentRegistered:
    return ev.AgentRegistered(agent_id=agent, producer=ev.Producer(agent, "test"),
                              instance_id=f"{agent}-{new_id()[:8]}", pool="gpu")


@pytest.mark.timeout(120)
async def test_a_pipeline_mixing_allowed_and_denied_subjects_fails_only_the_denied_and_promptly(
        tmp_path: Path) -> None:
    """Frames queued back to back, every other one on a subject the user may not publish: each denied one fails
    with PermissionDenied (the deadline is far beyond the test's bound: only the server's refusal routed to it
    ends it), each allowed one lands, and the connection stays good."""
    extra = """authorization {
  users = [
    {user: admin, password: adminpw}
    {user: a1, password: a1pw, permissions: {publish: ["ledger.*.*.*.a1", "$JS.API.>", "_INBOX.>"],
                                              subscribe: ["_INBOX.>"]}}
  ]
}
"""
    server = _own_server(tmp_path / "nats", extra=extra)
    try:
        async with EventStore.connect(Settings(nats_url=server.url, user="admin", password="adminpw"), ensure=True):
            pass
        a1 = Settings(nats_url=server.url, user="a1", password="a1pw", append_deadline=600.0, request_timeout=600.0)
        async with EventStore.connect(a1) as store:
            futures: list[asyncio.Future[int]] = []
            for n in range(200):
                futures.append(await store.submit(_registered("a1" if n % 2 == 0 else f"x{n}")))
            await _settled(futures, 60)
            own, forged = futures[0::2], futures[1::2]
            assert all(f.exception() is None for f in own), [f.exception() for f in own if f.exception()][:3]
            assert all(isinstance(f.exception(), PermissionDenied) for f in forged), \
                [f.exception() for f in forged if not isinstance(f.exception(), PermissionDenied)][:3]
            assert await store.append(_registered("a1")) > 0
    finally:
        server.stop()


_any_value = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), _token_text, st.binary(max_size=8), st.datetimes(), st.datetimes(timezones=st.just(UTC)),
    st.lists(st.sampled_from(["a", "b b", 1, None]), max_size=3).map(tuple),
    st.dictionaries(st.sampled_from(["k", "", "x" * 300]), st.sampled_from(["v", 1, "é" * 5000]), max_size=2),
)
FIELDS = [(cls, (f.name,)) for cls in ev.EVENT_TYPES for f in msgspec.structs.fields(cls)] + \
         [(cls, ("producer", name)) for cls in ev.EVENT_TYPES for name in ("id", "instance")]


@hsettings(max_examples=600, deadline=None)
@given(st.sampled_from(FIELDS), _any_value)
def test_any_value_in_any_field_is_judged_as_the_old_read_back_judged_it(
        where: tuple[type[ev.Event], tuple[str, ...]], value: object) -> None:
    cls, path = where
    event = _set(SAMPLES[cls], path, value)
    if len(codec.encode_payload(event) if _encodable(event) else b"") > codec.MAX_EVENT_BYTES:
        return  # refused on size before either read-back (the old one copied in the tests has no size check)
    old = _judged(_old_encode, event)
    for _ in range(2):
        new = _judged(codec.encode, event)
        if old[0] == "crashed":  # (a producer or evidence that is not one: the old encode raised AttributeError)
            assert new[0] != "written", new
        else:
            assert new == old


def _judged(fn: Callable[[ev.Event], codec.Outgoing], event: ev.Event) -> tuple[str, str]:
    try:
        return _outcome(fn, event)
    except Exception as e:  # noqa: BLE001 - not the SDK's error: say which
        return "crashed", f"{type(e).__name__}: {e}"


def test_an_event_without_a_producer_or_with_evidence_of_the_wrong_type_is_refused_as_invalid_input() -> None:
    """encode() is documented to refuse with InvalidInput, one line naming the field; it raised AttributeError
    (subject_of, called for the id's message, read producer.id off None; the float check walked into a bool) -
    before the fast path too."""
    event = _set(SAMPLES[ev.SessionCreated], ("producer",), None)
    with pytest.raises(InvalidInput, match=r"session.created refused: producer: expected `object`, got `null`"):
        codec.encode(event)
    suspected = _set(SAMPLES[ev.AgentSuspected], ("evidence",), False)
    with pytest.raises(InvalidInput, match=r"agent.suspected refused: evidence: expected `object`, got `bool`"):
        codec.encode(suspected)


def _encodable(event: ev.Event) -> bool:
    try:
        codec.encode_payload(event)
    except Exception:  # noqa: BLE001 - refused the same way by both: compared above
        return False
    return True


async def test_the_fast_path_counts_what_nc_publish_counted(settings: Settings) -> None:
    """nc.stats after framed appends and their direct acks: one out_msg and the payload's bytes per append, one
    in_msg and the ack's bytes per ack (no retries here: a 30 s ack timeout)."""
    sid = f"s-{uuid.uuid4().hex[:8]}"
    events = [_report(sid, n) for n in range(200)]
    async with EventStore.connect(settings.replace(request_timeout=30, append_deadline=60)) as store:
        nc = store.nc
        before = dict(nc.stats)
        futures = [await store.submit(e) for e in events]
        await _settled(futures, 30)
        assert all(f.exception() is None for f in futures)
        assert nc.stats["out_msgs"] - before["out_msgs"] == len(events)
        assert nc.stats["out_bytes"] - before["out_bytes"] == sum(len(codec.encode(e).payload) for e in events)
        assert nc.stats["in_msgs"] - before["in_msgs"] == len(events)
        assert nc.stats["in_bytes"] - before["in_bytes"] > 0
        sub = nc._subs[store._appender._sub._id]  # type: ignore[union-attr]
        assert sub._received >= len(events)


async def test_closing_the_connection_under_the_store_settles_every_append_in_flight(settings: Settings) -> None:
    nc = await nats.connect(settings.nats_url)
    store = EventStore(nc, settings.replace(request_timeout=0.2, append_deadline=5))
    await store.start()
    try:
        sid = f"s-{uuid.uuid4().hex[:8]}"
        store.drop_replies(lambda msg: False)
        futures = [await store.submit(_report(sid, n)) for n in range(300)]
        await nc.close()
        await _settled(futures, 20)
        _, errors = _outcomes(futures)
        assert len(errors) == len(futures)
        assert all(isinstance(e, Unavailable | AppendTimeout) for e in errors), errors[:3]
        with pytest.raises(Unavailable):
            await (await store.submit(_report(sid, 1000)))
    finally:
        await store.close()


async def test_an_append_submitted_after_the_store_closed_on_a_shared_connection_never_hangs(
        settings: Settings) -> None:
    """The store closed, its connection still open (another part of the program owns it): an append submitted
    now is refused (with no sweeper and no reply subscription left, it was published - and landed - while its
    future waited for ever)."""
    nc = await nats.connect(settings.nats_url)
    try:
        store = EventStore(nc, settings.replace(request_timeout=0.2, append_deadline=2))
        await store.start()
        await store.close()
        sid = f"s-{uuid.uuid4().hex[:8]}"
        with pytest.raises(Unavailable, match="not open"):
            await store.submit(_report(sid, 1))
        await store.start()  # opened again, it appends again
        assert await (await store.submit(_report(sid, 2))) > 0
        await store.close()
    finally:
        await nc.close()


@pytest.mark.parametrize("headers", [{codec.MSG_ID: "evt-1"}, {}, {
    codec.MSG_ID: "e" * 200, "Nats-Expected-Last-Subject-Sequence": "41",
    "Nats-Expected-Last-Subject-Sequence-Subject": "ledger.session." + "s" * 3000 + ".>"}], ids=len)
def test_message_size_is_what_the_frame_says_the_server_counts(headers: dict[str, str]) -> None:
    payload = b"x" * 1000
    cmd = wire.frame("ledger.session.s-1.created.cli", "_INBOX.abc.1", headers, payload)
    assert cmd is not None
    total = int(cmd.split(b"\r\n", 1)[0].split()[-1])  # HPUB subject reply header-size total-size
    assert wire.message_size(headers, payload) == total


async def test_a_reconnect_while_frames_are_queued_settles_every_append_once(settings: Settings) -> None:
    """force_reconnect with hundreds of frames in nats-py's pending buffer and acks outstanding: the frames queued
    before and the appends sent (through nc.publish) while reconnecting all land once, each at its own sequence."""
    sid = f"s-{uuid.uuid4().hex[:8]}"
    events = [_report(sid, n) for n in range(1000)]
    async with EventStore.connect(settings.replace(request_timeout=0.5, append_deadline=30)) as store:
        nc = store.nc
        reconnects = nc.stats["reconnects"]
        futures: list[asyncio.Future[int]] = []
        for n, event in enumerate(events):
            futures.append(await store.submit(event))
            if n == 500:
                await nc.force_reconnect()
        await _settled(futures, 45)
        acked, errors = _outcomes(futures)
        assert not errors, errors[:3]
        await _check_log(store, sid, events, acked)
        assert nc.stats["reconnects"] > reconnects


@pytest.mark.timeout(120)
async def test_appends_time_out_by_their_deadline_while_the_server_stays_frozen(crashable: EmbeddedServer) -> None:
    """Frozen server, more than nats-py's 2 MiB pending buffer of frames: every append must still fail with
    AppendTimeout at its deadline while the server stays frozen (not when it thaws)."""
    settings = Settings(nats_url=crashable.url, request_timeout=0.3, append_deadline=3)
    sid = f"s-{uuid.uuid4().hex[:8]}"
    async with EventStore.connect(settings, ensure=True) as store:
        assert crashable.pid is not None
        os.kill(crashable.pid, signal.SIGSTOP)
        try:
            futures: list[asyncio.Future[int]] = []
            submitting = asyncio.ensure_future(_submit_all(store, futures, [
                ev.SessionCreated(producer=CLI, session_id=f"{sid}-{n}", pool="p", labels={"k": "v" * 2000})
                for n in range(3000)]))
            done, _ = await asyncio.wait([submitting], timeout=15)
            submitting.cancel()
            assert done, f"submit blocked with {len(futures)} appends submitted and the server frozen"
            await _settled(futures, 15)
            assert all(isinstance(f.exception(), AppendTimeout) for f in futures)
        finally:
            os.kill(crashable.pid, signal.SIGCONT)


async def _submit_all(store: EventStore, futures: list[asyncio.Future[int]], events: list[ev.Event]) -> None:
    for e in events:
        futures.append(await store.submit(e))
