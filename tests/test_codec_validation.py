"""codec.encode's read-back through a twin type without the field patterns (checked on the event instead, with a
memo) accepts and refuses exactly what the event type's own decoder does - on every event type."""

from __future__ import annotations

from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
from samples import all_samples

from ledger import codec
from ledger import events as ev
from ledger.errors import InvalidInput

TYPES = list(ev.EVENT_TYPES)


def _pattern_paths(t: mi.Type, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], str]]:
    """Every pattern on a value reached from the struct by attributes (through Optional), found in msgspec's own
    description of the type - independently of how codec builds its twin."""
    if isinstance(t, mi.StrType):
        return [(path, t.pattern)] if t.pattern is not None else []
    if isinstance(t, mi.UnionType):
        members = [m for m in t.types if not isinstance(m, mi.NoneType)]
        return _pattern_paths(members[0], path) if len(members) == 1 and len(t.types) == 2 else []
    if isinstance(t, mi.StructType):
        return [p for f in t.fields for p in _pattern_paths(f.type, (*path, f.name))]
    return []


def _without_patterns(t: Any, lifted: set[tuple[str, ...]], path: tuple[str, ...] = ()) -> Any:
    """msgspec's description of a type as plain data, with the patterns at `lifted` removed and the classes
    replaced by their names (the twin is another class: all else must be the same)."""
    if isinstance(t, mi.StrType) and path in lifted:
        return _without_patterns(msgspec.structs.replace(t, pattern=None), set(), path)
    if isinstance(t, mi.StructType):
        return ("struct", t.tag_field, t.tag, t.array_like, t.forbid_unknown_fields,
                tuple((f.name, f.encode_name, f.required, repr(f.default), f.default_factory,
                       _without_patterns(f.type, lifted, (*path, f.name))) for f in t.fields))
    if isinstance(t, mi.Type):
        return (type(t).__name__, *(_without_patterns(getattr(t, name), lifted, path) for name in t.__struct_fields__))
    if isinstance(t, tuple):
        return tuple(_without_patterns(x, lifted, path) for x in t)
    return t


@pytest.mark.parametrize("cls", TYPES, ids=lambda c: c.type_tag())
def test_the_twin_is_the_type_less_exactly_its_attribute_patterns(cls: type[ev.Event]) -> None:
    twin, lifted = codec.twin_of(cls)
    expected = _pattern_paths(mi.type_info(cls))
    assert sorted(lifted) == sorted(expected)
    assert expected, "every event type has an id with the Token pattern"
    paths = {p for p, _ in lifted}
    assert _without_patterns(mi.type_info(twin), set()) == _without_patterns(mi.type_info(cls), paths)
    assert _pattern_paths(mi.type_info(twin)) == []  # none left where the twin's check would have to see it


def _old_encode(event: ev.Event) -> codec.Outgoing:
    """encode() as it was: the read-back with the event type's own decoder, always."""
    cls = type(event)
    if not isinstance(event.event_id, str) or not codec._MSG_ID_RE.match(event.event_id):
        raise InvalidInput(f"event {cls.type_tag()}: event_id {event.event_id!r} must be 1-200 printable ASCII "
                           "characters without spaces (it is the Nats-Msg-Id header)")
    try:
        payload = codec._encoder.encode(event)
    except (TypeError, ValueError, OverflowError) as e:
        raise InvalidInput(f"event {cls.type_tag()} cannot be encoded: {e}") from None
    if (bad := codec._non_finite(event)) is not None:
        raise InvalidInput(f"event {cls.type_tag()} refused: {bad} is not a finite number")
    try:
        codec._validators[cls].decode(payload)
    except Exception as e:  # noqa: BLE001 - as encode() did
        codec.subject_of(event)
        raise InvalidInput(f"event {cls.type_tag()} refused: {codec._field_first(codec._one_line(str(e)))}") from None
    return codec.Outgoing(codec.subject_of_unchecked(event), {codec.MSG_ID: event.event_id}, payload)


def _outcome(fn: Any, event: ev.Event) -> tuple[str, str]:
    try:
        out = fn(event)
    except InvalidInput as e:
        return "refused", str(e)
    return "written", f"{out.subject} {out.headers} {out.payload!r}"


