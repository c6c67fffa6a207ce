"""Self-declared times never decide: routes and sessions are timed by when the server stored their events.

A route transition or a health report is written by whoever can publish on its
subject, with whatever `time` (or `checked_at`) it likes. If the folds took
those times, a transition dated in the future would postpone its start or stop
timeout, a health report "checked" in the year 9999 would keep a route fresh
forever, and a clock running behind would time a route out at once. The folds
take every time a decision uses from the stored timestamp; these tests forge
the declared times both ways, first on the pure folds and rules, then against
the running consumers on a real server - where year-9999 times on every
subject family must crash nothing.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from fleet import agents, consumers, events, ledger_on
from helpers import eventually
from histories import histories
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from consumers.route_rules import next_step
from ledger import codec
from ledger import events as ev
from ledger import lifecycle as lc
from ledger.decide import AgentRef
from ledger.subjects import LEDGER_STREAM
from ledger.writer import Writer
from ledgerctl.server import EmbeddedServer
from projections.health import route_health
from projections.state import LedgerState

T0 = datetime(2026, 11, 1, 12, tzinfo=UTC)
CLI = ev.Producer(id="cli", instance="c1")
FORGER = ev.Producer(id="operator-forger", instance="f1")
"""Forges times, not identities: it writes only what its role may (an operator's clock; a monitor's or an agent's
below), so every fold takes its events and only their times are in question."""
MONITOR_FORGER = ev.Producer(id="monitor-forger", instance="f2")
A1 = ev.Producer(id="a1", instance="i1")
FAR_FUTURE = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
HOUR = 3600.0

# hypothesis takes naive bounds and makes each value aware in `timezones`
declared_times = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 31),  # noqa: DTZ001
                              timezones=st.just(UTC))
"""Any time a writer may declare, from the first years of the calendar to its last."""


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def stored(seq: int, seconds: float, event: ev.Event) -> codec.Recorded:
    return codec.Recorded(LEDGER_STREAM, seq, codec.subject_of(event), codec.to_ns(at(seconds)), event)


def fold_route(*records: codec.Recorded) -> lc.RouteState:
    state, anomalies = lc.fold(lc.evolve_route, records)
    assert anomalies == [] and state is not None
    return state


def created(probe: ev.Probe | None = None, *, time: datetime | None = None, **more: object) -> codec.Recorded:
    e = ev.RouteCreated(producer=CLI, route_id="r1", session_id="s1", endpoint="e", probe=probe,
                        start_timeout=300, stop_timeout=120, time=time or at(0), **more)  # type: ignore[arg-type]
    return stored(1, 0, e)


def moved(seq: int, seconds: float, from_state: str, to_state: str, *, time: datetime | None = None,
          traffic: str | None = None) -> codec.Recorded:
    return stored(seq, seconds, ev.RouteTransitioned(producer=FORGER, route_id="r1", from_state=from_state,
                                                     to_state=to_state, traffic=traffic, time=time or at(seconds)))


def health(seq: int, seconds: float, checked_at: datetime, healthy: bool = True) -> codec.Recorded:
    return stored(seq, seconds, ev.RouteHealthReported(producer=FORGER, route_id="r1", healthy=healthy,
                                                       checked_at=checked_at, time=checked_at))


def session(status: str = lc.S_PENDING) -> lc.SessionState:
    return lc.SessionState(session_id="s1", pool="p", platform="default", region="default", labels={},
                           idle_ttl=None, status=status, created_at=T0, owner="a1" if status == lc.S_ASSIGNED else None)


# --- the folds and rules (pure) -------------------------------------------------------------------------------


@hsettings(max_examples=200, deadline=None)
@given(declared=declared_times, stored_after=st.floats(min_value=0.001, max_value=10 * HOUR))
def test_a_start_timeout_counts_from_when_the_transition_was_stored(declared: datetime, stored_after: float):
    route = fold_route(created(time=declared), moved(2, stored_after, lc.PENDING, lc.STARTING, time=declared))
    assert (route.created_at, route.state_since) == (at(0), at(stored_after))
    assert next_step(route, session(), at(stored_after + 299)) is None  # a past `time` does not time it out early
    late = next_step(route, session(), at(stored_after + 301))  # nor a future one postpone it
    assert late is not None and late.to_state == lc.FAILED_TO_START and "start_timeout 300s" in late.reason


@hsettings(max_examples=200, deadline=None)
@given(declared=declared_times)
def test_a_stop_timeout_counts_from_when_the_transition_was_stored(declared: datetime):
    route = fold_route(created(), moved(2, 10, lc.PENDING, lc.TERMINATING, time=declared))
    assert next_step(route, session(lc.S_ASSIGNED), at(10 + 119)) is None
    late = next_step(route, session(lc.S_ASSIGNED), at(10 + 121))
    assert late is not None and late.to_state == lc.TERMINATED and "stop_timeout 120s" in late.reason


def running_route(checked_at: datetime, *, on_stale: str = "deactivate") -> lc.RouteState:
    probe = ev.Probe(initial_delay=60, stale_after=30, on_stale=on_stale)
    return fold_route(created(probe), moved(2, 1, lc.PENDING, lc.STARTING), moved(3, 2, lc.STARTING, lc.WARMING_UP),
                      moved(4, 3, lc.WARMING_UP, lc.RUNNING, traffic=lc.TRAFFIC_ACTIVE), health(5, 10, checked_at))


@hsettings(max_examples=200, deadline=None)
@given(declared=declared_times, on_stale=st.sampled_from(["deactivate", "terminate"]))
def test_health_is_fresh_from_when_the_report_was_stored_whatever_it_says_it_checked(declared: datetime,
                                                                                     on_stale: str):
    route = running_route(declared, on_stale=on_stale)
    assert route.health_checked_at == at(10)
    # A report "checked" an hour ago (or in year 1) neither deactivates nor terminates a route at once ...
    assert next_step(route, session(lc.S_ASSIGNED), at(10 + 29)) is None
    assert route_health(route, at(10 + 29)).stale is False  # the views agree with the watchdog
    # ... and one "checked" in the year 9999 goes stale like any other.
    step = next_step(route, session(lc.S_ASSIGNED), at(10 + 31))
    assert step is not None and "health stale" in step.reason
    assert (step.to_state, step.traffic) == ((lc.RUNNING, lc.TRAFFIC_INACTIVE) if on_stale == "deactivate"
                                             else (lc.TERMINATING, None))
    assert route_health(route, at(10 + 31)).stale is True


@pytest.mark.parametrize("declared", [FAR_FUTURE, at(-HOUR)])
def test_a_probe_counts_for_warming_up_when_it_was_stored_after_warming_up_began(declared: datetime):
    probe = ev.Probe(initial_delay=60, stale_after=30)
    base = (created(probe), moved(2, 1, lc.PENDING, lc.STARTING), moved(3, 5, lc.STARTING, lc.WARMING_UP))
    after = fold_route(*base, health(4, 6, declared))
    step = next_step(after, session(lc.S_ASSIGNED), at(7))
    assert step is not None and step.to_state == lc.RUNNING  # a clock behind the server does not hide the probe
    before = fold_route(base[0], base[1], health(3, 4, declared), base[2])
    assert next_step(before, session(lc.S_ASSIGNED), at(7)) is None  # one from before, dated ahead, does not count


@pytest.mark.parametrize("declared", [FAR_FUTURE, at(-HOUR)])
def test_session_times_are_when_the_server_stored_its_events(declared: datetime):
    a1 = AgentRef("a1", "i1", 1)
    records = [
        stored(2, 10, ev.SessionCreated(producer=CLI, session_id="s1", pool="p", idle_ttl=60, time=declared)),
        stored(3, 20, ev.SessionClaimed(producer=A1, session_id="s1", agent_id=a1.agent_id,
                                        instance_id=a1.instance_id, incarnation=a1.incarnation, time=declared)),
    ]
    claimed, anomalies = lc.fold(lc.evolve_session, records)
    assert anomalies == []
    assert (claimed.created_at, claimed.status_since, claimed.last_owner_write_at) == (at(10), at(20), at(20))
    report = stored(4, 30, ev.SessionResourceReported(producer=A1, session_id="s1", agent_id="a1", incarnation=1,
                                                      token=3, platform_resource_id="pod/1", time=declared))
    released = stored(5, 40, ev.SessionReleased(producer=A1, session_id="s1", agent_id="a1", incarnation=1,
                                                token=3, time=declared))
    reported, _ = lc.evolve_session(claimed, report)
    assert reported.last_owner_write_at == at(30)
    done, _ = lc.evolve_session(reported, released)
    assert (done.status, done.status_since) == (lc.S_RELEASED, at(40))


def test_the_projection_folds_route_and_session_times_as_stored():
    """The projections fold the same functions: what a view shows is what the watchdog decides on."""
    state = LedgerState()
    state.apply_all([stored(1, 0, ev.SessionCreated(producer=CLI, session_id="s1", pool="p", time=FAR_FUTURE)),
                     msgspec.structs.replace(created(ev.Probe(), time=FAR_FUTURE), seq=2),
                     moved(3, 5, lc.PENDING, lc.STARTING, time=FAR_FUTURE), health(4, 6, FAR_FUTURE)])
    route, sess = state.routes["r1"], state.sessions["s1"]
    assert (route.created_at, route.state_since, route.health_checked_at) == (at(0), at(5), at(6))
    assert sess.created_at == at(0)


def retimed(item: codec.Recorded | codec.Unreadable, declared: datetime) -> codec.Recorded | codec.Unreadable:
    """The same stored item, its writer claiming another time (and, for a health report, another check)."""
    if not isinstance(item, codec.Recorded):
        return item
    e = msgspec.structs.replace(item.event, time=declared)
    if isinstance(e, ev.RouteHealthReported):
        e = msgspec.structs.replace(e, checked_at=declared)
    return msgspec.structs.replace(item, event=e)


def decided_on(state: LedgerState) -> tuple[object, ...]:
    """What the consumers and views decide on. An agent's drain deadline is its payload, not a timestamp."""
    agents = {k: msgspec.structs.replace(a, drain_deadline=None) for k, a in state.agents.items()}
    return agents, state.ledger.sessions, state.ledger.routes, state.ledger.anomalies, state.ledger.dead_letters


