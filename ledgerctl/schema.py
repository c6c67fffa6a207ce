"""The event schema, published: a JSON Schema (draft 2020-12) and an AsyncAPI 3.0 document, from the Structs.

`msgspec.json.schema_components` describes the events as msgspec decodes them, but three things a foreign
validator or client needs differ from what it writes:

* its regex patterns are Python's (`\\Z` - end of input - is a literal `Z` to ECMA-262, so Ajv silently
  accepts ids with anything after them, or refuses valid ones): `to_ecma` rewrites them faithfully;
* `event_id` and `time` have Python default factories, so msgspec leaves them optional, yet the codec refuses a
  stored payload without them (`missing-envelope`) and an event id that is not 1-200 printable ASCII characters
  (it is the Nats-Msg-Id header): `envelope` makes both required and adds the id's pattern;
* RFC 3339 `date-time` admits leap seconds (`:60`), which the decoder refuses, and many validators skip `format`
  altogether: every time field also carries `TIME_PATTERN`.

What the schema cannot say - the subject a body must be stored on, the producer's role, the size limit, which
writes are compare-and-set - is in the AsyncAPI document and the README ("Writing events from another language").
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import msgspec

from ledger import __version__, authority, codec, subjects
from ledger import events as ev
from ledger.ids import TOKEN_PATTERN

DRAFT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_ID = "https://session-ledger.invalid/schema/events.json"

TIME_PATTERN = (r"^(?!0000)[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])"
                r"T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,9})?"
                r"(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])$")
"""ECMA-262: RFC 3339 times as the ledger writes them (upper-case T and Z), which the decoder reads; no leap
seconds (the decoder refuses them). Day-of-month validity is left to `format`."""

# --- Python regex -> ECMA-262 -------------------------------------------------------------


class UntranslatablePattern(ValueError):
    """A Python pattern construct whose ECMA-262 meaning differs and that `to_ecma` does not rewrite."""


_ESCAPES_OUTSIDE = {"Z": "$", "A": "^"}
"""Python's end/start of input; ECMA `$`/`^` without the m flag mean exactly that (never before a newline)."""
_SAME_MEANING = set(r"\^$.|?*+()[]{}/-")
"""Escaped punctuation that is the same literal in both (and allowed as an escape under ECMA's u flag; `-` only
inside a class, checked below)."""
_UNSAFE = ("(?P", "(?<", "(?#", "(?>", "(?i", "(?m", "(?s", "(?x", "(?a", "(?u", "(?L", "(?(")
"""Named groups (Python spelling), lookbehind, comments, atomic groups, inline flags, conditionals."""


def to_ecma(pattern: str) -> str:
    r"""`pattern` (Python `re`, as msgspec runs it with `re.search`) as an ECMA-262 regex with the same matches.

    Rewritten: `\Z` -> `$`, `\A` -> `^`, a bare `$` (end, or before a final newline, in Python) -> `(?=\n?$)`,
    `.` (anything but `\n` in Python; also not `\r`, U+2028, U+2029 in ECMA) -> `[^\n]`. Anything else whose
    meaning differs (`\d \w \s \b` are Unicode-aware in Python, ASCII in ECMA; possessive quantifiers, atomic
    groups, lookbehind, inline flags) raises UntranslatablePattern rather than being published wrong.
    """
    for construct in _UNSAFE:
        if construct in pattern:
            raise UntranslatablePattern(f"{pattern!r}: {construct!r} has no faithful ECMA-262 form here")
    out: list[str] = []
    in_class = False
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            if i + 1 >= len(pattern):
                raise UntranslatablePattern(f"{pattern!r}: ends with a lone backslash")
            n = pattern[i + 1]
            if not in_class and n in _ESCAPES_OUTSIDE:
                out.append(_ESCAPES_OUTSIDE[n])
            elif (n in _SAME_MEANING and (n != "-" or in_class)) or n in "nrtfv":
                out.append(c + n)
            else:
                raise UntranslatablePattern(f"{pattern!r}: escape \\{n} differs between Python and ECMA-262")
            i += 2
            continue
        if in_class:
            if c == "]":
                in_class = False
            elif c == "[":
                raise UntranslatablePattern(f"{pattern!r}: a '[' inside a class (a Python warning, ECMA v-mode set)")
            out.append(c)
        elif c == "[":
            in_class = True
            out.append(c)
            if pattern[i + 1:i + 2] == "^":
                out.append("^")
                i += 1
            if pattern[i + 1:i + 2] == "]":  # a leading ']' is a literal in Python, an empty class in ECMA
                out.append("\\]")
                i += 1
        elif c == "$":
            out.append(r"(?=\n?$)")
        elif c == ".":
            out.append(r"[^\n]")
        elif c in "*+?}" and pattern[i + 1:i + 2] == "+":
            raise UntranslatablePattern(f"{pattern!r}: possessive quantifier {c}+")
        else:
            out.append(c)
        i += 1
    if in_class:
        raise UntranslatablePattern(f"{pattern!r}: unterminated character class")
    return "".join(out)


