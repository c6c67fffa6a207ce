"""The liveness monitor's deadlines: a check judges the agents that changed or turned, and writes what judging
every agent at every check writes.

The reference is the monitor as it was before the deadlines (`FullScan` below: every agent judged by
`liveness_rules.judge`, every pool's members and every open breaker looked at, on every check). Both hear the
same generated history through one Follower (the state is built in memory, as the follower would fold the log)
and are checked at the same moments; the monitor under test writes its verdicts to a real server, and what it
wrote is folded back as the follower would fold it (at once, or a few checks later).
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from consumers import liveness_rules as rules
from consumers.follow import Follower
from consumers.monitor import LivenessMonitor
from ledger import codec
from ledger import events as ev
from ledger import lifecycle as lc
from ledger.codec import Recorded, from_ns
from ledger.ids import new_id
from ledger.store import EventStore
from ledger.subjects import HEARTBEAT_STREAM, LEDGER_STREAM
from ledger.writer import Writer
from projections.health import DEAD, HealthPolicy, assess, turns
from projections.state import LedgerState

MONITOR = ev.Producer(id="monitor", instance="m")
T0 = datetime(2026, 11, 1, tzinfo=UTC)
SETTINGS = rules.LivenessSettings(report_threshold=2, report_window=2.0, grace=0.0, breaker_window=6.0,
                                  breaker_min_agents=2)
DERIVED = ("dead-", "suspect-", "breaker-")
"""The monitor's own event ids; any other is a fresh one (the derived id was taken by other content)."""


class FullScan(LivenessMonitor):
    """The monitor before the deadlines, as the reference: every agent, every pool, on every check.

    Its writes are only recorded: the monitor under test writes the same ids to the server (which takes a
    verdict of the monitor's again under the same id as written: replicas de-duplicate each other so).
    """

    async def check(self, now: datetime) -> list[ev.Event]:
        state = self.follower.state
        written: list[ev.Event] = []
        verdicts = []
        overdue: dict[str, set[str]] = defaultdict(set)
        for agent in list(state.ledger.agents.values()):
            beat = state.current_beat(agent.agent_id)
            last = rules.LastBeat(beat.seq, from_ns(beat.stored_ns)) if beat is not None else None
            if rules.overdue(agent, last, now, self.settings):
                overdue[agent.pool].add(agent.agent_id)
            reports = sorted(self._reports.get((agent.agent_id, agent.incarnation), {}).values())
            verdict = rules.judge(agent, last, reports, now, self.settings, self.ledger.producer.id)
            if verdict is not None:
                verdicts.append((agent, last, verdict))
        for agent, last, verdict in verdicts:
            if verdict.event_id in self._written:
                continue
            if verdict.kind == rules.DEAD:
                if await self._view_lags(agent, last):
                    continue
                written += await self._full_scan_death(agent, verdict, now, overdue[agent.pool])
            else:
                written.append(await self._write(ev.AgentSuspected(
                    producer=self.ledger.producer, agent_id=agent.agent_id, incarnation=agent.incarnation,
                    reason=verdict.reason, evidence=verdict.evidence, event_id=verdict.event_id,
                    causation_id=agent.cause_id)))
            self._written.add(verdict.event_id)
        ledger = state.ledger
        for pool in list(ledger.pools.values()):
            if not pool.breaker_open:
                continue
            members = [a for a in ledger.agents.values() if a.pool == pool.pool]
            why = rules.breaker_recovered(pool, members, list(self._deaths[pool.pool]), now, self.settings)
            event_id = f"breaker-reset-{pool.pool}-{pool.trips}"
            if why and event_id not in self._written:
                written.append(await self._write(ev.PoolBreakerReset(producer=self.ledger.producer, pool=pool.pool,
                                                                     reason=why, event_id=event_id)))
                self._written.add(event_id)
        return written

    async def _full_scan_death(self, agent: lc.AgentState, verdict: rules.Verdict, now: datetime,
                               overdue: set[str]) -> list[ev.Event]:
        state = self.follower.state.ledger
        written: list[ev.Event] = []
        pool = state.pools.get(agent.pool)
        if pool is None or not pool.breaker_open:
            members = [a for a in state.agents.values() if a.pool == agent.pool]
            call = rules.breaker_before_death(members, list(self._deaths[agent.pool]), overdue | {agent.agent_id},
                                              now, self.settings)
            if call.trip:
                trips = pool.trips if pool else 0
                written.append(await self._write(ev.PoolBreakerTripped(
                    producer=self.ledger.producer, pool=agent.pool, reason=call.reason, dead=call.dead,
                    agents=call.agents, window=self.settings.breaker_window, threshold=self.settings.breaker_share,
                    event_id=f"breaker-{agent.pool}-{trips + 1}")))
        written.append(await self._write(ev.AgentDeclaredDead(
            producer=self.ledger.producer, agent_id=agent.agent_id, incarnation=agent.incarnation,
            reason=verdict.reason, evidence=verdict.evidence, event_id=verdict.event_id, causation_id=agent.cause_id)))
        self._deaths[agent.pool].append((agent.agent_id, now))
        return written

    async def _write(self, event: ev.Event) -> ev.Event:
        self.writes += 1
        return event


