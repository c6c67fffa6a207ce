"""The decoder is total: whatever bytes are stored, `codec.read` returns a Recorded or an Unreadable with a reason.

And the encoder refuses what the decoder would refuse, so the SDK and the CLI never write an event the ledger
cannot read (the constraints live once, on the event Structs, as msgspec Meta).
"""

from __future__ import annotations

import json
import math

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from samples import CLI, all_samples, sample

from ledger import codec
from ledger import events as ev
from ledger.errors import DecodeFailed, InvalidInput

SAMPLES = [codec.encode(e) for e in all_samples()]
SUBJECTS = [out.subject for out in SAMPLES] + ["ledger.session.s-1.created.cli", "ledger.hb.a.heartbeat.a", "x"]
DEPTH = 10_000


def nested_objects(depth: int = DEPTH) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def nested_arrays(depth: int = DEPTH) -> bytes:
    return b"[" * depth + b"]" * depth


def _read(data: bytes, subject: str) -> codec.Recorded | codec.Unreadable:
    """codec.read gives a Recorded or an Unreadable with a known code; decode agrees, raising only DecodeFailed."""
    item = codec.read("LEDGER", 7, subject, 1, data)
    assert isinstance(item, (codec.Recorded, codec.Unreadable))
    if isinstance(item, codec.Unreadable):
        assert item.reason and codec.reason_code(item.reason) in codec.REASONS, item.reason
        assert item.data == data and item.seq == 7
        with pytest.raises(DecodeFailed) as refused:
            codec.decode(data, subject)
        assert refused.value.reason == item.reason
    else:
        assert codec.decode(data, subject) == item.event
    return item


FIELD_NAMES = sorted({name for cls in ev.EVENT_TYPES for name in cls.__struct_fields__} | {"type"})
json_trees = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.sampled_from(sorted(ev.BY_TAG)),
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.text(max_size=12) | st.sampled_from(FIELD_NAMES), inner, max_size=8),
    max_leaves=40,
)
"""Any JSON value; keys drawn from the event's own field names too, so validation runs deep."""
hostile_values = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=False),
    st.text(max_size=30), st.sampled_from(["", "a.b", "*", ">", "2026-13-01T00:00:00Z", "2026-11-01T12:00:00"]),
    st.sampled_from(sorted(ev.BY_TAG)), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5),
                                                                                          st.integers(), max_size=3),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.sampled_from(SUBJECTS))
def test_random_bytes_never_raise(data: bytes, subject: str):
    _read(data, subject)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(json_trees, st.sampled_from(SUBJECTS))
def test_random_json_never_raises(tree: object, subject: str):
    _read(json.dumps(tree).encode(), subject)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SAMPLES), st.data())
def test_mutated_valid_payloads_never_raise(out: codec.Outgoing, data: st.DataObject):
    payload = json.loads(out.payload)
    target = payload
    if isinstance(payload.get("probe"), dict) and data.draw(st.booleans()):
        target = payload["probe"]
    elif isinstance(payload.get("evidence"), dict) and data.draw(st.booleans()):
        target = payload["evidence"]
    for _ in range(data.draw(st.integers(1, 3))):
        action = data.draw(st.sampled_from(["set", "drop", "add"]))
        if action == "drop" and target:
            target.pop(data.draw(st.sampled_from(sorted(target))))
        elif action == "set" and target:
            target[data.draw(st.sampled_from(sorted(target)))] = data.draw(hostile_values)
        else:
            target[data.draw(st.sampled_from(FIELD_NAMES))] = data.draw(hostile_values)
    raw = json.dumps(payload).encode()
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(0, len(raw)))
        raw = raw[:cut]
    item = _read(raw, data.draw(st.sampled_from([out.subject, *SUBJECTS])))
    if isinstance(item, codec.Recorded):  # what decodes, encodes again to the same bytes' meaning
        assert codec.decode(codec.encode(item.event).payload, item.subject) == item.event


