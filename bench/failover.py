"""Failover and claim contention, measured on the log's own clock.

    python bench/failover.py                         # embedded nats-server
    python bench/failover.py --sessions 1000 --claimers 50 --orphans 10000

1. Failover: an agent owns N sessions; it is declared dead (as the liveness
   monitor would), or it says goodbye. The reclaimer runs in its own process
   (`ledger consumers --no-monitor --no-watchdog`) and three healthy agents are
   in the pool. Per session: the stored time of its new claim minus the stored
   time of the death (or goodbye) event; p50 / p99 / max. Target p99 <= 250 ms.
2. Claim contention: M claimers (each with its own connection and agent
   identity) race over K orphaned sessions, in random orders, learning from a
   shared view of the log which are taken. Claims/s until all are owned, and a
   check of the whole log: every session has exactly one new owner and no
   overlapping or stale claim. Target >= 2,000 claims/s, zero double ownership.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from common import pct, run_against_server, server_options

from consumers.follow import Follower
from ledger import decide
from ledger import events as ev
from ledger import lifecycle as lc
from ledger.agent import Agent
from ledger.codec import Recorded
from ledger.errors import Conflict, NotClaimable
from ledger.ids import new_id
from ledger.settings import Settings
from ledger.store import EventStore
from ledger.writer import Writer


async def create_sessions(store: EventStore, producer: ev.Producer, pool: str, n: int, tag: str) -> list[str]:
    ids = [f"{tag}-{i}" for i in range(n)]
    futures = [await store.submit(ev.SessionCreated(producer=producer, session_id=sid, pool=pool), expect=0)
               for sid in ids]
    await store.flush()
    for f in futures:
        f.result()
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
    return {sid: (await store.last("session", sid)).seq for sid in sessions}


async def failover_round(url: str, kind: str, n: int) -> list[float]:
    """Seconds from the death/goodbye event to each session's new claim (server clock)."""
    settings = Settings(nats_url=url)
    pool = f"fo-{kind}-{new_id()[:6]}"
    async with Writer.connect(settings, producer_id="operator-bench") as ledger, contextlib.AsyncExitStack() as stack:
        # The victim alone in its pool first: the reclaimer gives it every new session.
        victim = await stack.enter_async_context(Agent(ledger, agent_id=f"{pool}-victim", pool=pool,
                                                       capacity=n, heartbeat=1.0, ttl=30.0))
        sessions = await create_sessions(ledger.store, ledger.producer, pool, n, pool)
        deadline = time.monotonic() + 30
        while len(victim.owned) < n:
            if time.monotonic() > deadline:
                raise SystemExit(f"the reclaimer placed only {len(victim.owned)} of {n} sessions on the victim")
            await asyncio.sleep(0.05)
        for name in ("b1", "b2", "b3"):  # the healthy agents that will take over
            await stack.enter_async_context(Agent(ledger, agent_id=f"{pool}-{name}", pool=pool, capacity=n,
                                                  heartbeat=1.0, ttl=30.0))
        await asyncio.sleep(1.0)  # let the reclaimer see the fleet as it is
        if kind == "death":
            victim._closing = True  # the process is gone: it neither re-registers nor says goodbye
            monitor = ev.Producer(id="monitor-bench", instance=new_id())  # only the monitor declares deaths
            seq = await ledger.append(ev.AgentDeclaredDead(producer=monitor, agent_id=victim.agent_id,
                                                           incarnation=victim.incarnation, reason="bench"))
        else:
            await victim.goodbye("bench")
            seq = (await ledger.store.last("agent", victim.agent_id)).seq
        decided = next(r for r in await ledger.store.history("agent", victim.agent_id) if r.seq == seq)
        deadline = time.monotonic() + 30
        latencies: dict[str, float] = {}
        while len(latencies) < n and time.monotonic() < deadline:
            for sid in sessions:
                if sid in latencies:
                    continue
                last = await ledger.store.last("session", sid)
                if isinstance(last, Recorded) and isinstance(last.event, ev.SessionClaimed) and \
                        last.event.agent_id != victim.agent_id:
                    latencies[sid] = (last.timestamp_ns - decided.timestamp_ns) / 1e9
            await asyncio.sleep(0.05)
        if len(latencies) < n:
            raise SystemExit(f"only {len(latencies)} of {n} sessions were re-owned within 30 s")
        return list(latencies.values())


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
                registrations.setdefault(r.event.agent_id, []).append(r.seq)
        histories: dict[str, list[Recorded]] = {sid: [] for sid in sessions}
        async for batch in ledger.store.replay("ledger.session.>"):
            for r in batch:
                if isinstance(r, Recorded) and r.event.session_id in histories:
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


async def run(url: str, sessions: int, rounds: int, claimers: int, orphans: int) -> None:
    async with EventStore.connect(Settings(nats_url=url), ensure=True):
        pass
    reclaimer = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ledgerctl", "consumers", "--no-monitor", "--no-watchdog", "--nats-url", url,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        await asyncio.sleep(1.5)
        for kind in ("death", "goodbye"):
            all_latencies: list[float] = []
            for _ in range(rounds):
                all_latencies += await failover_round(url, kind, sessions)
            ms = [x * 1000 for x in all_latencies]
            print(f"failover after {kind:<8}: {sessions:,} sessions x {rounds}: p50 {pct(ms, 50):6.1f} ms   "
                  f"p99 {pct(ms, 99):6.1f} ms   max {max(ms):6.1f} ms   (target p99 <= 250 ms)", flush=True)
    finally:
        reclaimer.terminate()
        await asyncio.wait_for(reclaimer.wait(), 30)
    await contention(url, claimers, orphans)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    server_options(parser)
    parser.add_argument("--sessions", type=int, default=1000, help="sessions of the failing agent (default 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="failovers of each kind (default 3)")
    parser.add_argument("--claimers", type=int, default=50)
    parser.add_argument("--orphans", type=int, default=10_000)
    args = parser.parse_args()
    run_against_server(args, lambda url: run(url, args.sessions, args.rounds, args.claimers, args.orphans))


if __name__ == "__main__":
    main()