def written_ids(events: list[ev.Event]) -> set[tuple[str, str, str]]:
    """What a check wrote, as the log keeps it: each id once (the server de-duplicates a second trip of a pool
    in one check, which judging in another order writes once more or once less), a fresh id as such."""
    return {(e.type_tag(), e.entity_id, e.event_id if e.event_id.startswith(DERIVED) else "fresh") for e in events}


class World:
    """The history as the two streams would store it, folded by one Follower both monitors listen to."""

    def __init__(self, store: EventStore, uid: str) -> None:
        self.store, self.uid = store, uid
        self.state = LedgerState()
        self.seq = {LEDGER_STREAM: itertools.count(1), HEARTBEAT_STREAM: itertools.count(1)}
        self.now = T0
        self.beats = itertools.count(1)
        self.pending: list[ev.Event] = []
        """What the monitor under test wrote and the follower has not folded yet."""
        self.log: list[ev.Event] = []
        """Everything it wrote."""
        self.lagging: list[Recorded] = []
        self.start()

    def start(self) -> None:
        """(Re)start both monitors on the state (a restart after the follower read what was written)."""
        self.fold()
        self.follower = Follower(self.store, self.state)
        self.monitor = LivenessMonitor(Writer(self.store, MONITOR), self.follower, SETTINGS)
        self.reference = FullScan(Writer(self.store, MONITOR), self.follower, SETTINGS)

    def agent(self, n: int) -> str:
        return f"a{n}-{self.uid}"

    def add(self, event: ev.Event) -> None:
        stream = HEARTBEAT_STREAM if type(event).family == "hb" else LEDGER_STREAM
        rec = Recorded(stream, next(self.seq[stream]), codec.subject_of(event), codec.to_ns(self.now), event)
        self.follower._apply(stream, [rec])

    def beat(self, n: int, incarnation: int) -> ev.AgentHeartbeat:
        agent_id = self.agent(n)
        return ev.AgentHeartbeat(producer=ev.Producer(id=agent_id, instance="i"), agent_id=agent_id,
                                 instance_id="i", incarnation=incarnation, beat=next(self.beats))

    async def lag(self, beat: ev.AgentHeartbeat) -> None:
        """Store a beat on the server that the state has not read: a death on that evidence must wait."""
        seq = await self.store.append(beat)
        if seq > self.state.heartbeats.seq:  # (else the state cannot be told it: it is past that position)
            self.lagging.append(Recorded(HEARTBEAT_STREAM, seq, codec.subject_of(beat), codec.to_ns(self.now), beat))

    def catch_up(self) -> None:
        """The state reads the beats it lagged behind (numbered as the server stored them)."""
        lagging, self.lagging = self.lagging, []
        for rec in lagging:
            self.follower._apply(HEARTBEAT_STREAM, [rec])
        if lagging:
            self.seq[HEARTBEAT_STREAM] = itertools.count(self.state.heartbeats.seq + 1)

    def fold(self) -> None:
        pending, self.pending = self.pending, []
        for event in pending:
            self.add(event)

    async def check(self, at: datetime) -> None:
        wrote = await self.monitor.check(at)
        expected = await self.reference.check(at)
        assert written_ids(wrote) == written_ids(expected), f"at {at - T0}"
        self.pending += wrote
        self.log += wrote

    def current(self, n: int) -> lc.AgentState | None:
        return self.state.agents.get(self.agent(n))


