"""Hostile cases for consumers split by pool (issue 13): odd pool names, overlapping replicas, a route whose
session the fold does not know, and --pools naming pools that do not exist."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from click.testing import CliRunner
from histories import CLI, WATCHDOG, Builder

from consumers.follow import Follower
from consumers.monitor import LivenessMonitor
from consumers.partition import Partition, pool_slot
from consumers.reclaim_rules import ClaimFor
from consumers.reclaimer import Reclaimer
from consumers.route_rules import Step
from consumers.watchdog import RouteWatchdog
from ledger import events as ev
from ledger import lifecycle as lc
from ledger.codec import from_ns
from ledger.ids import new_id
from ledger.store import EventStore
from ledger.writer import Writer
from ledgerctl.cli import cli
from projections.state import SESSION, Change, LedgerState, LifecycleState

ODD = ("", " ", "ünïcödé-池", "x" * 10_000, "a,b", "\u0000", "\U0001f680")


def writer(store: EventStore, producer: str) -> Writer:
    return Writer(store, ev.Producer(id=producer, instance=new_id()))


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_every_odd_pool_name_falls_on_exactly_one_slot(n: int) -> None:
    for pool in ODD:
        assert [i for i in range(n) if Partition(replica=i, replicas=n).owns(pool)] == [pool_slot(pool, n)]


def test_a_pool_name_with_a_lone_surrogate_never_reaches_the_fold() -> None:
    # pool_slot encodes the name as UTF-8, which a lone surrogate would break; the codec refuses one first.
    import msgspec

    with pytest.raises(msgspec.DecodeError):
        msgspec.json.decode(b'"\\ud800"')


@pytest.mark.parametrize("pools", [",", " , ,", ""])
def test_pools_that_name_nothing_are_one_line(pools: str) -> None:
    result = CliRunner().invoke(cli, ["consumers", "--pools", pools, "--nats-url", "nats://127.0.0.1:1"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "--pools" in result.output


@pytest.mark.parametrize("text", ["0/3 x", "1 / 3 /", "9" * 5000 + "/1", "0/" + "9" * 5000])
def test_odd_partitions_are_one_line(text: str) -> None:
    result = CliRunner().invoke(cli, ["consumers", "--partition", text, "--nats-url", "nats://127.0.0.1:1"])
    assert result.exit_code != 0
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


def orphan_route(b: Builder, uid: str) -> str:
    """A live route whose session the fold does not know (forged, or its session retired)."""
    rid = f"{uid}-orphan-route"
    b.add(ev.RouteCreated(producer=CLI, route_id=rid, session_id=f"{uid}-ghost", endpoint="chat", start_timeout=1.0))
    b.add(ev.RouteTransitioned(producer=WATCHDOG, route_id=rid, from_state=lc.PENDING, to_state=lc.STARTING))
    return rid


async def judged_by(store: EventStore, b: Builder, part: Partition) -> set[str]:
    watchdog = RouteWatchdog(writer(store, "watchdog-h"), Follower(store, b.model), partition=part)
    tried: set[str] = set()

    async def write(route: lc.RouteState, step: Step, t: float) -> None:
        tried.add(route.route_id)

    watchdog._write = write  # type: ignore[method-assign]
    await watchdog.step(b.now() + timedelta(seconds=5))
    return tried


async def test_a_route_of_an_unknown_session_is_moved_by_exactly_one_hash_replica(store: EventStore, uid: str):
    b = Builder()
    rid = orphan_route(b, uid)
    assert rid in b.model.ledger.routes and f"{uid}-ghost" not in b.model.ledger.sessions
    movers = [i for i in range(3) if rid in await judged_by(store, b, Partition(replica=i, replicas=3))]
    assert len(movers) == 1


async def test_a_route_of_an_unknown_session_is_moved_when_every_replica_names_its_pools(store: EventStore, uid: str):
    b = Builder()
    rid = orphan_route(b, uid)
    """Replicas that name their pools cannot know each other's, so each judges a route of no known pool (an
    overlap, safe by compare-and-set like any other); none of them judging it would leave it unjudged forever."""
    movers = [p for p in ("gpu", "cpu") if rid in await judged_by(store, b, Partition(pools=frozenset({p})))]
    assert movers == ["gpu", "cpu"]
    hashed = [i for i in range(3) if rid in await judged_by(store, b, Partition(replica=i, replicas=3))]
    assert len(hashed) == 1  # by the hash alone, the slot of pool "" alone


async def test_overlapping_replicas_claim_a_session_once(store: EventStore, uid: str, ledger: Writer):
    """Two replicas owning the same pool act on the same fold: the compare-and-set lets exactly one claim land."""
    pool = f"{uid}-pool"
    agent_id = f"{uid}-a"
    me = ev.Producer(id=agent_id, instance="i")
    ags = Writer(store, me)
    await ags.append(ev.AgentRegistered(producer=me, agent_id=agent_id, instance_id="i", pool=pool, capacity=5,
                                        heartbeat_interval=5.0, ttl=30.0))
    sid = f"{uid}-s"
    await ledger.append(ev.SessionCreated(producer=ledger.producer, session_id=sid, pool=pool))
    state = LedgerState()
    items = [*await store.history("agent", agent_id), *await store.history("session", sid)]
    for item in sorted(items, key=lambda i: i.seq):
        state.apply(item)
    now = from_ns(max(i.timestamp_ns for i in items)) + timedelta(seconds=1)
    reclaimers = [Reclaimer(writer(store, f"reclaimer-{uid}-{name}"), Follower(store, state), partition=part)
                  for name, part in (("r1", Partition(pools=frozenset({pool}))),
                                     ("r2", Partition(replica=pool_slot(pool, 2), replicas=2)))]
    results = await asyncio.gather(*(r.step(now) for r in reclaimers))
    assert all(any(isinstance(a, ClaimFor) for a in actions) for actions in results)  # both decided to claim ...
    history = await store.history("session", sid)
    claimed = [i for i in history if isinstance(getattr(i, "event", None), ev.SessionClaimed)]
    assert len(claimed) == 1  # ... one claim is in the log


async def test_overlapping_monitor_replicas_suspect_an_agent_once(store: EventStore, uid: str):
    """Two monitors owning one pool (named on one, by hash slot on the other) judge the same silence: the
    verdict's id is derived from its evidence, so the log holds one suspicion."""
    pool, agent_id = f"{uid}-pool", f"{uid}-quiet"
    me = ev.Producer(id=agent_id, instance="i")
    await Writer(store, me).append(ev.AgentRegistered(producer=me, agent_id=agent_id, instance_id="i", pool=pool,
                                                      capacity=1, heartbeat_interval=5.0, ttl=600.0))
    state = LedgerState()
    items = await store.history("agent", agent_id)
    for item in items:
        state.apply(item)
    now = from_ns(items[-1].timestamp_ns) + timedelta(seconds=60)  # 12 intervals without a beat: suspect
    monitors = [LivenessMonitor(writer(store, f"monitor-{uid}-{n}"), Follower(store, state), partition=part)
                for n, part in enumerate((Partition(pools=frozenset({pool})),
                                          Partition(replica=pool_slot(pool, 3), replicas=3)))]
    verdicts = await asyncio.gather(*(m.check(now) for m in monitors))
    assert all(any(isinstance(e, ev.AgentSuspected) for e in found) for found in verdicts)  # both judged ...
    suspected = [i for i in await store.history("agent", agent_id) if isinstance(i.event, ev.AgentSuspected)]
    assert len(suspected) == 1  # ... one suspicion in the log