@hsettings(max_examples=100, deadline=None)
@given(items=histories(), data=st.data())
def test_no_declared_time_reaches_an_agent_session_or_route(items: list, data: st.DataObject):  # type: ignore[type-arg]
    declared = data.draw(st.lists(declared_times, min_size=len(items), max_size=len(items)))
    honest, forged = LedgerState(), LedgerState()
    honest.apply_all(items)
    forged.apply_all([retimed(i, t) for i, t in zip(items, declared, strict=True)])
    assert decided_on(forged) == decided_on(honest)


# --- against the running consumers, on a real server ----------------------------------------------------------




async def route_state(ledger: Writer, rid: str) -> lc.RouteState:
    state, _ = await ledger.route(rid)
    return state


async def reaches(ledger: Writer, rid: str, *states: str, timeout: float = 15) -> lc.RouteState:
    async def there() -> lc.RouteState | None:
        st_ = await route_state(ledger, rid)
        return st_ if st_.state in states else None

    return await eventually(there, timeout=timeout, what=f"route {rid} reaching {states}")


async def forge_start(ledger: Writer, rid: str, sid: str, *, start_timeout: float, time: datetime) -> None:
    await ledger.create_route(rid, session_id=sid, endpoint="e", start_timeout=start_timeout)
    await ledger.append(ev.RouteTransitioned(producer=FORGER, route_id=rid, from_state=lc.PENDING,
                                             to_state=lc.STARTING, reason="forged", time=time))