AGENTS, POOLS = 4, 2
STEPS = st.one_of(
    st.tuples(st.just("register"), st.integers(0, AGENTS - 1), st.integers(0, POOLS - 1),
              st.sampled_from((1.0, 1.0, 0.5, 2.0)), st.sampled_from((4.0, 7.0, 10.0, 2.5))),
    st.tuples(st.just("beat"), st.integers(0, AGENTS - 1), st.sampled_from(("current",) * 6 + ("old", "forged"))),
    st.tuples(st.just("beat"), st.integers(0, AGENTS - 1), st.just("current")),
    st.tuples(st.just("report"), st.integers(0, AGENTS - 1), st.integers(0, 2), st.booleans()),
    st.tuples(st.just("goodbye"), st.integers(0, AGENTS - 1)),
    st.tuples(st.just("drain"), st.integers(0, AGENTS - 1)),
    st.tuples(st.just("tick"), st.sampled_from((0.2, 0.5, 1.0, 1.0, 2.0, 3.0)), st.booleans()),
    st.tuples(st.just("tick"), st.sampled_from((0.2, 0.5, 1.0, 1.5)), st.booleans()),
    st.tuples(st.just("fold")),
    st.tuples(st.just("earlier"), st.sampled_from((0.5, 1.0, 4.0))),
    st.tuples(st.just("lag"), st.integers(0, AGENTS - 1)),
    st.tuples(st.just("catch_up")),
    st.tuples(st.just("grace")),
    st.tuples(st.just("restart")),
    st.tuples(st.just("retire"), st.integers(0, AGENTS - 1)),
)


async def play(world: World, steps: list[tuple[object, ...]]) -> None:
    registered: dict[int, list[int]] = defaultdict(list)
    for step in steps:
        match step:
            case ("register", int(n), int(pool), float(interval), float(ttl)):
                agent_id = world.agent(n)
                world.add(ev.AgentRegistered(producer=ev.Producer(id=agent_id, instance="i"), agent_id=agent_id,
                                             instance_id=f"i{len(registered[n])}", pool=f"p{pool}-{world.uid}",
                                             heartbeat_interval=interval, ttl=ttl))
                registered[n].append(world.state.ledger.seq)
            case ("beat", int(n), str(which)) if registered[n]:
                incarnation = {"current": registered[n][-1], "old": registered[n][0],
                               "forged": world.state.ledger.seq + 1000}[which]
                world.add(world.beat(n, incarnation))
            case ("report", int(n), int(reporter), bool(named)) if registered[n]:
                world.add(ev.AgentUnreachableReported(
                    producer=ev.Producer(id=f"c{reporter}", instance="c"), agent_id=world.agent(n),
                    incarnation=registered[n][-1] if named else None, error="timeout"))
            case ("goodbye", int(n)) if registered[n]:
                agent_id = world.agent(n)
                world.add(ev.AgentGoodbye(producer=ev.Producer(id=agent_id, instance="i"), agent_id=agent_id,
                                          instance_id="i", incarnation=registered[n][-1]))
            case ("drain", int(n)) if registered[n]:
                agent_id = world.agent(n)
                world.add(ev.AgentDraining(producer=ev.Producer(id=agent_id, instance="i"), agent_id=agent_id,
                                           incarnation=registered[n][-1], deadline=world.now + timedelta(minutes=1)))
            case ("tick", float(seconds), bool(fold)):
                if fold:
                    world.fold()
                world.now += timedelta(seconds=seconds)
                await world.check(world.now)
            case ("fold",):
                world.fold()
            case ("earlier", float(seconds)):  # a check at an earlier moment than the last (a caller's own clock)
                await world.check(world.now - timedelta(seconds=seconds))
            case ("lag", int(n)) if registered[n]:  # the stream leader has a beat our state has not read yet
                await world.lag(world.beat(n, registered[n][-1]))
            case ("catch_up",):
                world.catch_up()
            case ("grace",):
                world.monitor.start_grace("a reconnect")
            case ("restart",):
                world.start()
            case ("retire", int(n)):  # the fold may let go of an agent that is gone, without a word
                agent = world.current(n)
                if agent is not None and agent.status in (lc.A_GONE, lc.A_DEAD):
                    del world.state.ledger.agents[agent.agent_id]
            case _:  # only a step about an agent that never registered means nothing
                assert step[0] in ("beat", "report", "goodbye", "drain", "lag"), step
    world.catch_up()
    for _ in range(3):  # and then silence: everyone still live turns suspect, then dead
        world.fold()
        world.now += timedelta(seconds=6)
        await world.check(world.now)


FLEET = st.lists(st.tuples(st.just("register"), st.integers(0, AGENTS - 1), st.integers(0, POOLS - 1),
                           st.sampled_from((1.0, 1.0, 0.5, 2.0)), st.sampled_from((4.0, 7.0, 10.0, 2.5))),
                 min_size=2, max_size=AGENTS)
