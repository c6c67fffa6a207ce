"""Failover on a log that already holds history, and claim contention, measured on the log's own clock.

    python bench/failover.py                                  # 1 M events in the log; 1,000 and 10,000 sessions
    python bench/failover.py --events 100000 --sessions 1000 --rounds 5
    python bench/failover.py --events 2000 --sessions 50 --rounds 1 --claimers 0   # a smoke run

1. The log is pre-filled with --events valid events (sessions created and
   terminated: settled history), fast (raw pipelined publishes of
   codec-encoded events, no fsync); then `ledger up` runs on it as a user runs
   it: fsync always, projector, liveness monitor, reclaimer.
2. Failover: a `ledger agent --no-self-claim` process (the victim, heartbeat
   --heartbeat, ttl --ttl) alone in its pool is given N sessions by the
   reclaimer; three healthy agents join the pool; then the victim is stopped:
   SIGTERM (it says goodbye on the way out: the goodbye path) or kill -9 (it
   just stops beating: the monitor must notice, after the ttl, and declare it
   dead: the death path). Per session, the stored time of its new claim minus
   (a) the stored time of the goodbye / death declaration - the goal: p99 <=
   100 ms at 1,000 sessions, <= 250 ms at 10,000 - and (b) the moment of the
   kill (this machine's clock), detection included. p50 / p99 / max.
3. Claim contention: M claimers (each with its own connection and agent
   identity) race over K orphaned sessions, in random orders, learning from a
   shared view of the log which are taken. Claims/s until all are owned, and a
   check of the whole log: every session has exactly one new owner and no
   overlapping or stale claim. Target >= 2,000 claims/s, zero double ownership.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import nats
from common import LedgerUp, RawPublisher, env, ledger_up, pct

from consumers.follow import Follower
from ledger import cancellation, codec, decide, subjects
from ledger import events as ev
from ledger import lifecycle as lc
from ledger.agent import Agent
from ledger.codec import Recorded
from ledger.errors import Conflict, NotClaimable
from ledger.ids import new_id
from ledger.settings import Settings
from ledger.store import EventStore
from ledger.writer import Writer
from ledgerctl.server import EmbeddedServer, ServerConfig, free_port


async def create_sessions(store: EventStore, producer: ev.Producer, pool: str, n: int, tag: str,
                          chunk: int = 1000) -> list[str]:
    """Create n sessions, pipelined a chunk at a time (a server that fsyncs every write is not flooded)."""
    ids = [f"{tag}-{i}" for i in range(n)]
    for i in range(0, n, chunk):
        futures = [await store.submit(ev.SessionCreated(producer=producer, session_id=sid, pool=pool), expect=0)
                   for sid in ids[i:i + chunk]]
        await store.flush()
        failed = [e for f in futures if (e := f.exception()) is not None]
        if failed:
            raise SystemExit(f"{len(failed)} of {len(futures)} session creations failed, first: {failed[0]}")
    return ids


async def claim_all_for(store: EventStore, producer: ev.Producer, agent: decide.AgentRef, sessions: list[str],
                        created: dict[str, int]) -> dict[str, int]:
    """Claim pending sessions for `agent` in one pipelined burst (bench set-up, no other claimer around)."""
    futures = {}
    for sid in sessions:
        event = ev.SessionClaimed(producer=producer, session_id=sid, agent_id=agent.agent_id,
                                  instance_id=agent.instance_id, incarnation=agent.incarnation)
        futures[sid] = await store.submit(event, expect=created[sid])
    await store.flush()
    return {sid: f.result() for sid, f in futures.items()}


async def last_seqs(store: EventStore, sessions: list[str]) -> dict[str, int]:
    out = {}
    for sid in sessions:
        last = await store.last("session", sid)
        if last is None:
            raise SystemExit(f"session {sid} is not in the log")
        out[sid] = last.seq
    return out


class ClaimWatch:
    """Every session claim stored after `start_seq`, as it lands: session -> (claimer, stored time in ns)."""

    def __init__(self, store: EventStore, start_seq: int) -> None:
        self.claims: dict[str, tuple[str, int]] = {}
        self._task = asyncio.create_task(self._follow(store, start_seq))

    async def _follow(self, store: EventStore, start_seq: int) -> None:
        async for batch in store.replay("ledger.session.*.claimed.*", start_seq=start_seq, follow=True):
            for r in batch:
                if isinstance(r, Recorded) and isinstance(r.event, ev.SessionClaimed):
                    self.claims[r.event.session_id] = (r.event.agent_id, r.timestamp_ns)

    async def until(self, sessions: list[str], owned: Callable[[str], bool], within: float, what: str) -> None:
        deadline = time.monotonic() + within
        while True:
            done = sum(1 for sid in sessions if sid in self.claims and owned(self.claims[sid][0]))
            if done == len(sessions):
                return
            if time.monotonic() > deadline:
                raise SystemExit(f"{what}: only {done} of {len(sessions)} sessions within {within:.0f} s")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        await cancellation.stop([self._task])


async def failover_round(up: LedgerUp, ledger: Writer, watch: ClaimWatch, stack: contextlib.AsyncExitStack, kind: str,
                         n: int, args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """Seconds from the kill (SIGKILL for a death, SIGTERM for a goodbye) and from the death declaration (or
    the goodbye) to each session's new claim: the bench's clock at the kill, the server's stored times after."""
    pool = f"fo-{kind}-{new_id()[:6]}"
    victim_id = f"{pool}-victim"
    # The victim alone in its pool first: the reclaimer gives it every new session.
    victim = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ledgerctl", "agent", "--agent-id", victim_id, "--pool", pool, "--capacity",
        str(n), "--heartbeat", str(args.heartbeat), "--ttl", str(args.ttl), "--no-self-claim",
        "--nats-url", up.url, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env())
    try:
        sessions = await create_sessions(ledger.store, ledger.producer, pool, n, pool)
        await watch.until(sessions, lambda who: who == victim_id, args.place_within,
                          "the reclaimer placed on the victim")
        for name in ("b1", "b2", "b3"):  # the healthy agents that will take over (kept to the end of the run)
            await stack.enter_async_context(Agent(ledger, agent_id=f"{pool}-{name}", pool=pool, capacity=n,
                                                  heartbeat=1.0, ttl=30.0))
        await asyncio.sleep(2.0)  # let the reclaimer see the fleet as it is
        killed_ns = time.time_ns()
        victim.send_signal(signal.SIGKILL if kind == "death" else signal.SIGTERM)
        await watch.until(sessions, lambda who: who != victim_id, args.ttl + 60, f"re-owned after the {kind}")
    finally:
        if victim.returncode is None:
            victim.kill()
        await asyncio.wait_for(victim.wait(), 30)
    verdict = ev.AgentDeclaredDead if kind == "death" else ev.AgentGoodbye
    decided = [r for r in await ledger.store.history("agent", victim_id)
               if isinstance(r, Recorded) and isinstance(r.event, verdict)]
    if not decided:
        raise SystemExit(f"no {verdict.__name__} of {victim_id} in the log")
    from_kill = [(watch.claims[sid][1] - killed_ns) / 1e9 for sid in sessions]
    from_verdict = [(watch.claims[sid][1] - decided[0].timestamp_ns) / 1e9 for sid in sessions]
    return from_kill, from_verdict


