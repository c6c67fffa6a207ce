"""The one place that owns the wire format: event <-> (subject, headers, bytes).

Payloads are JSON (msgspec), so `ledger replay` and `nats sub` show readable
events. The subject is derived from the event; a stored message whose subject
does not match its payload is treated as unreadable, never trusted.
"""

from __future__ import annotations

import contextlib
import math
import operator
import re
import types
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, NamedTuple, Union, get_args, get_origin

import msgspec
import msgspec.inspect as mi

from . import subjects
from .errors import DecodeFailed, InvalidInput
from .events import BY_TAG, DECODING, MISSING_ID, MISSING_TIME, AnyEvent, Event
from .ids import check_token

MSG_ID = "Nats-Msg-Id"
MAX_EVENT_BYTES = 64 * 1024
"""Largest payload the ledger writes or reads as an event; larger ones are refused or dead-lettered."""

_MSG_ID_RE = re.compile(r"^[!-~]{1,200}\Z")
"""What encode() lets into the Nats-Msg-Id header (a CR or LF there would forge headers), and so what decode()
accepts as an id. One match per event here rather than a Meta pattern on the Struct, where msgspec would also
run it for every nested id-like field."""

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AnyEvent)
_validators = {cls: msgspec.json.Decoder(cls) for cls in BY_TAG.values()}


# --- encode()'s read-back, without msgspec's per-value regex ------------------------------------------------
# msgspec runs a Meta pattern as a Python regex call per value: the Token pattern on an event's ids (five on a
# session.created) is most of the read-back's cost. So encode() reads back with a twin of the event type that
# has every constraint but the patterns on its own fields (and its nested Structs' fields: any path of
# attributes, through Optional), then runs those patterns on the event's attribute values - the very values
# it just wrote, now known to be of the right type - with a memo of values that matched (pools, platforms,
# producer ids repeat from event to event). What the twin accepts and the patterns pass is exactly what the
# event's own decoder accepts (tests/test_codec_validation.py compares the two types' msgspec.inspect trees,
# and both paths on every event type); anything refused goes through that decoder, for its message.

_META_ARGS = ("gt", "ge", "lt", "le", "multiple_of", "min_length", "max_length", "tz", "title", "description",
              "examples", "extra_json_schema", "extra")
"""Every argument of msgspec.Meta but `pattern`."""

Lifted = list[tuple[tuple[str, ...], str]]
"""(attribute path, regex) of each pattern the twin leaves out."""


def _lift(tp: Any, path: tuple[str, ...], lifted: Lifted) -> Any:
    """`tp` without the patterns on the value reached by `path` (listed in `lifted`), else as it is."""
    origin = get_origin(tp)
    if origin is Annotated:
        base, *metas = get_args(tp)
        kept: list[Any] = []
        for meta in metas:
            if isinstance(meta, msgspec.Meta) and meta.pattern is not None and base is str:
                lifted.append((path, meta.pattern))
                kept.append(msgspec.Meta(**{k: getattr(meta, k) for k in _META_ARGS if getattr(meta, k) is not None}))
            else:
                kept.append(meta)
        return Annotated[(_lift(base, path, lifted), *kept)]
    if origin in (Union, types.UnionType):
        members = get_args(tp)
        others = [m for m in members if m is not type(None)]
        if len(others) == 1 and len(members) == 2:  # Optional[X]: a None stops the path, X is walked
            return _lift(others[0], path, lifted) | None
        return tp  # a union of several types: msgspec checks it all
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return _twin(tp, path, lifted)
    return tp  # a container or a scalar: msgspec checks it, patterns inside included


def _twin(cls: type[msgspec.Struct], path: tuple[str, ...], lifted: Lifted) -> type[msgspec.Struct]:
    """A Struct decoding as `cls` does, less the patterns on the fields reached by attributes from it."""
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for f in msgspec.structs.fields(cls):
        t = _lift(f.type, (*path, f.name), lifted)
        if f.default is not msgspec.NODEFAULT:
            fields.append((f.name, t, f.default))
        elif f.default_factory is not msgspec.NODEFAULT:
            fields.append((f.name, t, msgspec.field(default_factory=f.default_factory)))
        else:
            fields.append((f.name, t))
    c = cls.__struct_config__
    return msgspec.defstruct(
        f"Unpatterned{cls.__name__}", fields, kw_only=True, frozen=c.frozen, omit_defaults=c.omit_defaults,
        forbid_unknown_fields=c.forbid_unknown_fields, tag=c.tag, tag_field=c.tag_field, array_like=c.array_like,
        gc=False,  # read back and dropped at once: no cycle to collect, no GC tracking to pay
        rename={f.name: f.encode_name for f in msgspec.structs.fields(cls)})