def _rewrite(node: Any) -> Any:
    """A copy of a schema tree with every `pattern` in ECMA-262."""
    if isinstance(node, dict):
        return {k: (to_ecma(v) if k == "pattern" and isinstance(v, str) else _rewrite(v)) for k, v in node.items()}
    if isinstance(node, list | tuple):  # a tuple default `()` too: as the list JSON has
        return [_rewrite(v) for v in node]
    return node


BASE64_PATTERN = "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
"""Padded standard base64, what msgspec decodes as bytes (it refuses "0", which `contentEncoding` alone allows)."""


def _time_fields(node: Any) -> None:
    """Add TIME_PATTERN beside every `format: date-time`, BASE64_PATTERN beside every base64 string (in place)."""
    if isinstance(node, dict):
        if node.get("format") == "date-time":
            node["pattern"] = TIME_PATTERN
        if node.get("contentEncoding") == "base64":
            node["pattern"] = BASE64_PATTERN
        for v in node.values():
            _time_fields(v)
    elif isinstance(node, list):
        for v in node:
            _time_fields(v)


ENVELOPE_REQUIRED = ("event_id", "time")
"""Defaults in Python only: a stored payload without them is refused (`missing-envelope`, ledger/events.py rule 8)."""
EVENT_ID_PATTERN = to_ecma(codec._MSG_ID_RE.pattern)  # the codec's own rule, not a copy of it


def envelope(defs: dict[str, Any]) -> None:
    """Make the envelope fields the codec insists on required, and give event_id its pattern (in place)."""
    for cls in ev.EVENT_TYPES:
        d = defs[cls.__name__]
        d["required"] = [*d["required"], *(f for f in ENVELOPE_REQUIRED if f not in d["required"])]
        d["properties"]["event_id"]["pattern"] = EVENT_ID_PATTERN


def components(ref_template: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the schema of any event, the named schemas it refers to) with refs made by `ref_template`."""
    (root,), defs = msgspec.json.schema_components([ev.AnyEvent], ref_template=ref_template)
    defs = _rewrite(defs)
    envelope(defs)
    _time_fields(defs)
    return root, defs


def json_schema() -> dict[str, Any]:
    """One JSON Schema (draft 2020-12) for a body of any ledger event; `$defs` holds each event type's."""
    root, defs = components("#/$defs/{name}")
    return {
        "$schema": DRAFT,
        "$id": SCHEMA_ID,
        "title": "session ledger event",
        "description": (f"A ledger event body (schema version {ev.SCHEMA_VERSION}), JSON on a subject "
                        f"{subjects.PREFIX}.<family>.<entity id>.<verb>.<producer id>. The `type` field selects "
                        "the event; unknown fields are ignored by readers. The body must also match its subject "
                        "(see the README: Writing events from another language)."),
        **root,
        "$defs": defs,
    }


