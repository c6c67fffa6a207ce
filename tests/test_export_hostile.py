"""`ledger import` of a crafted incident file: the file is the attacker's, the server is the user's.

A file comes from another machine (a bug report, a colleague, a stranger). Whatever it says, an import never
writes outside the streams of the copy it makes, never makes a stream the ledger does not have, never lets a
message capture or configure anything of the user's, and every refusal is one line, exit 1, never a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nats
import pytest
from click.testing import CliRunner, Result

from ledger import imported, incident, loader, subjects
from ledger.settings import Settings
from ledger.store import EventStore
from ledger.streams import ensure_streams
from ledger.subjects import DLQ_STREAM, HEARTBEAT_STREAM, LEDGER_STREAM
from ledgerctl.cli import cli
from ledgerctl.server import EmbeddedServer

SUBJECT = "ledger.session.s1.created.p1"


def msg(seq: int, subject: str = SUBJECT, headers: dict[str, str] | None = None, stream: str = LEDGER_STREAM,
        data: bytes = b"{}", stored_ns: int = 1_700_000_000_000_000_000) -> dict[str, Any]:
    return {"kind": "msg", "stream": stream, "seq": seq, "subject": subject, "stored_ns": stored_ns,
            "headers": headers or {}, "data": base64.b64encode(data).decode()}


def craft(path: Path, messages: list[dict[str, Any]], streams: list[dict[str, Any]] | None = None) -> Path:
    """An incident file as an attacker writes it: raw JSON lines, the end line's counts made to match."""
    if streams is None:
        last = max((m["seq"] for m in messages), default=0)
        streams = [{"name": LEDGER_STREAM, "first_seq": 1, "last_seq": last, "config": {}}]
    header = {"kind": "header", "format": incident.FORMAT, "version": incident.VERSION, "ledger_version": "x",
              "exported_at": "2026-01-01T00:00:00+00:00", "streams": streams}
    counts = {s["name"]: sum(1 for m in messages if m["stream"] == s["name"]) for s in streams}
    lines = [header, *messages, {"kind": "end", "messages": counts}]
    path.write_bytes(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
    return path


def load(file: Path, *into: str) -> Result:
    return CliRunner().invoke(cli, ["import", str(file), *(into or ("--data-dir", str(file) + "-d")), "-q"])


def refused(r: Result, says: str) -> None:
    assert r.exit_code == 1, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)  # no traceback
    assert r.output.count("\n") == 1 and r.output.startswith("Error: ") and says in r.output, r.output


async def streams_of(url: str) -> dict[str, dict[str, Any]]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        return {str(s.config.name): {"subjects": s.config.subjects, "messages": s.state.messages,
                                     "retention": str(s.config.retention), "sealed": s.config.sealed,
                                     "metadata": sorted(k for k in s.config.metadata or {} if k.startswith("ledger."))}
                for s in await js.streams_info()}
    finally:
        await nc.close()


@pytest.mark.parametrize(("subject", "says"), [
    ("ledger.session.s1 created.p1", "subject"),  # a space: the protocol line's separator
    ("ledger.session.s1.created.p1\r\nPUB ledger.x 1", "subject"),  # protocol injection
    ("ledger.session.*.created.p1", "subject"),  # a wildcard is no subject one can publish to
    ("ledger.session.>", "subject"),
    ("", "subject"),
])
def test_a_subject_that_is_not_one_is_refused_in_one_line(tmp_path: Path, subject: str, says: str) -> None:
    refused(load(craft(tmp_path / "f", [msg(1, subject)])), says)


@pytest.mark.parametrize(("headers", "says"), [
    ({"X-Evil": "a\r\nNats-Rollup: all"}, "header"),  # CRLF: a header of the attacker's choice
    ({"X-Evil": "a\nb"}, "header"),
    ({"Bad Name": "v"}, "header"),
    ({"Bad:Name": "v"}, "header"),
    ({"": "v"}, "header"),
    ({"X-Pad": " padded "}, "header"),  # a client trims it: the copy would not hold what the file says
])
def test_a_header_that_nats_cannot_carry_is_refused_in_one_line(tmp_path: Path, headers: dict[str, str],
                                                                says: str) -> None:
    refused(load(craft(tmp_path / "f", [msg(1, headers=headers)])), says)


@pytest.mark.parametrize("name", ["EVIL", "KV_config", "LEDGER.x", "LEDGER>", "OBJ_x", ""])
def test_a_stream_the_ledger_does_not_have_is_never_made(tmp_path: Path, fresh_server: EmbeddedServer,
                                                         name: str) -> None:
    streams = [{"name": name, "first_seq": 1, "last_seq": 0, "config": {"subjects": ["$KV.config.>"]}}]
    refused(load(craft(tmp_path / "f", [], streams), "--nats-url", fresh_server.url), "stream")
    assert asyncio.run(streams_of(fresh_server.url)) == {}


