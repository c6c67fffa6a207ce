"""Append throughput: EventStore.submit against raw nats-py publish_async, same payloads, same run.

    python bench/append.py                 # embedded nats-server, 20k events x 3 rounds
    python bench/append.py --events 50000 --rounds 5
    python bench/append.py --url nats://127.0.0.1:4222   # an existing server with the ledger streams

Both sides publish the same JSON bytes to the same kind of subject on the
LEDGER stream. The store also encodes each event (msgspec), adds its
Nats-Msg-Id, tracks a timeout and retry per append; the raw side publishes
pre-encoded bytes with no headers. Rounds alternate (raw, store, raw, ...)
and the median of each side is reported. Target (brief section 6): >= 0.9.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

import nats
from common import run_against_server, server_options

from ledger import codec
from ledger.events import Producer, SessionCreated
from ledger.settings import Settings
from ledger.store import EventStore

PRODUCER = Producer(id="operator-bench", instance=uuid.uuid4().hex)


def make_events(n: int, tag: str) -> list[SessionCreated]:
    return [SessionCreated(producer=PRODUCER, session_id=f"{tag}-{i}", pool="bench", platform="k8s",
                           region="eu-1") for i in range(n)]


async def raw_round(nc: nats.NATS, messages: list[tuple[str, bytes]]) -> float:
    js = nc.jetstream()
    started = time.perf_counter()
    for subject, payload in messages:
        await js.publish_async(subject, payload)
    await js.publish_async_completed()
    return len(messages) / (time.perf_counter() - started)


async def store_round(store: EventStore, events: list[SessionCreated], expect: int | None = None) -> float:
    started = time.perf_counter()
    futures = [await store.submit(e, expect=expect) for e in events]
    await store.flush()
    elapsed = time.perf_counter() - started
    failed = [f.exception() for f in futures if f.exception() is not None]
    if failed:
        raise SystemExit(f"{len(failed)} appends failed, first: {failed[0]}")
    return len(events) / elapsed


async def run(url: str, events: int, rounds: int, cas: bool) -> None:
    settings = Settings(nats_url=url)
    async with EventStore.connect(settings, ensure=True, name="bench-store") as store:
        nc = await nats.connect(url, name="bench-raw")
        try:
            raw_rates, store_rates, cas_rates = [], [], []
            for r in range(rounds):
                tag = uuid.uuid4().hex[:8]
                ours = make_events(events, f"s{tag}")
                raw = [(codec.subject_of(e), codec.encode_payload(e)) for e in make_events(events, f"r{tag}")]
                raw_rates.append(await raw_round(nc, raw))
                store_rates.append(await store_round(store, ours))
                if cas:
                    cas_rates.append(await store_round(store, make_events(events, f"c{tag}"), expect=0))
                print(f"round {r + 1}: raw publish_async {raw_rates[-1]:>9,.0f}/s   "
                      f"EventStore.submit {store_rates[-1]:>9,.0f}/s"
                      + (f"   with CAS {cas_rates[-1]:>9,.0f}/s" if cas else ""), flush=True)
        finally:
            await nc.close()
    raw_med, store_med = statistics.median(raw_rates), statistics.median(store_rates)
    print()
    print(f"raw nats-py publish_async : {raw_med:>9,.0f} events/s (median of {rounds})")
    print(f"EventStore.submit         : {store_med:>9,.0f} events/s (median of {rounds})")
    if cas:
        print(f"EventStore.submit + CAS   : {statistics.median(cas_rates):>9,.0f} events/s (create-if-absent)")
    print(f"ratio store/raw           : {store_med / raw_med:.2f}   (target >= 0.90)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    server_options(parser)
    parser.add_argument("--events", type=int, default=20_000, help="events per round and side (default 20000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per side (default 3)")
    parser.add_argument("--no-cas", action="store_true", help="skip the compare-and-set variant")
    args = parser.parse_args()
    print(f"{args.events:,} events x {args.rounds} rounds")
    run_against_server(args, lambda url: run(url, args.events, args.rounds, not args.no_cas))


if __name__ == "__main__":
    main()