# --- compare-and-set: which writes, with which headers -------------------------------------


class CasRule(NamedTuple):
    """How the ledger's own writers guard one event type (ledger/writer.py, ledger/agent, consumers)."""

    filter: str
    """Nats-Expected-Last-Subject-Sequence-Subject, with <id> for the entity id."""
    expected: str
    """What Nats-Expected-Last-Subject-Sequence is set to."""


_HISTORY = "ledger.{family}.<id>.>"
_LAST = "the newest sequence on the filter, as read when the write was decided (0 if none)"
COMPARE_AND_SET: dict[str, CasRule] = {
    "session.created": CasRule("ledger.session.<id>.created.*", "0 (no creation yet: create-if-absent)"),
    "route.created": CasRule("ledger.route.<id>.created.*", "0 (no creation yet: create-if-absent)"),
    "agent.registered": CasRule("ledger.agent.<id>.registered.<id>",
                                "the sequence of the agent's newest own registration; a first one may go without"),
    "session.claimed": CasRule(_HISTORY.format(family="session"), _LAST),
    "session.released": CasRule(_HISTORY.format(family="session"), _LAST),
    "session.resource_reported": CasRule(_HISTORY.format(family="session"), _LAST),
    "session.checkpointed": CasRule(_HISTORY.format(family="session"), _LAST),
    "session.orphaned": CasRule(_HISTORY.format(family="session"), _LAST),
    "session.terminated": CasRule(_HISTORY.format(family="session"), _LAST),
    "route.transitioned": CasRule(_HISTORY.format(family="route"), _LAST),
}
"""Writes decided on an entity's current state: they must not land if another write came in between. Other
event types are plain appends (a heartbeat, a report, a verdict the folds judge on their own)."""

NUMBER = {"type": "string", "pattern": "^(0|[1-9][0-9]*)$"}
HEADERS: dict[str, Any] = {
    codec.MSG_ID: {"type": "string", "pattern": EVENT_ID_PATTERN,
                   "description": "The body's event_id: JetStream drops a second message with it (a safe retry)."},
    "Nats-Expected-Last-Subject-Sequence": {**NUMBER, "description": "Compare-and-set: the expected sequence."},
    "Nats-Expected-Last-Subject-Sequence-Subject": {
        "type": "string", "description": "Compare-and-set: the subject filter the expectation is on."},
}


# --- AsyncAPI 3.0 ----------------------------------------------------------------------------


