"""Liveness monitor benchmark: the cost of a check (one 0.2 s tick) as the fleet grows, against a full scan.

    python bench/liveness.py                          # embedded nats-server; 1k, 5k, 10k, 20k agents
    python bench/liveness.py --agents 200,1000 --cycles 1   # a smoke run
    python bench/liveness.py --url nats://127.0.0.1:4222

The fleet lives in memory: a LedgerState with N agents (heartbeat every 5 s, ttl 30 s), each beating every
5 s, spread evenly over the 25 ticks of a beat interval (N / 25 beats per tick: 4,000 beats/s at 20 k). The
monitor is the real `LivenessMonitor` on a Follower of that state (a server is only needed to construct its
Writer: a fleet beating as it should gets no verdict, so nothing is written). Per tick, the beats of that
tick are folded into the state and told to the monitor, then `check(now)` runs. Reported per N, over
`--cycles` beat intervals after a warm-up:

  check     the monitor's check per tick, mean and p99 (judging the agents due: an agent that beats is judged when the
            beat it was last judged with would have turned it overdue - once per 3 intervals)
  per beat  what the monitor spends per beat: hearing it (scheduling it) plus judging it, in microseconds
  idle      a check with nothing due (no beat since the last one)
  baseline  judging every agent once (`liveness_rules.judge` over the whole fleet: what every check did
            before the deadlines, measured here on the same state)
  ratio     baseline / check

The goal (issue 13): a check costs O(change) - flat per beat as N grows - and idle costs ~nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import run_against_server, server_options

from consumers import liveness_rules as rules
from consumers.follow import Follower
from consumers.monitor import LivenessMonitor
from ledger import codec
from ledger import events as ev
from ledger.codec import Item, Recorded, from_ns
from ledger.settings import Settings
from ledger.store import EventStore
from ledger.subjects import HEARTBEAT_STREAM, LEDGER_STREAM
from ledger.writer import Writer
from projections.state import LedgerState

TICK = 0.2
INTERVAL = 5.0
TICKS_PER_INTERVAL = round(INTERVAL / TICK)
T0 = datetime(2026, 11, 1, tzinfo=UTC)
MONITOR = ev.Producer(id="monitor", instance="bench")
WARM_UP = 4
"""Beat intervals before measuring: the first check judges everyone (their deadlines all from the registration,
15 s on), then the deadlines spread out as each agent is judged with its own newest beat."""


class Fleet:
    """N agents registered at T0 in one pool, and their beats as the heartbeat stream would store them."""

    def __init__(self, agents: int) -> None:
        self.agents = agents
        self.state = LedgerState()
        self.seq = {LEDGER_STREAM: 0, HEARTBEAT_STREAM: 0}
        self.beat_no = 0
        self.ids = [f"a{n}" for n in range(agents)]
        self.state.apply_all([self._record(ev.AgentRegistered(
            producer=ev.Producer(id=a, instance="i"), agent_id=a, instance_id="i", pool="p",
            heartbeat_interval=INTERVAL, ttl=30.0), T0) for a in self.ids])
        self.incarnation = {a: self.state.agents[a].incarnation for a in self.ids}

    def _record(self, event: ev.Event, at: datetime) -> Recorded:
        stream = HEARTBEAT_STREAM if type(event).family == "hb" else LEDGER_STREAM
        self.seq[stream] += 1
        return Recorded(stream, self.seq[stream], codec.subject_of(event), codec.to_ns(at), event)

    def beats(self, tick: int, at: datetime) -> list[Item]:
        """The beats of tick `tick` (each agent beats at one of the interval's ticks)."""
        out: list[Item] = []
        for a in self.ids[tick % TICKS_PER_INTERVAL::TICKS_PER_INTERVAL]:
            self.beat_no += 1
            out.append(self._record(ev.AgentHeartbeat(producer=ev.Producer(id=a, instance="i"), agent_id=a,
                                                      instance_id="i", incarnation=self.incarnation[a],
                                                      beat=self.beat_no), at))
        return out


def full_scan(state: LedgerState, now: datetime, settings: rules.LivenessSettings) -> int:
    """The baseline: every agent judged once, as each check did before the deadlines; returns the verdicts."""
    verdicts = 0
    for agent in list(state.ledger.agents.values()):
        beat = state.current_beat(agent.agent_id)
        last = rules.LastBeat(beat.seq, from_ns(beat.stored_ns)) if beat is not None else None
        rules.overdue(agent, last, now, settings)
        if rules.judge(agent, last, [], now, settings, MONITOR.id) is not None:
            verdicts += 1
    return verdicts


async def measure(store: EventStore, agents: int, cycles: int) -> dict[str, float]:
    fleet = Fleet(agents)
    follower = Follower(store, fleet.state)
    monitor = LivenessMonitor(Writer(store, MONITOR), follower)
    checks: list[float] = []
    heard: list[float] = []
    idle: list[float] = []
    baseline: list[float] = []
    beats = judged = 0
    tick = 0
    for cycle in range(WARM_UP + cycles):
        for _ in range(TICKS_PER_INTERVAL):
            tick += 1
            now = T0 + timedelta(seconds=tick * TICK)
            batch = fleet.beats(tick, now)
            changes = fleet.state.apply_all(batch)  # the follower's fold (not the monitor's cost)
            started = time.perf_counter()
            monitor._heard(HEARTBEAT_STREAM, batch, changes)  # what the follower tells the monitor
            hearing = time.perf_counter() - started
            before = monitor.judged
            started = time.perf_counter()
            wrote = await monitor.check(now)
            checking = time.perf_counter() - started
            if wrote:
                raise SystemExit(f"a beating fleet got verdicts: {wrote[:3]}")
            started = time.perf_counter()
            await monitor.check(now + timedelta(milliseconds=1))  # nothing beat since: nothing due
            idling = time.perf_counter() - started
            if cycle < WARM_UP:
                continue
            checks.append(checking)
            heard.append(hearing)
            idle.append(idling)
            beats += len(batch)
            judged += monitor.judged - before
            if tick % 5 == 0:  # the full scan is slow at large N: a sample of the ticks is enough
                started = time.perf_counter()
                if full_scan(fleet.state, now, monitor.settings):
                    raise SystemExit("the full scan found verdicts in a beating fleet")
                baseline.append(time.perf_counter() - started)
    check_ms = statistics.fmean(checks) * 1e3  # (a mean: the judging falls on every third beat of an agent)
    baseline_ms = statistics.fmean(baseline) * 1e3
    return {"agents": agents, "check_ms": check_ms, "check_p99_ms": sorted(checks)[int(0.99 * len(checks))] * 1e3,
            "per_beat_us": (sum(checks) + sum(heard)) / max(1, beats) * 1e6, "judged_per_tick": judged / len(checks),
            "idle_us": statistics.median(idle) * 1e6, "baseline_ms": baseline_ms,
            "ratio": baseline_ms / check_ms if check_ms else float("inf")}


async def main(url: str, sizes: list[int], cycles: int) -> None:
    async with EventStore.connect(Settings(nats_url=url), ensure=True) as store:
        print(f"{'agents':>7} {'beats/s':>8} {'check ms':>9} {'p99 ms':>7} {'judged/tick':>11} {'per beat us':>11} "
              f"{'idle us':>8} {'baseline ms':>11} {'ratio':>7}")
        for n in sizes:
            r = await measure(store, n, cycles)
            print(f"{n:>7} {n / INTERVAL:>8.0f} {r['check_ms']:>9.2f} {r['check_p99_ms']:>7.2f} "
                  f"{r['judged_per_tick']:>11.0f} {r['per_beat_us']:>11.1f} {r['idle_us']:>8.1f} "
                  f"{r['baseline_ms']:>11.2f} {r['ratio']:>6.1f}x", flush=True)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", default="1000,5000,10000,20000", help="fleet sizes, comma separated")
    parser.add_argument("--cycles", type=int, default=3,
                        help=f"beat intervals measured (after {WARM_UP} of warm-up); 3 judge each agent once")
    server_options(parser)
    args = parser.parse_args()
    sizes = [int(n) for n in args.agents.split(",")]
    run_against_server(args, lambda url: main(url, sizes, args.cycles))


if __name__ == "__main__":
    cli()
