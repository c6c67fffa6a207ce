"""The event model and its wire format: tags, subjects, schema evolution, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from samples import AGENT, T0, all_samples, sample

from ledger import codec, subjects
from ledger import events as ev
from ledger.errors import DecodeFailed, InvalidInput

DATA = Path(__file__).parent / "data" / "events"

# Tags are permanent (rule 1): this list changes only by appending.
RELEASED_TAGS = [
    "agent.registered", "agent.heartbeat", "agent.draining", "agent.drained", "agent.goodbye",
    "agent.suspected", "agent.declared_dead", "agent.unreachable_reported",
    "session.created", "session.claimed", "session.released", "session.resource_reported",
    "session.orphaned", "session.terminated",
    "route.created", "route.transitioned", "route.health_reported",
    "agent.fenced", "pool.breaker_tripped", "pool.breaker_reset",
    "agent.drain_requested", "session.checkpointed",
]


def test_released_tags_are_all_still_known():
    assert [cls.type_tag() for cls in ev.EVENT_TYPES] == RELEASED_TAGS
    assert len(set(ev.BY_TAG)) == len(ev.EVENT_TYPES)


@pytest.mark.parametrize("event", all_samples(), ids=lambda e: e.type_tag())
def test_round_trip(event: ev.Event):
    out = codec.encode(event)
    assert out.headers == {codec.MSG_ID: event.event_id}
    assert codec.decode(out.payload, out.subject) == event


@pytest.mark.parametrize("event", all_samples(), ids=lambda e: e.type_tag())
def test_events_are_frozen(event: ev.Event):
    with pytest.raises(AttributeError):
        event.event_id = "other"  # type: ignore[misc]


def test_subject_layout():
    claimed = sample(ev.SessionClaimed)
    assert codec.subject_of(claimed) == "ledger.session.s-1.claimed.agent-1"
    assert codec.subject_of(sample(ev.AgentHeartbeat)) == "ledger.hb.agent-1.heartbeat.agent-1"
    assert codec.subject_of(sample(ev.AgentDeclaredDead)) == "ledger.agent.agent-1.declared_dead.monitor"
    assert codec.subject_of(sample(ev.RouteTransitioned)) == "ledger.route.r-1.transitioned.agent-1"
    assert subjects.entity_filter("session", "s-1") == "ledger.session.s-1.>"
    assert subjects.parse("ledger.session.s-1.claimed.agent-1") == ("session", "s-1", "claimed", "agent-1")
    assert subjects.stream_for_family("hb") == subjects.HEARTBEAT_STREAM
    assert subjects.stream_for_filter("ledger.session.*.claimed.*") == subjects.LEDGER_STREAM


def test_every_family_is_stored_by_exactly_one_stream():
    for event in all_samples():
        subject = codec.subject_of(event)
        matching = [p for p in subjects.LEDGER_SUBJECTS + subjects.HEARTBEAT_SUBJECTS
                    if _matches(p, subject)]
        assert len(matching) == 1, subject


def _matches(pattern: str, subject: str) -> bool:
    p, s = pattern.split("."), subject.split(".")
    if p[-1] == ">":
        return len(s) >= len(p) and all(a in ("*", b) for a, b in zip(p[:-1], s, strict=False))
    return len(p) == len(s) and all(a in ("*", b) for a, b in zip(p, s, strict=False))


@pytest.mark.parametrize("bad", ["a.b", "a b", "*", ">", "", "-lead", "x" * 129, "a\r\nb", "ab\n"])
def test_ids_that_would_break_subjects_are_refused(bad: str):
    with pytest.raises(InvalidInput, match="invalid session id"):
        codec.encode(ev.SessionCreated(producer=AGENT, session_id=bad, pool="p"))


def _recorded(folder: str) -> list[Path]:
    files = sorted((DATA / folder).glob("*.json"))
    assert len(files) == len(RELEASED_TAGS), f"{folder} must hold one payload per released tag"
    return files


@pytest.mark.parametrize("path", _recorded("v1"), ids=lambda p: p.stem)
def test_recorded_v1_payloads_still_decode(path: Path):
    rec = json.loads(path.read_text())
    event = codec.decode(json.dumps(rec["payload"]).encode(), rec["subject"])
    assert event.type_tag() == rec["payload"]["type"]
    assert event.event_id == rec["payload"]["event_id"]
    # Nothing that was written is lost or changed on the way back out (new fields may be added).
    again = json.loads(codec.encode_payload(event))
    assert_preserved(rec["payload"], again)


def assert_preserved(recorded: object, again: object, path: str = "$") -> None:
    """Every recorded value comes back unchanged; fields added since may appear (at any depth)."""
    if isinstance(recorded, dict):
        assert isinstance(again, dict), path
        for key, value in recorded.items():
            assert key in again, f"{path}.{key} was lost"
            assert_preserved(value, again[key], f"{path}.{key}")
    else:
        assert recorded == again, f"{path}: {recorded!r} became {again!r}"


@pytest.mark.parametrize("path", _recorded("v1-minimal"), ids=lambda p: p.stem)
def test_payloads_without_optional_fields_decode(path: Path):
    rec = json.loads(path.read_text())
    event = codec.decode(json.dumps(rec["payload"]).encode(), rec["subject"])
    assert event.v == ev.SCHEMA_VERSION
    assert event.time == T0


@pytest.mark.parametrize("path", _recorded("newer"), ids=lambda p: p.stem)
def test_newer_payloads_with_unknown_fields_decode(path: Path):
    rec = json.loads(path.read_text())
    event = codec.decode(json.dumps(rec["payload"]).encode(), rec["subject"])
    assert event.v == 2
    assert event.type_tag() == rec["payload"]["type"]
    known = {k: v for k, v in json.loads(codec.encode_payload(event)).items() if k != "v"}
    assert "added_in_v2" not in known and "trace_id" not in known


def test_unknown_type_is_refused_with_its_reason():
    payload = json.dumps({"type": "session.teleported", "session_id": "s-1"}).encode()
    with pytest.raises(DecodeFailed) as e:
        codec.decode(payload, "ledger.session.s-1.teleported.x")
    assert codec.reason_code(e.value.reason) == "unknown-type"


def test_malformed_bytes_are_refused():
    with pytest.raises(DecodeFailed) as e:
        codec.decode(b"\x00not json", "ledger.session.s-1.created.cli")
    assert codec.reason_code(e.value.reason) == "malformed"


def test_invalid_field_is_refused():
    payload = json.loads(codec.encode(sample(ev.SessionClaimed)).payload)
    payload["incarnation"] = "seven"
    with pytest.raises(DecodeFailed) as e:
        codec.decode(json.dumps(payload).encode(), "ledger.session.s-1.claimed.agent-1")
    assert codec.reason_code(e.value.reason) == "invalid"
    assert "incarnation" in e.value.reason


def test_event_on_the_wrong_subject_is_refused():
    out = codec.encode(sample(ev.SessionClaimed))
    with pytest.raises(DecodeFailed) as e:
        codec.decode(out.payload, "ledger.session.s-2.claimed.agent-1")
    assert codec.reason_code(e.value.reason) == "wrong-subject"
    # ... and so is one whose producer token was forged.
    with pytest.raises(DecodeFailed):
        codec.decode(out.payload, "ledger.session.s-1.claimed.agent-9")


def test_oversized_payloads_are_refused_both_ways():
    big = sample(ev.SessionCreated, labels={"blob": "x" * codec.MAX_EVENT_BYTES})
    with pytest.raises(InvalidInput, match="limit"):
        codec.encode(big)
    with pytest.raises(DecodeFailed) as e:
        codec.decode(msgspec.json.encode(big), "ledger.session.s-1.created.cli")
    assert codec.reason_code(e.value.reason) == "oversized"


def test_read_turns_bad_messages_into_unreadable():
    item = codec.read("LEDGER", 5, "ledger.session.s-1.created.cli", 1, b"{")
    assert isinstance(item, codec.Unreadable)
    assert item.seq == 5 and item.reason.startswith("malformed")


def test_ack_subject_parsing_v1_and_v2():
    v1 = codec.parse_ack_subject("$JS.ACK.LEDGER.cons.1.42.7.1700000000000000000.3")
    assert v1 == ("LEDGER", 42, 1700000000000000000, 3, 7, "cons")
    v2 = codec.parse_ack_subject("$JS.ACK.dom.acchash.LEDGER.cons.1.42.7.1700000000000000000.3.rand")
    assert v2 == ("LEDGER", 42, 1700000000000000000, 3, 7, "cons")
