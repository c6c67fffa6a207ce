"""Agent SDK latencies: heartbeat acknowledgement and session claims, next to a raw acked publish.

    python bench/agent.py                  # embedded nats-server
    python bench/agent.py --sessions 1000 --sync-always

* heartbeat ack: send -> acknowledgement of an agent's heartbeats (its own task).
* claim: Agent.claim() end to end - check the incarnation is current, read the
  session's history, decide, compare-and-set append.
* contended claims: N agents race over the same sessions; every session ends
  with exactly one owner (checked) and the rate is printed.
* raw: one nats-py `js.publish` awaited (a single acknowledged write), the floor
  any of the above can reach.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import time

import nats
from common import pct, run_against_server, server_options

from ledger.agent import Agent
from ledger.errors import NotClaimable
from ledger.settings import Settings
from ledger.store import EventStore
from ledger.writer import Writer


def line(name: str, values: list[float]) -> str:
    return (f"{name:<28} p50 {pct(values, 50) * 1000:7.2f} ms   p99 {pct(values, 99) * 1000:7.2f} ms   "
            f"max {max(values) * 1000:7.2f} ms   (n={len(values)})")


async def raw_publish(url: str, n: int) -> list[float]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    out = []
    for i in range(n):
        started = time.perf_counter()
        await js.publish(f"ledger.session.raw{i}.created.bench", b'{"x":1}')
        out.append(time.perf_counter() - started)
    await nc.close()
    return out


async def run(url: str, sessions: int, racers: int) -> None:
    settings = Settings(nats_url=url)
    async with EventStore.connect(settings, ensure=True):
        pass
    print(line("raw js.publish (acked)", await raw_publish(url, sessions)))
    async with Writer.connect(settings, producer_id="operator-bench") as ledger:
        async with Agent(ledger, agent_id="bench-hb", pool="bench", heartbeat=0.02, ttl=5) as agent:
            await asyncio.sleep(3)
            print(line("heartbeat send -> ack", list(agent.stats.ack_latencies)))

        ids = [(await ledger.create_session("bench", session_id=f"b{random.getrandbits(48):x}"))[0]
               for _ in range(sessions)]
        async with Agent(ledger, agent_id="bench-claimer", pool="bench", capacity=sessions, heartbeat=1,
                         ttl=10) as agent:
            took = []
            for sid in ids:
                started = time.perf_counter()
                await agent.claim(sid)
                took.append(time.perf_counter() - started)
            print(line("Agent.claim (uncontended)", took))

        ids = [(await ledger.create_session("race", session_id=f"r{random.getrandbits(48):x}"))[0]
               for _ in range(sessions)]
        agents = [Agent(ledger, agent_id=f"racer-{i}", pool="race", capacity=sessions, heartbeat=1, ttl=10)
                  for i in range(racers)]
        for a in agents:
            await a.__aenter__()
        latencies: list[float] = []

        async def race(agent: Agent) -> None:
            order = ids[:]
            random.shuffle(order)
            for sid in order:
                started = time.perf_counter()
                with contextlib.suppress(NotClaimable):
                    await agent.claim(sid)
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(race(a) for a in agents))
        elapsed = time.perf_counter() - started
        for a in agents:
            await a.__aexit__(None, None, None)
        owners = [(await ledger.session(sid))[0].owner for sid in ids]
        claims_per_owner = {}
        for owner in owners:
            claims_per_owner[owner] = claims_per_owner.get(owner, 0) + 1
        assert all(owners), "a session ended without an owner"
        print(line(f"claim attempts, {racers} racers", latencies))
        print(f"{'contended claims':<28} {sessions / elapsed:7.0f} sessions owned/s, "
              f"{len(latencies) / elapsed:7.0f} attempts/s, one owner each "
              f"(spread {min(claims_per_owner.values())}-{max(claims_per_owner.values())})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    server_options(parser)
    parser.add_argument("--sessions", type=int, default=500)
    parser.add_argument("--racers", type=int, default=10)
    args = parser.parse_args()
    run_against_server(args, lambda url: run(url, args.sessions, args.racers))


if __name__ == "__main__":
    main()
