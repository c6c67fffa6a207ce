"""A beating fleet against one `ledger up`: false verdicts, projector lag, CPU and RSS per process.

    python bench/scale.py                                   # 1k, 5k, 10k, 20k agents, 5 s beats, 60 s each
    python bench/scale.py --agents 20000 --seconds 120 --procs 2
    python bench/scale.py --agents 50 --seconds 3 --interval 1   # a smoke run

For each fleet size N, a fresh `ledger up` (its own embedded nats-server, fsync
always, projector, liveness monitor, reclaimer, watchdog; no HTTP) and N
agents in --procs load-generator processes. Each agent is a real
`ledger.agent.Agent`: it registers as `Agent.__aenter__` does
(`registration.first()`), then its own heartbeat loop (`Lease.run`, the loop
`Agent` runs, which renews the lease, fences on a lost one and registers
again) beats every --interval seconds through the SDK's `EventStore.submit`.
What the generator leaves out is the agent's watch (one ordered consumer on
every session and registration per agent: 20,000 of them in one process
would measure the generator, not the ledger); agents of one process share
--connections connections (as the processes of a real fleet would not).
Beats are spread evenly over the interval.

While the fleet beats (every agent beat, so any verdict is false):
* verdicts: AgentSuspected / AgentDeclaredDead / AgentFenced in the log, and
  the projection's agent table by status at the end (what `ledger agents`
  shows);
* projector lag, sampled each second: LEDGER_HB's last sequence minus the
  projection's committed LEDGER_HB sequence (messages), and now minus the
  stored time of that committed message (seconds);
* CPU (share of one core) and RSS of `ledger up`, its nats-server, and each
  generator process, from /proc.

Baseline (--baseline-seconds, 0 skips it): the same beat rate, the same
encoded heartbeat bytes, published raw (minimal pipelined publish, reply
inbox, one ack subscription) by one process to a bare embedded nats-server
with the ledger streams and nothing else: what beating costs the generator
and the server without the SDK and without the stack.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
from common import Meter, env, ledger_up, pct, projection_checkpoint
from nats.aio.msg import Msg

from ledger import codec, subjects
from ledger import events as ev
from ledger.agent import Agent
from ledger.settings import Settings
from ledger.store import EventStore
from ledger.writer import Writer
from ledgerctl.server import EmbeddedServer, ServerConfig, free_port

POOL = "scale"
VERDICTS = ("suspected", "declared_dead", "fenced")
REGISTER_CHUNK = 500
"""Registrations in flight at once while the fleet starts."""


# --- the load generator (a process of its own) -------------------------------------------------


async def worker(url: str, first: int, count: int, interval: float, ttl: float, seconds: float,
                 connections: int) -> None:
    settings = Settings(nats_url=url).for_lease(ttl)
    writers: list[Writer] = []
    stores = []
    for c in range(connections):
        cm = EventStore.connect(settings, name=f"scale-gen-{first}-{c}")
        store = await cm.__aenter__()
        stores.append((cm, store))
        writers.append(Writer(store, ev.Producer(id="scale", instance=f"gen{first}-{c}")))
    agents = [Agent(writers[i % connections], agent_id=f"scale-{first + i}", pool=POOL, capacity=1,
                    heartbeat=interval, ttl=ttl) for i in range(count)]

    async def beat(agent: Agent, offset: float) -> None:
        await asyncio.sleep(offset)  # spread the fleet's beats evenly over the interval
        await agent.lease.run()

    # Each agent starts beating as soon as it is registered (as `Agent.__aenter__` does), so a large fleet's
    # first registrations do not go silent while the rest register.
    beating = []
    for i in range(0, count, REGISTER_CHUNK):
        chunk = agents[i:i + REGISTER_CHUNK]
        await asyncio.gather(*(a.registration.first() for a in chunk))
        beating += [asyncio.create_task(beat(a, interval * (i + j) / count)) for j, a in enumerate(chunk)]
    first_incarnation = [a.incarnation for a in agents]
    # The measured window starts now: what was sent while the fleet registered does not count.
    sent_before = sum(a.stats.beats_sent for a in agents)
    acked_before = sum(a.stats.beats_acked for a in agents)
    print(json.dumps({"registered": count}), flush=True)
    await asyncio.sleep(seconds)
    stats = {
        "beats_sent": sum(a.stats.beats_sent for a in agents) - sent_before,
        "beats_acked": sum(a.stats.beats_acked for a in agents) - acked_before,
        "fenced_now": sum(1 for a in agents if a.fenced is not None),
        "re_registered": sum(1 for a, first in zip(agents, first_incarnation, strict=True) if a.incarnation != first),
        "ack_p99_ms": 1000 * pct([x for a in agents for x in a.stats.ack_latencies] or [0.0], 99),
    }
    print(json.dumps({"stats": stats}), flush=True)
    # Beating on until the coordinator has read the verdicts and the projection (a line on stdin).
    await asyncio.wait_for(asyncio.to_thread(sys.stdin.readline), 600)
    # Stop as a fleet that goes home does: no more beats, then a goodbye each.
    for a in agents:
        a._closing = True
    for t in beating:
        t.cancel()
    await asyncio.gather(*beating, return_exceptions=True)
    for i in range(0, count, REGISTER_CHUNK):
        await asyncio.gather(*(a.goodbye("bench over") for a in agents[i:i + REGISTER_CHUNK]))
    for cm, _ in stores:
        await cm.__aexit__(None, None, None)
    print(json.dumps({"done": True}), flush=True)


# --- the raw baseline ------------------------------------------------------------------------


def heartbeat_bytes(n: int, interval: float) -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        agent = f"raw-{i}"
        out.append(codec.encode(ev.AgentHeartbeat(
            producer=ev.Producer(id=agent, instance="raw"), agent_id=agent, instance_id="raw", incarnation=1,
            beat=1, load=0, capacity=1, sessions=())))
    return [(o.subject, o.payload) for o in out]


async def raw_worker(url: str, count: int, interval: float, seconds: float) -> None:
    """The same beats, raw: one publish per agent per interval, paced in 20 ms slices, acks counted."""
    nc = await nats.connect(url, name="scale-raw")
    messages = heartbeat_bytes(count, interval)
    window = asyncio.Semaphore(4096)
    acked = 0

    async def on_ack(_msg: Msg) -> None:
        nonlocal acked
        acked += 1
        window.release()

    prefix = nc.new_inbox() + "."
    await nc.subscribe(prefix + "*", cb=on_ack)
    print(json.dumps({"registered": count}), flush=True)
    rate = count / interval
    started = time.monotonic()
    sent = 0
    while (now := time.monotonic()) - started < seconds:
        due = int((now - started) * rate)
        while sent < due:
            subject, payload = messages[sent % count]
            await window.acquire()
            await nc.publish(subject, payload, reply=f"{prefix}{sent}")
            sent += 1
        await asyncio.sleep(0.02)
    await nc.flush()
    print(json.dumps({"stats": {"beats_sent": sent, "beats_acked": acked}}), flush=True)
    await asyncio.wait_for(asyncio.to_thread(sys.stdin.readline), 600)
    await nc.close()
    print(json.dumps({"done": True}), flush=True)


# --- the coordinator -------------------------------------------------------------------------


class Generator:
    """One load-generator process, speaking JSON lines."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.meter = Meter("generator", proc.pid)
        self.stats: dict[str, Any] = {}

    @classmethod
    async def start(cls, *argv: str) -> Generator:
        proc = await asyncio.create_subprocess_exec(sys.executable, str(Path(__file__).resolve()), *argv,
                                                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                                    env=env())
        return cls(proc)

    def release(self) -> None:
        """Let the generator's agents stop beating and say goodbye."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"stop\n")

    async def expect(self, key: str, within: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + within
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(), max(0.1, deadline - time.monotonic()))
            if not line:
                raise SystemExit(f"a load generator ended (exit {await self.proc.wait()}) before saying {key!r}")
            try:
                message: dict[str, Any] = json.loads(line)
            except json.JSONDecodeError:
                continue
            if key in message:
                return message


async def verdict_counts(js: Any) -> dict[str, int]:
    counts = {}
    for verb in VERDICTS:
        info = await js.stream_info(subjects.LEDGER_STREAM, subjects_filter=subjects.type_filter("agent", verb))
        counts[verb] = sum((info.state.subjects or {}).values())
    return counts


async def projection_behind(js: Any, db: Path) -> int:
    """Messages of both streams the projection has not committed yet."""
    ends = {stream: (await js.stream_info(stream)).state.last_seq
            for stream in (subjects.LEDGER_STREAM, subjects.HEARTBEAT_STREAM)}
    return sum(max(0, end - projection_checkpoint(db, stream)) for stream, end in ends.items())


async def sample_lag(js: Any, db: Path) -> tuple[int, float]:
    """(messages, seconds) the projection is behind LEDGER_HB."""
    info = await js.stream_info(subjects.HEARTBEAT_STREAM)
    last = info.state.last_seq
    checkpoint, stored_ns = 0, 0
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        row = con.execute("SELECT seq, stored_ns FROM checkpoints WHERE stream = ?",
                          (subjects.HEARTBEAT_STREAM,)).fetchone()
        con.close()
        if row:
            checkpoint, stored_ns = int(row[0]), int(row[1])
    except sqlite3.Error:
        checkpoint = projection_checkpoint(db, subjects.HEARTBEAT_STREAM)
    behind = max(0, last - checkpoint)
    seconds = max(0.0, (time.time_ns() - stored_ns) / 1e9) if behind and stored_ns else 0.0
    return behind, seconds


def agents_by_status(db: Path) -> dict[str, int]:
    import sqlite3

    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return dict(con.execute("SELECT status, count(*) FROM agents WHERE pool = ? GROUP BY status", (POOL,)))
    finally:
        con.close()


def split(n: int, parts: int) -> list[tuple[int, int]]:
    size = math.ceil(n / parts)
    return [(i, min(size, n - i)) for i in range(0, n, size)]


async def fleet_run(n: int, args: argparse.Namespace) -> None:
    procs = args.procs or max(1, math.ceil(n / 10_000))
    with tempfile.TemporaryDirectory(prefix="ledger-scale-") as tmp:
        async with ledger_up(Path(tmp)) as up:
            meters = [Meter("ledger up", up.proc.pid), Meter("nats-server", up.server_pid)]
            nc = await nats.connect(up.url, name="scale-observer")
            js = nc.jetstream()
            try:
                started = time.monotonic()
                gens = [await Generator.start("worker", "--url", up.url, "--first", str(first), "--count",
                                              str(count), "--interval", str(args.interval), "--ttl", str(args.ttl),
                                              "--seconds", str(args.seconds), "--connections", str(args.connections))
                        for first, count in split(n, procs)]
                for g in gens:
                    await g.expect("registered", 60 + n / 200)
                print(f"  {n:,} agents registered in {time.monotonic() - started:.1f} s "
                      f"({procs} generator process(es), {args.connections} connection(s) each)", flush=True)
                for m in meters:
                    m.read()
                for g in gens:
                    g.meter.read()
                    g.meter.samples.clear()
                for m in meters:
                    m.samples.clear()
                lags: list[tuple[int, float]] = []
                end = time.monotonic() + args.seconds
                while time.monotonic() < end:
                    await asyncio.sleep(1.0)
                    for m in [*meters, *(g.meter for g in gens)]:
                        m.read()
                    lags.append(await sample_lag(js, up.db))
                for g in gens:
                    g.stats = (await g.expect("stats", 60 + n / 100))["stats"]
                verdicts = await verdict_counts(js)
                status = agents_by_status(up.db)
                for g in gens:
                    g.release()
                for g in gens:
                    await g.expect("done", 60 + n / 100)
                    await g.proc.wait()
                idle = await idle_run(js, meters, args.idle_seconds, up.db) if args.idle_seconds > 0 else None
            finally:
                await nc.close()
    sent = sum(g.stats["beats_sent"] for g in gens)
    acked = sum(g.stats["beats_acked"] for g in gens)
    fenced = sum(g.stats["fenced_now"] for g in gens)
    again = sum(g.stats["re_registered"] for g in gens)
    msgs = [m for m, _ in lags] or [0]
    secs = [s for _, s in lags] or [0.0]
    false_verdicts = sum(verdicts.values())
    print(f"figure   {n:>6,} agents x {args.interval:g} s for {args.seconds:g} s: {sent / args.seconds:8,.0f} beats/s "
          f"sent, {acked:,} of {sent:,} acknowledged by the end ({acked / args.seconds:,.0f}/s), ack p99 "
          f"{max(g.stats['ack_p99_ms'] for g in gens):.0f} ms")
    if sent - acked > sent / args.seconds:  # more than a second's beats unacknowledged at the end
        print(f"WARNING  {sent - acked:,} beats were unacknowledged at the end of the window (more than a second's "
              "worth): the server is behind, and the figures below are those of a saturated server")
    print(f"figure   false verdicts: suspected {verdicts['suspected']:,}  declared dead {verdicts['declared_dead']:,}  "
          f"fenced {verdicts['fenced']:,}  (generator: {fenced:,} fenced at the end, {again:,} registered again)   "
          f"{'ok' if false_verdicts == 0 and fenced == 0 else 'FALSE VERDICTS'} (goal: 0)")
    print("figure   `ledger agents` by status at the end: "
          + ", ".join(f"{k} {v:,}" for k, v in sorted(status.items())))
    print(f"figure   projector lag behind LEDGER_HB: p50 {pct(msgs, 50):,} msgs / {pct(secs, 50):.2f} s   "
          f"p99 {pct(msgs, 99):,} msgs / {pct(secs, 99):.2f} s   max {max(msgs):,} msgs / {max(secs):.2f} s "
          f"(goal < 1 s)")
    for m in meters:
        print(f"figure   {m.summary()}")
    for i, g in enumerate(gens):
        g.meter.name = f"generator {i + 1}"
        print(f"figure   {g.meter.summary()}")
    total = sum(sum(s for s, _ in m.samples) / max(1, len(m.samples)) for m in meters)
    print(f"figure   ledger up + nats-server: {100 * total:.1f} % of a core (goal: under one core)", flush=True)
    if idle is not None:
        print(f"figure   idle after the fleet said goodbye ({n:,} agents came and went; {args.idle_seconds:g} s "
              f"with no event): ledger up {100 * idle[0]:.1f} %, nats-server {100 * idle[1]:.1f} % of a core "
              "(goal ~0 %)", flush=True)
    if args.baseline_seconds > 0:
        await baseline_run(n, args, sent / args.seconds, meters, gens)


async def idle_run(js: Any, meters: list[Meter], seconds: float, db: Path) -> tuple[float, float]:
    """CPU share of `ledger up` and its nats-server over `seconds` in which nothing is written.

    Measured once the log is quiet (the goodbyes and the verdicts they lead to are in, and no message arrived in
    the last second) and the projection has caught up with it: a projector still working through a backlog is
    not idle. The goal (issue 13): ~0 % when nothing changes, however many agents came and went.
    """
    last = -1
    for _ in range(60):  # at most a minute for the goodbyes' consequences to settle
        now = sum([(await js.stream_info(stream)).state.last_seq
                   for stream in (subjects.LEDGER_STREAM, subjects.HEARTBEAT_STREAM)])
        if now == last:
            break
        last = now
        await asyncio.sleep(1.0)
    give_up = time.monotonic() + 600
    while (behind := await projection_behind(js, db)) and time.monotonic() < give_up:
        print(f"  waiting for the projection to catch up before the idle window: {behind:,} messages behind",
              flush=True)
        await asyncio.sleep(5.0)
    if behind:
        print(f"WARNING  the projection is still {behind:,} messages behind: the idle figure includes catch-up",
              flush=True)
    for m in meters:
        m.read()
    await asyncio.sleep(seconds)
    up, server = (m.read()[0] for m in meters)
    after = sum([(await js.stream_info(stream)).state.last_seq
                 for stream in (subjects.LEDGER_STREAM, subjects.HEARTBEAT_STREAM)])
    if after != last:
        print(f"WARNING  {after - last:,} messages were written during the idle window: not idle", flush=True)
    return up, server


async def baseline_run(n: int, args: argparse.Namespace, sdk_rate: float, meters: list[Meter],
                       gens: list[Generator]) -> None:
    with tempfile.TemporaryDirectory(prefix="ledger-scale-raw-") as tmp:
        cfg = ServerConfig(data_dir=Path(tmp), port=free_port(), sync_always=True)
        with EmbeddedServer(cfg) as server:
            async with EventStore.connect(Settings(nats_url=server.url), ensure=True):
                pass
            assert server.pid is not None
            server_meter = Meter("nats-server", server.pid)
            g = await Generator.start("raw-worker", "--url", server.url, "--count", str(n), "--interval",
                                      str(args.interval), "--seconds", str(args.baseline_seconds))
            await g.expect("registered", 60)
            server_meter.read()
            g.meter.read()
            server_meter.samples.clear()
            g.meter.samples.clear()
            end = time.monotonic() + args.baseline_seconds
            while time.monotonic() < end:
                await asyncio.sleep(1.0)
                server_meter.read()
                g.meter.read()
            stats = (await g.expect("stats", 60))["stats"]
            g.release()
            await g.expect("done", 60)
            await g.proc.wait()

    def mean(m: Meter) -> float:
        return sum(s for s, _ in m.samples) / max(1, len(m.samples))

    raw_rate = stats["beats_sent"] / args.baseline_seconds
    gen_sdk = sum(mean(x.meter) for x in gens)
    print(f"baseline raw beats, same rate, bare nats-server (fsync always), {args.baseline_seconds:g} s: "
          f"{raw_rate:,.0f} beats/s, {stats['beats_acked']:,} of {stats['beats_sent']:,} acknowledged by the end "
          f"({stats['beats_acked'] / args.baseline_seconds:,.0f}/s)")
    if stats["beats_sent"] - stats["beats_acked"] > raw_rate:
        print("WARNING  the bare server did not keep up with the raw beats either (more than a second's worth "
              "unacknowledged at the end)")
    print(f"baseline {server_meter.summary()}")
    g.meter.name = "raw generator"
    print(f"baseline {g.meter.summary()}")
    print(f"ratio    generator CPU per beat, SDK / raw: "
          f"{(gen_sdk / max(sdk_rate, 1e-9)) / max(mean(g.meter) / max(raw_rate, 1e-9), 1e-9):.2f}   "
          f"nats-server CPU under ledger up / bare: {mean(meters[1]) / max(mean(server_meter), 1e-9):.2f}   "
          f"ledger up CPU per beat: {1e6 * mean(meters[0]) / max(sdk_rate, 1e-9):.0f} us", flush=True)


async def coordinate(args: argparse.Namespace) -> None:
    for n in args.agents:
        print(f"--- {n:,} agents, beat every {args.interval:g} s (ttl {args.ttl:g} s), {args.seconds:g} s", flush=True)
        await fleet_run(n, args)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("worker", "raw-worker"):
        p = argparse.ArgumentParser()
        p.add_argument("--url", required=True)
        p.add_argument("--first", type=int, default=0)
        p.add_argument("--count", type=int, required=True)
        p.add_argument("--interval", type=float, required=True)
        p.add_argument("--ttl", type=float, default=30.0)
        p.add_argument("--seconds", type=float, required=True)
        p.add_argument("--connections", type=int, default=4)
        a = p.parse_args(sys.argv[2:])
        if sys.argv[1] == "worker":
            asyncio.run(worker(a.url, a.first, a.count, a.interval, a.ttl, a.seconds, a.connections))
        else:
            asyncio.run(raw_worker(a.url, a.count, a.interval, a.seconds))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[1000, 5000, 10_000, 20_000])
    parser.add_argument("--interval", type=float, default=5.0, help="heartbeat interval, seconds (default 5)")
    parser.add_argument("--ttl", type=float, default=30.0, help="agent ttl, seconds (default 30)")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long each fleet beats (default 60)")
    parser.add_argument("--procs", type=int, default=0, help="load-generator processes (default: one per 10k)")
    parser.add_argument("--connections", type=int, default=4, help="NATS connections per generator (default 4)")
    parser.add_argument("--idle-seconds", type=float, default=20.0,
                        help="seconds of CPU measured with nothing written once the fleet said goodbye (default 20; "
                             "0: none)")
    parser.add_argument("--baseline-seconds", type=float, default=15.0,
                        help="seconds of the raw baseline after each fleet (default 15; 0: none)")
    args = parser.parse_args()
    random.seed(7)
    asyncio.run(coordinate(args))


if __name__ == "__main__":
    main()
