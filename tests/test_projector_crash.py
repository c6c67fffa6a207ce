"""kill -9 of a real `ledger project` process mid catch-up: restarted, it ends in exactly the rebuild's state."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import sys
from pathlib import Path

from projection_helpers import dump, until

from ledger import events as ev
from ledger.settings import Settings
from ledger.store import EventStore
from ledger.subjects import DLQ_STREAM, HEARTBEAT_STREAM, LEDGER_STREAM
from ledgerctl.server import EmbeddedServer
from projections.rebuild import rebuild
from projections.settings import ProjectionSettings

CLI = ev.Producer(id="cli", instance="t")
GARBAGE_EVERY = 997


async def publish_fleet(store: EventStore, n: int) -> int:
    """`n` lifecycle events (and a beat per ten), pipelined; returns how many are not events."""
    rng = random.Random(4)
    incarnation: dict[str, int] = {}
    for i in range(20):
        agent = f"a{i}"
        incarnation[agent] = await store.append(ev.AgentRegistered(
            producer=ev.Producer(id=agent, instance="i"), agent_id=agent, instance_id="i", pool=f"p{i % 3}"))
    owner: dict[str, tuple[str, int] | None] = {}
    seq = await store.last_seq(LEDGER_STREAM)
    garbage = 0
    for i in range(n):
        sid = f"s{rng.randrange(500)}"
        if sid not in owner:
            event: ev.Event = ev.SessionCreated(producer=CLI, session_id=sid, pool=f"p{rng.randrange(3)}")
            owner[sid] = None
        elif owner[sid] is None:
            agent = f"a{rng.randrange(20)}"
            event = ev.SessionClaimed(producer=ev.Producer(id=agent, instance="i"), session_id=sid, agent_id=agent,
                                      instance_id="i", incarnation=incarnation[agent])
            owner[sid] = (agent, seq + 1)
        else:
            agent, token = owner[sid]  # type: ignore[misc]
            event = ev.SessionReleased(producer=ev.Producer(id=agent, instance="i"), session_id=sid, agent_id=agent,
                                       incarnation=incarnation[agent], token=token)
            owner[sid] = None
        await store.submit(event)
        seq += 1
        if i % 10 == 0:
            agent = f"a{rng.randrange(20)}"
            await store.submit(ev.AgentHeartbeat(producer=ev.Producer(id=agent, instance="i"), agent_id=agent,
                                                 instance_id="i", incarnation=incarnation[agent], beat=i))
        if i % GARBAGE_EVERY == 0:
            await store.flush()  # keep the predicted sequences exact around a raw publish
            await store.nc.jetstream().publish(f"ledger.session.{sid}.created.cli", b"\xff not an event")
            seq += 1
            garbage += 1
    await store.flush()
    return garbage


def checkpoint(db: Path, stream: str = LEDGER_STREAM) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            row = conn.execute("SELECT seq FROM checkpoints WHERE stream = ?", (stream,)).fetchone()
    except sqlite3.OperationalError:  # the file is being created
        return 0
    return row[0] if row else 0


async def start_projector(url: str, db: Path) -> asyncio.subprocess.Process:
    # Small batches and little room ahead of the writer: many commits, so a kill lands between them.
    env = {**os.environ, "LEDGER_PROJECTION_BATCH": "500", "LEDGER_PROJECTION_COMMIT_EVERY": "1500",
           "LEDGER_PROJECTION_MAX_PENDING": "2000", "LEDGER_PROJECTION_SNAPSHOT_EVERY": "4000"}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ledgerctl", "project", "--db", str(db), "--nats-url", url, "--quiet",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def test_a_projector_killed_mid_catch_up_ends_in_the_rebuilds_state(fresh_server: EmbeddedServer,
                                                                          tmp_path: Path):
    db = tmp_path / "projection.sqlite3"
    async with EventStore.connect(Settings(nats_url=fresh_server.url), ensure=True) as store:
        garbage = await publish_fleet(store, 30_000)
        last = {s: await store.last_seq(s) for s in (LEDGER_STREAM, HEARTBEAT_STREAM)}

        killed_at = []
        for fraction in (0.2, 0.55):  # two kill -9s, each after some commits and before the end
            proc = await start_projector(fresh_server.url, db)
            target = int(last[LEDGER_STREAM] * fraction)

            async def progressed(target: int = target, proc: asyncio.subprocess.Process = proc) -> bool:
                return checkpoint(db) >= target or proc.returncode is not None

            await until(progressed, timeout=60, what=f"the projector to pass #{target}")
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            killed_at.append(checkpoint(db))
            assert killed_at[-1] < last[LEDGER_STREAM], "killed too late to prove anything"

        proc = await start_projector(fresh_server.url, db)

        async def caught_up() -> bool:
            assert proc.returncode is None, (await proc.stderr.read()).decode()  # type: ignore[union-attr]
            return checkpoint(db) == last[LEDGER_STREAM] and checkpoint(db, HEARTBEAT_STREAM) == last[HEARTBEAT_STREAM]

        await until(caught_up, timeout=60, what="the restarted projector to catch up")
        proc.send_signal(signal.SIGTERM)  # Ctrl-C's twin: a clean stop
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()

        await rebuild(store, ProjectionSettings(db=str(tmp_path / "rebuilt.sqlite3")))
        dead_letters = (await store.nc.jsm().stream_info(DLQ_STREAM)).state.messages

    assert killed_at[0] < killed_at[1] < last[LEDGER_STREAM]
    assert dump(db) == dump(tmp_path / "rebuilt.sqlite3")
    assert dump(db)["dead_letters"][0][2] == garbage
    assert dead_letters == garbage  # re-published after each kill, yet one dead letter per message
