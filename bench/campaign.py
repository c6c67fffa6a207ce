"""A fault campaign under steady load, checked after every fault; prints the campaign's table.

    python bench/campaign.py                     # 3-node cluster, 3 rounds of faults, then a single fsync node
    python bench/campaign.py --rounds 10 --freeze 20

The fleet: `ledger agent` processes that beat and claim, `ledger consumers` (monitor, reclaimer, watchdog),
`ledger project`, and a writer in this process that creates sessions and routes, walks routes through their
states and terminates old sessions, recording every acknowledged (sequence, event id).

Faults, each at a random point of the load: kill -9 of the LEDGER stream leader and its restart; SIGSTOP of
the leader for --freeze seconds, then SIGCONT; kill -9 of the projector and of the consumers, restarted; on a
single node with fsync (sync_interval: always), kill -9 of the server and its restart.

After each fault (once the fleet has settled, bounded): every acknowledged append is in the log with its
event id; the rules of `ledger check` find nothing; the projection, at its checkpoint, equals a rebuild to the
same checkpoint (every table but the snapshot cache); every agent's current incarnation is alive and beating
(none fenced for good). tests/test_campaign.py runs a short version of the same campaign in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import nats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ledger import (
    decide,
    subjects,
)
from ledger import events as ev
from ledger import lifecycle as lc
from ledger.check import DEFAULT_GRACE, RawMessage, Report, Violation, check, fold
from ledger.errors import LedgerError, NotClaimable
from ledger.settings import Settings
from ledger.store import EventStore
from ledger.writer import Writer
from ledgerctl.cli.check import read_raw
from ledgerctl.server import EmbeddedCluster, EmbeddedServer, ServerConfig, free_port
from projections.projector import Projector
from projections.schema import TABLES
from projections.settings import ProjectionSettings

POOL = "campaign"
NOT_COMPARED = {"snapshots"}
"""A cache of the fold, taken wherever batches happened to end."""
SETTLE = 45.0
"""Seconds the fleet gets after a fault to be whole again (every agent alive and beating, the projection
caught up) before the verification records what is still wrong."""


class FaultResult(msgspec.Struct, kw_only=True):
    fault: str
    detail: str = ""
    acks_checked: int = 0
    missing: list[tuple[int, str]] = []
    """Acknowledged (seq, event id) not in the log at that sequence."""
    violations: list[Violation] = []
    projection_equal: bool = False
    differing_tables: list[str] = []
    unsettled_agents: list[str] = []
    """Agents whose current incarnation is not alive and beating (fenced, dead, gone or silent) after SETTLE."""
    lost_owner_sessions: list[str] = []
    """Sessions still assigned to a superseded, dead, gone or fenced owner after SETTLE."""
    seconds: float = 0.0
    servers_whole: bool = True
    """The servers were whole again (one leader per stream that every node names, every replica current)."""
    happened: dict[str, int] = {}
    """What the fleet wrote since the previous verification: fences, deaths, re-registrations, claims."""

    @property
    def ok(self) -> bool:
        return not (self.missing or self.violations or self.unsettled_agents or self.lost_owner_sessions) \
            and self.projection_equal and self.servers_whole


# --- processes ------------------------------------------------------------------------------------------------


class Child:
    """A `ledger ...` subprocess with its output in a file (a pipe nobody reads would block it)."""

    def __init__(self, name: str, args: list[str], workdir: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.args, self.workdir, self.env = name, args, workdir, env
        self.log = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        with open(self.log, "ab") as out:
            out.write(f"--- start {self.starts}\n".encode())
            out.flush()
            self.proc = subprocess.Popen([sys.executable, "-m", "ledgerctl", *self.args], stdout=out,
                                         stderr=subprocess.STDOUT, env={**os.environ, **(self.env or {})})

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill9()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 5) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


class Fleet:
    def __init__(self, url: str, workdir: Path, *, agents: int = 3, heartbeat: float = 0.5, ttl: float = 4.0,
                 capacity: int = 20, grace: float = 1.0) -> None:
        self.url, self.workdir = url, workdir
        self.heartbeat, self.ttl = heartbeat, ttl
        self.db = workdir / "projection.sqlite3"
        self.agents = {f"a{i + 1}": Child(f"a{i + 1}", [
            "agent", "--agent-id", f"a{i + 1}", "--pool", POOL, "--capacity", str(capacity), "--heartbeat",
            str(heartbeat), "--ttl", str(ttl), "--nats-url", url], workdir) for i in range(agents)}
        self.consumers = Child("consumers", ["consumers", "--grace", str(grace), "--nats-url", url], workdir)
        self.projector = Child("projector", ["project", "--db", str(self.db), "--nats-url", url, "--quiet"], workdir,
                               env={"LEDGER_PROJECTION_BATCH": "200", "LEDGER_PROJECTION_COMMIT_EVERY": "400"})

    @property
    def children(self) -> list[Child]:
        return [*self.agents.values(), self.consumers, self.projector]

    def start(self) -> None:
        for child in self.children:
            child.start()

    def stop(self) -> None:
        for child in self.children:
            child.stop()


# --- the writer -----------------------------------------------------------------------------------------------


class LoadWriter:
    """Steady operator load; every acknowledged append is recorded as (seq, event id)."""

    def __init__(self, store: EventStore, tag: str, *, keep: int = 24, pause: float = 0.05) -> None:
        self.store, self.tag, self.keep, self.pause = store, tag, keep, pause
        self.producer = ev.Producer(id="operator-campaign", instance=tag)  # creates and ends sessions and routes
        self.ledger = Writer(store, self.producer)
        self.acks: list[tuple[int, str]] = []
        self.errors: Counter[str] = Counter()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _append(self, event: ev.Event) -> int | None:
        """A create-if-absent append."""
        try:
            seq = await self.store.append(event, expect=0)
        except LedgerError as e:  # an election: not acknowledged, not recorded
            self.errors[type(e).__name__] += 1
            return None
        self.acks.append((seq, event.event_id))
        return seq

    async def _cas(self, read: Callable[[int | None], Any], decide: Callable[[Any], ev.Event]) -> int | None:
        """Read, decide, compare-and-set (the SDK's own loop), as an operator's command does."""
        try:
            seq, event = await self.ledger.cas(read, decide)
        except LedgerError as e:  # an election, a race lost too often, a route the watchdog already ended
            self.errors[type(e).__name__] += 1
            return None
        self.acks.append((seq, event.event_id))
        return seq

    def _route_to(self, rid: str, to_state: str) -> Callable[[lc.RouteState | None], ev.Event]:
        def decide_route(state: lc.RouteState | None) -> ev.Event:
            decide.decide_transition(state, rid, to_state)
            assert state is not None
            return ev.RouteTransitioned(producer=self.producer, route_id=rid, from_state=state.state,
                                        to_state=to_state, reason="campaign")
        return decide_route

    def _terminate(self, sid: str) -> Callable[[lc.SessionState | None], ev.Event]:
        def decide_terminate(state: lc.SessionState | None) -> ev.Event:
            if state is None or state.status == lc.S_TERMINATED:
                raise NotClaimable(f"session {sid} is gone")
            return ev.SessionTerminated(producer=self.producer, session_id=sid, reason="campaign")
        return decide_terminate

    async def _run(self) -> None:
        live: deque[tuple[str, str]] = deque()
        n = 0
        while not self._stop.is_set():
            n += 1
            sid, rid = f"{self.tag}-s{n}", f"{self.tag}-r{n}"
            created = ev.SessionCreated(producer=self.producer, session_id=sid, pool=POOL)
            route = ev.RouteCreated(producer=self.producer, route_id=rid, session_id=sid,
                                    endpoint=f"http://127.0.0.1:1/{n}")
            if await self._append(created) and await self._append(route):
                live.append((sid, rid))
            if len(live) > self.keep:
                old_sid, old_rid = live.popleft()
                for to_state in ("TERMINATING", "TERMINATED"):
                    await self._cas(lambda m, r=old_rid: self.ledger.route(r, min_last_seq=m),
                                    self._route_to(old_rid, to_state))
                await self._cas(lambda m, s=old_sid: self.ledger.session(s, min_last_seq=m), self._terminate(old_sid))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.pause)  # the load's pace, not synchronisation

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task


# --- checking ---------------------------------------------------------------------------------------------------


def dump(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every table but the snapshot cache, in key order; checkpoints without their wall-clock commit time."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        out = {}
        for table in TABLES:
            if table in NOT_COMPARED:
                continue
            cols = [r[1] for r in conn.execute(f"PRAGMA table_info({table})") if r[1] != "updated_ns"]
            out[table] = conn.execute(f"SELECT {', '.join(cols)} FROM {table} ORDER BY {', '.join(cols)}").fetchall()
        return out


WATCHED = {"agent.fenced": "fenced", "agent.declared_dead": "dead", "agent.registered": "registered",
           "session.claimed": "claims", "session.orphaned": "orphaned"}


def happened(messages: list[RawMessage], after: int) -> dict[str, int]:
    """Counts of the fleet's telling events in LEDGER after sequence `after` (from the subject's verb)."""
    counts: Counter[str] = Counter()
    for m in messages:
        if m.stream == subjects.LEDGER_STREAM and m.seq > after:
            parts = m.subject.split(".")
            name = WATCHED.get(f"{parts[1]}.{parts[3]}") if len(parts) == 5 else None
            if name:
                counts[name] += 1
    return dict(counts)


def checkpoints(path: Path) -> dict[str, int]:
    if not path.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1) as conn:
            return dict(conn.execute("SELECT stream, seq FROM checkpoints").fetchall())
    except sqlite3.Error:  # being created
        return {}


def snapshot_copy(src: Path, dst: Path) -> None:
    """A consistent copy of a live projection file (its rows and checkpoint commit together)."""
    with sqlite3.connect(f"file:{src}?mode=ro", uri=True, timeout=10) as a, sqlite3.connect(dst) as b:
        a.backup(b)


class _Bounded:
    """A store whose replays end at `end` (so a rebuild stops where the live projection's checkpoint is)."""

    def __init__(self, store: EventStore, end: int) -> None:
        self.store, self.end = store, end

    def replay(self, *args: Any, **kwargs: Any) -> Any:
        return self.store.replay(*args, end_seq=self.end, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


async def rebuild_to(store: EventStore, path: Path, ends: dict[str, int]) -> None:
    """A projection folded from zero up to exactly `ends` (per stream), with the projector's own code."""
    projector = Projector(store, ProjectionSettings(db=str(path)), name="campaign-rebuild")
    await projector.open()
    readers = projector._readers  # the one seam that bounds a catch-up
    try:
        projector._readers = {s: _Bounded(r, ends.get(s, 0)) for s, r in readers.items()}  # type: ignore[misc]
        await projector.catch_up()
    finally:
        projector._readers = readers
        await projector.close()


async def until(check: Callable[[], Any], timeout: float, interval: float = 0.25) -> Any:
    """Poll an async check until it returns something truthy, or return its last result after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(interval)


class Campaign:
    def __init__(self, url: str, workdir: Path, *, rng: random.Random, grace: float = DEFAULT_GRACE,
                 say: Callable[[str], None] = print, **fleet: Any) -> None:
        self.url, self.workdir, self.rng, self.grace, self.say = url, workdir, rng, grace, say
        workdir.mkdir(parents=True, exist_ok=True)
        self.fleet = Fleet(url, workdir, **fleet)
        self.results: list[FaultResult] = []
        self._seen = 0
        self.store: EventStore | None = None
        self.writer: LoadWriter | None = None
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Campaign:
        settings = Settings(nats_url=self.url, request_timeout=2.0, append_deadline=30.0)
        self.store = await self._stack.enter_async_context(EventStore.connect(settings))
        self.fleet.start()
        self._stack.callback(self.fleet.stop)
        self.writer = LoadWriter(self.store, f"w{self.rng.randrange(10**6)}")
        self.writer.start()
        await until(self._agents_settled, SETTLE)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.writer is not None:
            await self.writer.stop()
        await self._stack.aclose()

    async def load_for(self, low: float, high: float) -> None:
        """Let the load run for a random while, so the next fault lands at a random point of it."""
        await asyncio.sleep(self.rng.uniform(low, high))

    # --- reading -------------------------------------------------------------------------------------------

    async def read(self) -> list[RawMessage]:
        assert self.store is not None
        return [*await read_raw(self.store, subjects.LEDGER_STREAM),
                *await read_raw(self.store, subjects.HEARTBEAT_STREAM)]

    async def _unsettled(self) -> tuple[list[str], list[str]]:
        """(agents whose current incarnation is not alive with a beat within its ttl of the log's newest time,
        sessions still assigned to a lost owner): what must be gone once the fleet has settled after a fault."""
        try:
            messages = await self.read()
        except LedgerError as e:
            return [f"(log unreadable: {e})"], []
        checker = fold(messages)
        now = checker.last_ns
        agents = []
        for name, child in self.fleet.agents.items():
            cur = checker.current(name)
            beat = checker.last_beat(name, cur.seq) if cur is not None else None
            fresh = cur is not None and beat is not None and now - beat < cur.ttl * 1e9
            if cur is None or cur.status != "alive" or not fresh or not child.alive:
                agents.append(f"{name}: {cur.status if cur else 'unregistered'}"
                              f"{'' if fresh else ', no fresh beat'}{'' if child.alive else ', process ended'}")
        return agents, checker.held_by_lost_owners()

    async def _agents_settled(self) -> bool:
        agents, sessions = await self._unsettled()
        return not agents and not sessions

    # --- verifying -----------------------------------------------------------------------------------------

    async def verify(self, fault: str, detail: str = "") -> FaultResult:
        started = time.monotonic()
        assert self.store is not None and self.writer is not None
        result = FaultResult(fault=fault, detail=detail)
        result.servers_whole = await self.fault_over()
        await until(self._agents_settled, SETTLE)
        result.unsettled_agents, result.lost_owner_sessions = await self._unsettled()
        acks = list(self.writer.acks)
        messages = await self.read()
        by_seq = {m.seq: m for m in messages if m.stream == subjects.LEDGER_STREAM}
        result.acks_checked = len(acks)
        result.happened = happened(messages, self._seen)
        self._seen = max(by_seq, default=0)
        for seq, event_id in acks:
            m = by_seq.get(seq)
            stored_id = None
            if m is not None:
                with contextlib.suppress(msgspec.DecodeError, AttributeError):
                    stored_id = msgspec.json.decode(m.data).get("event_id")
            if stored_id != event_id:
                result.missing.append((seq, event_id))
        report: Report = check(messages, grace=self.grace)
        result.violations = report.violations
        result.projection_equal, result.differing_tables = await self._projection_equals_rebuild(
            max((s for s, _ in acks), default=0))
        result.seconds = time.monotonic() - started
        self.results.append(result)
        self.say(row(result))
        return result

    async def _projection_equals_rebuild(self, seq: int) -> tuple[bool, list[str]]:
        assert self.store is not None
        db = self.fleet.db

        async def caught_up() -> bool:
            return checkpoints(db).get(subjects.LEDGER_STREAM, 0) >= seq

        if not await until(caught_up, SETTLE):
            return False, [f"projection stuck at #{checkpoints(db).get(subjects.LEDGER_STREAM, 0)} < #{seq}: "
                           f"{self.fleet.projector.tail()}"]
        n = len(self.results)
        live, rebuilt = self.workdir / f"live-{n}.sqlite3", self.workdir / f"rebuilt-{n}.sqlite3"
        await asyncio.to_thread(snapshot_copy, db, live)
        await rebuild_to(self.store, rebuilt, checkpoints(live))
        a, b = dump(live), dump(rebuilt)
        differing = sorted(t for t in a if a[t] != b.get(t))
        wanted, got = checkpoints(live), checkpoints(rebuilt)
        if wanted != got:  # the rebuild's replays ended elsewhere than asked: say so, it is not a fold difference
            differing.append(f"rebuild reached {got}, asked for {wanted}")
        return a == b, differing

    # --- faults --------------------------------------------------------------------------------------------

    async def fault_over(self) -> bool:
        """Wait (bounded) until the servers are whole again; False if they are not."""
        return True

    async def kill_child(self, child: Child, *, down: tuple[float, float] = (0.0, 1.0)) -> FaultResult:
        await self.load_for(0.5, 2.5)
        child.kill9()
        await self.load_for(*down)
        child.start()
        return await self.verify(f"kill -9 {child.name}", f"restarted (start {child.starts})")


class ClusterCampaign(Campaign):
    def __init__(self, cluster: EmbeddedCluster, workdir: Path, **kw: Any) -> None:
        super().__init__(cluster.url, workdir, **kw)
        self.cluster = cluster

    async def leader(self) -> EmbeddedServer:
        assert self.store is not None

        async def found() -> str | None:
            try:
                info = await self.store.nc.jsm(timeout=2).stream_info(subjects.LEDGER_STREAM)  # type: ignore[union-attr]
            except Exception:  # noqa: BLE001 - electing: ask again
                return None
            return info.cluster.leader if info.cluster else None

        name = await until(found, SETTLE)
        return next(s for s in self.cluster.servers if s.config.name == name)

    async def _views(self) -> list[tuple[str | None, bool, int]]:
        """Each node's own answer, per stream: (leader, every replica current and online, last sequence)."""
        views = []
        for server in self.cluster.servers:
            nc = await nats.connect(server.url, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False)
            try:
                for stream in (subjects.LEDGER_STREAM, subjects.HEARTBEAT_STREAM):
                    info = await nc.jsm(timeout=2).stream_info(stream)
                    peers = info.cluster.replicas or [] if info.cluster else []
                    views.append((info.cluster.leader if info.cluster else None,
                                  len(peers) == 2 and all(p.current and not p.offline for p in peers),
                                  info.state.last_seq))
            finally:
                await nc.close()
        return views

    async def fault_over(self) -> bool:
        """Every node answers, names the same leader of each stream, and sees every replica current.

        Right after SIGCONT a deposed leader can still answer for a moment with its old view of a stream;
        reading then would judge a past that the rest of the cluster has moved on from."""

        async def whole() -> bool:
            try:
                views = await self._views()
            except Exception:  # noqa: BLE001 - a node still starting or electing: ask again
                return False
            leaders = {stream: {v[0] for v in views[i::2]} for i, stream in enumerate("LH")}
            return all(len(ls) == 1 and None not in ls for ls in leaders.values()) and all(v[1] for v in views)

        return bool(await until(whole, SETTLE, interval=0.5))

    async def kill_leader(self) -> FaultResult:
        await self.load_for(0.5, 2.5)
        leader = await self.leader()
        leader.kill()
        await self.load_for(1.0, 3.0)
        await asyncio.to_thread(leader.start)
        return await self.verify("kill -9 stream leader", f"{leader.config.name}, restarted")

    async def freeze_leader(self, seconds: float) -> FaultResult:
        await self.load_for(0.5, 2.5)
        leader = await self.leader()
        assert leader.pid is not None
        os.kill(leader.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(seconds)  # the fault's length
        finally:
            os.kill(leader.pid, signal.SIGCONT)
        return await self.verify(f"SIGSTOP {seconds:g}s stream leader", f"{leader.config.name}")

    async def round(self, freeze: float) -> None:
        await self.kill_leader()
        await self.freeze_leader(freeze)
        await self.kill_child(self.fleet.projector)
        await self.kill_child(self.fleet.consumers)


class NodeCampaign(Campaign):
    def __init__(self, server: EmbeddedServer, workdir: Path, **kw: Any) -> None:
        super().__init__(server.url, workdir, **kw)
        self.server = server

    async def kill_server(self) -> FaultResult:
        await self.load_for(0.5, 2.5)
        self.server.kill()
        await asyncio.to_thread(self.server.start)
        return await self.verify("kill -9 fsync server", "sync_interval: always, restarted")


async def create_streams(url: str, replicas: int, patience: float = 60.0) -> None:
    """The ledger's streams, once JetStream answers (a new cluster elects its meta leader first)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            async with EventStore.connect(Settings(nats_url=url, replicas=replicas), ensure=True):
                return
        except Exception:  # not ready yet; the deadline bounds it
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


# --- the table --------------------------------------------------------------------------------------------------

HEADER = (f"{'fault':<28} {'acks checked':>12} {'missing':>8} {'violations':>10} {'proj=rebuild':>12} "
          f"{'unsettled':>9} {'lost own':>8} {'s':>6}  meanwhile")


def row(r: FaultResult) -> str:
    return (f"{r.fault:<28} {r.acks_checked:>12,} {len(r.missing):>8} {len(r.violations):>10} "
            f"{'yes' if r.projection_equal else 'NO':>12} {len(r.unsettled_agents):>9} "
            f"{len(r.lost_owner_sessions):>8} {r.seconds:>6.1f}  "
            + ", ".join(f"{k} {v}" for k, v in sorted(r.happened.items())))


def summary(results: list[FaultResult]) -> list[str]:
    lines = [f"{len(results)} faults injected, {sum(r.acks_checked for r in results):,} acknowledgements checked "
             f"(cumulative), {sum(len(r.violations) for r in results)} violations found, "
             f"{sum(len(r.missing) for r in results)} acknowledged appends missing, "
             f"{sum(not r.projection_equal for r in results)} projections unequal to a rebuild, "
             f"{sum(bool(r.unsettled_agents) for r in results)} faults left an agent fenced or dead"]
    for r in results:
        for v in r.violations[:5]:
            lines.append(f"  after {r.fault}: {v.kind} #{v.seq} {v.entity}: {v.detail}")
        if r.unsettled_agents:
            lines.append(f"  after {r.fault}: unsettled {', '.join(r.unsettled_agents)}")
        if not r.servers_whole:
            lines.append(f"  after {r.fault}: the cluster did not become whole within {SETTLE:g}s")
        if r.lost_owner_sessions:
            lines.append(f"  after {r.fault}: sessions with a lost owner {', '.join(r.lost_owner_sessions[:10])}")
        if r.differing_tables:
            lines.append(f"  after {r.fault}: differing {', '.join(r.differing_tables)}")
    return lines


async def main_async(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    results: list[FaultResult] = []
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.rounds:
            with EmbeddedCluster(work / "cluster") as cluster:
                await create_streams(cluster.url, 3)
                async with ClusterCampaign(cluster, work / "c", rng=rng) as c:
                    for _ in range(args.rounds):
                        await c.round(args.freeze)
                results += c.results
        if args.node_kills:
            cfg = ServerConfig(data_dir=work / "node", port=free_port(), sync_always=True)
            with EmbeddedServer(cfg) as server:
                await create_streams(server.url, 1)
                async with NodeCampaign(server, work / "n", rng=rng) as n:
                    for _ in range(args.node_kills):
                        await n.kill_server()
                        await n.kill_child(n.fleet.projector)
                results += n.results
    for line in summary(results):
        print(line)
    return 0 if all(r.ok for r in results) else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="cluster rounds (leader kill, freeze, projector and "
                                                              "consumer kills); 0 for none")
    parser.add_argument("--freeze", type=float, default=20.0, help="seconds a node stays SIGSTOPped")
    parser.add_argument("--node-kills", type=int, default=3, help="kill -9s of a single fsync'ing node")
    parser.add_argument("--seed", type=int, default=9)
    args = parser.parse_args()
    raise SystemExit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