async def contention(url: str, claimers: int, orphans: int) -> None:
    settings = Settings(nats_url=url)
    pool = f"race-{new_id()[:6]}"
    async with Writer.connect(settings, producer_id="operator-bench") as ledger, contextlib.AsyncExitStack() as stack:
        lost = decide.AgentRef(f"{pool}-lost", new_id(), 0)
        await ledger.append(ev.AgentRegistered(producer=ev.Producer(id=lost.agent_id, instance=lost.instance_id),
                                               agent_id=lost.agent_id, instance_id=lost.instance_id, pool=pool))
        reclaimer = ev.Producer(id="reclaimer-bench", instance=new_id())  # claims for others, orphans
        lost = decide.AgentRef(lost.agent_id, lost.instance_id, (await ledger.registrations(lost.agent_id))[-1])
        sessions = await create_sessions(ledger.store, ledger.producer, pool, orphans, pool)
        tokens = await claim_all_for(ledger.store, reclaimer, lost, sessions, await last_seqs(ledger.store, sessions))
        futures = [await ledger.store.submit(ev.SessionOrphaned(
            producer=reclaimer, session_id=sid, reason="owner_dead", previous_owner=lost.agent_id,
            previous_incarnation=lost.incarnation, previous_token=token), expect=token)
            for sid, token in tokens.items()]
        await ledger.store.flush()
        start_seq = max(f.result() for f in futures)

        stores = [await stack.enter_async_context(EventStore.connect(settings, name=f"claimer-{i}"))
                  for i in range(claimers)]
        refs = []
        for i, store in enumerate(stores):
            me = ev.Producer(id=f"{pool}-c{i}", instance=new_id())
            seq = await store.append(ev.AgentRegistered(producer=me, agent_id=me.id, instance_id=me.instance,
                                                        pool=pool, capacity=orphans))
            refs.append((store, me, decide.AgentRef(me.id, me.instance, seq)))
        view = Follower(ledger.store, heartbeats=False)
        orphaned = asyncio.Event()  # the view has folded the last orphaning

        def heard(_stream: str, _batch: object, _changes: object) -> None:
            if view.state.ledger.seq >= start_seq:
                orphaned.set()

        view.listen(heard)
        following = asyncio.create_task(view.run())
        await orphaned.wait()
        counts = {"claims": 0, "conflicts": 0}

        async def claimer(store: EventStore, me: ev.Producer, ref: decide.AgentRef) -> None:
            order = sessions[:]
            random.shuffle(order)
            for sid in order:
                state = view.state.ledger.sessions[sid]
                if state.status != lc.S_ORPHANED:
                    continue  # taken already, as far as we have heard
                event = decide.decide_claim(state, sid, ref, producer=me, reason="failover")
                try:
                    await store.append(event, expect=state.last_seq)
                    counts["claims"] += 1
                except (Conflict, NotClaimable):
                    counts["conflicts"] += 1

        started = time.perf_counter()
        await asyncio.gather(*(claimer(*r) for r in refs))
        elapsed = time.perf_counter() - started
        following.cancel()

        # The whole log of these sessions, folded: exactly one new owner each, nothing overlapping or stale.
        registrations: dict[str, list[int]] = {}
        async for batch in ledger.store.replay("ledger.agent.*.registered.*"):
            for r in batch:
                if isinstance(r, Recorded) and isinstance(r.event, ev.AgentRegistered):
                    registrations.setdefault(r.event.agent_id, []).append(r.seq)
        histories: dict[str, list[Recorded]] = {sid: [] for sid in sessions}
        async for batch in ledger.store.replay("ledger.session.>"):
            for r in batch:
                if isinstance(r, Recorded) and isinstance(r.event, ev.SessionEvent) and \
                        r.event.session_id in histories:
                    histories[r.event.session_id].append(r)
        lookup = lc.registrations_lookup(registrations)
        problems = 0
        for history in histories.values():
            state, anomalies = lc.fold(lc.evolve_session, history, lookup)
            claims_after = [r for r in history if r.seq > start_seq and isinstance(r.event, ev.SessionClaimed)]
            if anomalies or len(claims_after) != 1 or state.status != lc.S_ASSIGNED:
                problems += 1
    print(f"claim contention: {claimers} claimers, {orphans:,} orphaned sessions: "
          f"{counts['claims']:,} claims in {elapsed:.2f}s = {counts['claims'] / elapsed:,.0f} claims/s "
          f"({counts['conflicts']:,} lost races), double ownership: {problems} "
          f"({'ok' if problems == 0 else 'FAILED'}; target >= 2,000 claims/s)")


