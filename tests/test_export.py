"""`ledger export` / `ledger import` / `ledger up --from`: an incident's log, moved to another server, answers as the
original did - same sequences, same stored times, same views now and in the past, same `ledger check` and replay.

The log is the demo's (a failover, routes, heartbeats), run with 3 heartbeats kept per agent so the heartbeat
stream has gaps (beats pushed out in its middle), plus a message that is not an event (dead-lettered by a
projector into LEDGER_DLQ) and an event whose headers forge an original stored time on the live ledger.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from click.testing import CliRunner, Result
from conftest import start_binary_server
from hypothesis import given
from hypothesis import strategies as st

from ledger import codec, imported, incident
from ledger import events as ev
from ledger.errors import StoreError
from ledger.jsapi import RawStored
from ledger.settings import Settings
from ledger.store import EventStore
from ledger.subjects import DLQ_STREAM, HEARTBEAT_STREAM, LEDGER_STREAM
from ledgerctl.cli import cli
from ledgerctl.server import EmbeddedServer, free_port
from ledgerctl.stack import UpSettings, running_stack
from projections.projector import Projector
from projections.settings import ProjectionSettings

STREAMS = (LEDGER_STREAM, HEARTBEAT_STREAM, DLQ_STREAM)
FORGED_NS = 1_000_000_000  # 1970-01-01T00:00:01Z
VIEWS = ("agents", "sessions", "routes", "pools", "anomalies")


@dataclass
class Incident:
    base: Path
    source: EmbeddedServer
    copy: EmbeddedServer
    file: Path
    source_db: Path
    copy_db: Path
    forged_seq: int


def ledger(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


async def project(url: str, db: Path) -> None:
    async with EventStore.connect(Settings(nats_url=url)) as store:
        async with Projector(store, ProjectionSettings(db=str(db))) as projector:
            await projector.ready(timeout=60)


async def spoil(url: str) -> int:
    """A message that is not an event, and an event that claims an original stored time: on the live ledger."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.publish("ledger.session.junk.created.intruder", b"{not json", stream=LEDGER_STREAM)
        out = codec.encode(ev.SessionCreated(producer=ev.Producer(id="intruder", instance="i"),
                                             session_id="forged", pool="gpu"))
        ack = await js.publish(out.subject, out.payload, headers={**out.headers, imported.STORED_NS: str(FORGED_NS)})
        return ack.seq
    finally:
        await nc.close()


@pytest.fixture(scope="module")
def inc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Incident]:
    base = tmp_path_factory.mktemp("incident")
    demo = base / "demo"
    env = {**os.environ, "LEDGER_HEARTBEAT_PER_AGENT": "3"}
    subprocess.run([sys.executable, "-m", "ledgerctl", "demo", "--exit", "--pause", "0", "--no-http",
                    "--data-dir", str(demo)], env=env, check=True, timeout=300, capture_output=True)
    source = start_binary_server(demo)
    copy: EmbeddedServer | None = None
    try:
        forged = asyncio.run(spoil(source.url))
        source_db = base / "source.sqlite3"
        asyncio.run(project(source.url, source_db))  # dead-letters the junk into LEDGER_DLQ
        file = base / "incident.ledger"
        r = ledger("export", "--nats-url", source.url, "-o", str(file), "-q")
        assert r.exit_code == 0, r.output
        r = ledger("import", str(file), "--data-dir", str(base / "copy"), "-q")
        assert r.exit_code == 0, r.output
        copy = start_binary_server(base / "copy")
        copy_db = base / "copy.sqlite3"
        asyncio.run(project(copy.url, copy_db))
        yield Incident(base, source, copy, file, source_db, copy_db, forged)
    finally:
        source.stop()
        if copy is not None:
            copy.stop()


async def raw(url: str, stream: str) -> tuple[tuple[int, int, int, int], list[RawStored]]:
    async with EventStore.connect(Settings(nats_url=url), check=False) as store:
        facts = await store.stream_facts(stream)
        out: list[RawStored] = []
        start = facts.first_seq
        while start <= facts.last_seq:
            batch, pending = await store.raw_batch(stream, start)
            out += batch
            if not batch or pending == 0:
                break
            start = batch[-1].seq + 1
        return (facts.first_seq, facts.last_seq, facts.messages, facts.first_ns), out