def test_the_copy_captures_only_the_ledgers_own_subjects(tmp_path: Path, fresh_server: EmbeddedServer) -> None:
    """A configuration in the file that would capture the user's other traffic (or all of it) is not copied."""
    config = {"subjects": [">"], "retention": "interest", "mirror": {"name": "SECRET"},
              "sources": [{"name": "SECRET"}], "metadata": {"_nats.req.level": "0", "x": "y"}}
    streams = [{"name": LEDGER_STREAM, "first_seq": 1, "last_seq": 1, "config": config}]
    r = load(craft(tmp_path / "f", [msg(1, stream=LEDGER_STREAM)], streams), "--nats-url", fresh_server.url)
    assert r.exit_code == 0, r.output
    made = asyncio.run(streams_of(fresh_server.url))
    assert made == {LEDGER_STREAM: {"subjects": subjects.LEDGER_SUBJECTS, "messages": 1, "retention": "limits",
                                    "sealed": True, "metadata": [imported.MARK]}}


def test_a_message_on_another_streams_subject_never_lands_there(tmp_path: Path, fresh_server: EmbeddedServer) -> None:
    """The sequence guard is the message's, not the stream's: published on a subject another stream of the
    user's stores, it would land in that stream (at the very sequence the guard names)."""
    async def other() -> None:
        nc = await nats.connect(fresh_server.url)
        try:
            await nc.jetstream().add_stream(name="OTHER", subjects=["other.>"])
        finally:
            await nc.close()

    asyncio.run(other())
    refused(load(craft(tmp_path / "f", [msg(1, "other.evil")]), "--nats-url", fresh_server.url), "other.evil")
    assert asyncio.run(streams_of(fresh_server.url))["OTHER"]["messages"] == 0
    assert LEDGER_STREAM not in asyncio.run(streams_of(fresh_server.url))  # the half-made copy is gone


def test_a_heartbeat_in_the_ledger_stream_is_refused(tmp_path: Path) -> None:
    refused(load(craft(tmp_path / "f", [msg(1, "ledger.hb.a1.heartbeat.a1")])), "ledger.hb.a1.heartbeat.a1")


@pytest.mark.parametrize(("first", "last", "says"), [
    (0, 1, "#0"),
    (-5, 1, "#-5"),
    (2**63, 2**63, "#9223372036854775808"),
    (1, 2**64 + 5, "#18446744073709551621"),
    (3, 1, "#3..#1"),
])
def test_a_range_no_stream_can_have_is_refused(tmp_path: Path, first: int, last: int, says: str) -> None:
    streams = [{"name": LEDGER_STREAM, "first_seq": first, "last_seq": last, "config": {}}]
    refused(load(craft(tmp_path / "f", [], streams)), says)


def test_the_same_stream_twice_in_the_header_is_refused(tmp_path: Path) -> None:
    streams = [{"name": LEDGER_STREAM, "first_seq": 1, "last_seq": 0, "config": {}}] * 2
    refused(load(craft(tmp_path / "f", [], streams)), "twice")


def test_invalid_base64_is_one_line(tmp_path: Path) -> None:
    bad = {**msg(1), "data": "!!!not base64"}
    refused(load(craft(tmp_path / "f", [bad])), "line 2")



async def mark_live(url: str) -> int:
    """What someone with stream admin can do to a live ledger: mark its (unsealed) LEDGER stream as an imported
    copy; then an event whose headers claim an original stored time."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        config = (await js.stream_info(LEDGER_STREAM)).config
        config.metadata = {**(config.metadata or {}), imported.MARK: "exported yesterday from nowhere"}
        await js.update_stream(config)
        ack = await js.publish(SUBJECT, b"{}", headers={imported.STORED_NS: "1000000000"})
        return ack.seq
    finally:
        await nc.close()


def test_a_marked_stream_that_is_not_sealed_is_no_copy(server: EmbeddedServer) -> None:
    """Only a sealed stream can be an imported copy (the import seals what it marks, and a sealed stream takes no
    write): a live ledger's stream with the mark is still live - its stored times the server's, its settings
    checked, its consumers running - whoever marked it."""
    seq = asyncio.run(mark_live(server.url))

    async def seen() -> tuple[int | None, bool, list[str]]:
        async with EventStore.connect(Settings(nats_url=server.url), ensure=True) as store:
            reports = await ensure_streams(store.nc.jetstream(), store.settings)
            return await store.stored_ns(seq), await store.is_imported(LEDGER_STREAM), [r.action for r in reports]

    stored, trusted, actions = asyncio.run(seen())
    assert stored is not None and stored > 1_000_000_000 * 10**9  # the server's time, not the forged 1970 one
    assert trusted is False
    assert "imported" not in actions


DIE = """
import asyncio, os, sys
from pathlib import Path
from ledger import incident, transfer
from ledger.settings import Settings
from ledger.store import EventStore

