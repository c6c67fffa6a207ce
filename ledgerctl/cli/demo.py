"""`ledger demo`: `ledger up` plus a small fleet of reference agents that fails, narrated as it happens."""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import click

from consumers.follow import Item
from consumers.liveness_rules import LivenessSettings
from ledger import cancellation
from ledger import events as ev
from ledger import lifecycle as lc
from ledger.codec import Recorded
from ledger.events import Producer
from ledger.ids import new_id
from ledger.subjects import LEDGER_STREAM
from ledger.writer import Writer
from ledgerctl.server import free_port
from ledgerctl.stack import DEFAULT_HTTP_PORT, Stack, UpSettings, running_stack
from projections.gc_tuning import tune_gc
from projections.query import Query
from projections.state import Change, LifecycleState

from . import tables
from .common import async_command, echo, stop_signals
from .up import env_line, web_settings

POOLS = ("gpu", "cpu")
"""The demo's pools; the first gets the kill -9, the second the goodbye."""
ADDRESS = "{agent}.%s.demo:8000"
"""Where an agent of a pool says its sessions run (`ledger agent --report-address`)."""
STEP_TIMEOUT = 30.0
"""Seconds any one step of the story may take before the demo gives up and says which."""


class DemoFailed(click.ClickException):
    pass


class Fleet:
    """The demo's `ledger agent` child processes; each writes its own log file."""

    def __init__(self, url: str, log_dir: Path, *, heartbeat: float, ttl: float, capacity: int) -> None:
        self.url, self.log_dir = url, log_dir
        self.heartbeat, self.ttl, self.capacity = heartbeat, ttl, capacity
        self.procs: dict[str, asyncio.subprocess.Process] = {}

    async def start(self, agent_id: str, pool: str) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{agent_id}.log", "ab") as log:  # noqa: ASYNC230 - a local file, opened at once
            self.procs[agent_id] = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ledgerctl", "agent", "--agent-id", agent_id, "--pool", pool,
                "--capacity", str(self.capacity), "--heartbeat", str(self.heartbeat), "--ttl", str(self.ttl),
                "--report-address", ADDRESS % pool, "--report-health", "--nats-url", self.url,
                stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True)  # Ctrl-C reaches the demo, which then stops its agents one by one

    def kill9(self, agent_id: str) -> None:
        if self.procs[agent_id].returncode is None:
            self.procs[agent_id].kill()

    async def terminate(self, agent_id: str) -> int:
        proc = self.procs[agent_id]
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return await cancellation.wait_for(proc.wait(), STEP_TIMEOUT)
        except TimeoutError:
            proc.kill()
            raise DemoFailed(f"{agent_id} did not exit {STEP_TIMEOUT:g} s after SIGTERM; "
                             f"see {self.log_dir / (agent_id + '.log')}") from None

    async def stop(self) -> None:
        """SIGTERM every agent still running (each says goodbye), then wait for them."""
        alive = [a for a, p in self.procs.items() if p.returncode is None]
        for agent_id in alive:
            self.procs[agent_id].send_signal(signal.SIGTERM)
        for agent_id in alive:
            try:
                await cancellation.wait_for(self.procs[agent_id].wait(), STEP_TIMEOUT)
            except TimeoutError:
                self.procs[agent_id].kill()
                await self.procs[agent_id].wait()