def twin_of(cls: type[Event]) -> tuple[type[msgspec.Struct], Lifted]:
    """The read-back type of `cls` without its attribute-path patterns, and those patterns (for tests too)."""
    lifted: Lifted = []
    return _twin(cls, (), lifted), lifted


_token_memo: dict[str, set[str]] = {}
"""Per regex, values that matched it (bounded: emptied when full)."""
_MEMO_SIZE = 4096


def _pattern_check(lifted: Lifted) -> Callable[[Event], bool]:
    """Whether the values at the lifted paths of an event (of the right types: the twin just read them back) match
    their pattern, as msgspec matches (`re.search`); False sends the event to its own decoder."""
    if len({rx for _, rx in lifted}) != 1:
        return _never  # not so today (one pattern, the Token one): such a type is read back the slow way
    getter = operator.attrgetter(*(".".join(path) for path, _ in lifted))
    single = len(lifted) == 1
    search = re.compile(lifted[0][1]).search
    memo = _token_memo.setdefault(lifted[0][1], set())

    def check(event: Event) -> bool:
        try:
            values = getter(event)
        except AttributeError:  # a None on an Optional struct on the way: the full read-back decides
            return False
        for value in (values,) if single else values:
            if value is None or (type(value) is str and value in memo):  # exactly str: a subclass may fake __eq__
                continue
            if search(value) is None:  # (not a str at all - a UUID msgspec writes as one: TypeError, the slow way)
                return False
            if type(value) is str:
                if len(memo) >= _MEMO_SIZE:
                    memo.clear()
                memo.add(value)
        return True

    return check


def _never(event: Event) -> bool:
    return False


def _always(event: Event) -> bool:
    return True


