"""The published event schema (`ledger schema`): valid for standard validators, faithful to the codec."""

from __future__ import annotations

import json
import re
from datetime import UTC, timedelta, timezone
from functools import cache
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
import regress
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, ValidationError
from jsonschema.validators import extend
from samples import all_samples, sample

from ledger import authority, codec, subjects
from ledger import events as ev
from ledger.errors import DecodeFailed, InvalidInput
from ledger.ids import TOKEN_PATTERN
from ledgerctl.cli import cli
from ledgerctl.schema import COMPARE_AND_SET, UntranslatablePattern, asyncapi, json_schema, readme_tables, to_ecma

DATA = Path(__file__).parent / "data" / "events"
README = Path(__file__).parent.parent / "README.md"
RECORDED = sorted(DATA.glob("*/*.json"))
SCHEMA = json_schema()
VALIDATOR = Draft202012Validator(SCHEMA, format_checker=Draft202012Validator.FORMAT_CHECKER)


@cache
def _ecma(pattern: str) -> regress.Regex:
    return regress.Regex(pattern, "u")  # the u flag: as Ajv compiles them, and strict about escapes


def _ecma_pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Any:
    if validator.is_type(instance, "string") and _ecma(pattern).find(instance) is None:
        yield ValidationError(f"{instance!r} does not match {pattern!r} (ECMA-262)")


EcmaValidator = extend(Draft202012Validator, {"pattern": _ecma_pattern})
"""Draft 2020-12 with `pattern` run as ECMA-262, as the spec says (and Ajv does): Python's `$` also matches
before a final newline, so the stock validator would accept an id with one after it."""
ECMA = EcmaValidator(SCHEMA, format_checker=Draft202012Validator.FORMAT_CHECKER)


def _patterns(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "pattern" and isinstance(v, str)] + [
            p for v in node.values() for p in _patterns(v)]
    if isinstance(node, list):
        return [p for v in node for p in _patterns(v)]
    return []


# --- the JSON Schema ---------------------------------------------------------------------------------


def test_the_schema_is_a_valid_draft_2020_12_schema():
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(SCHEMA)
    assert {ref["$ref"].rsplit("/", 1)[1] for ref in SCHEMA["anyOf"]} == {c.__name__ for c in ev.EVENT_TYPES}


def test_format_checking_is_on():
    """The date-time format is checked only with rfc3339-validator installed: without it, this would pass."""
    body = msgspec.to_builtins(sample(ev.SessionCreated))
    assert VALIDATOR.is_valid(body)
    assert not VALIDATOR.is_valid({**body, "time": "2026-02-30T12:00:00Z"})


@pytest.mark.parametrize("path", RECORDED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_recorded_payload_validates(path: Path):
    recorded = json.loads(path.read_bytes())
    body = recorded["payload"]
    VALIDATOR.validate(body)
    ECMA.validate(body)
    assert readme_subject(body) == recorded["subject"]


def test_there_are_recorded_payloads_of_every_type_in_every_set():
    for folder in ("v1", "v1-minimal", "newer"):
        assert {p.stem for p in (DATA / folder).glob("*.json")} == set(ev.BY_TAG)


@pytest.mark.parametrize("event", all_samples(), ids=lambda e: e.type_tag())
def test_every_sample_validates(event: ev.Event):
    body = json.loads(codec.encode(event).payload)
    VALIDATOR.validate(body)
    ECMA.validate(body)


def test_the_envelope_the_codec_insists_on_is_required():
    body = json.loads(codec.encode(sample(ev.SessionCreated)).payload)
    for name in ("event_id", "time"):
        stripped = {k: v for k, v in body.items() if k != name}
        assert not VALIDATOR.is_valid(stripped)
        with pytest.raises(DecodeFailed, match="missing-envelope"):
            codec.decode(json.dumps(stripped).encode(), "ledger.session.s-1.created.cli")
    assert not ECMA.is_valid({**body, "event_id": "has space"})
    assert not VALIDATOR.is_valid({**body, "time": "2026-11-01T12:00:00"})  # no time zone


def test_no_pattern_uses_python_only_anchors_and_each_compiles_as_ecma_262():
    patterns = _patterns(SCHEMA) + _patterns(asyncapi())
    assert patterns
    for p in patterns:
        assert "\\Z" not in p and "\\A" not in p, p
        assert "(?<" not in p and "(?P" not in p, p  # lookbehind and Python's named groups: not everywhere
        assert not re.search(r"[*+?}]\+", p.replace("\\+", "")), p  # possessive quantifiers
        _ecma(p)  # raises RegressError if not a valid ECMA-262 (u flag) pattern


def test_a_python_end_anchor_left_in_would_be_a_literal_z_to_ecma():
    """Why the rewrite matters: without the u flag, JavaScript reads `\\Z` as the letter Z."""
    assert regress.Regex(TOKEN_PATTERN).find("a-1") is None
    assert regress.Regex(to_ecma(TOKEN_PATTERN), "u").find("a-1") is not None


_ALPHABET = "aZz09-_:@=+~.*> \n\r\tA\u00e9\u2028"


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=_ALPHABET, max_size=12) | st.sampled_from(["a" * 128, "a" * 129, "x\n", "\nx"]),
       st.sampled_from([TOKEN_PATTERN, codec._MSG_ID_RE.pattern,  # the codec's own rule
                        r"^a.c$", r"^[^\]a]+\Z", r"\Aab\Z", r"^[a\-z]{1,3}$"]))
