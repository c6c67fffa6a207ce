"""Hostile tests of issue 11's one-fold stack: kill -9, a listener that raises, a projection file that fails.

`ledger up` folds the log once: one follower, whose listeners are the projector and the consumers. These
tests attack that sharing - a kill between commits, a listener's failure, an SQLite writer that cannot
write - and check that the file still equals a rebuild and that a failure is seen, not a silent stall.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import cast

import fleet
import msgspec
import pytest
from conftest import RunningNats
from helpers import authorized, eventually
from nats.aio.msg import Msg
from projection_helpers import dump, until
from test_projector_crash import checkpoint, publish_fleet
from test_stack_fold import create_sessions, up_settings

from consumers.follow import Item
from consumers.liveness_rules import LivenessSettings
from consumers.monitor import LivenessMonitor
from ledger import events as ev
from ledger import lifecycle as lc
from ledger.agent import Agent
from ledger.check import HEARTBEATS, LEDGER, Report, check
from ledger.codec import Recorded
from ledger.errors import LedgerError
from ledger.settings import Settings
from ledger.store import EventStore
from ledger.subjects import DLQ_STREAM, HEARTBEAT_STREAM, LEDGER_STREAM
from ledger.writer import Writer
from ledgerctl.cli.check import read_raw
from ledgerctl.server import EmbeddedServer
from ledgerctl.stack import running_stack
from projections.projector import Projector
from projections.rebuild import rebuild
from projections.settings import ProjectionSettings
from projections.state import Change

HERE = Path(__file__).parent


async def start_up(url: str, tmp_path: Path, db: Path, *args: str, **env: str) -> asyncio.subprocess.Process:
    """A real `ledger up` on an existing server; small projection batches so that a kill lands between commits."""
    full = {**os.environ, "LEDGER_PROJECTION_BATCH": "200", "LEDGER_PROJECTION_COMMIT_EVERY": "400",
            "LEDGER_PROJECTION_MAX_PENDING": "2000", "LEDGER_PROJECTION_SNAPSHOT_EVERY": "4000", **env}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ledgerctl", "up", "--nats-url", url, "--db", str(db), "--data-dir", str(tmp_path), *args,
        env=full, cwd=HERE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def ready(proc: asyncio.subprocess.Process, timeout: float = 60.0) -> None:
    """Wait for `ledger up` to say it is ready (its signal handlers are set by then)."""
    assert proc.stdout is not None

    async def read() -> None:
        while b"ready" not in (line := await proc.stdout.readline()):  # type: ignore[union-attr]
            assert line, f"ledger up ended: {(await proc.stderr.read()).decode()}"  # type: ignore[union-attr]

    await asyncio.wait_for(read(), timeout)


async def finish_standalone(store: EventStore, db: Path) -> None:
    """Bring the file to the log's end with a projector of its own (it resumes from the file's checkpoints)."""
    projector = Projector(store, ProjectionSettings(db=str(db)))
    await projector.open()
    try:
        await projector.catch_up()
    finally:
        await projector.close()


async def test_kill_9_of_up_mid_catch_up_leaves_a_file_that_resumes_into_the_rebuilds_state(
        fresh_server: EmbeddedServer, tmp_path: Path):
    """The projector fed by the stack's follower commits rows and checkpoints together, like the standalone one.

    Two kill -9s of `ledger up` while it catches up (its consumers acting on the same state meanwhile), a
    clean restart and stop: a projector then resuming from the file ends where a rebuild does, and every
    unreadable message was dead-lettered exactly once however often it was re-read.
    """
    db = tmp_path / "projection.sqlite3"
    async with EventStore.connect(Settings(nats_url=fresh_server.url), ensure=True) as store:
        garbage = await publish_fleet(store, 30_000)
        last = await store.last_seq(LEDGER_STREAM)
        killed_at = []
        for fraction in (0.25, 0.6):
            proc = await start_up(fresh_server.url, tmp_path, db)
            target = int(last * fraction)

            async def progressed(target: int = target, proc: asyncio.subprocess.Process = proc) -> bool:
                return checkpoint(db) >= target or proc.returncode is not None

            await until(progressed, timeout=90, what=f"ledger up's projector to pass #{target}")
            assert proc.returncode is None, (await proc.stderr.read()).decode()  # type: ignore[union-attr]
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            killed_at.append(checkpoint(db))
            assert killed_at[-1] < last, "killed too late to prove anything"

        proc = await start_up(fresh_server.url, tmp_path, db)

        async def caught_up() -> bool:
            assert proc.returncode is None, (await proc.stderr.read()).decode()  # type: ignore[union-attr]
            return checkpoint(db) >= last and checkpoint(db, HEARTBEAT_STREAM) >= await store.last_seq(HEARTBEAT_STREAM)

        await until(caught_up, timeout=90, what="the restarted ledger up to catch up")
        await ready(proc)
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()

        await finish_standalone(store, db)  # what the consumers wrote after the last commit, if anything
        await rebuild(store, ProjectionSettings(db=str(tmp_path / "rebuilt.sqlite3")))
        dead_letters = (await store.nc.jsm().stream_info(DLQ_STREAM)).state.messages

    assert killed_at[0] < killed_at[1] < last
    assert dump(db) == dump(tmp_path / "rebuilt.sqlite3")
    assert dead_letters == garbage  # one dead letter per unreadable message, through two kills


class Poisoned(Exception):
    """A listener's bug."""


