"""Memory while sessions come and go: `ledger up` and nats-server RSS under churn, and the server's cost per entity
by subject layout.

    python bench/churn.py                                   # 200k sessions through the SDK, then each raw layout
    python bench/churn.py --sessions 50000 --every 10000 --settle 130
    python bench/churn.py --sessions 2000 --every 500 --raw-sessions 2000   # a smoke run
    python bench/churn.py --no-sdk --raw-sessions 1000000 --layouts project one-subject

1. SDK churn (deliverable 7): `ledger up` (embedded nats-server, fsync always,
   projector, consumers), and in this process --agents real `Agent`s (pool
   churn). In rounds of --concurrency sessions: the operator creates them
   (`Writer.create_session`, pool `churn`), the agents claim them
   (`Agent.claim`; a claim must come from an agent of the session's pool, so
   the reclaimer races them and claims some first, for one of them: either
   way each session gets one owner) and the owners terminate them
   (`Agent.terminate`). RSS of `ledger up`, of its
   nats-server and of this process before, every --every sessions and after
   (once the projection has caught up, and again after --settle seconds: the
   server forgets message ids after the stream's 120 s duplicate window), and
   nats-server's bytes per session.
2. The server side, raw (no SDK, no stack: a bare embedded nats-server, one
   stream, --raw-sessions sessions of created + claimed + terminated, the
   SDK's encoded events, published pipelined). Layouts:
   * project     - ledger.session.<id>.<verb>.<producer>, Nats-Msg-Id on each
                   event, the LEDGER stream's settings: the project's layout;
   * no-msg-id   - the same without Nats-Msg-Id: what the de-duplication
                   window holds;
   * one-subject - ledger.session.<id> (verb and producer in the payload):
                   one subject per entity instead of one per (verb, producer);
   * transform   - publishers keep the project's subjects; the stream stores
                   them as ledger.session.<id> (a subject transform);
   * entity-producer - the same, stored as ledger.session.<id>.<producer>
                   (the producer token, which permissions and the folds'
                   authority checks read, survives; the verb does not);
   * sharded     - ledger.session.<crc32(id) % 256>: a bounded set of
                   subjects (the per-entity compare-and-set is lost);
   * purge       - the project's layout, each terminated session's subjects
                   purged at once (the LEDGER stream denies purges: this is
                   what retiring entities from the server would buy).
   Each prints nats-server RSS every --every sessions, its subject count,
   bytes per session, and the extrapolation to 1 M and 10 M sessions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import tempfile
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import nats
from common import MiB, RawPublisher, ledger_up, projection_checkpoint, rss_bytes, stream_state
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig, SubjectTransform

from ledger import codec, subjects
from ledger import events as ev
from ledger.agent import Agent
from ledger.errors import AppendTimeout, LedgerError, NotClaimable, Unavailable
from ledger.ids import new_id
from ledger.settings import Settings
from ledger.writer import Writer
from ledgerctl.server import EmbeddedServer, ServerConfig, free_port

SESSION_POOL = "churn"


def mib(n: float) -> str:
    return f"{n / MiB:7.1f} MiB"


# --- 1. through the SDK, against `ledger up` ------------------------------------------------


RETRIES = {"count": 0}
"""Writes tried again after a timeout (a loaded machine: the server answers late, as it may in production)."""


async def patiently(write: Callable[[], Awaitable[object]]) -> None:
    """`write`, tried again (up to 5 times, 1 s apart) when it timed out or the server was unreachable, as a
    patient client would; on a retry, a refusal means the attempt that timed out landed after all: done."""
    for attempt in range(6):
        try:
            await write()
            return
        except (AppendTimeout, Unavailable) as e:
            if attempt == 5:
                raise SystemExit(f"a write timed out 6 times: {e}") from e
            RETRIES["count"] += 1
            await asyncio.sleep(1.0)
        except LedgerError:
            if attempt:
                return
            raise


async def create(ledger: Writer, sid: str) -> None:
    await patiently(lambda: ledger.create_session(SESSION_POOL, session_id=sid))


async def claim(agent: Agent, sid: str) -> None:
    """`agent` claims `sid`, unless the reclaimer was first (for one of the agents: the only eligible ones)."""
    with contextlib.suppress(NotClaimable):
        await patiently(lambda: agent.claim(sid))


async def terminate(agents: list[Agent], sid: str) -> None:
    """The owner terminates `sid` once it knows it owns it (a claim by the reclaimer reaches it by its watch)."""
    for _ in range(1200):  # at most ~60 s
        for agent in agents:
            if sid in agent.owned:
                await patiently(lambda: agent.terminate(sid))  # noqa: B023
                return
        await asyncio.sleep(0.05)
    raise SystemExit(f"no agent came to own {sid} within 60 s")


async def sdk_churn(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="ledger-churn-") as tmp:
        async with ledger_up(Path(tmp), "--no-query-service") as up:
            server_pid = up.server_pid
            settings = Settings(nats_url=up.url)
            nc = await nats.connect(up.url, name="churn-observer")
            js = nc.jetstream()

            async def sample(label: str) -> tuple[int, int]:
                state = await stream_state(nc, subjects.LEDGER_STREAM)
                up_rss, srv_rss = rss_bytes(up.proc.pid), rss_bytes(server_pid)
                print(f"  {label:<30} ledger up {mib(up_rss)}   nats-server {mib(srv_rss)}   "
                      f"generator {mib(rss_bytes(os.getpid()))}   LEDGER {state['messages']:>9,} msgs "
                      f"{state.get('num_subjects', 0):>9,} subjects", flush=True)
                return up_rss, srv_rss

            try:
                async with Writer.connect(settings, producer_id="operator-bench") as ledger, \
                        contextlib.AsyncExitStack() as stack:
                    agents = [await stack.enter_async_context(Agent(
                        ledger, agent_id=f"churner-{i}", pool=SESSION_POOL, capacity=args.concurrency,
                        heartbeat=5.0, ttl=30.0)) for i in range(args.agents)]
                    await asyncio.sleep(1.0)  # the agents' first beats and watches are under way
                    before = await sample("before")
                    during: list[tuple[int, int, int]] = []
                    server_samples: list[tuple[int, int]] = []
                    up_samples: list[tuple[int, int]] = []
                    started = time.monotonic()
                    rate_from = (0, started)  # the rate since the previous sample: does it hold as the log grows?
                    done = 0
                    tag = new_id()[:6]
                    while done < args.sessions:
                        n = min(args.concurrency, args.sessions - done)
                        ids = [f"c{tag}-{done + i}" for i in range(n)]
                        await asyncio.gather(*(create(ledger, sid) for sid in ids))
                        await asyncio.gather(*(claim(agents[i % len(agents)], sid) for i, sid in enumerate(ids)))
                        await asyncio.gather(*(terminate(agents, sid) for sid in ids))
                        previous, done = done, done + n
                        if done // args.every != previous // args.every or done == args.sessions:
                            now = time.monotonic()
                            rate = (done - rate_from[0]) / max(now - rate_from[1], 1e-9)
                            rate_from = (done, now)
                            up_rss, srv_rss = await sample(f"{done:,} sessions ({rate:,.0f}/s)")
                            during.append((done, up_rss, srv_rss))
                            server_samples.append((done, srv_rss))
                            up_samples.append((done, up_rss))
                    elapsed = time.monotonic() - started
                    print(f"  {args.sessions:,} sessions created, claimed and terminated in {elapsed:.1f} s "
                          f"({args.sessions / elapsed:,.0f}/s, {3 * args.sessions / elapsed:,.0f} appends/s; "
                          f"{RETRIES['count']:,} writes tried again after a timeout)", flush=True)
                last = (await js.stream_info(subjects.LEDGER_STREAM)).state.last_seq
                for _ in range(600):  # at most 300 s for the projection to catch up
                    if projection_checkpoint(up.db, subjects.LEDGER_STREAM) >= last:
                        break
                    await asyncio.sleep(0.5)
                after = await sample("after (caught up)")
                if args.settle > 0:
                    await asyncio.sleep(args.settle)
                    after = await sample(f"after {args.settle:g} s more")
            finally:
                await nc.close()
    per_up = (after[0] - before[0]) / args.sessions
    per_srv = (after[1] - before[1]) / args.sessions
    print(f"figure  ledger up   RSS {mib(before[0])} -> {mib(after[0])} over {args.sessions:,} sessions: "
          f"{per_up:6.0f} B/session ({marginal(up_samples):6.0f} past the first sample)   "
          f"(goal: flat within 20 %: {after[0] / max(before[0], 1):.2f}x)")
    print(f"figure  nats-server RSS {mib(before[1])} -> {mib(after[1])} over {args.sessions:,} sessions: "
          f"{per_srv:6.0f} B/session ({marginal(server_samples):6.0f} past the first sample) = "
          f"{mib(per_srv * 10_000)} "
          f"per 10k; at 1 M {mib(per_srv * 1e6)}, "
          f"at 10 M {mib(per_srv * 1e7)} (linear extrapolation)", flush=True)


# --- 2. the server's cost per entity, by layout (raw) -----------------------------------------


@dataclass(frozen=True)
class Layout:
    subjects: list[str]
    stored: Callable[[str], str] | None
    """The subject an event of this session is published on (None: the project's own subject)."""
    msg_id: bool = True
    transform: SubjectTransform | None = None
    purge: bool = False


LAYOUTS: dict[str, Layout] = {
    "project": Layout(["ledger.session.*.*.*"], None),
    "no-msg-id": Layout(["ledger.session.*.*.*"], None, msg_id=False),
    "one-subject": Layout(["ledger.session.*"], lambda sid: f"ledger.session.{sid}"),
    "transform": Layout(["ledger.session.*.*.*"], None, transform=SubjectTransform(
        src="ledger.session.*.*.*", dest="ledger.session.{{wildcard(1)}}")),
    "entity-producer": Layout(["ledger.session.*.*.*"], None, transform=SubjectTransform(
        src="ledger.session.*.*.*", dest="ledger.session.{{wildcard(1)}}.{{wildcard(3)}}")),
    "sharded": Layout(["ledger.session.*"], lambda sid: f"ledger.session.{zlib.crc32(sid.encode()) % 256}"),
    "purge": Layout(["ledger.session.*.*.*"], None, purge=True),
}


def session_events(sid: str, agent: ev.Producer) -> list[ev.Event]:
    """One session's life as the SDK writes it (tokens and incarnations plausible: a raw stream checks nothing)."""
    operator = ev.Producer(id="operator-bench", instance="churn")
    return [ev.SessionCreated(producer=operator, session_id=sid, pool=SESSION_POOL),
            ev.SessionClaimed(producer=agent, session_id=sid, agent_id=agent.id, instance_id=agent.instance,
                              incarnation=1),
            ev.SessionTerminated(producer=agent, session_id=sid, token=2, reason="done")]


async def raw_layout(name: str, layout: Layout, args: argparse.Namespace) -> tuple[float, float]:
    """nats-server bytes per session under this layout: while it runs, and once restarted on the same data (what it
    keeps for good: no write cache, no message ids of the duplicate window, a fresh heap)."""
    with tempfile.TemporaryDirectory(prefix=f"ledger-churn-{name}-") as tmp:
        config = ServerConfig(data_dir=Path(tmp), port=free_port(), sync_always=args.sync_always)
        with EmbeddedServer(config) as server:
            assert server.pid is not None
            pid = server.pid
            nc = await nats.connect(server.url, name=f"churn-{name}")
            try:
                js = nc.jetstream()
                await js.add_stream(StreamConfig(
                    name="CHURN", subjects=layout.subjects, retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
                    discard=DiscardPolicy.NEW, max_age=0, max_msgs=-1, max_bytes=-1,
                    duplicate_window=Settings().duplicate_window, deny_delete=True, deny_purge=not layout.purge,
                    allow_direct=True, subject_transform=layout.transform))
                await asyncio.sleep(1.0)
                before = rss_bytes(pid)
                agent = ev.Producer(id="churner-0", instance="churn")
                started = time.monotonic()
                samples: list[tuple[int, int]] = []
                async with RawPublisher(nc) as raw:
                    done = 0
                    while done < args.raw_sessions:
                        n = min(args.every, args.raw_sessions - done)
                        ids = [f"r{done + i}-{new_id()[:6]}" for i in range(n)]
                        for sid in ids:
                            for event in session_events(sid, agent):
                                out = codec.encode(event)
                                subject = layout.stored(sid) if layout.stored else out.subject
                                await raw.publish(subject, out.payload, out.headers if layout.msg_id else None)
                        await raw.drain()
                        if layout.purge:
                            for i in range(0, n, 256):
                                await asyncio.gather(*(js.purge_stream("CHURN", subject=subjects.entity_filter(
                                    "session", sid)) for sid in ids[i:i + 256]))
                        done += n
                        state = await stream_state(nc, "CHURN")
                        samples.append((done, rss_bytes(pid)))
                        print(f"  {name:<15} {done:>9,} sessions  nats-server {mib(samples[-1][1])}   "
                              f"{state['messages']:>9,} msgs {state.get('num_subjects', 0):>9,} subjects", flush=True)
                elapsed = time.monotonic() - started
                after = rss_bytes(pid)
                if args.settle > 0:
                    await asyncio.sleep(args.settle)
                    after = rss_bytes(pid)
                    print(f"  {name:<15} after {args.settle:g} s idle: nats-server {mib(after)}", flush=True)
                state = await stream_state(nc, "CHURN")
            finally:
                await nc.close()
        # The same data, a fresh server: the state it rebuilds and keeps (per-subject index, block index).
        with EmbeddedServer(dataclasses.replace(config, port=free_port())) as again:
            assert again.pid is not None
            nc = await nats.connect(again.url, name=f"churn-{name}-restarted")
            try:
                await stream_state(nc, "CHURN")  # the stream is loaded
                await asyncio.sleep(2.0)
                restarted = rss_bytes(again.pid)
            finally:
                await nc.close()
    live = (after - before) / args.raw_sessions
    kept = (restarted - before) / args.raw_sessions
    print(f"figure  {name:<15} nats-server {mib(before)} -> {mib(after)} live: {live:6.0f} B/session "
          f"({marginal(samples):6.0f} past the first sample); restarted on the same data {mib(restarted)}: "
          f"{kept:6.0f} B/session kept   [{state.get('num_subjects', 0):,} subjects, {state['bytes'] / MiB:.0f} MiB "
          f"stored, {args.raw_sessions / elapsed:,.0f} sessions/s]", flush=True)
    if args.settle < Settings().duplicate_window:
        print(f"note    {name:<15} 'kept' includes the message ids of the last {Settings().duplicate_window:g} s, "
              "which a restarted server rebuilds: --settle 130 for the floor", flush=True)
    print(f"figure  {name:<15} extrapolated: 1 M sessions {mib(live * 1e6)} live / {mib(kept * 1e6)} kept;  "
          f"10 M {mib(live * 1e7)} live / {mib(kept * 1e7)} kept", flush=True)
    return float(live), float(kept)


def marginal(samples: list[tuple[int, int]]) -> float:
    """Bytes per session between the first and the last sample: the slope, without the server's warm-up."""
    if len(samples) < 2 or samples[-1][0] == samples[0][0]:
        return float("nan")
    return (samples[-1][1] - samples[0][1]) / (samples[-1][0] - samples[0][0])


async def raw_layouts(args: argparse.Namespace) -> None:
    results: dict[str, tuple[float, float]] = {}
    for name in args.layouts:
        results[name] = await raw_layout(name, LAYOUTS[name], args)
    if "project" in results:
        live, kept = results["project"]
        for name, (lv, kp) in results.items():
            print(f"ratio   {name:<15} / project: live {lv / live if live > 0 else float('nan'):.2f}   "
                  f"kept {kp / kept if kept > 0 else float('nan'):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=200_000, help="SDK churn: sessions (default 200,000)")
    parser.add_argument("--every", type=int, default=20_000, help="sample every this many sessions (default 20,000)")
    parser.add_argument("--concurrency", type=int, default=256, help="sessions in flight at once (default 256)")
    parser.add_argument("--agents", type=int, default=4, help="agents claiming and terminating (default 4)")
    parser.add_argument("--settle", type=float, default=0.0,
                        help="seconds to wait after the churn before the last sample (130: past the duplicate window)")
    parser.add_argument("--no-sdk", action="store_true", help="skip the SDK churn against ledger up")
    parser.add_argument("--raw-sessions", type=int, default=None, help="raw layouts: sessions (default --sessions; "
                        "0: skip the raw layouts)")
    parser.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--sync-always", action=argparse.BooleanOptionalAction, default=False,
                        help="raw layouts: fsync every write (memory does not depend on it; default off)")
    args = parser.parse_args()
    if args.raw_sessions is None:
        args.raw_sessions = args.sessions
    if not args.no_sdk:
        print(f"--- SDK churn: {args.sessions:,} sessions against ledger up (fsync always)", flush=True)
        asyncio.run(sdk_churn(args))
    if args.raw_sessions > 0:
        print(f"--- raw layouts: {args.raw_sessions:,} sessions each, bare nats-server", flush=True)
        asyncio.run(raw_layouts(args))


if __name__ == "__main__":
    main()