def _camel(tag: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[._]", tag))


def _stream_of(cls: type[ev.Event]) -> str:
    return subjects.stream_for_family(cls.family)


def _id_parameter(what: str) -> dict[str, Any]:
    return {"description": f"{what}: one subject token matching {to_ecma(TOKEN_PATTERN)}"}


def asyncapi() -> dict[str, Any]:
    """An AsyncAPI 3.0 document: a channel and a message per event type, the dead letters, the streams."""
    _, schemas = components("#/components/schemas/{name}")
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for cls in ev.EVENT_TYPES:
        tag, name = cls.type_tag(), _camel(cls.type_tag())
        cas = COMPARE_AND_SET.get(tag)
        headers: dict[str, Any] = {"type": "object", "properties": dict(HEADERS) if cas else
                                   {codec.MSG_ID: HEADERS[codec.MSG_ID]}, "required": [codec.MSG_ID]}
        if cas:
            headers["required"] = list(HEADERS)
        messages[name] = {
            "name": tag,
            "title": cls.__name__,
            "summary": (cls.__doc__ or tag).strip().splitlines()[0],
            "contentType": "application/json",
            "headers": headers,
            "payload": {"$ref": f"#/components/schemas/{cls.__name__}"},
            "x-writers": authority.describe_writers(tag),
            **({"x-compare-and-set": {"Nats-Expected-Last-Subject-Sequence-Subject": cas.filter,
                                      "Nats-Expected-Last-Subject-Sequence": cas.expected}} if cas else {}),
        }
        channels[name] = {
            "address": subjects.event_subject(cls.family, "{entity}", cls.verb(), "{producer}"),
            "title": f"{tag} events",
            "description": f"Stored in stream {_stream_of(cls)}. The body's {cls.family} id is the entity token, "
                           "its producer.id the producer token; any other pairing is dead-lettered.",
            "parameters": {"entity": _id_parameter(f"the {cls.family} id"),
                           "producer": _id_parameter("the producer id (an agent id or a service role)")},
            "messages": {name: {"$ref": f"#/components/messages/{name}"}},
            "x-stream": _stream_of(cls),
        }
        operations[f"append{name}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{name}"},
            "summary": f"Append a {tag} event" + (" with compare-and-set" if cas else ""),
            "messages": [{"$ref": f"#/channels/{name}/messages/{name}"}],
        }
    channels["deadLetters"] = {
        "address": subjects.dlq_subject("{stream}", "{reason}"),
        "title": "dead letters",
        "description": "Stored messages a reader could not use as events: the original bytes, with headers saying "
                       "where they came from and why (ledger/dlq.py).",
        "parameters": {"stream": {"enum": [subjects.LEDGER_STREAM, subjects.HEARTBEAT_STREAM],
                                  "description": "the stream the original was stored in"},
                       "reason": {"enum": list(codec.REASONS), "description": "why it is not an event"}},
        "messages": {"deadLetter": {"$ref": "#/components/messages/deadLetter"}},
        "x-stream": subjects.DLQ_STREAM,
    }
    messages["deadLetter"] = {
        "name": "dead-letter",
        "title": "Dead letter",
        "contentType": "application/octet-stream",
        "headers": {"type": "object", "properties": {h: {"type": "string"} for h in (
            codec.MSG_ID, "Ledger-Dlq-Stream", "Ledger-Dlq-Subject", "Ledger-Dlq-Seq", "Ledger-Dlq-Stored-Ns",
            "Ledger-Dlq-Reason", "Ledger-Dlq-Consumer", "Ledger-Dlq-Truncated")}},
        "payload": {"type": "string", "description": "the original message's bytes (cut when too large)"},
    }
    operations["readDeadLetters"] = {"action": "receive", "channel": {"$ref": "#/channels/deadLetters"},
                                     "messages": [{"$ref": "#/channels/deadLetters/messages/deadLetter"}]}
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "session ledger",
            "version": __version__,
            "description": "Events of agents, sessions, routes and pools on NATS JetStream. Subjects are "
                           f"{subjects.PREFIX}.<family>.<entity id>.<verb>.<producer id>; one entity's history is "
                           f"{subjects.PREFIX}.<family>.<id>.>.",
        },
        "defaultContentType": "application/json",
        "servers": {"local": {"host": "127.0.0.1:4222", "protocol": "nats",
                              "description": "`ledger up` (any NATS server with the streams below)"}},
        "channels": channels,
        "operations": operations,
        "components": {"schemas": schemas, "messages": messages},
        "x-streams": {
            subjects.LEDGER_STREAM: {"subjects": list(subjects.LEDGER_SUBJECTS),
                                     "retention": "forever: deny_delete, deny_purge, discard new"},
            subjects.HEARTBEAT_STREAM: {"subjects": list(subjects.HEARTBEAT_SUBJECTS),
                                        "retention": "bounded by age and per agent"},
            subjects.DLQ_STREAM: {"subjects": list(subjects.DLQ_SUBJECTS), "retention": "bounded by age"},
        },
    }


# --- the README's field tables ---------------------------------------------------------------

ENVELOPE_FIELDS = ("type", "event_id", "time", "producer", "causation_id", "correlation_id", "v")
_TOKEN = to_ecma(TOKEN_PATTERN)