def test_to_ecma_keeps_every_match(text: str, pattern: str):
    assert bool(re.search(pattern, text)) == (_ecma(to_ecma(pattern)).find(text) is not None)


@pytest.mark.parametrize("pattern", [r"^\d+$", r"\w", r"a++", r"(?<=a)b", r"(?i)a", r"(?P<x>a)", r"\bx"])
def test_to_ecma_refuses_what_it_cannot_translate_faithfully(pattern: str):
    with pytest.raises(UntranslatablePattern):
        to_ecma(pattern)


def test_ledger_schema_prints_both_documents(tmp_path: Path):
    runner = CliRunner()
    result = runner.invoke(cli, ["schema"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == SCHEMA
    out = tmp_path / "asyncapi.json"
    result = runner.invoke(cli, ["schema", "--asyncapi", "--out", str(out)])
    assert result.exit_code == 0 and result.output == ""
    assert json.loads(out.read_text()) == asyncapi()
    result = runner.invoke(cli, ["schema", "--out", str(tmp_path / "no" / "such" / "dir.json")])
    assert result.exit_code == 1 and "cannot write" in result.output and "Traceback" not in result.output


# --- the AsyncAPI document ---------------------------------------------------------------------------


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return ([node["$ref"]] if isinstance(node.get("$ref"), str) else []) + [r for v in node.values()
                                                                                for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _subject_matches(filter_: str, subject: str) -> bool:
    f, s = filter_.split("."), subject.split(".")
    for i, token in enumerate(f):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(f) == len(s)


def test_the_asyncapi_document_is_structurally_sound():
    doc = asyncapi()
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"]["title"] and doc["info"]["version"]
    assert set(doc) <= {"asyncapi", "id", "info", "servers", "defaultContentType", "channels", "operations",
                        "components"} | {k for k in doc if k.startswith("x-")}
    for server in doc["servers"].values():
        assert server["protocol"] == "nats" and server["host"]
    for ref in _refs(doc):
        _resolve(doc, ref)  # every reference points at something
    for op in doc["operations"].values():
        assert op["action"] in ("send", "receive")
        channel = _resolve(doc, op["channel"]["$ref"])
        for m in op["messages"]:  # 3.0: an operation's messages are its channel's
            assert m["$ref"].startswith(op["channel"]["$ref"] + "/messages/")
        assert channel["messages"]


def test_every_event_type_has_a_message_with_its_schema_and_headers():
    doc = asyncapi()
    by_name = {m["name"]: m for m in doc["components"]["messages"].values()}
    for cls in ev.EVENT_TYPES:
        message = by_name[cls.type_tag()]
        assert _resolve(doc, message["payload"]["$ref"])["properties"]["type"] == {"enum": [cls.type_tag()]}
        headers = message["headers"]
        assert codec.MSG_ID in headers["required"]
        if cls.type_tag() in COMPARE_AND_SET:
            assert {"Nats-Expected-Last-Subject-Sequence",
                    "Nats-Expected-Last-Subject-Sequence-Subject"} <= set(headers["required"])


def test_every_channel_address_follows_the_subject_layout():
    doc = asyncapi()
    event_channels = 0
    for channel in doc["channels"].values():
        address = channel["address"]
        assert set(re.findall(r"\{(\w+)\}", address)) == set(channel.get("parameters", {})), address
        concrete = re.sub(r"\{\w+\}", "x-1", address)
        tokens = address.split(".")
        stream_filters = {subjects.LEDGER_STREAM: subjects.LEDGER_SUBJECTS,
                          subjects.HEARTBEAT_STREAM: subjects.HEARTBEAT_SUBJECTS,
                          subjects.DLQ_STREAM: subjects.DLQ_SUBJECTS}[channel["x-stream"]]
        assert any(_subject_matches(f, concrete) for f in stream_filters), address
        if tokens[1] == "dlq":
            assert address == "ledger.dlq.{stream}.{reason}"
            continue
        event_channels += 1
        (message,) = [_resolve(doc, m["$ref"]) for m in channel["messages"].values()]
        cls = ev.BY_TAG[message["name"]]
        assert tokens == [subjects.PREFIX, cls.family, "{entity}", cls.verb(), "{producer}"]
        assert subjects.stream_for_family(cls.family) == channel["x-stream"]
    assert event_channels == len(ev.EVENT_TYPES)


def test_the_compare_and_set_filters_cover_their_entity():
    for tag, rule in COMPARE_AND_SET.items():
        cls = ev.BY_TAG[tag]
        on = codec.encode(sample(cls)).subject
        entity = on.split(".")[2]
        assert _subject_matches(rule.filter.replace("<id>", entity), on), (tag, rule)


# --- the subject <-> body rules the README states -------------------------------------------------------


ENTITY_FIELD = {"agent": "agent_id", "hb": "agent_id", "session": "session_id", "route": "route_id", "pool": "pool"}
"""README: the entity token is the body's `<family>_id` (`pool` for pools; heartbeats' family is `hb`)."""


def readme_subject(body: dict[str, Any]) -> str:
    """The subject a body must be stored on, by the README's rules alone."""
    family, verb = body["type"].split(".", 1)
    family = "hb" if body["type"] == "agent.heartbeat" else family
    return f"ledger.{family}.{body[ENTITY_FIELD[family]]}.{verb}.{body['producer']['id']}"


@pytest.mark.parametrize("event", all_samples(), ids=lambda e: e.type_tag())
def test_the_readme_rule_gives_the_subject_and_every_other_pairing_is_dead_lettered(event: ev.Event):
    out = codec.encode(event)
    body = json.loads(out.payload)
    assert readme_subject(body) == out.subject
    codec.decode(out.payload, out.subject)
    tokens = out.subject.split(".")
    wrong = [".".join([*tokens[:i], "other", *tokens[i + 1:]]) for i in (1, 2, 3, 4)]
    for subject in wrong:
        with pytest.raises(DecodeFailed) as refused:
            codec.decode(out.payload, subject)
        assert codec.reason_code(refused.value.reason) == "wrong-subject"


def test_the_readme_lists_every_event_type_and_field_and_the_rules():
    text = README.read_text()
    start = text.index("## Writing events from another language")
    section = text[start:text.index("\n## ", start + 1)]
    for cls in ev.EVENT_TYPES:
        for f in msgspec.structs.fields(cls):
            row = f"| every event | `{f.encode_name}` |" if f.encode_name in ENVELOPE else (
                f"| `{cls.type_tag()}` | `{f.encode_name}` |")
            assert row in section or f.encode_name == "type", (cls.type_tag(), f.name)
    for name in ENVELOPE:
        assert f"`{name}`" in section
    for tag, rule in COMPARE_AND_SET.items():
        assert f"`{tag}`" in section and f"`{rule.filter}`" in section, tag
    for rule in ("`agent.heartbeat` goes on family `hb`", "`<entity id>` is the body's `agent_id`", "`session_id`",
                 "`route_id`", "or `pool`", "`<producer id>` is the body's `producer.id`"):
        assert rule in section, rule  # the rules readme_subject() follows
    for phrase in ("Nats-Msg-Id", "Nats-Expected-Last-Subject-Sequence", "Nats-Expected-Last-Subject-Sequence-Subject",
                   "wrong-subject", "missing-envelope", *codec.REASONS, str(codec.MAX_EVENT_BYTES)):
        assert phrase in section, phrase
    for tag in ev.BY_TAG:
        assert f"| `{tag}` | {authority.describe_writers(tag)} |" in section, tag


def test_the_readme_tables_are_the_generated_ones():
    """Regenerate with: python -c 'from ledgerctl.schema import readme_tables; print(readme_tables(), end="")'"""
    assert readme_tables() in README.read_text()


ENVELOPE = ("type", "event_id", "time", "producer", "causation_id", "correlation_id", "v")


# --- schema <-> codec, for generated bodies -------------------------------------------------------------


def _decodes(body: object, subject: str) -> bool:
    try:
        codec.decode(json.dumps(body).encode(), subject)
    except DecodeFailed:
        return False
    return True


_TIMES = st.sampled_from(["2026-11-01T12:00:00Z", "2026-11-01T12:00:00.5+02:00", "2026-11-01T12:00:00-00:00",
                          "2026-11-01T23:59:60Z", "2026-02-30T12:00:00Z", "2026-11-01T12:00:00", "2026-11-01",
                          "2026-11-01T12:00:00+24:00", "0000-01-01T00:00:00Z", "2026-11-01T12:00Z"])
_JSON_VALUES = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-2, max_value=3), st.sampled_from([2**63 - 1, 2**63, 10**9, 10**9 + 1, 10**6 + 1]),
    st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer()),  # 1.0: see README
    st.sampled_from([0.5, 1e9 - 0.5, 1e9 + 0.5, -0.5, 1e300]),
    st.text(alphabet="aZ09-_:@.*> \n", max_size=6), st.sampled_from(["", "a" * 129, "x" * 5000, "a-1\n"]),
    _TIMES,
    st.lists(st.text(alphabet="ab.", max_size=3), max_size=3),
    st.dictionaries(st.text(alphabet="ab", max_size=2), st.text(alphabet="ab", max_size=2) | st.integers(), max_size=2),
)