class Feed:
    """Tells what happens, as the stack's follower applies it to the state the consumers act on."""

    def __init__(self, stack: Stack, say: Callable[[str], None], log_dir: Path) -> None:
        self.follower = stack.follower  # the one fold of the process: the story reads what the consumers see
        self.follower.listen(self._heard)
        self.log_dir = log_dir
        self.say = say
        self.t0 = time.time_ns()
        self.stored_ns: dict[str, int] = {}
        """When the latest event of each kind of interest was stored (e.g. 'dead:a1', 'goodbye:a2')."""
        self._changed = asyncio.Event()

    @property
    def state(self) -> LifecycleState:
        return self.follower.state.ledger

    def at(self, ns: int) -> str:
        return f"+{(ns - self.t0) / 1e9:6.2f}s"

    def _heard(self, stream: str, batch: list[Item], changes: list[Change]) -> None:
        if stream != LEDGER_STREAM:
            return  # beats tell nothing; the monitor's verdicts about them do
        for item, change in zip(batch, changes, strict=True):
            if isinstance(item, Recorded) and change.applied:  # a refused event (a forgery, a race) changed nothing
                self._tell(item)
        self._changed.set()

    def _tell(self, item: Recorded) -> None:
        e = item.event
        line: str | None = None
        if isinstance(e, ev.AgentRegistered):
            line = f"{e.agent_id} registered (incarnation {item.seq}, capacity {e.capacity})"
        elif isinstance(e, ev.SessionClaimed):
            origin = f" from {e.previous_owner}" if e.previous_owner else ""
            line = f"{e.session_id} claimed by {e.agent_id} ({e.reason}{origin}; fencing token {item.seq})"
            self.stored_ns["claim"] = item.timestamp_ns
        elif isinstance(e, ev.AgentSuspected):
            line = f"{e.agent_id} suspected by {e.producer.id}: {e.evidence.detail or e.reason}"
        elif isinstance(e, ev.AgentDeclaredDead):
            line = f"{e.agent_id} declared dead by {e.producer.id}: {e.evidence.detail or e.reason}"
            self.stored_ns[f"dead:{e.agent_id}"] = item.timestamp_ns
        elif isinstance(e, ev.AgentGoodbye):
            line = f"{e.agent_id} said goodbye ({e.reason})"
            self.stored_ns[f"goodbye:{e.agent_id}"] = item.timestamp_ns
        elif isinstance(e, ev.SessionResourceReported):
            line = f"{e.session_id} runs on {e.agent_id} at {e.address}"
        elif isinstance(e, ev.RouteCreated):
            line = f"route {e.route_id} created for {e.session_id} -> {e.endpoint} ({lc.PENDING})"
        elif isinstance(e, ev.RouteTransitioned):
            traffic = f" {e.traffic}" if e.to_state == lc.RUNNING and e.traffic else ""
            line = f"route {e.route_id} {e.from_state} -> {e.to_state}{traffic}: {e.reason}"
        elif isinstance(e, ev.PoolBreakerTripped):
            line = f"pool {e.pool}: breaker tripped - {e.reason}"
        if line:
            self.say(f"  {self.at(item.timestamp_ns)}  #{item.seq:<5} {line}")

    async def until(self, done: Callable[[], bool], what: str) -> None:
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                while not done():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise DemoFailed(f"the demo stopped: {what} did not happen within {STEP_TIMEOUT:g} s "
                             f"(agent logs: {self.log_dir})") from None

    def owner(self, session_id: str) -> str | None:
        session = self.state.sessions.get(session_id)
        return session.owner if session is not None else None

    async def moved_on(self, agent_id: str, sessions: list[str], event: str, what: str) -> int:
        """Wait for the agent's `event` ("dead" or "goodbye") and for `sessions` to have owners; its stored time."""
        key = f"{event}:{agent_id}"
        await self.until(lambda: key in self.stored_ns and not self.owned_by(agent_id)
                         and all(self.serving(s) for s in sessions), what)
        return self.stored_ns[key]

    def reowned(self, sessions: list[str], since_ns: int, since: str) -> str:
        if not sessions:
            return ""
        return f"; {sessions_(sessions)} owned again {(self.stored_ns['claim'] - since_ns) / 1e6:.0f} ms after {since}"

    def serving(self, session_id: str) -> bool:
        """Whether the session's owner has reported where it runs (a claim clears the address)."""
        session = self.state.sessions.get(session_id)
        return session is not None and session.owner is not None and session.address is not None

    def route_served(self, route_id: str) -> bool:
        """Whether the route runs with traffic, reported healthy since its session's latest claim."""
        route = self.state.routes.get(route_id)
        session = self.state.sessions.get(route.session_id) if route is not None else None
        return (route is not None and route.state == lc.RUNNING and route.traffic == lc.TRAFFIC_ACTIVE
                and session is not None and route.health_checked_at is not None and session.status_since is not None
                and route.health_checked_at >= session.status_since)

    def routes_of(self, sessions: list[str]) -> list[lc.RouteState]:
        return sorted((r for r in self.state.routes.values() if r.session_id in sessions), key=lambda r: r.route_id)

    def owned_by(self, agent_id: str) -> list[str]:
        return sorted(s.session_id for s in self.state.sessions.values() if s.owner == agent_id)