def raising_on(session_id: str):  # type: ignore[no-untyped-def]
    """A listener (the demo's narrator, say) with a bug: it raises when it hears `session_id` change."""
    def listener(stream: str, items: list[Item], changes: list[Change]) -> None:
        for item in items:
            if changes and isinstance(item, Recorded) and getattr(item.event, "session_id", None) == session_id:
                raise Poisoned(f"heard {session_id} at #{item.seq}")
    return listener


async def test_a_listener_that_raises_stops_the_stack_visibly_and_the_file_still_holds_what_was_applied(
        server: EmbeddedServer, tmp_path: Path):
    s = up_settings(server, tmp_path)
    raised: list[BaseException] = []
    try:
        async with running_stack(s, lambda line: None, listeners=[raising_on("poison")]) as stack:
            await create_sessions(stack, ["s1", "s2", "poison", "s3"])
            await asyncio.wait_for(stack.run_until(asyncio.Event()), 30)  # the follower's failure ends the stack
    except* Poisoned as group:
        raised.append(group)
    assert raised, "the listener's failure did not surface"
    poisoned = checkpoint(s.db_path)
    assert poisoned >= 3, "the batch the projector heard before the failing listener was not committed"

    # Restarted without the bug: it resumes from the file, and the file ends as a rebuild does.
    async with running_stack(s, lambda line: None) as stack:
        last = await create_sessions(stack, ["s4"])
        await stack.projector.wait_for(last)
        assert {"s1", "s2", "poison", "s3", "s4"} <= set(stack.follower.state.sessions)
    async with EventStore.connect(Settings(nats_url=server.url)) as store:
        await finish_standalone(store, s.db_path)
        await rebuild(store, ProjectionSettings(db=str(tmp_path / "rebuilt.sqlite3")))
    assert dump(s.db_path) == dump(tmp_path / "rebuilt.sqlite3")


async def test_up_whose_projection_file_cannot_be_written_exits_with_one_line(server: EmbeddedServer, tmp_path: Path):
    """Another process holds the file's write lock: the projector's commit fails. That must end `ledger up` with
    one `Error:` line and a non-zero code - not leave the consumers running on a projection that stalled."""
    db = tmp_path / "projection.sqlite3"
    proc = await start_up(server.url, tmp_path, db)
    try:
        async with EventStore.connect(Settings(nats_url=server.url)) as store:
            seq = await store.append(ev.SessionCreated(producer=ev.Producer(id="operator-t", instance="i"),
                                                       session_id="before", pool="gpu"))

            async def committed() -> bool:
                assert proc.returncode is None, (await proc.stderr.read()).decode()  # type: ignore[union-attr]
                return checkpoint(db) >= seq

            await until(committed, timeout=60, what="ledger up to commit the first session")
            holder = sqlite3.connect(db, timeout=0, isolation_level=None)
            try:
                holder.execute("BEGIN EXCLUSIVE")  # a writer elsewhere that never lets go
                await store.append(ev.SessionCreated(producer=ev.Producer(id="operator-t", instance="i"),
                                                     session_id="after", pool="gpu"))
                _, err = await asyncio.wait_for(proc.communicate(), 90)
            finally:
                holder.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert proc.returncode not in (0, None)
    assert any(line.startswith("Error:") and "SQLite" in line for line in lines), lines
    assert not any("Traceback" in line for line in lines), lines