def _twin_validator(cls: type[Event]) -> tuple[msgspec.json.Decoder[Any], Callable[[Event], bool]]:
    """The twin's decoder and its pattern check (a type without patterns: its own decoder, nothing to check)."""
    twin, lifted = twin_of(cls)
    if not lifted:
        return _validators[cls], _always
    return msgspec.json.Decoder(twin), _pattern_check(lifted)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def from_ns(ns: int) -> datetime:
    """Nanoseconds since the epoch -> aware datetime, truncated (never rounded up) to microseconds."""
    return _EPOCH + timedelta(0, 0, ns // 1000)  # (days, seconds, microseconds): positional is ~25 % faster, per fold


def to_ns(when: datetime) -> int:
    """Aware datetime -> exact nanoseconds since the epoch (no float rounding)."""
    return (when - _EPOCH) // timedelta(microseconds=1) * 1000


class Outgoing(msgspec.Struct, frozen=True, gc=False):
    """What one append publishes. (gc=False: it holds strings, a dict of strings and bytes, so it is never part of
    a cycle; untracked, the appends in flight cost the garbage collector nothing.)"""

    subject: str
    headers: dict[str, str]
    payload: bytes


class Recorded(msgspec.Struct, frozen=True, gc=False):
    """An event as stored: where it sits in which stream, and when the server stored it."""

    stream: str
    seq: int
    subject: str
    timestamp_ns: int
    event: Event

    @property
    def stored_at(self) -> datetime:
        return from_ns(self.timestamp_ns)


class Unreadable(msgspec.Struct, frozen=True, gc=False):
    """A stored message that is not a valid event, with the reason it was refused."""

    stream: str
    seq: int
    subject: str
    timestamp_ns: int
    data: bytes
    reason: str

    @property
    def stored_at(self) -> datetime:
        return from_ns(self.timestamp_ns)


Item = Recorded | Unreadable
"""One stored message as read: an event, or why it is not one."""


def subject_of(event: Event) -> str:
    """The subject `event` is stored on (validates the ids it is built from)."""
    cls = type(event)
    entity = check_token(event.entity_id, f"{cls.family} id")
    producer = check_token(event.producer.id, "producer id")
    return subjects.event_subject(cls.family, entity, cls.verb(), producer)


def encode(event: Event) -> Outgoing:
    """Subject, headers and payload of `event`; InvalidInput (one line, naming the field) if readers would refuse it."""
    plan = _plans.get(type(event))
    if plan is None:
        raise InvalidInput(f"{type(event).__name__} is not a ledger event type")
    if not isinstance(event.event_id, str) or not _MSG_ID_RE.match(event.event_id):
        raise InvalidInput(f"event {event.type_tag()}: event_id {event.event_id!r} must be 1-200 printable ASCII "
                           "characters without spaces (it is the Nats-Msg-Id header)")
    try:
        payload = _encoder.encode(event)
    except (TypeError, ValueError, OverflowError) as e:  # a value msgspec cannot write at all
        raise InvalidInput(f"event {event.type_tag()} cannot be encoded: {e}") from None
    if len(payload) > MAX_EVENT_BYTES:
        raise InvalidInput(
            f"event {event.type_tag()} is {len(payload)} bytes; the limit is {MAX_EVENT_BYTES}"
        )
    validator, twin, patterns_pass, has_floats = plan
    if has_floats and (bad := _non_finite(event)):
        # msgspec writes NaN and infinity as null: an optional field would silently read back as None
        raise InvalidInput(f"event {event.type_tag()} refused: {bad} is not a finite number")
    # msgspec checks the Meta constraints on decode, never on __init__: read the payload back
    # with the same Struct (its type's own decoder: the tag, subject and envelope are right by
    # construction), so what is appended is always readable. The twin's read-back first (above: about 1 us
    # rather than 2.5 on a session.created); whatever it does not pass, the type's own decoder judges.
    # The ids are valid subject tokens then (the Token pattern was checked): no second regex for the subject.
    try:
        twin.decode(payload)
        passed = patterns_pass(event)
    except Exception:  # noqa: BLE001 - refused: the type's own decoder says why
        passed = False
    if not passed:
        try:
            validator.decode(payload)
        except Exception as e:  # noqa: BLE001 - ValidationError, or anything else: never written
            with contextlib.suppress(AttributeError):  # no producer to take an id from: msgspec's message says so
                subject_of(event)  # a bad id is refused as the SDK always said it ("invalid session id ...")
            raise InvalidInput(f"event {event.type_tag()} refused: {_field_first(_one_line(str(e)))}") from None
    return Outgoing(subject_of_unchecked(event), {MSG_ID: event.event_id}, payload)


def _float_paths(t: mi.Type, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Attribute paths from a struct type to every float it holds, through nested structs and optionals."""
    if isinstance(t, mi.FloatType):
        return [prefix]
    if isinstance(t, mi.UnionType):
        return [p for member in t.types for p in _float_paths(member, prefix)]
    if isinstance(t, mi.StructType):
        return [p for f in t.fields for p in _float_paths(f.type, (*prefix, f.name))]
    return []  # no event keeps floats in containers


_FLOATS = {cls: tuple(_float_paths(mi.type_info(cls))) for cls in BY_TAG.values()}
"""Per event type, where its floats are: encode() checks only those (walking every field costs more than the
rest of encode together)."""


def _non_finite(event: Event) -> str | None:
    """The path of the first NaN or infinite float in an event, else None."""
    for path in _FLOATS.get(type(event), ()):
        value: object = event
        for name in path:
            value = getattr(value, name, None)  # (a nested struct of the wrong type: the read-back refuses it)
            if value is None:
                break
        if isinstance(value, float) and not math.isfinite(value):
            return ".".join(path)
    return None


_plans = {cls: (_validators[cls], *_twin_validator(cls), bool(_FLOATS[cls])) for cls in BY_TAG.values()}
"""Per event type, what encode() does with it: its decoder, the twin's and its pattern check, whether it holds
floats."""


def encode_payload(event: Event) -> bytes:
    return _encoder.encode(event)


REASONS = ("oversized", "malformed", "too-deep", "unknown-type", "invalid", "missing-envelope", "wrong-subject",
           "undecodable")
"""Every reason code decode() gives (the first token of a DecodeFailed reason; the dead-letter subject's last)."""


_AT_FIELD = re.compile(r"^(.*) - at `\$\.?(.*)`$")


def _field_first(text: str) -> str:
    """msgspec's "Expected `int` >= 1, got 0 - at `$.capacity`" -> "capacity: expected `int` >= 1, got 0"."""
    m = _AT_FIELD.match(text)
    return f"{m.group(2)}: {m.group(1)[:1].lower()}{m.group(1)[1:]}" if m and m.group(2) else text


def _one_line(text: str) -> str:
    return " ".join(text.split())[:500]


def _refuse(code: str, detail: str, subject: str) -> DecodeFailed:
    return DecodeFailed(f"{code}: {_one_line(detail)}", subject=subject)


def decode(data: bytes, subject: str) -> Event:
    """Decode one payload stored on `subject`; DecodeFailed says why it is not an event.

    Total by design: whatever the bytes, the result is an event or DecodeFailed with a
    code from REASONS, never another exception (a reader that dies on a hostile message
    would die again on it at every restart).
    """
    if len(data) > MAX_EVENT_BYTES:
        raise DecodeFailed(f"oversized: {len(data)} bytes > {MAX_EVENT_BYTES}", subject=subject)
    token = DECODING.set(True)
    try:
        event: Event = _decoder.decode(data)
    except msgspec.ValidationError as e:
        text = str(e)
        raise _refuse("unknown-type" if "at `$.type`" in text else "invalid", text, subject) from None
    except msgspec.DecodeError as e:
        raise _refuse("malformed", str(e), subject) from None
    except RecursionError:
        raise _refuse("too-deep", "nested deeper than the decoder follows", subject) from None
    except Exception as e:  # noqa: BLE001 - anything else msgspec raises: still a refusal, never a crash
        raise _refuse("undecodable", f"{type(e).__name__}: {e}", subject) from None
    finally:
        DECODING.reset(token)
    if event.event_id is MISSING_ID or event.time is MISSING_TIME:
        missing = [name for name, value in (("event_id", event.event_id is MISSING_ID),
                                            ("time", event.time is MISSING_TIME)) if value]
        raise _refuse("missing-envelope", f"no {' or '.join(missing)}", subject)
    if not _MSG_ID_RE.match(event.event_id):  # the rule encode() applies: what one refuses, the other does too
        raise _refuse("invalid", f"event_id {event.event_id[:40]!r} is not 1-200 printable ASCII characters "
                                 "without spaces", subject)
    expected = subject_of_unchecked(event)
    if expected != subject:
        raise _refuse("wrong-subject", f"payload belongs on {expected}", subject)
    return event


_SUBJECT_PARTS = {cls: (f"{subjects.PREFIX}.{cls.family}.", f".{cls.verb()}.") for cls in BY_TAG.values()}
"""Per event type, the subject around its entity id: decode() checks every stored message against it."""


def subject_of_unchecked(event: Event) -> str:
    # Decoded events were validated by msgspec's Token pattern already.
    head, middle = _SUBJECT_PARTS[type(event)]
    return f"{head}{event.entity_id}{middle}{event.producer.id}"


def reason_code(reason: str) -> str:
    """The short code in front of a DecodeFailed reason, usable as a subject token."""
    return reason.split(":", 1)[0]


def read(stream: str, seq: int, subject: str, timestamp_ns: int, data: bytes) -> Recorded | Unreadable:
    """Turn one stored message into a Recorded event, or an Unreadable with its reason."""
    try:
        event = decode(data, subject)
    except DecodeFailed as e:
        return Unreadable(stream, seq, subject, timestamp_ns, data, e.reason)
    except Exception as e:  # noqa: BLE001 - decode() is total; should a bug make it raise, nothing is lost
        return Unreadable(stream, seq, subject, timestamp_ns, data, f"undecodable: {type(e).__name__}: {e}")
    return Recorded(stream, seq, subject, timestamp_ns, event)


class AckInfo(NamedTuple):
    stream: str
    seq: int
    timestamp_ns: int
    pending: int
    delivery: int = 0
    """The consumer's delivery sequence: 1, 2, 3, ... without gaps for one consumer."""
    consumer: str = ""


def parse_ack_subject(reply: str) -> AckInfo:
    """Stream, sequence, time and pending count from a JetStream delivery's reply subject.

    Cheaper than nats-py's `msg.metadata`, which builds several objects per
    message. Handles both the v1 (9 tokens) and v2 (12 tokens) layouts.
    """
    t = reply.split(".")
    if len(t) == 9:
        return AckInfo(t[2], int(t[5]), int(t[7]), int(t[8]), int(t[6]), t[3])
    if len(t) >= 11:
        return AckInfo(t[4], int(t[7]), int(t[9]), int(t[10]), int(t[8]), t[5])
    raise DecodeFailed(f"not a JetStream delivery: reply subject {reply!r}")
