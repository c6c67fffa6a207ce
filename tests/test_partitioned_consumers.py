"""Consumers split by pool (`ledger consumers --partition I/N`, `--pools`): each replica acts on its pools only,
and between them every pool is covered once."""

from __future__ import annotations

from datetime import timedelta

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
from ledger.ids import new_id
from ledger.store import EventStore
from ledger.writer import Writer


def two_pools(uid: str) -> tuple[str, str]:
    """Two pool names that fall on different slots of 2."""
    names = [f"{uid}-pool{i}" for i in range(20)]
    first = names[0]
    second = next(p for p in names if pool_slot(p, 2) != pool_slot(first, 2))
    return first, second


def fleet_with_work(b: Builder, pools: tuple[str, ...], per_pool: int) -> dict[str, set[str]]:
    """Per pool: two beating agents, `per_pool` pending sessions, each with a route that has timed out STARTING."""
    sessions: dict[str, set[str]] = {}
    registered: dict[str, int] = {}
    for pool in pools:
        for i in range(2):
            agent_id = f"{pool}-a{i}"
            me = ev.Producer(id=agent_id, instance="i")
            registered[agent_id] = b.add(ev.AgentRegistered(producer=me, agent_id=agent_id, instance_id="i",
                                                            pool=pool, capacity=100, heartbeat_interval=5.0,
                                                            ttl=30.0)).seq
        for i in range(per_pool):
            sid = f"{pool}-s{i}"
            b.add(ev.SessionCreated(producer=CLI, session_id=sid, pool=pool))
            b.add(ev.RouteCreated(producer=CLI, route_id=f"{pool}-r{i}", session_id=sid, endpoint="chat",
                                  start_timeout=1.0))
            b.add(ev.RouteTransitioned(producer=WATCHDOG, route_id=f"{pool}-r{i}", from_state=lc.PENDING,
                                       to_state=lc.STARTING))
            sessions.setdefault(pool, set()).add(sid)
    for agent_id, incarnation in registered.items():  # (each item is a second later: beat last, all fresh now)
        b.add(ev.AgentHeartbeat(producer=ev.Producer(id=agent_id, instance="i"), agent_id=agent_id, instance_id="i",
                                incarnation=incarnation, beat=1))
    return sessions


def writer(store: EventStore, producer: str) -> Writer:
    return Writer(store, ev.Producer(id=producer, instance=new_id()))


async def test_replicas_of_two_slots_each_place_and_move_only_their_pools(store: EventStore, uid: str):
    b = Builder()
    first, second = two_pools(uid)
    sessions = fleet_with_work(b, (first, second), 5)
    now = b.now() + timedelta(seconds=2)  # every route is past its start timeout; every agent beat just now
    claimed: dict[int, set[str]] = {}
    moved: dict[int, set[str]] = {}
    for replica in (0, 1):
        part = Partition(replica=replica, replicas=2)
        follower = Follower(store, b.model)
        reclaimer = Reclaimer(writer(store, f"reclaimer-{replica}"), follower, partition=part)
        watchdog = RouteWatchdog(writer(store, f"watchdog-{replica}"), follower, partition=part)
        actions = await reclaimer.step(now)
        claimed[replica] = {a.session_id for a in actions if isinstance(a, ClaimFor)}
        tried: set[str] = set()

        async def write(route: lc.RouteState, step: Step, t: float, tried: set[str] = tried) -> None:
            tried.add(route.route_id)  # what the watchdog decided to move (these routes are not in the server's log)

        watchdog._write = write  # type: ignore[method-assign]
        await watchdog.step(now)
        moved[replica] = tried
        assert watchdog.looked == 5
    mine = {pool_slot(first, 2): first, pool_slot(second, 2): second}
    for replica, pool in mine.items():
        assert claimed[replica] == sessions[pool]  # all of its pool's sessions, none of the other's
        assert moved[replica] == {f"{pool}-r{i}" for i in range(5)}


async def test_named_pools_leave_the_others_alone(store: EventStore, uid: str):
    b = Builder()
    first, second = two_pools(uid)
    sessions = fleet_with_work(b, (first, second), 3)
    follower = Follower(store, b.model)
    reclaimer = Reclaimer(writer(store, "reclaimer-gpu"), follower, partition=Partition(pools=frozenset({second})))
    actions = await reclaimer.step(b.now())
    assert {a.session_id for a in actions if isinstance(a, ClaimFor)} == sessions[second]
    everything = Reclaimer(writer(store, "reclaimer"), Follower(store, b.model))
    assert {a.session_id for a in await everything.step(b.now()) if isinstance(a, ClaimFor)} == (
        sessions[first] | sessions[second])


async def test_monitor_replicas_each_judge_only_their_pools_agents(store: EventStore, uid: str):
    b = Builder()
    first, second = two_pools(uid)
    for pool in (first, second):
        for i in range(3):
            agent_id = f"{pool}-quiet{i}"
            b.add(ev.AgentRegistered(producer=ev.Producer(id=agent_id, instance="i"), agent_id=agent_id,
                                     instance_id="i", pool=pool, capacity=1, heartbeat_interval=5.0, ttl=600.0))
    now = b.now() + timedelta(seconds=60)  # no beat for 12 intervals: every agent is suspect (dead only after 600 s)
    suspected: dict[int, set[str]] = {}
    for replica in (0, 1):
        monitor = LivenessMonitor(writer(store, f"monitor-{uid}-{replica}"), Follower(store, b.model),
                                  partition=Partition(replica=replica, replicas=2))
        suspected[replica] = {e.agent_id for e in await monitor.check(now) if isinstance(e, ev.AgentSuspected)}
    for pool in (first, second):
        assert suspected[pool_slot(pool, 2)] == {f"{pool}-quiet{i}" for i in range(3)}