async def raw_check(store: EventStore) -> Report:
    """`ledger check`'s rules over the whole log as the server stores it."""
    messages = [m for stream in (LEDGER, HEARTBEATS) for m in await read_raw(store, stream)]
    return check(messages)


@pytest.mark.parametrize("moment", [".declared_dead.", ".claimed."])
async def test_up_killed_right_after_a_death_or_claim_resumes_without_a_doubly_owned_or_stranded_session(
        server: EmbeddedServer, tmp_path: Path, moment: str):
    """kill -9 of `ledger up` the moment its monitor's death (or the reclaimer's first failover claim) is stored:
    the file (and so the resumed state) is behind the log, the reclaimer's in-flight claims are forgotten.
    Restarted, every session of the dead agent goes to the survivor once - no second owner, no claim loop - and
    `ledger check` finds the log clean."""
    db = tmp_path / "projection.sqlite3"
    sessions = [f"s{i}" for i in range(1, 7)]
    async with fleet.ledger_on(server.url) as ledger:
        async with fleet.agents(server.url, "gpu", ["a1", "a2"], self_claim=False) as procs:
            up = await start_up(server.url, tmp_path, db, "--grace", "0")
            try:
                for sid in sessions:
                    await ledger.create_session("gpu", session_id=sid)

                async def owners() -> dict[str, str | None]:
                    return {sid: (await ledger.session(sid))[0].owner for sid in sessions}  # type: ignore[union-attr]

                async def all_owned() -> bool:
                    assert up.returncode is None, (await up.stderr.read()).decode()  # type: ignore[union-attr]
                    return None not in (await owners()).values()

                await until(all_owned, timeout=60, what="every session claimed")
                victim = next(o for o in (await owners()).values() if o is not None)
                survivor = "a2" if victim == "a1" else "a1"
                killed = asyncio.Event()

                async def on_death(msg: Msg) -> None:
                    if moment in msg.subject and not killed.is_set():
                        up.send_signal(signal.SIGKILL)  # the moment it is stored: the death not yet committed
                        killed.set()

                procs[victim].kill9()  # (a claim from here on is a failover)
                watching = await ledger.store.nc.subscribe("ledger.>", cb=on_death)
                await asyncio.wait_for(killed.wait(), 60)
                await watching.unsubscribe()
                await up.wait()
                up = await start_up(server.url, tmp_path, db, "--grace", "0")

                async def all_with_survivor() -> bool:
                    assert up.returncode is None, (await up.stderr.read()).decode()  # type: ignore[union-attr]
                    return set((await owners()).values()) == {survivor}

                await until(all_with_survivor, timeout=60, what=f"every session with {survivor}")
                await ready(up)
                up.send_signal(signal.SIGTERM)
                _, err = await asyncio.wait_for(up.communicate(), 60)
                assert up.returncode == 0, err.decode()
            finally:
                if up.returncode is None:
                    up.kill()
                    await up.wait()
        claims = {sid: sum(isinstance(e, ev.SessionClaimed) for e in await fleet.events(ledger.store, "session", sid))
                  for sid in sessions}
        report = await raw_check(ledger.store)
    assert report.clean, report.violations
    assert all(n <= 2 for n in claims.values()), claims  # the first claim, and at most one failover each