HISTORIES = st.tuples(FLEET, st.lists(STEPS, min_size=20, max_size=80)).map(lambda h: [*h[0], *h[1]])


R0 = ("register", 0, 0, 1.0, 4.0)
FOUND: list[list[tuple[object, ...]]] = [
    # a report leaving its window makes the suspicion name the next one (no beat or change in between)
    [("register", 0, 0, 2.0, 10.0), ("report", 0, 0, True), ("tick", 0.5, False), ("report", 0, 1, True),
     ("report", 0, 2, True), ("tick", 0.5, False), ("tick", 1.2, False)],
    # a beat after a suspicion: suspect again (another id) once that beat is overdue, not when it is dead
    [R0, ("beat", 0, "current"), ("tick", 3.0, True), ("fold",), ("beat", 0, "current"), ("tick", 2.0, True),
     ("tick", 1.0, False), ("tick", 0.5, False)],
    # beats of made-up incarnations push the real one out of the fold: the agent is judged from its registration
    [("register", 0, 0, 1.0, 10.0), ("beat", 0, "current"), ("tick", 1.0, False), ("tick", 1.0, False),
     ("beat", 0, "current"), ("tick", 1.2, False),
     *[step for n in (1, 2, 3, 1) for step in [("beat", 0, "forged"), ("register", n, 1, 1.0, 10.0)]],
     ("tick", 0.5, False), ("tick", 2.0, False)],
    # half a pool dies, the other half beats: no trip (as many alive as dead is not more than half)
    [*(("register", n, 0, 1.0, 4.0) for n in range(4)),
     *[step for _ in range(5) for step in [("beat", 0, "current"), ("beat", 1, "current"), ("tick", 1.0, True)]]],
    # shrunk from failures of broken deadlines: a beat is a change; a breaker's last death leaving the window,
    # an agent of an open pool changing, a check at an earlier moment
    [R0] * 6 + [("beat", 0, "current")] + [R0] * 8 + [("register", 0, 0, 0.5, 4.0), ("beat", 0, "current"),
     ("tick", 2.0, False), ("beat", 0, "current"), ("register", 1, 0, 1.0, 4.0), ("retire", 0), ("tick", 1.5, False)],
    [R0] * 13 + [("register", 0, 0, 1.0, 2.5), ("register", 1, 0, 1.0, 7.0), ("tick", 3.0, False), R0,
                 ("beat", 1, "current"), R0, R0, ("register", 0, 0, 1.0, 7.0), ("tick", 0.2, True)],
    [R0, ("register", 0, 1, 1.0, 4.0), ("beat", 0, "current"), ("beat", 0, "current"), ("catch_up",),
     ("register", 1, 1, 1.0, 2.5), ("tick", 3.0, False), ("fold",), ("restart",), ("beat", 0, "current"),
     ("earlier", 0.5), ("retire", 0), ("register", 0, 1, 1.0, 4.0), ("beat", 0, "current"), ("beat", 0, "current"),
     ("earlier", 0.5), ("beat", 0, "current")],
    [R0, ("register", 1, 0, 1.0, 4.0)] + [R0] * 5 + [("beat", 0, "current"), ("tick", 1.0, False), R0, ("retire", 0),
     R0, ("beat", 0, "current"), ("tick", 0.2, False), ("beat", 0, "current"), ("beat", 0, "current"),
     ("tick", 1.0, False), ("tick", 2.0, False), R0, ("earlier", 0.5)],
]
"""Histories that once told a broken deadline from the full scan (run on every test run, before the drawn ones)."""


def with_found(test: Any) -> Any:
    for steps in FOUND:
        test = example(steps=steps)(test)
    return test


@hsettings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=HISTORIES)
@with_found
async def test_the_deadline_monitor_writes_what_judging_every_agent_at_every_check_writes(
        store: EventStore, steps: list[tuple[object, ...]]):
    await play(World(store, new_id()[-10:].lower()), steps)