def _set(event: Any, path: tuple[str, ...], value: object) -> Any:
    """`event` with the attribute at `path` replaced (nested Structs rebuilt), without any validation."""
    if len(path) == 1:
        return msgspec.structs.replace(event, **{path[0]: value})
    return msgspec.structs.replace(event, **{path[0]: _set(getattr(event, path[0]), path[1:], value)})


BAD_TOKENS: list[object] = ["", "has space", "trailing\n", "-leading-dash", "x" * 129, "dot.ted", "wild*", "é",
                            7, None, b"bytes"]
GOOD_TOKENS: list[object] = ["a", "A-1_b:c@d=e+f~g", "x" * 128]


@pytest.mark.parametrize("cls", TYPES, ids=lambda c: c.type_tag())
def test_encode_refuses_and_accepts_what_the_types_own_read_back_does(cls: type[ev.Event]) -> None:
    sample = next(s for s in all_samples() if type(s) is cls)
    assert _outcome(codec.encode, sample) == _outcome(_old_encode, sample)
    assert _outcome(codec.encode, sample)[0] == "written"
    _, twin, patterns_pass, _ = codec._plans[cls]  # and a valid event is written through the twin, not the slow way
    twin.decode(codec.encode_payload(sample))
    assert patterns_pass(sample)
    tried = 0
    for path, _ in codec.twin_of(cls)[1]:
        for value in BAD_TOKENS + GOOD_TOKENS:
            event = _set(sample, path, value)
            for _ in range(2):  # the second time through the memo of values that matched
                assert _outcome(codec.encode, event) == _outcome(_old_encode, event), (path, value)
                tried += 1
    # Others than the lifted patterns still refuse through the twin: a wrong type, a constraint the twin keeps.
    for event in (msgspec.structs.replace(sample, causation_id="x" * 1025), _set(sample, ("producer", "instance"), ""),
                  _set(sample, ("producer", "instance"), 5), msgspec.structs.replace(sample, v=0)):
        assert _outcome(codec.encode, event) == _outcome(_old_encode, event)
        assert _outcome(codec.encode, event)[0] == "refused"
    assert tried


def test_a_refused_token_gives_the_message_it_always_gave() -> None:
    event = ev.SessionCreated(producer=ev.Producer(id="cli", instance="i"), session_id="s-1", pool="bad pool")
    with pytest.raises(InvalidInput, match=r"session.created refused: pool: expected `str` matching regex"):
        codec.encode(event)
    with pytest.raises(InvalidInput, match="session id"):  # a bad entity id: subject_of's message, as before
        codec.encode(msgspec.structs.replace(event, session_id="bad id"))


def test_the_memo_of_matching_values_is_bounded() -> None:
    producer = ev.Producer(id="cli", instance="i")
    for i in range(codec._MEMO_SIZE + 10):
        codec.encode(ev.SessionCreated(producer=producer, session_id=f"s-{i}", pool="p"))
    assert all(len(memo) <= codec._MEMO_SIZE for memo in codec._token_memo.values())
    # A value refused is never remembered as matching.
    with pytest.raises(InvalidInput):
        codec.encode(ev.SessionCreated(producer=producer, session_id="s-x", pool="no way"))
    assert all("no way" not in memo for memo in codec._token_memo.values())


class _Liar(str):
    """A str that says it equals anything (and hashes as a value the memo holds)."""

    def __eq__(self, other: object) -> bool:
        return True

    def __hash__(self) -> int:
        return hash("p")


def test_a_str_subclass_cannot_pass_for_a_remembered_value() -> None:
    producer = ev.Producer(id="cli", instance="i")
    codec.encode(ev.SessionCreated(producer=producer, session_id="s-1", pool="p"))  # "p" is remembered now
    liar = ev.SessionCreated(producer=producer, session_id="s-1", pool=_Liar("not a token"))
    assert _outcome(codec.encode, liar) == _outcome(_old_encode, liar)
    assert _outcome(codec.encode, liar)[0] == "refused"  # (msgspec writes no str subclass; the memo would not ask)