async def test_the_watchdog_times_out_a_start_dated_in_the_future_and_not_one_dated_in_the_past(
        server: EmbeddedServer):
    async with ledger_on(server.url) as ledger, consumers(server.url, reclaimer=False, monitor=False):
        sid, _ = await ledger.create_session("gpu", session_id="s1")  # pending: nothing but a timeout moves a route
        await forge_start(ledger, "future", sid, start_timeout=0.5, time=FAR_FUTURE)
        # A start dated two hours back, with an hour to start: it must not fail at once.
        await forge_start(ledger, "past", sid, start_timeout=HOUR, time=ev.utcnow() - timedelta(hours=2))
        # A witness stored after both, timed honestly: once it has timed out, the watchdog has judged the others.
        await forge_start(ledger, "witness", sid, start_timeout=0.5, time=ev.utcnow())
        failed = await reaches(ledger, "future", lc.FAILED_TO_START)
        assert "start_timeout 0.5s" in failed.reason
        await reaches(ledger, "witness", lc.FAILED_TO_START)
        assert (await route_state(ledger, "past")).state == lc.STARTING


async def test_a_health_report_checked_in_the_year_9999_does_not_keep_a_route_fresh(server: EmbeddedServer):
    async with ledger_on(server.url) as ledger, consumers(server.url, reclaimer=False, monitor=False):
        sid, _ = await ledger.create_session("gpu", session_id="s1")
        await ledger.create_route("r1", session_id=sid, endpoint="e",
                                  probe=ev.Probe(initial_delay=HOUR, stale_after=0.5))
        for from_state, to_state in ((lc.PENDING, lc.STARTING), (lc.STARTING, lc.WARMING_UP)):
            await ledger.append(ev.RouteTransitioned(producer=FORGER, route_id="r1", from_state=from_state,
                                                     to_state=to_state, reason="forged"))
        await ledger.append(ev.RouteHealthReported(producer=FORGER, route_id="r1", healthy=True,
                                                   checked_at=FAR_FUTURE, time=FAR_FUTURE))
        running = await reaches(ledger, "r1", lc.RUNNING)
        assert running.traffic == lc.TRAFFIC_ACTIVE  # the probe passed ...

        async def deactivated() -> lc.RouteState | None:
            st_ = await route_state(ledger, "r1")
            return st_ if st_.traffic == lc.TRAFFIC_INACTIVE else None

        stale = await eventually(deactivated, timeout=15, what="the route deactivated on stale health")
        assert "health stale" in stale.reason  # ... and went stale half a second after it was stored