def prefill(data_dir: Path, events: int) -> int:
    """Fill a fresh data directory's log with `events` valid events (sessions created and terminated, by the
    operator: settled history that leaves the consumers nothing to do), fast: raw pipelined publishes of
    codec-encoded events, on a server without fsync. Returns the LEDGER stream's last sequence."""
    async def fill(url: str) -> int:
        async with EventStore.connect(Settings(nats_url=url), ensure=True):
            pass
        operator = ev.Producer(id="operator-bench", instance=new_id())
        nc = await nats.connect(url, name="bench-prefill")
        try:
            async with RawPublisher(nc) as raw:
                for i in range(events // 2):
                    sid = f"past-{i}"
                    for event in (ev.SessionCreated(producer=operator, session_id=sid, pool="past"),
                                  ev.SessionTerminated(producer=operator, session_id=sid, reason="bench history")):
                        out = codec.encode(event)
                        await raw.publish(out.subject, out.payload, out.headers)
                await raw.drain()
            info = await nc.jetstream().stream_info(subjects.LEDGER_STREAM)
            return int(info.state.last_seq)
        finally:
            await nc.close()

    if events <= 0:
        return 0
    started = time.monotonic()
    with EmbeddedServer(ServerConfig(data_dir=data_dir, port=free_port(), sync_always=False)) as server:
        last = asyncio.run(fill(server.url))
    print(f"pre-filled the log with {last:,} events in {time.monotonic() - started:.1f} s "
          "(raw pipelined publishes, no fsync)", flush=True)
    return last


async def write_floor(url: str, n: int) -> tuple[float, float]:
    """The raw baseline of a failover: how long the same server (same disk, same fsync) takes to store `n`
    compare-and-set publishes of a claim's size, pipelined (one reply inbox, a wildcard ack subscription), and
    as one atomic batch (ADR-50) - on a scratch stream, so the ledger's log is not touched. Milliseconds each."""
    import json
    import uuid

    nc = await nats.connect(url, name="bench-floor")
    name = f"BENCHFLOOR{uuid.uuid4().hex[:8]}"
    config = {"name": name, "subjects": [f"{name.lower()}.>"], "storage": "file", "allow_atomic": True}
    try:
        await nc.request(f"$JS.API.STREAM.CREATE.{name}", json.dumps(config).encode(), timeout=10)
        payload = b"x" * 330  # a session.claimed as encoded is ~330 bytes
        started = time.perf_counter()
        async with RawPublisher(nc) as raw:
            for i in range(n):
                await raw.publish(f"{name.lower()}.p{i}", payload, {"Nats-Expected-Last-Subject-Sequence": "0"})
            await raw.drain()
        pipelined = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        for first in range(0, n, 1000):  # at most 1,000 messages per atomic batch
            batch, size = uuid.uuid4().hex, min(1000, n - first)
            for i in range(size):
                headers = {"Nats-Batch-Id": batch, "Nats-Batch-Sequence": str(i + 1),
                           "Nats-Expected-Last-Subject-Sequence": "0"}
                subject = f"{name.lower()}.b{first + i}"
                if i == size - 1:
                    reply = await nc.request(subject, payload, headers={**headers, "Nats-Batch-Commit": "1"},
                                             timeout=30)
                    if b'"error"' in reply.data:
                        raise SystemExit(f"atomic batch refused: {reply.data[:300]!r}")
                elif i == 0:
                    await nc.request(subject, payload, headers=headers, timeout=30)
                else:
                    await nc.publish(subject, payload, headers=headers)
        batched = (time.perf_counter() - started) * 1000
        return pipelined, batched
    finally:
        with contextlib.suppress(Exception):
            await nc.request(f"$JS.API.STREAM.DELETE.{name}", b"", timeout=10)
        await nc.close()


async def run(data_dir: Path, args: argparse.Namespace, start_seq: int) -> None:
    started = time.monotonic()
    fsync = "always" if args.sync_always else "off"
    with contextlib.ExitStack() as own:
        extra = []
        if not args.sync_always:  # `ledger up` always fsyncs a server of its own: serve the log without, point it there
            server = own.enter_context(EmbeddedServer(ServerConfig(data_dir=data_dir, port=free_port(),
                                                                   sync_always=False)))
            extra = ["--nats-url", server.url]
        await measure(data_dir, args, start_seq, started, fsync, extra)


async def measure(data_dir: Path, args: argparse.Namespace, start_seq: int, started: float, fsync: str,
                  extra: list[str]) -> None:
    async with ledger_up(data_dir, "--no-query-service", *extra, ready_within=600) as up:
        print(f"ledger up ready in {time.monotonic() - started:.1f} s (fsync {fsync}, {start_seq:,} events in the log)",
              flush=True)
        settings = Settings(nats_url=up.url)
        async with EventStore.connect(settings, name="bench-watch") as store, \
                Writer.connect(settings, producer_id="operator-bench") as ledger, \
                contextlib.AsyncExitStack() as stack:
            watch = ClaimWatch(store, start_seq + 1)
            try:
                for n in args.sessions:
                    for kind in ("goodbye", "death"):
                        kill_ms: list[float] = []
                        verdict_ms: list[float] = []
                        for _ in range(args.rounds):
                            from_kill, from_verdict = await failover_round(up, ledger, watch, stack, kind, n, args)
                            kill_ms += [x * 1000 for x in from_kill]
                            verdict_ms += [x * 1000 for x in from_verdict]
                        goal = 100 if n <= 1000 else 250
                        what = "SIGTERM" if kind == "goodbye" else "kill -9"
                        after = "goodbye" if kind == "goodbye" else "declaration"
                        print(f"figure  failover {kind:<7} {n:>6,} sessions x {args.rounds}, from the {after:<11}: "
                              f"p50 {pct(verdict_ms, 50):7.1f} ms  p99 {pct(verdict_ms, 99):7.1f} ms  "
                              f"max {max(verdict_ms):7.1f} ms   (goal p99 <= {goal} ms: "
                              f"{'met' if pct(verdict_ms, 99) <= goal else 'NOT met'})", flush=True)
                        how = (f"detection included: ttl {args.ttl:g} s" if kind == "death"
                               else "the goodbye written on the way out included")
                        print(f"figure  failover {kind:<7} {n:>6,} sessions x {args.rounds}, from the {what:<11}: "
                              f"p50 {pct(kill_ms, 50):7.1f} ms  p99 {pct(kill_ms, 99):7.1f} ms  "
                              f"max {max(kill_ms):7.1f} ms   ({how})", flush=True)
                    pipelined, batched = await write_floor(up.url, n)
                    print(f"baseline raw nats-py on this server (fsync {fsync}): {n:,} compare-and-set publishes of a "
                          f"claim's size stored in {pipelined:.1f} ms pipelined, {batched:.1f} ms as atomic batches; "
                          f"the {kind} path's p99 from the declaration is {pct(verdict_ms, 99) / pipelined:.2f}x the "
                          f"pipelined floor", flush=True)
            finally:
                await watch.stop()


async def contention_run(args: argparse.Namespace) -> None:
    """Claim contention on a bare server (no reclaimer to take the orphans first), fsync as for the failovers."""
    with tempfile.TemporaryDirectory(prefix="ledger-contention-") as tmp, \
            EmbeddedServer(ServerConfig(data_dir=Path(tmp), port=free_port(), sync_always=args.sync_always)) as server:
        async with EventStore.connect(Settings(nats_url=server.url), ensure=True):
            pass
        await contention(server.url, args.claimers, args.orphans)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sync-always", action=argparse.BooleanOptionalAction, default=True,
                        help="fsync every write, as `ledger up` does by default (default: on)")
    parser.add_argument("--events", type=int, default=1_000_000, help="events in the log before the first failover "
                        "(default 1,000,000)")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1000, 10_000],
                        help="sessions of the failing agent (default: 1000 10000)")
    parser.add_argument("--rounds", type=int, default=3, help="failovers of each kind and size (default 3)")
    parser.add_argument("--heartbeat", type=float, default=1.0, help="the victim's heartbeat interval (default 1 s)")
    parser.add_argument("--ttl", type=float, default=3.0, help="the victim's ttl: its detection time (default 3 s)")
    parser.add_argument("--place-within", type=float, default=600.0,
                        help="seconds the stack may take to place a round's sessions on the victim (the first round "
                             "waits for its catch-up on the pre-filled log; default 600)")
    parser.add_argument("--claimers", type=int, default=50, help="claim contention: claimers (0: skip it)")
    parser.add_argument("--orphans", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ledger-failover-") as tmp:
        data_dir = Path(tmp)
        start_seq = prefill(data_dir, args.events)
        asyncio.run(run(data_dir, args, start_seq))
    if args.claimers > 0:
        asyncio.run(contention_run(args))


if __name__ == "__main__":
    main()
