"""Restart benchmark: `ledger up` on a log it has projected before - time to "ready" vs the raw read of the log,
and how long a SIGTERM during catch-up takes to end it.

    python bench/restart.py                      # embedded nats-server, 1,000,000 events (the issue's figure)
    python bench/restart.py --events 20000       # a smoke run
    python bench/restart.py --url nats://127.0.0.1:4222

It publishes the projection benchmark's workload (bench/workload.py) with pipelined appends, then:

(a) raw: both streams read through ordered consumers that only decode (bench/projection.py `raw_rate`) -
    the raw read time of the log;
(b) a first `ledger up --nats-url` (the projection built from nothing), stopped with SIGTERM once ready;
(c) `ledger up` again on the same projection file: seconds to "ready", which it says only once the projector
    and every consumer caught up (goal: within 2x the raw read time, reported as (c) / (a));
(d) `ledger up` once more, SIGTERM at its first "catching up" line (or at "consumers" if it has none): seconds
    until it exited (goal: within 5 s).
"""

from __future__ import annotations

import argparse
import asyncio
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import run_against_server, server_options
from projection import Cpu, publish, raw_rate

from ledger.settings import Settings
from ledger.store import EventStore
from ledger.subjects import HEARTBEAT_STREAM, LEDGER_STREAM

LEDGER = [sys.executable, "-m", "ledgerctl"]


def up(url: str, db: Path) -> subprocess.Popen[str]:
    # One pipe for both outputs, read line by line: `catching up:` progress goes to stderr every 2 s, and a pipe
    # nobody reads fills and blocks `ledger up` (the bench hung that way on 1 M events).
    return subprocess.Popen([*LEDGER, "up", "--nats-url", url, "--db", str(db), "--no-http", "--no-query-service"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def lines(proc: subprocess.Popen[str], patience: float) -> Iterator[str]:
    """The process's output lines as they come, for at most `patience` seconds (then it is killed)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + patience
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if sel.select(timeout=0.5):
                line = proc.stdout.readline()
                if not line:
                    return
                yield line
    proc.kill()
    raise SystemExit(f"ledger up: nothing expected within {patience:.0f} s")


def until_ready(proc: subprocess.Popen[str], patience: float) -> float:
    """Seconds from now until the process says "ready"."""
    started = time.perf_counter()
    seen: list[str] = []
    for line in lines(proc, patience):
        if line.startswith("ready"):
            return time.perf_counter() - started
        seen = [*seen[-20:], line]
    proc.kill()
    raise SystemExit(f"ledger up ended before it said ready: {''.join(seen)[-2000:]}")


def stop(proc: subprocess.Popen[str], patience: float = 60.0) -> float:
    """SIGTERM; seconds until the process exited."""
    started = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=patience)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return float("inf")
    return time.perf_counter() - started


def stop_while_catching_up(proc: subprocess.Popen[str], patience: float) -> tuple[float, str]:
    """SIGTERM at the first "catching up" line, else at "ready" if the catch-up ended first; (seconds to exit,
    when)."""
    when = f"after {patience:.0f} s without either"
    for line in lines(proc, patience):
        if line.startswith("catching up"):
            when = "at the first 'catching up' line"
            break
        if line.startswith("ready"):
            when = "after 'ready' (the catch-up was over first)"
            break
    return stop(proc), when


async def run(url: str, events: int, work: Path) -> None:
    async with EventStore.connect(Settings(nats_url=url), check=False) as store:
        await store.ensure_streams()
        ledger_events, beats, rate = await publish(store, events)
        ends = {s: await store.last_seq(s) for s in (LEDGER_STREAM, HEARTBEAT_STREAM)}
    print(f"published {ledger_events:,} lifecycle events and {beats:,} heartbeats ({rate:,.0f}/s)", flush=True)
    raw, total = await raw_rate(url, ends, Cpu())
    raw_seconds = total / raw
    print(f"(a) raw read of the log: {total:,} messages in {raw_seconds:.2f} s ({raw:,.0f}/s)", flush=True)
    db = work / "projection.sqlite3"
    patience = max(120.0, 50 * raw_seconds)
    first = up(url, db)
    built = await asyncio.to_thread(until_ready, first, patience)
    print(f"(b) first ledger up (projection from nothing): ready after {built:.2f} s; "
          f"stopped in {await asyncio.to_thread(stop, first):.2f} s", flush=True)
    again = up(url, db)
    ready = await asyncio.to_thread(until_ready, again, patience)
    stopped = await asyncio.to_thread(stop, again)
    print(f"(c) restart: ready after {ready:.2f} s = {ready / raw_seconds:.2f} x the raw read (goal <= 2); "
          f"stopped in {stopped:.2f} s", flush=True)
    third = up(url, db)
    seconds, when = await asyncio.to_thread(stop_while_catching_up, third, patience)
    print(f"(d) SIGTERM {when}: exited after {seconds:.2f} s (goal <= 5)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    server_options(parser)
    parser.add_argument("--events", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        run_against_server(args, lambda url: run(url, args.events, Path(work)))


if __name__ == "__main__":
    main()