async def ended_by(store: EventStore, uid: str, parts: tuple[Partition, ...]) -> list[set[str]]:
    """Which of these watchdog replicas end a live route whose session retires in the item that ends it."""
    b = Builder()
    b.model = LedgerState(ledger=LifecycleState(retain=0))
    pool = next(p for p in (f"{uid}-p{i}" for i in range(50)) if pool_slot(p, 2) != pool_slot("", 2))
    sid, rid = f"{uid}-s", f"{uid}-r"
    b.add(ev.SessionCreated(producer=CLI, session_id=sid, pool=pool))
    b.add(ev.RouteCreated(producer=CLI, route_id=rid, session_id=sid, endpoint="chat", start_timeout=300.0))
    tried: list[set[str]] = [set() for _ in parts]
    watchdogs = []
    for n, part in enumerate(parts):
        watchdog = RouteWatchdog(writer(store, f"watchdog-{uid}-{n}"), Follower(store, b.model), partition=part)

        async def write(route: lc.RouteState, step: Step, t: float, mine: set[str] = tried[n]) -> None:
            mine.add(route.route_id)

        watchdog._write = write  # type: ignore[method-assign]
        await watchdog.step(b.now())  # the first step: every live route once (nothing to do yet)
        watchdogs.append(watchdog)
    assert not any(tried)
    b.add(ev.SessionTerminated(producer=CLI, session_id=sid, token=None))
    assert sid not in b.model.ledger.sessions and rid in b.model.ledger.routes  # retired at once; the route lives
    for watchdog in watchdogs:
        watchdog.changed(Change(SESSION, sid, None, None))  # what the follower tells its listeners
        await watchdog.step(b.now())
    return tried


async def test_a_route_whose_session_retires_as_it_ends_is_ended_by_a_watchdog_of_every_pool(store: EventStore,
                                                                                          uid: str):
    assert await ended_by(store, uid, (Partition(),)) == [{f"{uid}-r"}]


async def test_a_route_whose_session_retires_as_it_ends_is_ended_by_one_hash_replica(store: EventStore, uid: str):
    tried = await ended_by(store, uid, (Partition(replica=0, replicas=2), Partition(replica=1, replicas=2)))
    assert sorted(len(t) for t in tried) == [0, 1]  # one replica ends the route