def test_up_on_a_projection_file_that_is_not_a_database_is_one_line(server: EmbeddedServer, tmp_path: Path):
    """A torn or overwritten file: `ledger up` stops at once with one line (no traceback, no stall)."""
    db = tmp_path / "projection.sqlite3"
    db.write_bytes(b"\x00garbage, not SQLite" * 512)
    command = [sys.executable, "-m", "ledgerctl", "up", "--nats-url", server.url, "--db", str(db),
               "--data-dir", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=HERE, check=False)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"Error: {db}"), lines


async def test_a_slow_projection_writer_never_holds_back_the_consumers(server: EmbeddedServer, tmp_path: Path):
    """The follower never waits for the file: while another process holds the file's write lock, the reclaimer
    still claims a new session for a live agent; once the lock goes, the file catches up with that claim."""
    s = up_settings(server, tmp_path, liveness=LivenessSettings(grace=0))
    async with fleet.agents(server.url, "gpu", ["a1"], self_claim=False), \
            running_stack(s, lambda line: None) as stack:
        ledger = Writer(stack.store, ev.Producer(id="operator-test", instance="i"))
        await stack.projector.wait_for(await stack.store.last_seq(LEDGER_STREAM))
        holder = sqlite3.connect(s.db_path, timeout=0, isolation_level=None)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            _, created = await ledger.create_session("gpu", session_id="slow")

            async def claimed() -> int:
                state, seq = await ledger.session("slow")
                return seq if state is not None and state.owner == "a1" else 0

            claim = await eventually(claimed, timeout=4, what="the claim while the file is locked")
            assert checkpoint(s.db_path) < claim  # the file had not seen it: the claim came from the follower
        finally:
            holder.close()
        await stack.projector.wait_for(claim, timeout=30)
        assert all(not t.done() for t in stack.running)


HOSTILE_PAYLOADS = [
    ("ledger.session.h1.created.operator-x", b""),
    ("ledger.session.h2.created.operator-x", b"\xff\xfe not json"),
    ("ledger.session.h3.created.operator-x", b"{}"),
    ("ledger.agent.a1.declared_dead.monitor", b"[" * 5000 + b"]" * 5000),
    ("ledger.session.h4.claimed.a1", b'{"type": "agent.declared_dead", "agent_id": "a1"}'),
    ("ledger.pool.gpu.breaker_tripped.monitor", b'{"type": "pool.breaker_tripped", "pool": 7}'),
]


async def test_unreadable_lifecycle_items_in_the_shared_follower_are_dead_lettered_once_and_crash_nobody(
        server: EmbeddedServer, tmp_path: Path):
    """Hostile bytes on lifecycle subjects reach every listener of the one follower (projector, monitor,
    reclaimer, watchdog): each is one dead letter, through two restarts, and no piece stops."""
    s = up_settings(server, tmp_path, liveness=LivenessSettings(grace=0))
    for _ in range(2):
        async with running_stack(s, lambda line: None) as stack:
            if not await stack.store.last_seq(LEDGER_STREAM):
                for subject, data in HOSTILE_PAYLOADS:
                    await stack.store.nc.jetstream().publish(subject, data)
            last = await create_sessions(stack, [f"after-{await stack.store.last_seq(LEDGER_STREAM)}"])
            await stack.projector.wait_for(last)
            assert stack.follower.state.ledger.dead_letters and all(not t.done() for t in stack.running)
    async with EventStore.connect(Settings(nats_url=server.url)) as store:
        dead_letters = (await store.nc.jsm().stream_info(DLQ_STREAM)).state.messages
    assert dead_letters == len(HOSTILE_PAYLOADS)
    assert sum(stack.follower.state.ledger.dead_letters.values()) == len(HOSTILE_PAYLOADS)