@pytest.mark.parametrize("data", [nested_objects(), nested_arrays(),
                                  b'{"type":"session.created","x":' + nested_arrays() + b"}",
                                  b'{"type":"session.created","labels":' + nested_objects() + b"}"],
                         ids=["objects", "arrays", "arrays-in-unknown-field", "objects-in-labels"])
def test_deeply_nested_messages_are_unreadable_not_a_crash(data: bytes):
    assert len(data) < codec.MAX_EVENT_BYTES
    item = _read(data, "ledger.session.s-1.created.cli")
    assert isinstance(item, codec.Unreadable)
    if data.startswith(b"{") and b"type" not in data[:10]:
        assert codec.reason_code(item.reason) == "too-deep"
    with pytest.raises(DecodeFailed):
        codec.decode(data, "ledger.session.s-1.created.cli")


def test_the_codes_say_what_went_wrong():
    subject = "ledger.session.s-1.created.cli"
    good = json.loads(codec.encode(sample(ev.SessionCreated)).payload)
    cases = {
        b"": "malformed",
        b"\xff\xfe": "malformed",
        b'{"type": "session.created"': "malformed",
        b"[]": "invalid",
        b"null": "invalid",
        nested_objects(): "too-deep",
        json.dumps({**good, "type": "session.teleported"}).encode(): "unknown-type",
        json.dumps({**good, "pool": 5}).encode(): "invalid",
        json.dumps({k: v for k, v in good.items() if k != "event_id"}).encode(): "missing-envelope",
        json.dumps({k: v for k, v in good.items() if k != "time"}).encode(): "missing-envelope",
        json.dumps({**good, "idle_ttl": -1}).encode(): "invalid",
        json.dumps({**good, "time": "2026-11-01T12:00:00"}).encode(): "invalid",  # no time zone
        codec.encode(sample(ev.SessionCreated)).payload: None,
    }
    for data, code in cases.items():
        item = _read(data, subject)
        got = codec.reason_code(item.reason) if isinstance(item, codec.Unreadable) else None
        assert got == code, (data[:60], item)


def test_events_without_id_or_time_are_refused_and_python_still_gets_the_defaults():
    out = codec.encode(sample(ev.SessionCreated))
    payload = json.loads(out.payload)
    for missing in ("event_id", "time"):
        data = json.dumps({k: v for k, v in payload.items() if k != missing}).encode()
        first, second = _read(data, out.subject), _read(data, out.subject)
        assert isinstance(first, codec.Unreadable) and first == second  # two readings of one log agree
        assert codec.reason_code(first.reason) == "missing-envelope" and missing in first.reason
    made = ev.SessionCreated(producer=CLI, session_id="s-9", pool="p")
    assert made.event_id and made.event_id != ev.SessionCreated(producer=CLI, session_id="s-9", pool="p").event_id
    assert made.time.tzinfo is not None
    assert codec.decode(codec.encode(made).payload, codec.subject_of(made)) == made


