"""Projection benchmark: catch-up rate vs the raw ordered-consumer decode rate, rebuild time, projector RSS.

    python bench/projection.py                   # embedded nats-server, 1,000,000 events
    python bench/projection.py --events 200000   # smaller
    python bench/projection.py --url nats://127.0.0.1:4222   # an existing server with the ledger streams

It publishes a fixed-population workload (bench/workload.py: 1,000 agents,
20,000 sessions, 5,000 routes; heartbeats on LEDGER_HB) with pipelined
EventStore.submit, then measures, on the same data:

(a) raw: an ordered consumer per stream with a callback that only decodes
    (msgspec, the ledger's event union) - the fastest way nats-py reads;
(b) the projector catching up into a new SQLite file (rows, anomalies,
    checkpoints and snapshots committed per batch), reported as b / a, both
    measured in this run (goal >= 0.8, issue 13). Beside each rate: CPU
    seconds per event of the event loop's thread and of the whole process
    (a shared machine moves wall rates more than CPU per event);
(c) `projections.rebuild` of all events, as seconds per 1 M events
    (extrapolated, and said so, when fewer were published; goal < 15 s);
(d) the projector's peak RSS (VmHWM) in a subprocess after 100 k events and
    after 1 M (goal: flat within 20 %; the comparison needs --events 1000000
    or more, a smaller run prints what it has);
(e) time-travel views: `Query.sessions(as_of=N)` at random sequences of the
    rebuilt file (nearest snapshot + replay), as a dashboard would ask.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import msgspec
import nats
from workload import Workload

from ledger.codec import parse_ack_subject
from ledger.events import AnyEvent
from ledger.settings import Settings
from ledger.store import EventStore
from ledger.subjects import HEARTBEAT_STREAM, LEDGER_STREAM
from ledgerctl.server import EmbeddedServer, ServerConfig, free_port
from projections.gc_tuning import tune_gc
from projections.projector import FILTERS, Progress, Projector
from projections.query import Query
from projections.rebuild import rebuild
from projections.settings import ProjectionSettings

STREAMS = (LEDGER_STREAM, HEARTBEAT_STREAM)


def peak_rss_kb() -> int:
    """VmHWM (peak resident set) of this process, in KiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


async def publish(store: EventStore, total: int) -> tuple[int, int, float]:
    first = await store.last_seq(LEDGER_STREAM) + 1
    workload = Workload(first_seq=first)
    started = time.perf_counter()
    checks = []
    for n, event in enumerate(workload.events(total)):
        future = await store.submit(event)
        if n % 997 == 0 and type(event).family != "hb":
            checks.append((future, workload.seq - 1))
    await store.flush()
    elapsed = time.perf_counter() - started
    wrong = sum(1 for f, predicted in checks if f.result() != predicted)
    if wrong:
        print(f"warning: {wrong} of {len(checks)} sampled sequences differ from the prediction "
              "(another writer?); the projection will flag more anomalies", flush=True)
    return workload.ledger_events, workload.heartbeats, total / elapsed


class Cpu:
    """CPU microseconds per event spent between `start` and `stop`: the event loop's thread, and the process."""

    def start(self) -> None:
        self.thread, self.process = time.thread_time(), time.process_time()

    def stop(self, events: int) -> str:
        per = 1e6 / max(events, 1)
        return (f"CPU {(time.thread_time() - self.thread) * per:.1f} us/event on the loop, "
                f"{(time.process_time() - self.process) * per:.1f} in all threads")


async def raw_rate(url: str, ends: dict[str, int], cpu: Cpu) -> tuple[float, int]:
    """Both streams through ordered consumers whose callback only decodes."""
    # One connection per stream, like the projector (two ordered consumers can overflow one connection).
    conns = {s: await nats.connect(url, name=f"bench-raw-{s}") for s in STREAMS}
    decode = msgspec.json.Decoder(AnyEvent).decode
    counts = {s: 0 for s in STREAMS}
    done = {s: asyncio.Event() for s in STREAMS}
    subs = []
    try:
        started = time.perf_counter()
        cpu.start()
        for stream in STREAMS:
            js = conns[stream].jetstream()
            if not ends[stream]:
                done[stream].set()
                continue

            def callback(stream: str):  # type: ignore[no-untyped-def]
                async def cb(msg) -> None:  # type: ignore[no-untyped-def]
                    decode(msg.data)
                    counts[stream] += 1
                    if parse_ack_subject(msg.reply).seq >= ends[stream]:
                        done[stream].set()
                return cb

            # The same subscription settings as ledger.replay.Replay (a bounded queue drops messages).
            subs.append(await js.subscribe(FILTERS[stream], stream=stream, cb=callback(stream), ordered_consumer=True,
                                           idle_heartbeat=2.0, pending_msgs_limit=0, pending_bytes_limit=0))
        for event in done.values():
            await event.wait()
        elapsed = time.perf_counter() - started
    finally:
        for sub in subs:
            await sub.unsubscribe()
        for nc in conns.values():
            await nc.close()
    total = sum(counts.values())
    return total / elapsed, total


async def catch_up_rate(store: EventStore, db: Path, cpu: Cpu) -> tuple[float, int, Projector]:
    projector = Projector(store, ProjectionSettings(db=str(db)), name="bench")
    await projector.open()
    try:
        started = time.perf_counter()
        cpu.start()
        await projector.catch_up()
        elapsed = time.perf_counter() - started
    finally:
        await projector.close()
    return projector.events / elapsed, projector.events, projector