def sessions_(ids: list[str]) -> str:
    return "1 session" if len(ids) == 1 else f"{len(ids)} sessions"


def pools_of(names: list[str]) -> dict[str, str]:
    """Agent -> pool: the first half (rounded up) in the first pool, the rest in the second."""
    half = (len(names) + 1) // 2
    return {name: POOLS[0] if i < half else POOLS[1] for i, name in enumerate(names)}


async def routes_served_again(feed: Feed, sessions: list[str]) -> None:
    """Wait for the routes of `sessions` to run with traffic, reported healthy by the new owner; tell them."""
    routes = [r.route_id for r in feed.routes_of(sessions)]
    await feed.until(lambda: all(feed.route_served(r) for r in routes),
                     f"routes {' '.join(routes)} reported healthy by their new owner")
    for r in feed.routes_of(sessions):
        session = feed.state.sessions[r.session_id]
        echo(f"   route {r.route_id}: {r.state} {r.traffic}, healthy per {session.owner} (its address stays "
             f"{r.address}, set as it warmed up; {r.session_id} now runs at {session.address})")


async def story(stack: Stack, fleet: Fleet, feed: Feed, names: list[str], sessions: int, pause: float = 0.0) -> int:
    """Start the fleet in two pools, give it sessions and routes, kill -9 one agent, SIGTERM another; show the
    projection.

    `pause`: seconds to wait before each failure, for a look at the dashboard.
    Returns the last sequence before the kill, for a look at the past.
    """
    say = echo

    async def wait_a_moment() -> None:
        if pause > 0:  # a pace for a person watching, not a wait for anything to happen
            where = f"; watch it live on {stack.http_url}/" if stack.http_url else ""
            say(f"   (in {pause:g} s{where})")
            await asyncio.sleep(pause)

    pool_of = pools_of(names)
    say(f"\n1. A fleet of {len(names)} agents (heartbeat {fleet.heartbeat:g} s, ttl {fleet.ttl:g} s) in two pools:")
    for pool in POOLS:
        say(f"   {pool}: {' '.join(n for n in names if pool_of[n] == pool)}")
    for name in names:
        await fleet.start(name, pool_of[name])
    await feed.until(lambda: set(names) <= feed.state.agents.keys(), "the agents' registration")

    ids = [f"s{i:02d}" for i in range(1, sessions + 1)]
    routed = {sid: f"r{sid[1:]}" for sid in ids[:(sessions + 1) // 2]}
    # Stale well before the owner's death is declared (its last report is at most a period before the kill),
    # yet a report late by more than a period is not stale yet; a third of the ttl keeps the log from filling up.
    probe = ev.Probe(initial_delay=STEP_TIMEOUT, period=max(fleet.heartbeat, fleet.ttl / 3),
                     stale_after=fleet.ttl * 0.75)
    say(f"\n2. {sessions} sessions, each bound to a pool (never to an agent), and routes to the first "
        f"{len(routed)}: the agents claim the sessions and say where each runs; the route watchdog moves "
        f"the routes {lc.PENDING} -> {lc.STARTING} -> {lc.WARMING_UP} -> {lc.RUNNING} once the owner reports "
        f"them healthy (every {probe.period:g} s; stale after {probe.stale_after:g} s: traffic off)")
    ledger = Writer(stack.store, Producer(id="demo", instance=new_id()))
    for i, sid in enumerate(ids):
        pool = POOLS[i % len(POOLS)]
        await ledger.create_session(pool, session_id=sid)
        if sid in routed:
            await ledger.create_route(routed[sid], session_id=sid, endpoint=f"https://{sid}.{pool}.demo", probe=probe)
    await feed.until(lambda: all(feed.serving(s) for s in ids), "every session claimed and running")
    await feed.until(lambda: all(feed.route_served(r) for r in routed.values()), "every route RUNNING with traffic")
    for name in names:
        say(f"   {name} ({pool_of[name]}) owns {' '.join(feed.owned_by(name)) or 'nothing'}")

    # The busiest agent of each pool fails (routed sessions first, so the routes show it); the rest take over.
    def busiest(pool: str) -> str:
        return max((n for n in names if pool_of[n] == pool),
                   key=lambda n: (len(set(feed.owned_by(n)) & routed.keys()), len(feed.owned_by(n))))

    victim, leaver = busiest(POOLS[0]), busiest(POOLS[1])
    lost = feed.owned_by(victim)
    say(f"\n3. kill -9 {victim} (pool {POOLS[0]}): no goodbye. Its {sessions_(lost)} wait until the liveness "
        f"monitor declares it dead ({fleet.ttl:g} s without a heartbeat), and its routes lose traffic when "
        f"their health goes stale; a survivor of {POOLS[0]} takes the sessions and reports the routes healthy")
    await wait_a_moment()
    before = feed.state.seq
    killed = time.time_ns()
    fleet.kill9(victim)
    dead = await feed.moved_on(victim, lost, "dead", f"the death of {victim} and the re-claim of its sessions")
    after = feed.reowned(lost, dead, "the declaration")
    say(f"   -> declared dead {(dead - killed) / 1e9:.2f} s after the kill{after}")
    await routes_served_again(feed, lost)

    moved = feed.owned_by(leaver)
    say(f"\n4. SIGTERM {leaver} (pool {POOLS[1]}): it says goodbye once and exits 0; its {sessions_(moved)} "
        f"move at once to a survivor of {POOLS[1]}")
    await wait_a_moment()
    code = await fleet.terminate(leaver)
    bye = await feed.moved_on(leaver, moved, "goodbye", f"the goodbye of {leaver} and the re-claim of its sessions")
    say(f"   -> exit code {code}{feed.reowned(moved, bye, 'the goodbye')}")
    await routes_served_again(feed, moved)

    say("\n5. The projection (SQLite), caught up with the log:")
    await stack.projector.wait_for(feed.state.seq)
    async with Query.open(stack.projector.path) as q:
        page = await q.sessions()
        tables.show(page, tables.sessions(page))
        route_page = await q.routes()
        tables.show(route_page, tables.routes(route_page))
        anomalies = await q.anomalies()
    if anomalies.items:
        say(f"   {len(anomalies.items)} anomalies flagged (see `ledger anomalies`)")
    else:
        say("   no anomalies: no session ever had two owners, no write under a stale token")
    return before


@click.command("demo")
@click.option("--agents", "count", default=4, show_default=True, type=click.IntRange(4, 9),
              help="Agents in the demo fleet, split over two pools (one of each pool fails).")
@click.option("--sessions", default=12, show_default=True, type=click.IntRange(1, 500))
@click.option("--heartbeat", default=0.5, show_default=True, type=click.FloatRange(min=0.05),
              help="The agents' heartbeat interval, seconds.")
@click.option("--ttl", default=3.0, show_default=True, type=click.FloatRange(min=0.2),
              help="Seconds without a heartbeat before an agent is dead.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the demo's ledger here [default: a temporary directory, removed at the end].")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Client port [default: a free one].")
@click.option("--exit", "then_exit", is_flag=True, help="End after the story instead of staying up for Ctrl-C.")
@click.option("--http-port", type=click.IntRange(0, 65535), default=None,
              help=f"The dashboard's port; 0: any free one [default: {DEFAULT_HTTP_PORT}, or a free one when taken].")
@click.option("--pause", type=click.FloatRange(min=0), default=None,
              help="Seconds to wait before each failure, to watch it in the dashboard [default: 10; 0 with --exit].")
@click.option("--http/--no-http", "http", default=True, show_default=True, help="Serve the dashboard and the API.")
@async_command
async def demo_command(count: int, sessions: int, heartbeat: float, ttl: float, data_dir: Path | None,
                       port: int | None, then_exit: bool, pause: float | None, http_port: int | None,
                       http: bool) -> None:
    """`ledger up` on a fresh embedded server, plus a fleet that fails: watch failover happen.

    Starts reference agents (`ledger agent` processes) in two pools, gpu and
    cpu, creates sessions they claim and routes the watchdog moves to RUNNING,
    kills a gpu agent with SIGKILL (its sessions move once the liveness monitor
    declares it dead) and stops a cpu agent with SIGTERM (its goodbye moves
    them at once), then shows the projection. The dashboard shows it all live.
    Afterwards it stays up so you can look around with the commands it prints,
    until Ctrl-C.
    """
    if ttl <= heartbeat:
        raise click.BadParameter(f"--ttl ({ttl:g}) must be longer than --heartbeat ({heartbeat:g})", param_hint="--ttl")
    if data_dir is not None and data_dir.exists() and any(data_dir.iterdir()):
        raise click.BadParameter(f"{data_dir} is not empty: the demo tells its story on a fresh ledger",
                                 param_hint="--data-dir")
    temporary = data_dir is None
    root = Path(tempfile.mkdtemp(prefix="ledger-demo-")) if data_dir is None else data_dir
    told_all = False
    s = UpSettings(nats_url=None, data_dir=root, port=port or free_port(),
                   liveness=LivenessSettings(grace=min(1.0, ttl / 2)),
                   **web_settings(http, "127.0.0.1", http_port, query_service=True))
    tune_gc()
    if not logging.getLogger().isEnabledFor(logging.INFO):
        logging.getLogger("consumers").setLevel(logging.ERROR)  # the story tells of deaths itself
    stop = stop_signals()
    names = [f"a{i}" for i in range(1, count + 1)]
    try:
        async with running_stack(s, echo, name="ledger-demo") as stack:
            fleet = Fleet(stack.url, root / "agents", heartbeat=heartbeat, ttl=ttl, capacity=sessions)
            feed = Feed(stack, echo, fleet.log_dir)
            try:
                pace = pause if pause is not None else 0.0 if then_exit else 10.0
                told = asyncio.create_task(story(stack, fleet, feed, names, sessions, pace))
                # The stack is supervised while the story runs too: a piece that fails ends the demo with its
                # error, rather than a step that "did not happen within 30 s".
                told_or_stopped = asyncio.Event()
                told.add_done_callback(lambda _: told_or_stopped.set())
                stopped = asyncio.ensure_future(stop.wait())
                stopped.add_done_callback(lambda _: told_or_stopped.set())
                try:
                    await stack.run_until(told_or_stopped)
                finally:
                    stopped.cancel()
                    if not told.done():
                        await cancellation.stop([told])
                if told.done() and not told.cancelled():
                    before_kill = told.result()
                    if not then_exit:
                        echo(f"\nThe ledger stays up with {len(names) - 2} agent(s) running. In another terminal:")
                        if export := env_line(s, stack.url):
                            echo(export)
                        for command, what in [(f"ledger history session {min(feed.state.sessions)}",
                                               "each change of a session, and its cause"),
                                              (f"ledger sessions --at-seq {before_kill}", "the past: before the kill"),
                                              ("ledger routes", "the routes and their lifecycle"),
                                              ("ledger replay --type agent.declared_dead", "the log itself")]:
                            echo(f"  {command:<42}# {what}")
                        if stack.http_url:
                            echo(f"  {'open ' + stack.http_url + '/':<42}# the dashboard: the story, live and past")
                        echo(f"agent logs in {root / 'agents'}; press Ctrl-C to stop")
                        await stack.run_until(stop)
                told_all = True
            finally:
                echo("\nstopping the fleet (each agent says goodbye) ...")
                await fleet.stop()
    finally:
        if temporary and told_all:
            shutil.rmtree(root, ignore_errors=True)
        elif temporary:
            echo(f"kept {root} (server data, projection, agent logs) for a look at what went wrong")
    echo("stopped")