async def test_a_frozen_server_stops_no_piece_of_the_stack_and_the_one_follower_goes_on_after(
        server: EmbeddedServer, tmp_path: Path):
    """SIGSTOP of the server under a running stack, long enough for the follower's pull to miss its idle
    heartbeats (it starts over) and for requests to time out: on SIGCONT the same follower, projector and
    consumers go on - nothing ended, what is written after is folded once and committed."""
    assert server.pid is not None
    s = up_settings(server, tmp_path)
    async with running_stack(s, lambda line: None) as stack, \
            EventStore.connect(Settings(nats_url=server.url, request_timeout=1.0)) as probe:
        before = await create_sessions(stack, ["before-freeze"])
        await stack.projector.wait_for(before)
        failed: list[str] = []

        async def probe_times_out() -> bool:
            try:
                await probe.stream_facts(LEDGER_STREAM)
            except LedgerError as e:
                failed.append(type(e).__name__)
            return len(failed) >= 4  # about 4 s frozen: two idle heartbeats of the follower's pull missed

        os.kill(server.pid, signal.SIGSTOP)
        try:
            await eventually(probe_times_out, timeout=60, interval=0.1, what="requests timing out while frozen")
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert all(not t.done() for t in stack.running), [t for t in stack.running if t.done()]
        after = await create_sessions(stack, ["after-freeze"])
        await stack.projector.wait_for(after, timeout=60)
        assert "after-freeze" in stack.follower.state.sessions
        assert all(not t.done() for t in stack.running), [t for t in stack.running if t.done()]
        assert stack.projector.events == after  # each item folded and noted once, through the freeze


async def suspicions(store: EventStore, agent_id: str) -> list[int]:
    """The incarnations of `agent_id` the log says were suspected."""
    return [e.incarnation for e in await fleet.events(store, "agent", agent_id) if isinstance(e, ev.AgentSuspected)]


async def suspected(store: EventStore, agent_id: str) -> bool:
    return bool(await suspicions(store, agent_id))


async def test_reports_about_an_earlier_incarnation_recalled_after_a_restart_do_not_suspect_the_current_one(
        server: EmbeddedServer, tmp_path: Path):
    """Failure reports that name no incarnation count against the one registered when they were stored.

    Live, three such reports about incarnation 1 suspect it, and a new incarnation 2 starts with none. After a
    restart of `ledger up` within the report window, the recall tells the monitor those reports again - on a
    state that already holds incarnation 2: they must still not count against it.
    """
    s = up_settings(server, tmp_path, liveness=LivenessSettings(grace=0))
    async with Writer.connect(Settings(nats_url=server.url), producer_id="operator-test") as ledger:
        async with running_stack(s, lambda line: None) as stack:
            async with Agent(ledger, agent_id="a1", pool="gpu", heartbeat=0.2, ttl=30) as first:
                for reporter in ("operator-r1", "operator-r2", "operator-r3"):
                    await Writer(ledger.store, ev.Producer(id=reporter, instance="i")).report_unreachable("a1")
                await eventually(lambda: suspected(ledger.store, "a1"), what="incarnation 1 suspected on reports")
        async with Agent(ledger, agent_id="a1", pool="gpu", heartbeat=0.2, ttl=30) as second:
            async with running_stack(s, lambda line: None) as stack:
                monitor = cast(LivenessMonitor, stack.consumers.parts["monitor"])
                await eventually(lambda: stack.follower.state.agents["a1"].incarnation == second.incarnation,
                                 what="the stack seeing incarnation 2")
                await monitor.check(stack.follower.clock.now(ev.utcnow))  # live: the old reports are not about it
                assert await suspicions(ledger.store, "a1") == [first.incarnation]
                await stack.projector.wait_for(await ledger.store.last_seq(LEDGER_STREAM))

            async with running_stack(s, lambda line: None) as stack:  # restarted: the file holds incarnation 2
                monitor = cast(LivenessMonitor, stack.consumers.parts["monitor"])
                assert stack.follower.state.agents["a1"].incarnation == second.incarnation
                await stack.follower.caught_up.wait()  # the recall is told before it
                await stack.follower.heartbeats_caught_up.wait()
                await monitor.check(stack.follower.clock.now(ev.utcnow))
                assert await suspicions(ledger.store, "a1") == [first.incarnation]


