"""Hostile checkpoints: what a client may write into one (a note, bytes) and what it may put on the wire past the SDK
(bad base64, oversize data) must reach `ledger session show`, the agent SDK and the reference agent as data - never
as terminal control, a crash or a traceback. Real nats-server."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import nats
import pytest

from ledger import codec
from ledger import events as ev
from ledger.agent import Agent, Claim
from ledger.codec import Unreadable
from ledger.settings import Settings
from ledger.writer import Writer
from ledgerctl.agent_process import Progress, progress_of

HOSTILE = "\x1b[2J\x1b]0;owned\x07\r\nforged: line\u202e"
"""Clears the screen, sets the window title, forges a line of output, reverses what follows."""


def agent_of(ledger: Writer, agent_id: str) -> Agent:
    return Agent(ledger, agent_id=agent_id, pool="p", heartbeat=0.1, ttl=5.0, capacity=4)


def ledger_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LEDGER_NATS_URL": settings.nats_url}
    return subprocess.run([sys.executable, "-m", "ledgerctl", *args], capture_output=True, text=True, timeout=60,
                          env=env, check=False)


def shows_no_control(out: str) -> None:
    for bad in ("\x1b", "\x07", "\r", "\u202e", "\nforged: line"):
        assert bad not in out, (bad, out)


async def test_session_show_escapes_what_a_client_wrote_in_a_checkpoint_note_and_a_reason(
        settings: Settings, ledger: Writer, uid: str):
    sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
    async with agent_of(ledger, f"{uid}-a1") as a1:
        await a1.claim(sid)
        await a1.checkpoint(sid, b"progress=1", note=HOSTILE)
        shown = ledger_cli(settings, "session", "show", sid)
        assert shown.returncode == 0, shown.stderr
        shows_no_control(shown.stdout)
        assert "\\x1b[2J" in shown.stdout  # escaped, still there to read
        doc = json.loads(ledger_cli(settings, "session", "show", sid, "--json").stdout)
        assert doc["checkpoint"]["note"] == HOSTILE  # JSON keeps the exact text (its own escaping)
        await a1.release(sid, reason=HOSTILE)
    shown = ledger_cli(settings, "session", "show", sid)
    assert shown.returncode == 0, shown.stderr
    shows_no_control(shown.stdout)


async def raw_publish(settings: Settings, subject: str, body: dict[str, object], msg_id: str) -> None:
    nc = await nats.connect(settings.nats_url)
    try:
        await nc.jetstream().publish(subject, json.dumps(body).encode(), headers={"Nats-Msg-Id": msg_id})
    finally:
        await nc.close()


@pytest.mark.parametrize("data", ["!!! not base64 !!!", "eA", base64.b64encode(b"x" * (ev.MAX_CHECKPOINT_BYTES + 1))
                                  .decode(), 12345, None])
async def test_a_checkpoint_unreadable_on_the_wire_is_a_dead_letter_and_the_session_reads_on(
        settings: Settings, ledger: Writer, uid: str, data: object):
    sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
    async with agent_of(ledger, f"{uid}-a1") as a1:
        claim = await a1.claim(sid)
        good = await a1.checkpoint(sid, b"progress=5")
        event = ev.SessionCheckpointed(producer=a1.producer, session_id=sid, agent_id=a1.agent_id,
                                       incarnation=a1.incarnation, token=claim.token, data=b"")
        body = json.loads(codec.encode(event).payload)
        body["data"] = data
        await raw_publish(settings, codec.subject_of(event), body, event.event_id)
        items = await ledger.store.history("session", sid)
        assert isinstance(items[-1], Unreadable), items[-1]
        state, last = await ledger.session(sid)
        assert state is not None and state.checkpoint is not None and state.checkpoint.seq == good
        assert last == items[-1].seq
        await a1.checkpoint(sid, b"progress=6")  # the owner goes on writing past it
    shown = ledger_cli(settings, "session", "show", sid)
    assert shown.returncode == 0 and "progress=6" in shown.stdout, shown.stderr


@pytest.mark.parametrize("data", [b"progress=abc", b"progress=-1", b"progress=" + str(10**100).encode(),
                                  b"progress=", b"progress=+7", b"progress= 7", "progress=\u0661\u0662".encode(),
                                  b"progress=7\n", b"\xff\xfe", b""])
def test_the_reference_agent_restarts_from_zero_on_a_checkpoint_it_did_not_write(data: bytes):
    cp = ev_checkpoint(data)
    assert progress_of(cp) is None
    said: list[str] = []
    progress = Progress(agent=None, every=1.0, say=said.append)  # type: ignore[arg-type]
    progress.gained(Claim("s1", 3, "failover", cp))
    assert progress.done == {"s1": 0} and said == []


def ev_checkpoint(data: bytes):  # type: ignore[no-untyped-def]
    from datetime import UTC, datetime

    from ledger import lifecycle as lc

    return lc.Checkpoint(data=data, seq=9, agent_id="mallory", token=3, at=datetime(2026, 1, 1, tzinfo=UTC))


async def test_a_flood_of_checkpoints_keeps_the_newest_alone_and_one_version_row_each(tmp_path):  # type: ignore[no-untyped-def]
    """10,000 checkpoints on one session: the fold holds one (the newest), the projection one current row and one
    version row per checkpoint, and one checkpoint row each (linear in the log)."""
    import sqlite3

    from projection_helpers import commit_batches

    from ledger.codec import Recorded
    from ledger.subjects import LEDGER_STREAM

    history = _owner_history(reports=0)
    a1 = ev.Producer(id="a1", instance="i1")
    n = 10_000
    for k in range(n):
        seq = len(history) + 1
        e = ev.SessionCheckpointed(producer=a1, session_id="s1", agent_id="a1", incarnation=1, token=3,
                                   data=b"progress=%d" % k)
        history.append(Recorded(LEDGER_STREAM, seq, codec.subject_of(e), 1_000_000_000 * seq, e))
    path = tmp_path / "p.db"
    state = await commit_batches(path, [history[i:i + 1000] for i in range(0, len(history), 1000)])
    kept = state.sessions["s1"].checkpoint
    assert kept is not None and kept.data == b"progress=%d" % (n - 1) and kept.seq == len(history)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM sessions").fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM session_versions").fetchone()[0] == n + 3  # incl. the first 3
        assert conn.execute("SELECT count(*) FROM session_checkpoints").fetchone()[0] == n + 1  # and the 16 KiB one


# --- the projection ----------------------------------------------------------------------------------------


def _owner_history(reports: int) -> list[object]:
    from ledger.codec import Recorded
    from ledger.subjects import LEDGER_STREAM

    cli, a1 = ev.Producer(id="cli", instance="c"), ev.Producer(id="a1", instance="i1")
    out: list[Recorded] = []

    def add(e: ev.Event) -> int:
        seq = len(out) + 1
        out.append(Recorded(LEDGER_STREAM, seq, codec.subject_of(e), 1_000_000_000 * seq, e))
        return seq

    add(ev.AgentRegistered(producer=a1, agent_id="a1", instance_id="i1", pool="p"))
    add(ev.SessionCreated(producer=cli, session_id="s1", pool="p"))
    token = add(ev.SessionClaimed(producer=a1, session_id="s1", agent_id="a1", instance_id="i1", incarnation=1))
    add(ev.SessionCheckpointed(producer=a1, session_id="s1", agent_id="a1", incarnation=1, token=token,
                               data=b"\xff" * ev.MAX_CHECKPOINT_BYTES))
    for k in range(reports):
        add(ev.SessionResourceReported(producer=a1, session_id="s1", agent_id="a1", incarnation=1, token=token,
                                       platform_resource_id=f"r{k}"))
    return out  # type: ignore[return-value]


async def test_a_checkpoint_is_stored_once_in_the_projection_not_once_per_later_event(tmp_path):  # type: ignore[no-untyped-def]
    import sqlite3

    from projection_helpers import commit_batches

    from projections.db import ProjectionDB
    from projections.state import LedgerState

    history = _owner_history(reports=100)
    logged = sum(len(codec.encode(r.event).payload) for r in history)  # type: ignore[attr-defined]
    path = tmp_path / "p.db"
    state = await commit_batches(path, [history[i:i + 10] for i in range(0, len(history), 10)])
    with sqlite3.connect(path) as conn:
        versions = conn.execute("SELECT sum(length(doc)) FROM session_versions").fetchone()[0]
        checkpoints = conn.execute("SELECT count(*), sum(length(doc)) FROM session_checkpoints").fetchone()
    # Each version names the checkpoint by sequence; its bytes are one row (the schema-3 file held 2.3 MB of
    # version documents here: the 22 KiB of base64 once per later event).
    assert checkpoints[0] == 1
    assert versions + checkpoints[1] < 3 * logged, (versions, checkpoints, logged)
    cp = state.sessions["s1"].checkpoint
    assert cp is not None and cp.seq == 4 and len(cp.data) == ev.MAX_CHECKPOINT_BYTES
    async with await ProjectionDB.open(path, readonly=True) as db, db.reading():  # the past still has it, whole
        for seq in (3, 4, 5, 60, len(history)):
            then = LedgerState()
            then.apply_all(history[:seq])  # type: ignore[arg-type]
            assert await db.session_states(as_of=seq) == [then.sessions["s1"]], seq
            assert then.sessions["s1"].checkpoint == (cp if seq >= 4 else None)


async def test_an_agent_of_another_pool_may_not_own_nor_checkpoint_a_session(ledger: Writer, uid: str):
    from ledger.errors import LedgerError

    sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
    stranger = Agent(ledger, agent_id=f"{uid}-q1", pool="q", heartbeat=0.1, ttl=5.0, capacity=4)
    async with stranger:
        with pytest.raises(LedgerError):
            await stranger.claim(sid)
            await stranger.checkpoint(sid, b"progress=999999")
    state, _ = await ledger.session(sid)
    assert state is not None and state.checkpoint is None


def test_a_checkpoint_under_the_old_token_after_a_failover_never_reaches_a_later_owner():
    """The old owner writes under its token after the reclaimer gave the session on (a race the SDK's
    compare-and-set refuses; a raw append lands): flagged, and the owner after next resumes from the last
    checkpoint written under a current claim."""
    from ledger import lifecycle as lc
    from ledger.codec import Recorded
    from ledger.subjects import LEDGER_STREAM
    from projections.state import LedgerState

    cli, reclaimer = ev.Producer(id="cli", instance="c"), ev.Producer(id="reclaimer", instance="r")
    producers = {a: ev.Producer(id=a, instance=f"{a}-i") for a in ("a1", "a2", "a3")}
    state = LedgerState()
    seq = 0

    flagged: dict[int, str] = {}

    def add(e: ev.Event) -> int:
        nonlocal seq
        seq += 1
        change = state.apply(Recorded(LEDGER_STREAM, seq, codec.subject_of(e), 1_000_000_000 * seq, e))
        assert change is not None
        if change.anomaly is not None:
            flagged[seq] = change.anomaly.kind
        return seq

    for a, p in producers.items():
        add(ev.AgentRegistered(producer=p, agent_id=a, instance_id=p.instance, pool="p"))
    add(ev.SessionCreated(producer=cli, session_id="s1", pool="p"))
    first = add(ev.SessionClaimed(producer=producers["a1"], session_id="s1", agent_id="a1", instance_id="a1-i",
                                  incarnation=1))
    good = add(ev.SessionCheckpointed(producer=producers["a1"], session_id="s1", agent_id="a1", incarnation=1,
                                      token=first, data=b"progress=1"))
    add(ev.SessionOrphaned(producer=reclaimer, session_id="s1", reason="owner_dead", previous_token=first))
    second = add(ev.SessionClaimed(producer=reclaimer, session_id="s1", agent_id="a2", instance_id="a2-i",
                                   incarnation=2, reason="failover"))
    late = add(ev.SessionCheckpointed(producer=producers["a1"], session_id="s1", agent_id="a1", incarnation=1,
                                      token=first, data=b"progress=999"))
    add(ev.SessionOrphaned(producer=reclaimer, session_id="s1", reason="owner_dead", previous_token=second))
    add(ev.SessionClaimed(producer=reclaimer, session_id="s1", agent_id="a3", instance_id="a3-i", incarnation=3,
                          reason="failover"))
    now = state.sessions["s1"]
    assert now.owner == "a3" and now.checkpoint is not None
    assert (now.checkpoint.seq, now.checkpoint.data, now.checkpoint.agent_id) == (good, b"progress=1", "a1")
    assert flagged == {late: lc.STALE_TOKEN}