async def test_year_9999_on_every_subject_family_crashes_no_consumer(server: EmbeddedServer):
    parts = ("follower", "monitor", "reclaimer", "watchdog")
    async with ledger_on(server.url) as ledger, agents(server.url, "gpu", ["a2"], heartbeat=0.2, ttl=1.5), \
            consumers(server.url) as running:
        def alive() -> list[str]:
            tasks = {t.get_name(): t for t in asyncio.all_tasks() if t.get_name() in parts}
            return sorted(name for name, t in tasks.items() if not t.done())

        assert alive() == sorted(parts)
        far = {"time": FAR_FUTURE}
        ghost = ev.Producer(id="z1", instance="zi")
        inc = await ledger.append(ev.AgentRegistered(producer=ghost, agent_id="z1", instance_id="zi", pool="gpu",
                                                     capacity=5, heartbeat_interval=0.2, ttl=1.0, **far))
        await ledger.append(ev.AgentHeartbeat(producer=ghost, agent_id="z1", instance_id="zi", incarnation=inc,
                                              beat=1, **far))
        await ledger.append(ev.AgentUnreachableReported(producer=FORGER, agent_id="z1", incarnation=inc, **far))
        await ledger.append(ev.AgentSuspected(producer=MONITOR_FORGER, agent_id="z1", incarnation=inc, reason="forged",
                                              evidence=ev.Evidence(observed_at=FAR_FUTURE), **far))
        await ledger.append(ev.AgentDraining(producer=ghost, agent_id="z1", incarnation=inc, deadline=FAR_FUTURE,
                                             **far))
        await ledger.append(ev.SessionCreated(producer=CLI, session_id="s1", pool="gpu", **far))
        await ledger.append(ev.SessionClaimed(producer=ghost, session_id="s1", agent_id="z1", instance_id="zi",
                                              incarnation=inc, **far))
        await ledger.append(ev.RouteCreated(producer=CLI, route_id="r1", session_id="s1", endpoint="e",
                                            start_timeout=0.5, probe=ev.Probe(initial_delay=0.5), **far))
        await ledger.append(ev.RouteHealthReported(producer=FORGER, route_id="r1", healthy=False,
                                                   checked_at=FAR_FUTURE, **far))
        await ledger.append(ev.PoolBreakerTripped(producer=MONITOR_FORGER, pool="other", reason="forged", **far))
        await ledger.append(ev.PoolBreakerReset(producer=FORGER, pool="other", reason="forged", **far))
        # Every consumer and the agent still act on what follows: z1, draining, hands its session to a2 and
        # dies a ttl after its one beat was stored; the route started for it times out.

        async def with_a2() -> bool:
            state, _ = await ledger.session("s1")
            return state.status == lc.S_ASSIGNED and state.owner == "a2"

        async def declared() -> list[ev.Event]:
            return [e for e in await events(ledger.store, "agent", "z1") if isinstance(e, ev.AgentDeclaredDead)]

        await eventually(with_a2, timeout=20, what="z1's session handed to a2")
        await eventually(declared, timeout=20, what="z1 declared dead")
        route = await reaches(ledger, "r1", lc.FAILED_TO_START, lc.TERMINATING, lc.TERMINATED)
        session, _ = await ledger.session("s1")
        # Nothing decided on, or shown, carries the forged year.
        assert {route.created_at.year, session.created_at.year, running.follower.state.ledger.agents["z1"].
                registered_at.year} == {ev.utcnow().year}
        assert alive() == sorted(parts)