async def records_agree_with_the_log(agent: Agent, ledger: Writer, sessions: list[str]) -> bool:
    """The agent's one record per session says exactly what the log says this incarnation owns, with its token;
    its views (owned, activity) name the same sessions, and no record is left of a session it lost."""
    in_log = {}
    for sid in sessions:
        state, _ = await ledger.session(sid)
        if lc.owns(state, agent.agent_id, agent.incarnation):
            assert state is not None
            in_log[sid] = state.token
    held = {sid: claim.token for sid, claim in agent.owned.items()}
    return held == in_log and set(agent.activity()) == set(held) and not any(
        "record" in agent.sessions.traces(sid) for sid in sessions if sid not in held)


async def test_forged_take_over_terminate_and_fence_during_a_drain_leave_no_record_out_of_step(
        nats_server: RunningNats, uid: str):
    """Without auth anyone may publish as anyone. While a1 drains (no reclaimer hands its sessions off), a forged
    take-over, a terminate and finally a fence of a1 land: after each, a1's records are what the log says."""
    async with Writer.connect(Settings(nats_url=nats_server.url), producer_id="operator-test") as ledger:
        sessions = [f"{uid}-s{i}" for i in range(3)]
        async with Agent(ledger, agent_id=f"{uid}-a1", pool=uid, capacity=5, heartbeat=0.2, ttl=30) as a1, \
                Agent(ledger, agent_id=f"{uid}-a2", pool=uid, capacity=5, heartbeat=0.2, ttl=30) as a2:
            for sid in sessions:
                await ledger.create_session(uid, session_id=sid)
                await a1.claim(sid)
            await a1.drain(deadline=3600, reason="hostile test")
            await eventually(lambda: records_agree_with_the_log(a1, ledger, sessions), what="records before")

            forger = Writer(ledger.store, ev.Producer(id="reclaimer-mallory", instance="m"))
            token = a1.owned[sessions[0]].token
            await forger.claim_session(sessions[0], a2.ref, reason="drain", previous_token=token)
            await eventually(lambda: sessions[0] not in a1.owned and sessions[0] in a2.owned, what="s0 taken over")
            await eventually(lambda: records_agree_with_the_log(a1, ledger, sessions), what="records after take-over")

            operator = Writer(ledger.store, ev.Producer(id="operator-mallory", instance="m"))
            await operator.terminate_session(sessions[1], reason="forged")
            await eventually(lambda: sessions[1] not in a1.owned, what="s1 terminated")
            await eventually(lambda: records_agree_with_the_log(a1, ledger, sessions), what="records after terminate")

            fenced = a1.incarnation
            await ledger.store.append(ev.AgentFenced(
                producer=ev.Producer(id=a1.agent_id, instance="mallory"), agent_id=a1.agent_id, incarnation=fenced,
                reason="forged fence", fenced_at=ev.utcnow(), ttl=30))
            await eventually(lambda: a1.incarnation > fenced or (a1.fenced is not None and not a1.owned),
                             what="a1 acting on the fence")
            await eventually(lambda: records_agree_with_the_log(a1, ledger, sessions), what="records after fence")
            assert sessions[2] not in a1.owned


async def test_a_client_that_deletes_the_followers_consumers_stops_nothing(server: EmbeddedServer, tmp_path: Path):
    """Without auth any client may call the JetStream API: deleting the one follower's consumers (both streams)
    must make it start over where it was, not end the stack or lose an item."""
    s = up_settings(server, tmp_path)
    async with running_stack(s, lambda line: None) as stack:
        first = await create_sessions(stack, ["before-delete"])
        await stack.projector.wait_for(first)
        jsm = stack.store.nc.jsm()
        deleted = 0
        for stream in (LEDGER_STREAM, HEARTBEAT_STREAM):
            for info in await jsm.consumers_info(stream):
                await jsm.delete_consumer(stream, info.name)
                deleted += 1
        assert deleted >= 2
        after = await create_sessions(stack, ["after-delete"])
        await stack.projector.wait_for(after, timeout=60)
        assert "after-delete" in stack.follower.state.sessions
        assert all(not t.done() for t in stack.running), [t for t in stack.running if t.done()]
        assert stack.projector.events == after  # nothing folded twice or skipped