def _paths(body: dict[str, Any]) -> list[tuple[str, ...]]:
    paths: list[tuple[str, ...]] = []
    for k, v in body.items():
        paths.append((k,))
        if isinstance(v, dict) and k in ("producer", "evidence", "probe"):
            paths.extend((k, inner) for inner in v)
    return paths


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.sampled_from(ev.EVENT_TYPES), st.data())
def test_a_body_the_schema_accepts_decodes_on_its_subject(cls: type[ev.Event], data: st.DataObject):
    original = codec.encode(sample(cls))
    body: dict[str, Any] = json.loads(original.payload)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(body)))
        target = body if len(path) == 1 else body[path[0]]
        if not isinstance(target, dict):
            continue
        if data.draw(st.booleans()):
            target.pop(path[-1], None)
        else:
            target[path[-1]] = data.draw(_JSON_VALUES)
    try:
        subject = readme_subject(body)
    except (KeyError, TypeError, AttributeError, ValueError):
        subject = original.subject
    if ECMA.is_valid(body):
        assert _decodes(body, subject), (body, subject)


@st.composite
def generated_events(draw: st.DrawFn) -> ev.Event:
    """An event of any type with every field drawn from its declared type and bounds (msgspec.inspect)."""
    cls = draw(st.sampled_from(ev.EVENT_TYPES))
    over: dict[str, object] = {}
    for f in mi.type_info(cls).fields:  # type: ignore[attr-defined]
        if f.name in ("producer",) or (f.name not in ("event_id", "time") and draw(st.booleans())):
            continue
        over[f.name] = draw(_value_of(f.type))
    try:
        return sample(cls, **over)
    except (TypeError, ValueError):
        assume(False)
        raise