async def as_of_times(store: EventStore, db: Path, end: int, n: int = 9) -> list[float]:
    """Seconds for each of `n` views of the past at random LEDGER sequences (no cache hits), sorted."""
    rng = random.Random(1)
    times = []
    async with Query.open(db, store) as q:
        for seq in rng.sample(range(1, end + 1), n):
            started = time.perf_counter()
            await q.sessions(as_of=seq)
            times.append(time.perf_counter() - started)
    return sorted(times)


MARKS = (100_000, 1_000_000)


def child_rss(url: str, db: Path) -> dict[str, list[int]]:
    """Run the projector in a subprocess; it reports its peak RSS after 100 k, 1 M and all events."""
    out = subprocess.run([sys.executable, __file__, "--child-rss", "--url", url, "--db", str(db)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


async def child_main(url: str, db: Path) -> None:
    marks: dict[str, list[int]] = {}

    def progress(p: Progress) -> None:  # called after each commit: the first one past each mark
        for mark in MARKS:
            if p.events >= mark and str(mark) not in marks:
                marks[str(mark)] = [p.events, peak_rss_kb()]

    async with EventStore.connect(Settings(nats_url=url), name="bench-child") as store:
        projector = Projector(store, ProjectionSettings(db=str(db)), name="bench-child", on_progress=progress)
        await projector.open()
        try:
            await projector.catch_up()
        finally:
            await projector.close()
    marks["final"] = [projector.events, peak_rss_kb()]
    print(json.dumps(marks))


async def run(url: str, events: int, work: Path) -> None:
    settings = Settings(nats_url=url)
    async with EventStore.connect(settings, ensure=True, name="bench-store") as store:
        print(f"publishing {events:,} events (pipelined EventStore.submit) ...", flush=True)
        ledger_n, hb_n, rate = await publish(store, events)
        print(f"  {ledger_n:,} lifecycle events on {LEDGER_STREAM}, {hb_n:,} heartbeats on {HEARTBEAT_STREAM} "
              f"at {rate:,.0f}/s", flush=True)
        ends = {s: await store.last_seq(s) for s in STREAMS}

        cpu = Cpu()
        raw, raw_n = await raw_rate(url, ends, cpu)
        print(f"(a) raw ordered consumer + decode : {raw:>9,.0f} events/s  ({raw_n:,} events; {cpu.stop(raw_n)})",
              flush=True)
        proj, proj_n, projector = await catch_up_rate(store, work / "catchup.sqlite3", cpu)
        print(f"(b) projector catch-up -> SQLite  : {proj:>9,.0f} events/s  ({proj_n:,} events; {cpu.stop(proj_n)}; "
              f"{projector.commits:,} commits, {projector.state.ledger.anomalies:,} anomalies flagged)", flush=True)
        print(f"    ratio b/a (this run)          : {proj / raw:.2f}   (goal >= 0.80)", flush=True)
        result = await rebuild(store, ProjectionSettings(db=str(work / "rebuilt.sqlite3")))
        per_million = result.seconds * 1_000_000 / max(result.events, 1)
        how = ("measured" if result.events >= 1_000_000 else
               f"extrapolated from {result.events:,} events: a small run is dominated by the creation of the "
               "population, so it overstates")
        print(f"(c) rebuild from zero             : {per_million:.1f} s per 1 M events ({how}; "
              f"{result.seconds:.1f} s for {result.events:,}; goal < 15 s)", flush=True)
        times = await as_of_times(store, work / "rebuilt.sqlite3", ends[LEDGER_STREAM])
        print(f"(e) sessions view as of a past seq : p50 {times[len(times) // 2] * 1e3:.0f} ms, "
              f"max {times[-1] * 1e3:.0f} ms over {len(times)} random sequences (version rows)", flush=True)
    rss = child_rss(url, work / "child.sqlite3")
    final_events, final_kb = rss["final"]
    print(f"(d) projector peak RSS            : {final_kb / 1024:.0f} MiB after {final_events:,} events (subprocess)")
    for mark in MARKS:
        if str(mark) in rss:
            n, kb = rss[str(mark)]
            print(f"    after {n:>9,} events           : {kb / 1024:.0f} MiB")
    small, large = (str(m) for m in MARKS)
    if small in rss and large in rss:
        growth = rss[large][1] / rss[small][1] - 1
        print(f"    100 k -> 1 M events           : {growth:+.0%}   (goal: flat within 20 %)")
    else:
        print("    100 k -> 1 M events           : not measured (run with --events 1000000 or more)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="use this NATS server instead of starting an embedded one")
    parser.add_argument("--events", type=int, default=1_000_000, help="events to publish (default 1000000)")
    parser.add_argument("--child-rss", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    args = parser.parse_args()
    tune_gc()  # what `ledger project` does; the raw baseline runs in this process too, under the same setting
    if args.child_rss:
        asyncio.run(child_main(args.url, Path(args.db)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.url:
            asyncio.run(run(args.url, args.events, work))
            return
        cfg = ServerConfig(data_dir=work / "nats", port=free_port(), sync_always=False)
        with EmbeddedServer(cfg) as server:
            print(f"nats-server {'.'.join(map(str, server.version or ()))} on {server.url}", flush=True)
            asyncio.run(run(server.url, args.events, work))


if __name__ == "__main__":
    main()