def deaths_by_pool(monitor: LivenessMonitor) -> dict[str, list[str]]:
    """The monitor's memory of recent deaths (what its pool breakers judge), agent ids by pool."""
    return {pool: [agent for agent, _ in deaths] for pool, deaths in monitor._deaths.items() if deaths}


async def test_a_death_recalled_after_a_restart_counts_towards_the_pool_it_happened_in(
        server: EmbeddedServer, tmp_path: Path):
    s = up_settings(server, tmp_path, liveness=LivenessSettings(grace=0))
    async with Writer.connect(Settings(nats_url=server.url), producer_id="operator-test") as ledger:
        async with running_stack(s, lambda line: None) as stack:
            live = cast(LivenessMonitor, stack.consumers.parts["monitor"])
            async with Agent(ledger, agent_id="a1", pool="pool-a", heartbeat=0.2, ttl=30) as first:
                death = authorized(ev.AgentDeclaredDead(
                    producer=ev.Producer(id="monitor", instance="x"), agent_id="a1", incarnation=first.incarnation,
                    reason="missed_heartbeats", evidence=ev.Evidence(dead_after=30.0)))
                await ledger.store.append(death)
                await eventually(lambda: deaths_by_pool(live).get("pool-a"), what="the death heard live")
            async with Agent(ledger, agent_id="a1", pool="pool-b", heartbeat=0.2, ttl=30) as second:
                await eventually(lambda: stack.follower.state.agents["a1"].incarnation == second.incarnation,
                                 what="a1 registered again, in pool-b")
                await stack.projector.wait_for(await ledger.store.last_seq(LEDGER_STREAM))
                heard_live = deaths_by_pool(live)
        assert heard_live == {"pool-a": ["a1"]}

        async with running_stack(s, lambda line: None) as stack:  # restarted within the breaker window
            await stack.follower.caught_up.wait()  # the recall is told before it
            assert deaths_by_pool(cast(LivenessMonitor, stack.consumers.parts["monitor"])) == heard_live


async def test_a_recalled_death_whose_registration_was_not_recalled_is_filed_under_the_pool_it_registered_in(
        store: EventStore, uid: str):
    """The recall tells only what was stored within its window: a death of an incarnation registered before it,
    heard with a state that holds a later registration in another pool, is filed (before the next check judges
    any breaker) under the pool its own registration names, read from the log. A death naming no registration
    of its agent (every fold flags it) counts towards no pool."""
    from consumers.follow import Follower

    a1 = f"{uid}-a1"

    def registration(pool: str) -> ev.AgentRegistered:
        return ev.AgentRegistered(producer=ev.Producer(id=a1, instance="i"), agent_id=a1, instance_id=f"i-{pool}",
                                  pool=pool, ttl=30)

    first = await store.append(registration(f"{uid}-pool-a"))
    death = ev.AgentDeclaredDead(producer=ev.Producer(id="monitor", instance="m"), agent_id=a1, incarnation=first,
                                 reason="missed_heartbeats")
    died = await store.append(death)
    second = await store.append(registration(f"{uid}-pool-b"))
    forged = await store.append(msgspec.structs.replace(death, incarnation=second + 1000, event_id=f"{uid}-x"))
    items = {r.seq: r for r in await store.history("agent", a1) if isinstance(r, Recorded)}
    follower = Follower(store, heartbeats=False)
    follower.state.apply_all([items[first], items[died], items[second]])  # the state the restart resumes from
    monitor = LivenessMonitor(Writer(store, ev.Producer(id="monitor", instance="m")), follower)
    monitor._heard(LEDGER_STREAM, [items[died], items[forged]], [])  # recalled: no registration of its time
    assert deaths_by_pool(monitor) == {}  # not under pool-b, where a1 is registered now
    await monitor.check(ev.utcnow())
    assert deaths_by_pool(monitor) == {f"{uid}-pool-a": [a1]}
