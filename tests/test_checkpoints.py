"""Checkpoints: an owner records its progress on a session, and the session's next owner receives it with its claim
(after a kill and a failover, a drain, a take-over). Real nats-server; the fold's rules as pure functions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import msgspec
import pytest
from fleet import agents, consumers, ledger_on
from helpers import authorized, eventually

from ledger import codec
from ledger import events as ev
from ledger import lifecycle as lc
from ledger.agent import Agent, Claim
from ledger.codec import Recorded
from ledger.errors import InvalidInput, NotFound, StaleToken
from ledger.ids import new_id
from ledger.settings import Settings
from ledger.subjects import LEDGER_STREAM
from ledger.writer import Writer
from ledgerctl.agent_process import PROGRESS, progress_of
from ledgerctl.server import EmbeddedServer
from projections import rows

HEARTBEAT, TTL = 0.2, 1.5


def agent_of(ledger: Writer, agent_id: str, **kw: object) -> Agent:
    # ttl 5 s: these tests spawn `ledger` subprocesses, and on a loaded 2-core machine a 2 s ttl fenced the agent
    # mid-test once (its claim then belonged to the fenced incarnation). No test here waits for a death.
    options = {"pool": "p", "heartbeat": 0.1, "ttl": 5.0, "capacity": 4, **kw}
    return Agent(ledger, agent_id=agent_id, **options)  # type: ignore[arg-type]


async def records(ledger: Writer, sid: str) -> list[Recorded]:
    return [r for r in await ledger.store.history("session", sid) if isinstance(r, Recorded)]


# --- the fold -----------------------------------------------------------------------------------------------


def _history() -> tuple[list[Recorded], dict[str, int]]:
    """s1: created, claimed by a1, checkpointed, released, claimed by a2, orphaned, claimed by a1, terminated."""
    cli = ev.Producer(id="cli", instance="c")
    a1, a2 = ev.Producer(id="a1", instance="i1"), ev.Producer(id="a2", instance="i2")
    reclaimer = ev.Producer(id="reclaimer", instance="r")
    out: list[Recorded] = []
    seqs: dict[str, int] = {}

    def add(name: str, e: ev.Event) -> None:
        seq = len(out) + 1
        seqs[name] = seq
        out.append(Recorded(LEDGER_STREAM, seq, codec.subject_of(e), 1_000_000_000 * seq, e))

    add("created", ev.SessionCreated(producer=cli, session_id="s1", pool="p"))
    add("claim1", ev.SessionClaimed(producer=a1, session_id="s1", agent_id="a1", instance_id="i1", incarnation=1))
    add("ckpt", ev.SessionCheckpointed(producer=a1, session_id="s1", agent_id="a1", incarnation=1,
                                       token=seqs["claim1"], data=b"progress=3", note="three"))
    add("released", ev.SessionReleased(producer=a1, session_id="s1", agent_id="a1", incarnation=1,
                                       token=seqs["claim1"]))
    add("claim2", ev.SessionClaimed(producer=a2, session_id="s1", agent_id="a2", instance_id="i2", incarnation=1))
    add("orphaned", ev.SessionOrphaned(producer=reclaimer, session_id="s1", reason="owner_dead",
                                       previous_token=seqs["claim2"]))
    add("claim3", ev.SessionClaimed(producer=reclaimer, session_id="s1", agent_id="a1", instance_id="i1",
                                    incarnation=1, reason="failover"))
    add("terminated", ev.SessionTerminated(producer=cli, session_id="s1", reason="done"))
    return out, seqs


def test_the_fold_keeps_the_checkpoint_across_release_orphan_and_claims_and_drops_it_at_terminate():
    history, seqs = _history()
    state: lc.SessionState | None = None
    kept: dict[int, lc.Checkpoint | None] = {}
    for rec in history:
        state, anomaly = lc.evolve_session(state, rec)
        assert anomaly is None, (rec.event.type_tag(), anomaly)
        assert state is not None
        kept[rec.seq] = state.checkpoint
    assert kept[seqs["claim1"]] is None
    written = kept[seqs["ckpt"]]
    assert written == lc.Checkpoint(data=b"progress=3", seq=seqs["ckpt"], agent_id="a1", token=seqs["claim1"],
                                    at=history[seqs["ckpt"] - 1].stored_at, note="three")
    for name in ("released", "claim2", "orphaned", "claim3"):
        assert kept[seqs[name]] == written, name
    assert kept[seqs["terminated"]] is None
    # The projection's row document and its snapshot carry it unchanged.
    mid = lc.fold(lc.evolve_session, history[:seqs["claim3"]])[0]
    assert mid is not None and rows.session_of(msgspec.json.encode(mid).decode()) == mid


@pytest.mark.parametrize("who", ["non-owner", "foreign producer", "old token", "after terminate"])
def test_a_checkpoint_by_anyone_but_the_current_owner_is_flagged_and_changes_nothing(who: str):
    history, seqs = _history()
    a2 = ev.Producer(id="a2", instance="i2")
    upto = {"non-owner": "ckpt", "foreign producer": "ckpt", "old token": "claim3", "after terminate": "terminated"}
    base = history[:seqs[upto[who]]]
    forged = {
        "non-owner": ev.SessionCheckpointed(producer=a2, session_id="s1", agent_id="a2", incarnation=1,
                                            token=seqs["claim1"], data=b"forged"),
        "foreign producer": ev.SessionCheckpointed(producer=a2, session_id="s1", agent_id="a1", incarnation=1,
                                                   token=seqs["claim1"], data=b"forged"),
        "old token": ev.SessionCheckpointed(producer=ev.Producer(id="a1", instance="i1"), session_id="s1",
                                            agent_id="a1", incarnation=1, token=seqs["claim1"], data=b"forged"),
        "after terminate": ev.SessionCheckpointed(producer=ev.Producer(id="a1", instance="i1"), session_id="s1",
                                                  agent_id="a1", incarnation=1, token=seqs["claim3"],
                                                  data=b"forged"),
    }[who]
    before, _ = lc.fold(lc.evolve_session, base)
    rec = Recorded(LEDGER_STREAM, len(base) + 1, codec.subject_of(forged), 10**12, forged)
    after, anomaly = lc.evolve_session(before, rec)
    assert anomaly is not None and after is before
    expected = {"non-owner": lc.STALE_TOKEN, "foreign producer": lc.UNAUTHORIZED_PRODUCER,
                "old token": lc.STALE_TOKEN, "after terminate": lc.AFTER_FINAL}[who]
    assert anomaly.kind == expected


def test_the_codec_refuses_an_oversize_checkpoint_and_takes_the_largest_allowed():
    event = ev.SessionCheckpointed(producer=ev.Producer(id="a1", instance="i"), session_id="s1", agent_id="a1",
                                   incarnation=1, token=2, data=b"\xff" * ev.MAX_CHECKPOINT_BYTES)
    out = codec.encode(event)
    assert len(out.payload) < codec.MAX_EVENT_BYTES and codec.decode(out.payload, out.subject) == event
    with pytest.raises(InvalidInput):
        codec.encode(msgspec.structs.replace(event, data=b"\xff" * (ev.MAX_CHECKPOINT_BYTES + 1)))


# --- the agent SDK on a real server -----------------------------------------------------------------------


async def test_an_oversize_or_non_bytes_checkpoint_is_refused_before_the_append(ledger: Writer, uid: str):
    sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
    async with agent_of(ledger, f"{uid}-a1") as a1:
        await a1.claim(sid)
        _, last = await ledger.session(sid)
        with pytest.raises(InvalidInput, match=f"larger than the {ev.MAX_CHECKPOINT_BYTES} bytes"):
            await a1.checkpoint(sid, b"x" * (ev.MAX_CHECKPOINT_BYTES + 1))
        with pytest.raises(InvalidInput, match="must be bytes"):
            await a1.checkpoint(sid, "progress=1")  # type: ignore[arg-type]
        assert (await ledger.session(sid))[1] == last  # nothing was appended
        seq = await a1.checkpoint(sid, b"x" * ev.MAX_CHECKPOINT_BYTES)
        state, _ = await ledger.session(sid)
        assert state is not None and state.checkpoint is not None
        assert (state.checkpoint.seq, len(state.checkpoint.data)) == (seq, ev.MAX_CHECKPOINT_BYTES)


async def test_a_take_over_hands_the_checkpoint_to_the_next_owner_and_the_old_owner_is_refused(
        ledger: Writer, uid: str):
    sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
    gained: list[tuple[Claim, str]] = []
    async with agent_of(ledger, f"{uid}-a1") as a1, \
            agent_of(ledger, f"{uid}-a2", on_gained=lambda claim, by: gained.append((claim, by))) as a2:
        first = await a1.claim(sid)
        assert first.checkpoint is None
        await a1.checkpoint(sid, b"progress=1")
        last = await a1.checkpoint(sid, b"progress=2", note="two done")
        await a1.drain(deadline=600, reason="upgrade")  # its owner may now be replaced
        reclaimer = Writer(ledger.store, ev.Producer(id="reclaimer-test", instance=new_id()))
        token = await reclaimer.claim_session(sid, a2.ref, reason="drain", previous_token=first.token)
        await eventually(lambda: sid in a2.owned, what="a2 gaining the session")
        [(claim, by)] = gained
        assert by == "reclaimer-test" and claim.token == token and claim.checkpoint is not None
        assert (claim.checkpoint.data, claim.checkpoint.seq, claim.checkpoint.agent_id, claim.checkpoint.note) == (
            b"progress=2", last, a1.agent_id, "two done")
        assert a2.owned[sid] == claim
        # The stale owner, under the claim it held, is refused like any of its owner writes.
        with pytest.raises(StaleToken):
            await a1.checkpoint(sid, b"progress=3", token=first.token)
        await eventually(lambda: sid not in a1.owned, what="a1 dropping the session")
        with pytest.raises(NotFound):
            await a1.checkpoint(sid, b"progress=3")
        state, _ = await ledger.session(sid)
        assert state is not None and state.checkpoint == claim.checkpoint  # nothing of a1's landed
        await a2.checkpoint(sid, b"progress=3")
        # Forged checkpoints on a2's session, appended raw past the SDK: by a1 with its own credentials under a2's
        # token, and by a2's producer naming a1 as the writer. The fold flags both and keeps a2's.
        for forged in (authorized(ev.SessionCheckpointed(producer=a2.producer, session_id=sid, agent_id=a1.agent_id,
                                                         incarnation=a1.incarnation, token=token, data=b"forged")),
                       ev.SessionCheckpointed(producer=a2.producer, session_id=sid, agent_id=a1.agent_id,
                                              incarnation=a1.incarnation, token=token, data=b"forged")):
            await ledger.store.append(forged)
        state, anomalies = lc.fold(lc.evolve_session, await records(ledger, sid))
        assert state is not None and state.checkpoint is not None and state.checkpoint.data == b"progress=3"
        assert [a.kind for _, a in anomalies][-2:] == [lc.STALE_TOKEN, lc.UNAUTHORIZED_PRODUCER]
        # A terminate ends it: no checkpoint survives, and none can be written.
        await a2.terminate(sid, reason="done")
        state, _ = await ledger.session(sid)
        assert state is not None and state.checkpoint is None
        with pytest.raises(NotFound):
            await a2.checkpoint(sid, b"progress=4")


async def test_a_drain_hands_the_checkpoint_on_through_the_reclaimer(server: EmbeddedServer):
    gained: list[Claim] = []
    async with ledger_on(server.url) as ledger:
        async with Agent(ledger, agent_id="a", pool="gpu", capacity=2, heartbeat=HEARTBEAT, ttl=TTL) as a, \
                Agent(ledger, agent_id="b", pool="gpu", capacity=2, heartbeat=HEARTBEAT, ttl=TTL,
                      on_gained=lambda claim, by: gained.append(claim)) as b:
            sid, _ = await ledger.create_session("gpu", session_id="s1")
            await a.claim(sid)
            seq = await a.checkpoint(sid, b"\x00\x01 binary progress")
            async with consumers(server.url, watchdog=False, monitor=False):
                await a.drain(deadline=600, reason="upgrade")
                await eventually(lambda: sid in b.owned, timeout=20, what="the hand-off of s1 to b")
            [claim] = gained
            assert claim.reason == "drain" and claim.checkpoint is not None
            assert (claim.checkpoint.data, claim.checkpoint.seq, claim.checkpoint.agent_id) == (
                b"\x00\x01 binary progress", seq, "a")


async def test_the_reference_agent_resumes_from_the_checkpoint_of_a_killed_owner(server: EmbeddedServer):
    async with ledger_on(server.url) as ledger, agents(server.url, "gpu", ["a1"], heartbeat=HEARTBEAT, ttl=TTL,
                                                        checkpoint_every=0.05) as victims:
        sid, _ = await ledger.create_session("gpu", session_id="s1")
        await victims["a1"].says("claimed s1")

        async def progressed() -> lc.SessionState | None:
            state, _ = await ledger.session(sid)
            return state if state is not None and (progress_of(state.checkpoint) or 0) >= 3 else None

        await eventually(progressed, timeout=20, what="a1 checkpointing its progress on s1")
        victims["a1"].kill9()
        at_kill, _ = await ledger.session(sid)
        assert at_kill is not None and at_kill.checkpoint is not None and at_kill.checkpoint.agent_id == "a1"
        done = progress_of(at_kill.checkpoint)
        async with agents(server.url, "gpu", ["a2"], heartbeat=HEARTBEAT, ttl=TTL, self_claim=False,
                          checkpoint_every=0.05) as heirs, consumers(server.url, watchdog=False):
            line = await heirs["a2"].says("resuming s1 from checkpoint", timeout=30)
            assert f"resuming s1 from checkpoint {done} (#{at_kill.checkpoint.seq}, written by a1)" in line

            async def went_on() -> bool:
                state, _ = await ledger.session(sid)
                return (state is not None and state.checkpoint is not None and state.checkpoint.agent_id == "a2"
                        and progress_of(state.checkpoint) == (done or 0) + 1)

            await eventually(went_on, timeout=20, what="a2 going on from a1's count")
        history = [r.event for r in await records(ledger, sid)]
        a2_first = next(e for e in history if isinstance(e, ev.SessionCheckpointed) and e.agent_id == "a2")
        assert a2_first.data == PROGRESS + str((done or 0) + 1).encode()


# --- `ledger session show` --------------------------------------------------------------------------------


def ledger_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LEDGER_NATS_URL": settings.nats_url}
    return subprocess.run([sys.executable, "-m", "ledgerctl", *args], capture_output=True, text=True, timeout=60,
                          env=env, check=False)


async def test_session_show_prints_the_checkpoint_as_text_or_base64_and_json_has_it(
        settings: Settings, ledger: Writer, uid: str):
    sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
    async with agent_of(ledger, f"{uid}-a1") as a1:
        await a1.claim(sid)
        seq = await a1.checkpoint(sid, b"progress=7\nstep two", note="seven")
        shown = ledger_cli(settings, "session", "show", sid)
        assert shown.returncode == 0, shown.stderr
        assert f"checkpoint: #{seq} by {a1.agent_id}" in shown.stdout and "19 bytes: seven" in shown.stdout
        assert "| progress=7" in shown.stdout and "| step two" in shown.stdout
        doc = json.loads(ledger_cli(settings, "session", "show", sid, "--json").stdout)
        assert doc["checkpoint"] == {**doc["checkpoint"], "seq": seq, "size": 19, "encoding": "utf-8",
                                     "data": "progress=7\nstep two", "note": "seven", "agent_id": a1.agent_id}
        hostile = b"\x1b[2J\x1b]0;owned\x07\xff"  # terminal escapes, and not UTF-8
        seq = await a1.checkpoint(sid, hostile)
        shown = ledger_cli(settings, "session", "show", sid)
        assert shown.returncode == 0 and "\x1b" not in shown.stdout
        assert f"#{seq} by {a1.agent_id}" in shown.stdout and f"{len(hostile)} bytes (base64)" in shown.stdout
        doc = json.loads(ledger_cli(settings, "session", "show", sid, "--json").stdout)
        assert (doc["checkpoint"]["encoding"], doc["checkpoint"]["size"]) == ("base64", len(hostile))
        import base64

        assert base64.b64decode(doc["checkpoint"]["data"]) == hostile
        assert base64.b64decode(doc["state"]["checkpoint"]["data"]) == hostile


async def test_session_show_in_the_past_and_the_history_show_which_checkpoint_was_current(
        settings: Settings, ledger: Writer, uid: str):
    sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
    async with agent_of(ledger, f"{uid}-a1") as a1:
        await a1.claim(sid)
        first = await a1.checkpoint(sid, b"progress=1")
        second = await a1.checkpoint(sid, b"progress=22")
    then = json.loads(ledger_cli(settings, "session", "show", sid, "--at-seq", str(first), "--json").stdout)
    assert (then["checkpoint"]["seq"], then["checkpoint"]["data"], then["last_seq"]) == (first, "progress=1", first)
    now = json.loads(ledger_cli(settings, "session", "show", sid, "--json").stdout)
    assert (now["checkpoint"]["seq"], now["checkpoint"]["data"]) == (second, "progress=22")
    both = ledger_cli(settings, "session", "show", sid, "--at-seq", "1", "--as-of", "now")
    assert both.returncode != 0 and "not both" in both.stderr and "Traceback" not in both.stderr
    history = ledger_cli(settings, "history", "session", sid, "--db", "/nonexistent/x.db")
    assert history.returncode == 0, history.stderr
    assert f"checkpoint: None -> #{first} (10 bytes)" in history.stdout
    assert f"checkpoint: #{first} (10 bytes) -> #{second} (11 bytes)" in history.stdout