async def test_the_idle_reaper_ignores_the_times_sessions_declare(store, uid: str):  # type: ignore[no-untyped-def]
    """The reaper times idleness on the owning agent's own clock, never by a session's events' `time`."""
    from consumers.idle import IdleReaper
    from ledger.agent import Agent
    from ledger.ids import new_id

    ledger = Writer(store, ev.Producer(id="operator-test", instance=new_id()))
    future, past = f"{uid}-future", f"{uid}-past"
    await ledger.append(ev.SessionCreated(producer=CLI, session_id=future, pool=uid, idle_ttl=0.2, time=FAR_FUTURE))
    await ledger.append(ev.SessionCreated(producer=CLI, session_id=past, pool=uid, idle_ttl=HOUR,
                                          time=ev.utcnow() - timedelta(hours=2)))
    async with Agent(ledger, agent_id=f"{uid}-a", pool=uid, capacity=2, heartbeat=0.5, ttl=5) as agent:
        for sid in (future, past):
            await agent.claim(sid)
        reaper = IdleReaper(agent, every=0.05)
        task = asyncio.create_task(reaper.run())
        try:
            # Each pass looks at every owned session: once the future-dated one went, the past-dated one was judged.
            await eventually(lambda: future in reaper.released, timeout=15, what="the future-dated session released")
            assert past in agent.owned and past not in reaper.released
        finally:
            task.cancel()
    state, _ = await ledger.session(future)
    assert state.status == lc.S_RELEASED and state.status_since.year == ev.utcnow().year
