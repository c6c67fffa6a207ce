"""The incident file: a ledger's stored messages, portable (`ledger export` writes it, `ledger import` reads it).

JSON lines, one object a line, each tagged by `kind`:

    {"kind":"header","format":"ledger-incident","version":1,"ledger_version":"0.1.0","exported_at":...,
     "since":null,"until":null,"streams":[{"name":"LEDGER","first_seq":1,"last_seq":812,"config":{...}}, ...]}
    {"kind":"msg","stream":"LEDGER","seq":1,"subject":"ledger.agent.a1.registered.a1","stored_ns":...,
     "headers":{"Nats-Msg-Id":"..."},"data":"<base64>"}
    ...
    {"kind":"end","messages":{"LEDGER":790,"LEDGER_HB":4000}}

The header says what the file holds: per stream, the sequence range (`first_seq`..`last_seq`: the stream's
whole range, or what a window covers) and the stream's configuration as its server answered it. Messages follow
stream by stream, in the header's order, in rising sequence: a sequence missing in the range is a gap of the
original (a message deleted or aged out), and an import keeps it a gap. The data are the stored bytes exactly
(base64). The end line counts the messages, so a truncated file is told from a complete one.

Every reading failure is `UnreadableIncident`, one line naming the line number.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import IO, Any

import msgspec

from . import subjects
from .errors import InvalidInput

FORMAT = "ledger-incident"
VERSION = 1
MAX_LINE = 8 * 1024 * 1024
"""Longest line read (a message of the largest payload NATS allows, in base64, and its headers)."""
MAX_SEQ = 2**63 - 1
"""The largest stream sequence a file may name (JetStream's are unsigned 64-bit; nothing real comes near)."""
SUBJECTS = {subjects.LEDGER_STREAM: subjects.LEDGER_SUBJECTS, subjects.HEARTBEAT_STREAM: subjects.HEARTBEAT_SUBJECTS,
            subjects.DLQ_STREAM: subjects.DLQ_SUBJECTS}
"""The streams a file may hold, and the subjects each stores: a file comes from anywhere, and an import makes no
stream the ledger does not have and publishes on no subject of anything else's (the sequence guard is the
message's: on another stream's subject it would land in that stream)."""
_TOKEN = re.compile(r"[^\s.\x00-\x1f\x7f]+")
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 7230 token: what NATS clients send
_HEADER_VALUE = re.compile(r"(?:[^\s\x00-\x1f\x7f](?:[^\r\n\x00-\x08\x0a-\x1f\x7f]*[^\s\x00-\x1f\x7f])?)?")
"""A value a client sends as it is: no CR/LF (a header of its own), no edge whitespace (trimmed away)."""


class UnreadableIncident(InvalidInput):
    """A file that is not an incident file this version can read (foreign, truncated, corrupted)."""


class StreamRange(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    name: str
    first_seq: int
    """The first sequence the file covers (messages may start later: gaps)."""
    last_seq: int
    """The last sequence the file covers; first_seq - 1 when it covers none."""
    config: dict[str, Any] = {}
    """The stream's configuration as the source server answered it."""


class Header(msgspec.Struct, frozen=True, tag_field="kind", tag="header"):
    format: str
    version: int
    ledger_version: str
    exported_at: str
    """When the export ran (ISO-8601, UTC)."""
    streams: list[StreamRange]
    since: str | None = None
    until: str | None = None
    source: str = ""
    """The server exported from (its URL, without credentials)."""


class Message(msgspec.Struct, frozen=True, tag_field="kind", tag="msg"):
    stream: str
    seq: int
    subject: str
    stored_ns: int
    headers: dict[str, str]
    data: bytes


class End(msgspec.Struct, frozen=True, tag_field="kind", tag="end"):
    messages: dict[str, int]


Line = Header | Message | End

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Line)


def encode(line: Line) -> bytes:
    """One line of the file, with its newline."""
    return _encoder.encode(line) + b"\n"


def _decode(raw: bytes, number: int) -> Line:
    try:
        line: Line = _decoder.decode(raw)
    except msgspec.ValidationError as e:
        raise UnreadableIncident(f"line {number}: not an incident record: {e}") from None
    except msgspec.DecodeError as e:
        raise UnreadableIncident(f"line {number}: not JSON ({e})") from None
    return line


def read_header(raw: bytes, name: str = "the file") -> Header:
    """The first line's header; UnreadableIncident when `name` is not an incident file this version reads."""
    if not raw.strip():
        raise UnreadableIncident(f"{name} is empty: not an incident file (made by `ledger export`)")
    try:
        head: Line | None = _decode(raw, 1)
    except UnreadableIncident:
        head = None
    if not isinstance(head, Header) or head.format != FORMAT:
        raise UnreadableIncident(f"{name}, line 1: not an incident file (made by `ledger export`)")
    if head.version != VERSION:
        raise UnreadableIncident(f"{name}, line 1: incident format version {head.version}; this ledger reads "
                                 f"version {VERSION} (exported by ledger {head.ledger_version})")
    seen: set[str] = set()
    for s in head.streams:
        if s.name not in SUBJECTS:
            raise UnreadableIncident(f"{name}, line 1: stream {s.name!r} is not a ledger stream (those are "
                                     f"{', '.join(SUBJECTS)})")
        if s.name in seen:
            raise UnreadableIncident(f"{name}, line 1: stream {s.name} twice")
        seen.add(s.name)
        if not (1 <= s.first_seq <= MAX_SEQ and s.first_seq - 1 <= s.last_seq <= MAX_SEQ):
            raise UnreadableIncident(f"{name}, line 1: {s.name} #{s.first_seq}..#{s.last_seq} is no stream's range")
    return head


def publishable(subject: str, patterns: Iterable[str]) -> bool:
    """Whether `subject` is one a message can be published on (no wildcard, no whitespace or control character,
    no empty token) and one of `patterns` takes it."""
    tokens = subject.split(".")
    if not all(_TOKEN.fullmatch(t) and t not in ("*", ">") for t in tokens):
        return False
    for pattern in patterns:
        want = pattern.split(".")
        if want[-1] == ">" and len(tokens) >= len(want):
            want, got = want[:-1], tokens[:len(want) - 1]
        elif len(want) == len(tokens):
            got = tokens
        else:
            continue
        if all(w in ("*", t) for w, t in zip(want, got, strict=True)):
            return True
    return False


def _check(line: Message, name: str, number: int) -> None:
    if not publishable(line.subject, SUBJECTS[line.stream]):
        raise UnreadableIncident(f"{name}, line {number}: {line.stream} #{line.seq}: subject {line.subject!r} is "
                                 f"not one of {line.stream}'s")
    for key, value in line.headers.items():
        if not _HEADER_NAME.fullmatch(key) or not _HEADER_VALUE.fullmatch(value):
            raise UnreadableIncident(f"{name}, line {number}: {line.stream} #{line.seq}: header {key!r}: "
                                     f"{value!r} is not one NATS carries as it is")
    if len({key.lower() for key in line.headers}) < len(line.headers):
        raise UnreadableIncident(f"{name}, line {number}: {line.stream} #{line.seq}: a header twice (names differing "
                                 "in case only are one header to NATS)")
    if line.stored_ns < 0:
        raise UnreadableIncident(f"{name}, line {number}: {line.stream} #{line.seq}: stored before 1970")


def read(lines: Iterable[bytes], name: str = "the file") -> tuple[Header, Iterator[Message]]:
    """The header, and the messages one by one (checked as they come: ranges, order, the end line's counts).

    The messages are an iterator over `lines`, so a big file is never held in memory; a failure is raised where it
    is met, naming its line.
    """
    it = iter(lines)
    header = read_header(next(it, b""), name)
    return header, _messages(header, it, name)


def _messages(header: Header, lines: Iterator[bytes], name: str) -> Iterator[Message]:
    ranges = {s.name: s for s in header.streams}
    order = [s.name for s in header.streams]
    counts = dict.fromkeys(order, 0)
    at, last = 0, 0  # index into order, last sequence seen on it
    number = 1
    for raw in lines:
        number += 1
        if len(raw) > MAX_LINE:
            raise UnreadableIncident(f"{name}, line {number}: longer than {MAX_LINE:,} bytes")
        if not raw.endswith(b"\n"):
            raise UnreadableIncident(f"{name}, line {number}: truncated (the file ends inside it)")
        line = _decode(raw, number)
        if isinstance(line, End):
            if line.messages != counts:
                raise UnreadableIncident(f"{name}, line {number}: the end line counts {line.messages}, the file "
                                         f"holds {counts}")
            if next(lines, None) is not None:
                raise UnreadableIncident(f"{name}, line {number + 1}: more after the end line")
            return
        if not isinstance(line, Message):
            raise UnreadableIncident(f"{name}, line {number}: a second header")
        where = ranges.get(line.stream)
        if where is None:
            raise UnreadableIncident(f"{name}, line {number}: stream {line.stream!r} is not in the header")
        index = order.index(line.stream)
        if index < at:
            raise UnreadableIncident(f"{name}, line {number}: {line.stream} after {order[at]}: out of order")
        if index > at:
            at, last = index, 0
        if not (where.first_seq <= line.seq <= where.last_seq) or line.seq <= last:
            raise UnreadableIncident(f"{name}, line {number}: {line.stream} #{line.seq} out of order or outside "
                                     f"#{where.first_seq}..#{where.last_seq}")
        _check(line, name, number)
        last = line.seq
        counts[line.stream] += 1
        yield line
    raise UnreadableIncident(f"{name}: truncated after line {number} (no end line: the export did not finish)")


def lines_of(f: IO[bytes]) -> Iterator[bytes]:
    """The file's lines, read as needed (bounded: a line longer than MAX_LINE is cut there, and refused)."""
    while True:
        raw = f.readline(MAX_LINE + 1)
        if not raw:
            return
        yield raw