def test_the_premise_a_log_with_gaps_a_dead_letter_and_a_failover(inc: Incident) -> None:
    (first, last, messages, _), _ = asyncio.run(raw(inc.source.url, HEARTBEAT_STREAM))
    assert messages < last - first + 1  # beats pushed out in the middle: gaps
    (_, _, letters, _), _ = asyncio.run(raw(inc.source.url, DLQ_STREAM))
    assert letters == 1
    replay = ledger("replay", "--nats-url", inc.source.url, "--type", "agent.declared_dead")
    assert "agent.declared_dead" in replay.output


def test_every_message_is_at_its_sequence_with_its_stored_time_headers_and_bytes(inc: Incident) -> None:
    for stream in STREAMS:
        original, copied = asyncio.run(raw(inc.source.url, stream)), asyncio.run(raw(inc.copy.url, stream))
        assert copied == original, stream


def test_views_now_and_in_the_past_are_the_originals(inc: Incident) -> None:
    at_seq = str(inc.forged_seq // 2)
    as_of = ledger("replay", "--nats-url", inc.source.url, "--from-seq", at_seq, "--to-seq", at_seq, "--json")
    moment = json.loads(as_of.output.splitlines()[0])["stored_at"]
    for view in VIEWS:
        for past in ((), ("--at-seq", at_seq), ("--as-of", moment)):
            answers = []
            for server, db in ((inc.source, inc.source_db), (inc.copy, inc.copy_db)):
                r = ledger(view, "--nats-url", server.url, "--db", str(db), "--json", *past)
                assert r.exit_code == 0, r.output
                doc = json.loads(r.output)
                if not past:  # health is judged at the wall clock's now, a moment apart for the two
                    doc["position"].pop("now")
                    doc["items"] = [{k: v for k, v in item.items() if not k.endswith("_age")}  # seconds before now
                                    for item in doc["items"]]
                answers.append(doc)
            assert answers[0] == answers[1], (view, past)
            assert answers[0]["items"] or view == "anomalies"


def test_check_and_replay_say_the_same(inc: Incident) -> None:
    for command in (("check", "--json"), ("replay", "--json"), ("replay", "--heartbeats", "--json"),
                    ("replay", "--json", "--since", "1970-01-01T00:00:00Z")):
        original = ledger(*command, "--nats-url", inc.source.url)
        copied = ledger(*command, "--nats-url", inc.copy.url)
        assert (copied.exit_code, copied.stdout) == (original.exit_code, original.stdout), command
        assert original.stdout


def test_why_and_whatif_say_the_same(inc: Incident) -> None:
    deaths = ledger("replay", "--nats-url", inc.source.url, "--type", "session.claimed", "--json")
    failed_over = [d["event"]["session_id"] for d in map(json.loads, deaths.output.splitlines())
                   if d["event"].get("reason") == "failover"]
    assert failed_over, "the demo's log holds a failover"
    dead = ledger("replay", "--nats-url", inc.source.url, "--type", "agent.declared_dead", "--json")
    agent = json.loads(dead.output.splitlines()[0])["event"]["agent_id"]
    for command in (("why", "session", failed_over[0], "--json"), ("why", "session", failed_over[0]),
                    ("why", "agent", agent, "--json"), ("whatif", "--json"), ("whatif", "--dead-after", "60s"),
                    ("whatif", "--dead-after", "1s", "--json")):
        original = ledger(*command, "--nats-url", inc.source.url)
        copied = ledger(*command, "--nats-url", inc.copy.url)
        assert (copied.exit_code, copied.stdout) == (original.exit_code, original.stdout), command
        assert original.exit_code == 0 and original.stdout, (command, original.output)


def test_doctor_tells_an_imported_copy_from_a_live_ledger(inc: Incident) -> None:
    copy = ledger("doctor", "--nats-url", inc.copy.url, "--no-check", "--db", str(inc.copy_db))
    live = ledger("doctor", "--nats-url", inc.source.url, "--no-check", "--db", str(inc.source_db))
    assert "LEDGER: an imported copy" in copy.output, copy.output
    assert "imported copy" not in live.output, live.output


def test_a_forged_stored_time_is_ignored_on_a_live_ledger_and_not_carried_into_the_copy(inc: Incident) -> None:
    async def stored(url: str) -> tuple[int, int | None, bool]:
        async with EventStore.connect(Settings(nats_url=url)) as store:
            history = await store.history("session", "forged")
            assert [i.seq for i in history] == [inc.forged_seq]
            at = await store.stored_ns(inc.forged_seq)
            return history[0].timestamp_ns, at, await store.is_imported(LEDGER_STREAM)

    live, copied = asyncio.run(stored(inc.source.url)), asyncio.run(stored(inc.copy.url))
    assert live[0] > FORGED_NS * 1000  # the server's time, not the header's
    assert live[0] == live[1] == copied[0] == copied[1]
    assert (live[2], copied[2]) == (False, True)


def test_the_copy_is_sealed(inc: Incident) -> None:
    async def write() -> None:
        async with EventStore.connect(Settings(nats_url=inc.copy.url)) as store:
            await store.append(ev.SessionCreated(producer=ev.Producer(id="cli", instance="t"), session_id="late",
                                                 pool="gpu"))

    with pytest.raises(StoreError, match="sealed"):
        asyncio.run(write())


def test_a_window_exports_what_was_stored_in_it(inc: Incident) -> None:
    _, messages = asyncio.run(raw(inc.source.url, LEDGER_STREAM))
    low, high = messages[len(messages) // 4], messages[3 * len(messages) // 4]
    since, until = (codec.from_ns(m.stored_ns).isoformat() for m in (low, high))
    window = inc.base / "window.ledger"
    r = ledger("export", "--nats-url", inc.source.url, "--since", since, "--until", until, "-o", str(window), "-q")
    assert r.exit_code == 0, r.output
    with window.open("rb") as f:
        header, records = incident.read(incident.lines_of(f))
        kept = [m for m in records if m.stream == LEDGER_STREAM]
    ledger_range = next(s for s in header.streams if s.name == LEDGER_STREAM)
    assert (ledger_range.first_seq, ledger_range.last_seq) == (low.seq, high.seq)
    assert [m.seq for m in kept] == [m.seq for m in messages if low.seq <= m.seq <= high.seq]
    r = ledger("import", str(window), "--data-dir", str(inc.base / "window-copy"), "-q")
    assert r.exit_code == 0, r.output
    server = start_binary_server(inc.base / "window-copy")
    try:
        (first, last, count, first_ns), copied = asyncio.run(raw(server.url, LEDGER_STREAM))
    finally:
        server.stop()
    assert (first, last, count, first_ns) == (low.seq, high.seq, len(kept), low.stored_ns)
    assert [(m.seq, m.stored_ns, m.data) for m in copied] == [(m.seq, m.stored_ns, m.data) for m in kept]


@pytest.mark.parametrize(("spoil_file", "says"), [
    (lambda lines: lines[:-1], "truncated"),
    (lambda lines: [*lines[:3], b"{\"kind\": \"msg\", \"stream\"\n", *lines[4:]], "line 4"),
    (lambda lines: [b"{\"hello\": 1}\n", *lines[1:]], "not an incident file"),
    (lambda lines: [lines[0].replace(b"\"version\":1", b"\"version\":99"), *lines[1:]], "version 99"),
    (lambda lines: [*lines[:2], lines[3], lines[2], *lines[4:]], "out of order"),
])
def test_an_unreadable_file_is_one_line(inc: Incident, tmp_path: Path, spoil_file, says: str) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.ledger"
    bad.write_bytes(b"".join(spoil_file(inc.file.read_bytes().splitlines(keepends=True))))
    r = CliRunner().invoke(cli, ["import", str(bad), "--data-dir", str(tmp_path / "d"), "-q"])
    assert r.exit_code == 1
    assert r.output.count("\n") == 1 and r.output.startswith("Error: ") and says in r.output, r.output
    assert "Traceback" not in r.output


def test_up_from_a_file_runs_read_only_on_the_copy(inc: Incident, tmp_path: Path) -> None:
    said: list[str] = []

    async def up() -> tuple[dict[str, object], dict[str, int]]:
        s = UpSettings(nats_url=None, data_dir=tmp_path / "up", port=free_port(), from_file=inc.file,
                       sync_always=False)
        async with running_stack(s, said.append) as stack:
            await asyncio.wait_for(stack.projector.caught_up.wait(), 60)
            return dict(stack.consumers.parts), dict(stack.projector.committed)

    parts, committed = asyncio.run(up())
    assert parts == {}
    assert committed[LEDGER_STREAM] == asyncio.run(raw(inc.source.url, LEDGER_STREAM))[0][1]
    assert any("none: an imported log is read-only" in line for line in said)


def test_a_server_holding_a_ledger_is_never_loaded_into(inc: Incident) -> None:
    r = CliRunner().invoke(cli, ["import", str(inc.file), "--nats-url", inc.source.url, "-q"])
    assert r.exit_code == 1
    assert r.output == (f"Error: the server already holds a ledger of its own: import {inc.file} into a fresh "
                        "server (a new --data-dir)\n")
    into = str(inc.base / "twice")
    first, again = (CliRunner().invoke(cli, ["import", str(inc.file), "--data-dir", into, "--json", "-q"])
                    for _ in range(2))
    assert json.loads(first.output)["reused"] is False
    assert json.loads(again.output)["reused"] is True  # the very same export: nothing to do


_names = st.one_of(st.sampled_from(["Nats-Msg-Id", "Nats-Expected-Last-Sequence", "Nats-TTL", "nats-rollup",
                                    imported.STORED_NS, "Ledger-Imported-Nats-TTL", "Ledger-Imported-X", "X-Trace"]),
                   st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,20}", fullmatch=True))


@given(headers=st.dictionaries(_names, st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20),
                               max_size=6),
       stored=st.integers(0, 2**63 - 1), escape=st.booleans())
def test_the_headers_a_copy_is_loaded_with_give_back_the_originals_and_their_time(
        headers: dict[str, str], stored: int, escape: bool) -> None:
    if len({k.lower() for k in headers}) < len(headers):
        return  # one header per name, whatever its case: what a NATS client reads
    loaded = imported.publish_headers(headers, stored, escape_msg_id=escape)
    assert imported.restored_headers(loaded) == headers
    assert imported.stored_ns(loaded, 0) == stored
    acted_on = {k for k in loaded if k.lower().startswith("nats-")}  # what the server reads when it is published
    assert acted_on <= ({"Nats-Msg-Id"} if not escape else set())


@given(st.lists(st.tuples(st.integers(1, 50), st.binary(max_size=40),
                          st.dictionaries(st.from_regex(r"[A-Z][a-z-]{0,8}", fullmatch=True),
                                          st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=8),
                                          max_size=2)), max_size=8))
def test_an_incident_file_reads_back_what_was_written(msgs: list[tuple[int, bytes, dict[str, str]]]) -> None:
    seqs = sorted({seq for seq, _, _ in msgs})
    written = [incident.Message(LEDGER_STREAM, seq, "ledger.session.s.created.p", seq * 7, h, data)
               for seq, (_, data, h) in zip(seqs, msgs, strict=False)]
    header = incident.Header(format=incident.FORMAT, version=incident.VERSION, ledger_version="t", exported_at="t",
                             streams=[incident.StreamRange(LEDGER_STREAM, 1, 50)])
    lines = [incident.encode(header), *map(incident.encode, written),
             incident.encode(incident.End({LEDGER_STREAM: len(written)}))]
    _, read = incident.read(lines)
    assert list(read) == written