async def test_the_histories_reach_every_verdict_and_the_breaker(store: EventStore):
    """The steps generated are not vacuous: a history of them suspects, kills, trips a breaker and resets it."""
    world = World(store, new_id()[-10:].lower())
    steps: list[tuple[object, ...]] = [("register", n, 0, 1.0, 3.0) for n in range(3)]
    steps += [("report", 2, 0, True), ("report", 2, 1, False), ("tick", 1.0, False), ("tick", 2.5, True),
              ("fold",)]
    steps += [("register", n, 0, 1.0, 3.0) for n in range(3)]
    steps += [step for _ in range(7) for step in [*(("beat", n, "current") for n in range(3)), ("tick", 1.0, True)]]
    await play(world, steps)
    wrote = Counter(e.type_tag() for e in world.log)
    assert wrote["agent.suspected"] >= 1 and wrote["agent.declared_dead"] >= 3, wrote
    assert wrote["pool.breaker_tripped"] >= 1 and wrote["pool.breaker_reset"] == 1, wrote


def agent_state(registered_at: datetime, interval: float, ttl: float) -> lc.AgentState:
    return lc.AgentState(agent_id="a1", incarnation=1, instance_id="i", pool="p", platform="default",
                         region="default", labels={}, capacity=1, heartbeat_interval=interval, ttl=ttl,
                         registered_at=registered_at, status=lc.A_ALIVE, reason="registered",
                         status_since=registered_at, status_seq=1)


@hsettings(max_examples=500, deadline=None)
@given(micros=st.integers(0, 10**13), interval=st.floats(1e-3, 1e6), ttl=st.floats(1e-3, 1e8),
       missed=st.integers(1, 10), dead_after=st.none() | st.floats(1e-3, 1e6), beat=st.booleans())
def test_turns_says_when_assess_turns_overdue_and_dead_never_later_and_only_microseconds_earlier(
        micros: int, interval: float, ttl: float, missed: int, dead_after: float | None, beat: bool):
    since = T0 + timedelta(microseconds=micros)
    agent = agent_state(since - timedelta(seconds=1) if beat else since, interval, ttl)
    policy = HealthPolicy(suspect_after_missed=missed, dead_after=dead_after)
    last = since if beat else None
    overdue_at, dead_at = turns(agent, last, policy)
    assert overdue_at is not None and dead_at is not None
    tick, few = timedelta(microseconds=1), timedelta(microseconds=4)
    assert not assess(agent, last, overdue_at - tick, policy).overdue
    assert assess(agent, last, overdue_at + few, policy).overdue
    assert assess(agent, last, dead_at - tick, policy).health != DEAD
    assert assess(agent, last, dead_at + few, policy).health == DEAD


async def test_a_check_judges_only_the_agents_that_changed_or_turned(store: EventStore):
    """1,000 agents beating as they should: once each judged, a check judges none, however many checks. A beat
    leaves a quiet agent's deadline where it was (when it would turn overdue by its older beat): then it is
    judged, finds the newer beat, and is due again when that one turns; an agent that stopped beating is
    suspected then, and only it."""
    world = World(store, new_id()[-10:].lower())
    fleet = range(1000)
    for n in fleet:
        world.add(ev.AgentRegistered(producer=ev.Producer(id=world.agent(n), instance="i"), agent_id=world.agent(n),
                                     instance_id="i", pool=f"p-{world.uid}", heartbeat_interval=5.0, ttl=30.0))
    incarnation = {n: world.state.agents[world.agent(n)].incarnation for n in fleet}
    for n in fleet:
        world.add(world.beat(n, incarnation[n]))
    monitor = world.monitor

    async def judged_at(seconds: float) -> tuple[int, list[ev.Event]]:
        before = monitor.judged
        wrote = await monitor.check(T0 + timedelta(seconds=seconds))
        return monitor.judged - before, wrote

    assert await judged_at(1.0) == (1000, [])  # the first check: everyone once
    for moment in (1.2, 1.4, 4.8):
        assert await judged_at(moment) == (0, []), moment
    for beat_at in (5.0, 10.0):
        world.now = T0 + timedelta(seconds=beat_at)
        for n in fleet[10:]:
            world.add(world.beat(n, incarnation[n]))
        assert await judged_at(beat_at + 0.2) == (0, [])
        assert await judged_at(beat_at + 4.9) == (0, [])
    judged, wrote = await judged_at(15.1)  # 3 beats (5 s apart) after the one each was judged with
    assert judged == 1000 and sorted(e.entity_id for e in wrote) == sorted(world.agent(n) for n in fleet[:10])
    assert all(isinstance(e, ev.AgentSuspected) for e in wrote)  # the ten silent since T0; the others beat at 10 s
    assert await judged_at(15.3) == (0, [])
    assert await judged_at(24.9) == (0, [])
    assert (await judged_at(25.1))[0] == 990  # when their beat at 10 s would turn them overdue