BAD_EVENTS = [
    (lambda: sample(ev.RouteCreated, probe=ev.Probe(stale_after=math.nan)), "probe.stale_after"),
    (lambda: sample(ev.RouteCreated, probe=ev.Probe(initial_delay=-5.0)), "probe.initial_delay"),
    (lambda: sample(ev.RouteCreated, probe=ev.Probe(period=math.inf)), "probe.period"),
    (lambda: sample(ev.RouteCreated, start_timeout=0.0), "start_timeout"),
    (lambda: sample(ev.RouteCreated, stop_timeout=1e300), "stop_timeout"),
    (lambda: sample(ev.SessionCreated, idle_ttl=-1.0), "idle_ttl"),
    (lambda: sample(ev.AgentRegistered, capacity=0), "capacity"),
    (lambda: sample(ev.AgentRegistered, heartbeat_interval=math.nan), "heartbeat_interval"),
    (lambda: sample(ev.AgentRegistered, ttl=-30.0), "ttl"),
    (lambda: sample(ev.AgentRegistered, instance_id=""), "instance_id"),
    (lambda: sample(ev.AgentHeartbeat, load=-1), "load"),
    (lambda: sample(ev.AgentHeartbeat, incarnation=-1), "incarnation"),
    (lambda: sample(ev.AgentHeartbeat, sessions=("s-1", "")), "sessions"),
    (lambda: sample(ev.SessionReleased, token=-3), "token"),
    (lambda: sample(ev.SessionClaimed, incarnation=2**64), "incarnation"),
    (lambda: sample(ev.PoolBreakerTripped, threshold=2.0), "threshold"),
    (lambda: sample(ev.SessionCreated, event_id=""), "event_id"),
    (lambda: sample(ev.SessionCreated, producer=ev.Producer(id="cli", instance="")), "producer.instance"),
    (lambda: sample(ev.SessionCreated, pool=7), "pool"),
    (lambda: sample(ev.AgentSuspected, evidence=ev.Evidence(heartbeat_interval=-1.0)), "evidence.heartbeat_interval"),
]


@pytest.mark.parametrize("make,field", BAD_EVENTS, ids=[f for _, f in BAD_EVENTS])
def test_the_encoder_refuses_what_the_decoder_would_refuse(make, field: str):
    event = make()
    with pytest.raises(InvalidInput) as e:
        codec.encode(event)
    message = str(e.value)
    assert field in message and "\n" not in message, message
    # ... and the same bytes, forged onto the wire, are dead-lettered on read.
    forged = msgspec.json.encode(event)
    item = _read(forged, codec.subject_of_unchecked(event))
    assert isinstance(item, codec.Unreadable)


@pytest.mark.parametrize("make,field", [
    (lambda: sample(ev.SessionCreated, idle_ttl=math.nan), "idle_ttl"),
    (lambda: sample(ev.AgentFenced, ttl=math.inf), "ttl"),
    (lambda: sample(ev.AgentSuspected, evidence=ev.Evidence(dead_after=math.nan)), "evidence.dead_after"),
], ids=["idle_ttl", "ttl", "evidence.dead_after"])
def test_a_non_finite_optional_float_is_refused_rather_than_read_back_as_none(make, field: str):
    event = make()
    assert codec.decode(msgspec.json.encode(event), codec.subject_of(event)) != event  # NaN would come back None
    with pytest.raises(InvalidInput, match=f"{field} is not a finite number"):
        codec.encode(event)


def test_an_event_id_that_would_forge_headers_is_refused():
    # Checked by encode only: readers never put the id in a header (dead letters derive their own).
    for bad in ("a\r\nNats-Expected-Last-Sequence: 0", "with space", "x" * 201):
        with pytest.raises(InvalidInput, match="event_id"):
            codec.encode(sample(ev.SessionCreated, event_id=bad))


@pytest.mark.parametrize("event", all_samples(), ids=lambda e: e.type_tag())
def test_valid_samples_pass_the_encoder(event: ev.Event):
    out = codec.encode(event)
    assert codec.decode(out.payload, out.subject) == event


def test_a_probe_with_zero_initial_delay_is_fine():
    event = sample(ev.RouteCreated, probe=ev.Probe(initial_delay=0.0))
    assert codec.decode(codec.encode(event).payload, codec.subject_of(event)) == event


@pytest.mark.parametrize("event_id", [" ", "a b", "x\r\nNats-Expected-Stream: other", "é"])
def test_an_event_id_that_encode_refuses_is_refused_on_decode_too(event_id: str):
    payload = (b'{"type":"pool.breaker_reset","pool":"gpu","reason":"r","event_id":' + json.dumps(event_id).encode()
               + b',"time":"2026-11-01T12:00:00Z","producer":{"id":"cli","instance":"i"}}')
    item = _read(payload, "ledger.pool.gpu.breaker_reset.cli")
    assert isinstance(item, codec.Unreadable) and item.reason.startswith("invalid: event_id")
