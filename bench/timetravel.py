"""Time-travel benchmark: views of past moments from the projection's version rows vs nearest snapshot + replay.

    python bench/timetravel.py                    # embedded nats-server, 1,000,000 events
    python bench/timetravel.py --events 20000     # a smoke run
    python bench/timetravel.py --url nats://127.0.0.1:4222   # an existing server (publishes onto its streams)

It publishes the fixed-population workload of bench/projection.py (bench/workload.py: 1,000 agents, 20,000
sessions, 5,000 routes; 40 % heartbeats on LEDGER_HB), catches a projector up into a new SQLite file (version
rows included: its time and the rows it wrote are printed), then asks views of the past at random moments,
each moment once (no cache hits), in two ways on the same file and the same server:

(a) indexed: `Query.open(file, store)` - what `ledger sessions --as-of` / `--at-seq` does: the version rows,
    read a page at a time in SQL, as a view of now is;
(b) baseline: the same Query answering from the nearest snapshot plus a replay from JetStream
    (`projections.timetravel.state_as_of`, the path before the version rows; fewer samples, it is slow).

The views are those a person asks: the first page of sessions, agents and routes as of a random LEDGER
sequence (100 rows, what a table shows unless told), a later page of the sessions in one state (`after` a
random id: the next page), the pools at a random moment in time (every agent judged), and every session at
once (`--all`, 20,000 rows; fewer samples). For each it prints p50 / p99 / max (goal: indexed p99 < 250 ms at
1 M events), the ratio baseline / indexed where the baseline ran, and the same view "now" for scale: a page of
the past costs one page of rows, as now, plus finding the moment (about twenty gets from the server: the
LEDGER message, a bisection of LEDGER_HB) and counting its entities (`total`: a pass over each one's version
as of the moment, unless no filter); the agents page counts their sessions then, and the pools view judges
every agent and counts every session, so both pay a pass over the moment's sessions. Every row of the past
costs about what every row of now does (building the rows, not finding them).
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import pct, run_against_server, server_options
from workload import Workload

from ledger.codec import from_ns
from ledger.settings import Settings
from ledger.store import EventStore
from ledger.subjects import HEARTBEAT_STREAM, LEDGER_STREAM
from projections.gc_tuning import tune_gc
from projections.projector import Projector
from projections.query import Query
from projections.settings import ProjectionSettings
from projections.timetravel import Past, Rebuilt, state_as_of

VERSION_TABLES = ("agent_versions", "session_versions", "route_versions", "pool_versions", "beat_versions")


class ReplayQuery(Query):
    """The baseline: every moment rebuilt from the nearest snapshot plus a replay, never from the version rows."""

    async def _past(self, as_of: int | datetime) -> Past | Rebuilt:
        if isinstance(as_of, int):
            return await state_as_of(self.store, self.db, seq=as_of)  # type: ignore[arg-type]
        return await state_as_of(self.store, self.db, time=as_of)  # type: ignore[arg-type]


async def publish(store: EventStore, total: int, workload: Workload) -> tuple[int, int, float]:
    started = time.perf_counter()
    for event in workload.events(total):
        await store.submit(event)
    await store.flush()
    return workload.ledger_events, workload.heartbeats, total / (time.perf_counter() - started)


async def build(store: EventStore, db: Path) -> tuple[float, int]:
    projector = Projector(store, ProjectionSettings(db=str(db)), name="bench-timetravel")
    await projector.open()
    try:
        started = time.perf_counter()
        await projector.catch_up()
        return time.perf_counter() - started, projector.events
    finally:
        await projector.close()


async def timed(ask: Callable[[Any], Awaitable[Any]], moments: list[Any]) -> list[float]:
    out = []
    for moment in moments:
        started = time.perf_counter()
        await ask(moment)
        out.append(time.perf_counter() - started)
    return out


def figures(t: list[float]) -> str:
    return f"p50 {pct(t, 50) * 1e3:7.1f}  p99 {pct(t, 99) * 1e3:7.1f}  max {max(t) * 1e3:7.1f} ms (n={len(t)})"


def line(name: str, indexed: list[float], baseline: list[float] | None, now: list[float]) -> str:
    out = f"  {name:<34} indexed  {figures(indexed)}\n"
    if baseline:
        out += (f"  {'':<34} baseline {figures(baseline)}\n"
                f"  {'':<34} ratio baseline/indexed: p50 {pct(baseline, 50) / pct(indexed, 50):6.1f}x, "
                f"p99 {pct(baseline, 99) / pct(indexed, 99):6.1f}x\n")
    return out + f"  {'':<34} (the same view now: p50 {pct(now, 50) * 1e3:.1f} ms, max {max(now) * 1e3:.1f} ms)"


PAGE = 100
"""Rows a table shows unless told (`ledger sessions` without --limit or --all)."""

View = tuple[str, str, Callable[[Any], dict[str, Any]], list[Any], bool]
"""(name, Query method, its arguments for a moment (as_of aside), the moments, whether the baseline runs too)."""


async def run(url: str, events: int, samples: int, baseline_samples: int, every_samples: int, work: Path) -> None:
    async with EventStore.connect(Settings(nats_url=url), ensure=True, name="bench-timetravel") as store:
        print(f"publishing {events:,} events (pipelined EventStore.submit) ...", flush=True)
        workload = Workload(first_seq=await store.last_seq(LEDGER_STREAM) + 1)
        ledger_n, hb_n, rate = await publish(store, events, workload)
        print(f"  {ledger_n:,} lifecycle events on {LEDGER_STREAM}, {hb_n:,} heartbeats on {HEARTBEAT_STREAM} "
              f"at {rate:,.0f}/s", flush=True)
        db = work / "timetravel.sqlite3"
        seconds, folded = await build(store, db)
        with sqlite3.connect(db) as conn:
            rows = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in VERSION_TABLES}
        print(f"projector catch-up (with version rows): {seconds:.1f} s for {folded:,} events "
              f"({folded / seconds:,.0f}/s); file {db.stat().st_size / 2**20:,.0f} MiB; version rows: "
              + ", ".join(f"{t.removesuffix('_versions')} {n:,}" for t, n in rows.items()), flush=True)

        facts = await store.stream_facts(LEDGER_STREAM)
        rng = random.Random(13)
        seqs = rng.sample(range(1, facts.last_seq + 1), min(samples, facts.last_seq))
        first_ns, last_ns = facts.first_ns, await store.stored_ns(facts.last_seq) or facts.first_ns
        moments = [from_ns(rng.randrange(first_ns, last_ns + 1)) for _ in range(samples)]
        after = {seq: f"session-{rng.randrange(workload.n_sessions)}" for seq in seqs}
        views: list[View] = [
            ("sessions as of #seq, first page", "sessions", lambda _: {"limit": PAGE}, seqs, True),
            ("sessions #seq, assigned, a page on", "sessions",
             lambda m: {"state": "assigned", "after": after.get(m, "session-5"), "limit": PAGE}, seqs, False),
            ("agents as of #seq, first page", "agents", lambda _: {"limit": PAGE}, seqs, True),
            ("routes as of #seq, first page", "routes", lambda _: {"limit": PAGE}, seqs, False),
            ("pools as of a time", "pools", lambda _: {}, moments, True),
            ("sessions as of #seq, every row", "sessions", lambda _: {}, seqs[:every_samples], False),
        ]
        few = baseline_samples
        async with Query.open(db, store) as indexed, ReplayQuery.open(db, store) as replayed:
            probe = await indexed.sessions(as_of=seqs[0], limit=PAGE)
            assert probe.position.source.startswith("the projection's versions"), probe.position.source
            print(f"views of the past ({probe.total:,} sessions at #{seqs[0]}; every moment asked once):",
                  flush=True)
            for name, view, args, at, baseline in views:
                fast = await timed(lambda m, v=view, a=args: getattr(indexed, v)(as_of=m, **a(m)), at)
                slow = (await timed(lambda m, v=view, a=args: getattr(replayed, v)(as_of=m, **a(m)), at[-few:])
                        if baseline and few else None)
                now = await timed(lambda m, v=view, a=args: getattr(indexed, v)(**a(m)), at[:20])
                print(line(name, fast, slow, now), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    server_options(parser)
    parser.add_argument("--events", type=int, default=1_000_000, help="events to publish (default 1000000)")
    parser.add_argument("--samples", type=int, default=200, help="moments per view, indexed (default 200)")
    parser.add_argument("--baseline-samples", type=int, default=9,
                        help="moments per view for the snapshot + replay baseline (default 9: seconds each at 1 M)")
    parser.add_argument("--every-samples", type=int, default=20,
                        help="moments for the view of every session (default 20)")
    args = parser.parse_args()
    tune_gc()  # what `ledger project` and `ledger up` do

    async def go(url: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            await run(url, args.events, args.samples, args.baseline_samples, args.every_samples, Path(tmp))

    run_against_server(args, go)


if __name__ == "__main__":
    main()
