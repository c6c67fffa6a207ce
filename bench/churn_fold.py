"""Churn through the fold: sessions created, claimed, routed and terminated, with and without retirement.

    python bench/churn_fold.py                    # 200,000 sessions (the issue's churn figure), about a minute
    python bench/churn_fold.py --sessions 20000   # a smoke run

No server: the items are built as the LEDGER stream would store them (50 ms apart, so the default
retention of ten minutes holds 12,000 of them) and folded by `projections.state`, the fold `ledger up`,
`ledger agent` and the consumers keep. After each fifth of the run it prints, for retirement at the
default `retain` beside the baseline of no retirement (what the fold did before): entries kept in the
state, the process's RSS (MiB), the LEDGER snapshot (KiB, msgpack before zlib), fold cost per item (us),
and one scan of every session as the reclaimer's `plan` does per step (ms). Goal: flat within 20 %.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ledger import codec
from ledger import events as ev
from ledger.codec import Recorded
from ledger.lifecycle import CLAIMABLE
from ledger.subjects import LEDGER_STREAM
from projections.state import DEFAULT_RETAIN, LedgerState, LifecycleState, encode

OPERATOR, WATCHDOG = ev.Producer(id="cli", instance="c"), ev.Producer(id="watchdog", instance="w")
STEP_NS = 50_000_000


def churn(sessions: int, start: int = 0, seq: int = 0) -> list[Recorded]:
    """Sessions `start`.. `start + sessions`; agents of 50 sessions each come and go; every 4th session routed."""
    t0, items = codec.to_ns(ev.utcnow()), []

    def log(event: ev.Event) -> Recorded:
        items.append(Recorded(LEDGER_STREAM, seq + len(items) + 1, codec.subject_of(event),
                              t0 + (seq + len(items) + 1) * STEP_NS, event))
        return items[-1]

    for n in range(start, start + sessions):
        agent = f"a{n // 50}"
        me = ev.Producer(id=agent, instance="i")
        if n % 50 == 0 or n == start:
            incarnation = log(ev.AgentRegistered(producer=me, agent_id=agent, instance_id="i", pool="p", ttl=60)).seq
        sid, rid = f"s{n}", f"r{n}"
        log(ev.SessionCreated(producer=OPERATOR, session_id=sid, pool="p"))
        log(ev.SessionClaimed(producer=me, session_id=sid, agent_id=agent, instance_id="i", incarnation=incarnation,
                              reason="initial"))
        if n % 4 == 0:
            log(ev.RouteCreated(producer=OPERATOR, route_id=rid, session_id=sid, endpoint="e"))
            log(ev.RouteTransitioned(producer=WATCHDOG, route_id=rid, from_state="PENDING", to_state="TERMINATING"))
            log(ev.RouteTransitioned(producer=WATCHDOG, route_id=rid, from_state="TERMINATING", to_state="TERMINATED"))
        log(ev.SessionTerminated(producer=OPERATOR, session_id=sid, token=None))
        if n % 50 == 49:
            log(ev.AgentGoodbye(producer=me, agent_id=agent, instance_id="i", incarnation=incarnation))
    return items


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run(sessions: int, retain: float) -> None:
    state = LedgerState(ledger=LifecycleState(retain=retain))
    fifth = sessions // 5
    print("  sessions   entries   RSS MiB  snapshot KiB  us/item  scan ms", flush=True)
    for k in range(5):
        items = churn(fifth, k * fifth, state.ledger.seq)  # built a fifth at a time: only the state accumulates
        t = time.perf_counter()
        state.apply_all(items)
        per_item = (time.perf_counter() - t) / len(items) * 1e6
        del items
        t = time.perf_counter()
        sum(1 for s in state.ledger.sessions.values() if s.status in CLAIMABLE)
        scan = (time.perf_counter() - t) * 1e3
        part = state.ledger
        entries = len(part.agents) + len(part.sessions) + len(part.routes)
        print(f"  {(k + 1) * fifth:>8}  {entries:>8}  {rss_mib():>8.1f}  {len(encode(part)) // 1024:>12}  "
              f"{per_item:>7.1f}  {scan:>7.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=200_000)
    parser.add_argument("--retain", type=float, help="run this one configuration in this process")
    args = parser.parse_args()
    if args.retain is not None:
        run(args.sessions, args.retain)
        return
    for label, retain in ((f"retain {DEFAULT_RETAIN:g}s", DEFAULT_RETAIN), ("baseline: no retirement", 1e12)):
        print(label, flush=True)  # each in a process of its own: RSS is not shared
        subprocess.run([sys.executable, __file__, "--sessions", str(args.sessions), "--retain", str(retain)],
                       check=True)


if __name__ == "__main__":
    main()