async def main(url: str, path: str, stream: str, seq: int) -> None:
    header = transfer.read_file(Path(path))
    async with EventStore.connect(Settings(nats_url=url), check=False) as store:
        with open(path, "rb") as f:
            _, messages = incident.read(incident.lines_of(f))
            def dying():
                for m in messages:
                    if (m.stream, m.seq) == (stream, seq):
                        os._exit(9)  # as kill -9: no clean-up runs
                    yield m
            await transfer.import_log(store, header, dying())

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
"""


@pytest.mark.parametrize(("stream", "seq"), [(LEDGER_STREAM, 300), (HEARTBEAT_STREAM, 2)])
def test_an_import_killed_half_way_is_never_taken_for_the_copy(tmp_path: Path, fresh_server: EmbeddedServer,
                                                               stream: str, seq: int) -> None:
    beats = [msg(s, "ledger.hb.a1.heartbeat.a1", stream=HEARTBEAT_STREAM) for s in range(1, 4)]
    streams = [{"name": LEDGER_STREAM, "first_seq": 1, "last_seq": 600, "config": {}},
               {"name": HEARTBEAT_STREAM, "first_seq": 1, "last_seq": 3, "config": {}}]
    file = craft(tmp_path / "f", [*(msg(s) for s in range(1, 601)), *beats], streams)
    died = subprocess.run([sys.executable, "-c", DIE, fresh_server.url, str(file), stream, str(seq)], check=False,
                          capture_output=True, text=True, timeout=120)
    assert died.returncode == 9, died.stderr
    refused(load(file, "--nats-url", fresh_server.url), "interrupted")


def test_writing_to_a_copy_is_one_line(tmp_path: Path, fresh_server: EmbeddedServer) -> None:
    streams = [{"name": LEDGER_STREAM, "first_seq": 1, "last_seq": 1, "config": {}},
               *({"name": name, "first_seq": 1, "last_seq": 0, "config": {}} for name in (HEARTBEAT_STREAM,
                                                                               DLQ_STREAM))]
    file = craft(tmp_path / "f", [msg(1)], streams)
    assert load(file, "--nats-url", fresh_server.url).exit_code == 0
    r = CliRunner().invoke(cli, ["session", "create", "--pool", "gpu", "--nats-url", fresh_server.url])
    refused(r, "an imported copy (`ledger import`) is read-only")
    assert asyncio.run(streams_of(fresh_server.url))[LEDGER_STREAM]["messages"] == 1


def test_a_window_that_ends_before_it_starts_is_one_line(server: EmbeddedServer, tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["export", "--nats-url", server.url, "--since", "-1h", "--until", "-2h",
                                 "-o", str(tmp_path / "w")])
    refused(r, "before")


def test_a_message_over_the_streams_size_is_one_line(tmp_path: Path) -> None:
    streams = [{"name": LEDGER_STREAM, "first_seq": 1, "last_seq": 1, "config": {"max_msg_size": 16}}]
    refused(load(craft(tmp_path / "f", [msg(1, data=b"x" * 100)], streams)), "LEDGER #1")


def test_a_line_longer_than_any_message_is_refused_unread(tmp_path: Path) -> None:
    file = craft(tmp_path / "f", [msg(1, data=b"x" * (incident.MAX_LINE))])
    refused(load(file), "longer than")


def test_a_file_claiming_a_huge_gap_never_fills_the_disk_with_fillers(fresh_server: EmbeddedServer,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A gap costs the file nothing (a range in its header) and the import a filler per sequence: they are purged
    on the way, so the stream never holds more than PURGE_EVERY of them (plus one chunk in flight)."""
    monkeypatch.setattr(loader, "PURGE_EVERY", 2 * loader.CHUNK, raising=False)
    last = 12 * loader.CHUNK
    held: list[int] = []

    async def stored() -> int:
        nc = await nats.connect(fresh_server.url)
        try:
            return int((await nc.jetstream().stream_info(LEDGER_STREAM)).state.messages)
        finally:
            await nc.close()

    def seen(stream: str, at: int, end: int) -> None:  # the loader waits while the stream is looked at
        with ThreadPoolExecutor(1) as pool:
            held.append(pool.submit(asyncio.run, stored()).result())

    async def load_gap() -> int:
        async with EventStore.connect(Settings(nats_url=fresh_server.url), check=False) as store:
            m = incident.Message(LEDGER_STREAM, last, SUBJECT, 1, {}, b"{}")
            return await store.loader().load(LEDGER_STREAM, {}, 1, last, [m], "test", seen)

    assert asyncio.run(load_gap()) == 1
    assert len(held) >= 10 and max(held) <= loader.PURGE_EVERY + loader.CHUNK, held
    assert asyncio.run(stored()) == 1


def test_a_message_over_the_servers_payload_limit_is_one_line(tmp_path: Path) -> None:
    refused(load(craft(tmp_path / "f", [msg(1, data=b"x" * (2 * 1024 * 1024))])), "LEDGER #1")


def test_a_header_the_client_refuses_is_one_line(tmp_path: Path) -> None:
    """Two names differing in case only: one header to NATS, two in the file (the copy could not hold both)."""
    refused(load(craft(tmp_path / "f", [msg(1, headers={"X-A": "1", "x-a": "2"})])), "header")