def _num(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:g}"


def _bounds(prop: dict[str, Any], unit: str) -> str:
    lo = (f"> {_num(prop['exclusiveMinimum'])}" if "exclusiveMinimum" in prop else
          f">= {_num(prop['minimum'])}" if "minimum" in prop else "")
    hi = f"<= {_num(prop['maximum'])}" if "maximum" in prop and prop["maximum"] < ev.MAX_COUNT else ""
    return " ".join(x for x in (unit, lo, hi) if x)


def _type_text(prop: dict[str, Any]) -> str:
    """A schema property in a few words: its type and bounds."""
    if "$ref" in prop:
        return f"{str(prop['$ref']).rsplit('/', 1)[1]} object"
    if "anyOf" in prop:
        return " or ".join(_type_text(p) for p in prop["anyOf"])
    t = prop.get("type", "")
    if prop.get("format") == "date-time":
        return "time"
    if prop.get("pattern") == _TOKEN:
        return "id"
    if prop.get("contentEncoding") == "base64":
        return f"bytes, base64 (<= {prop['maxLength']} chars)" if "maxLength" in prop else "bytes, base64"
    if t == "string":
        return f"string {prop.get('minLength', 0)}-{prop['maxLength']} chars" if "maxLength" in prop else "string"
    if t == "array":
        return f"list of {_type_text(prop.get('items', {}))}, <= {prop.get('maxItems', 'any'):,} items"
    if t == "object":
        return f"object: string -> {_type_text(prop.get('additionalProperties', {}))}"
    if t in ("integer", "number"):
        return _bounds(prop, t)
    return str(t)


def _rows(event: str, d: dict[str, Any], skip: tuple[str, ...] = ()) -> list[str]:
    rows = []
    for name, prop in d["properties"].items():
        if name in skip:
            continue
        default = "required" if name in d.get("required", ()) else (
            f"`{msgspec.json.encode(prop['default']).decode()}`" if "default" in prop else "optional")
        rows.append(f"| {event} | `{name}` | {_type_text(prop)} | {default} |")
    return rows


def readme_tables() -> str:
    """The README's tables of every event's fields, one per family (`ledger.<family>`), plus the nested objects."""
    _, defs = components("#/$defs/{name}")
    head = ["| event | field | type | default |", "|---|---|---|---|"]
    out: list[str] = []
    families: dict[str, list[type[ev.Event]]] = {}
    for cls in ev.EVENT_TYPES:
        families.setdefault(cls.family, []).append(cls)
    for family, classes in families.items():
        rows = [r for cls in classes for r in _rows(f"`{cls.type_tag()}`", defs[cls.__name__], ENVELOPE_FIELDS)]
        out += [f"Family `{family}` (subjects `ledger.{family}.<id>.<verb>.<producer>`):", "", *head, *rows, ""]
    envelope_rows = _rows("every event", defs[ev.SessionCreated.__name__])
    out += ["The envelope, on every event:", "", *head,
            *[r for r in envelope_rows if r.split("`")[1] in ENVELOPE_FIELDS and r.split("`")[1] != "type"], ""]
    for nested in ("Producer", "Evidence", "Probe"):
        out += [f"`{nested}` object:", "", *head, *_rows(nested, defs[nested]), ""]
    out += ["Who writes each event (the producer token's role, `ledger/authority.py`) and how:", "",
            "| event | written by | compare-and-set: `...-Subject` | `Nats-Expected-Last-Subject-Sequence` |",
            "|---|---|---|---|"]
    for cls in ev.EVENT_TYPES:
        tag = cls.type_tag()
        rule = COMPARE_AND_SET.get(tag)
        how = f"`{rule.filter}` | {rule.expected}" if rule else "no (a plain append) | -"
        out.append(f"| `{tag}` | {authority.describe_writers(tag)} | {how} |")
    return "\n".join(out).rstrip() + "\n"