def _value_of(t: mi.Type) -> st.SearchStrategy[Any]:
    if isinstance(t, mi.UnionType):
        return st.one_of(*[_value_of(m) for m in t.types])
    if isinstance(t, mi.NoneType):
        return st.none()
    if isinstance(t, mi.BoolType):
        return st.booleans()
    if isinstance(t, mi.IntType):
        return st.integers(min_value=t.ge if t.ge is not None else -(2**63), max_value=t.le or 2**63 - 1)
    if isinstance(t, mi.FloatType):
        lo = t.ge if t.ge is not None else t.gt
        return st.floats(min_value=lo, max_value=t.le, exclude_min=t.gt is not None, allow_nan=False)
    if isinstance(t, mi.StrType):
        if t.pattern is not None:
            return st.from_regex(t.pattern, fullmatch=True)
        return st.text(min_size=t.min_length or 0, max_size=min(t.max_length or 20, 20))
    if isinstance(t, mi.BytesType):
        return st.one_of(st.binary(max_size=20), st.binary(min_size=t.max_length, max_size=t.max_length)
                         if t.max_length else st.nothing())
    if isinstance(t, mi.DateTimeType):
        return st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=-5, minutes=-30))]))
    if isinstance(t, mi.VarTupleType):
        return st.lists(_value_of(t.item_type), max_size=3).map(tuple)
    if isinstance(t, mi.DictType):
        return st.dictionaries(_value_of(t.key_type), _value_of(t.value_type), max_size=3)
    if isinstance(t, mi.StructType):
        return st.builds(t.cls)
    raise AssertionError(f"no strategy for {t}")


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(generated_events())
def test_an_event_the_codec_writes_validates(event: ev.Event):
    try:
        out = codec.encode(event)
    except InvalidInput:
        assume(False)
        raise
    body = json.loads(out.payload)
    VALIDATOR.validate(body)
    ECMA.validate(body)
    assert readme_subject(body) == out.subject
