"""Failover end to end: real agent processes, the liveness monitor, the reclaimer, a real server."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from datetime import timedelta

import pytest
from fleet import agents, consumers, events, ledger_on
from helpers import eventually

from ledger import events as ev
from ledger import lifecycle as lc
from ledger.codec import Recorded
from ledger.errors import LedgerError
from ledger.writer import Writer
from ledgerctl.server import EmbeddedServer

HEARTBEAT, TTL = 0.2, 1.5




async def owners(ledger, sessions: list[str]) -> dict[str, str | None]:  # type: ignore[no-untyped-def]
    return {sid: (await ledger.session(sid))[0].owner for sid in sessions}


async def test_kill_9_one_of_three_agents_moves_its_sessions_once_it_is_declared_dead(server: EmbeddedServer):
    async with ledger_on(server.url) as ledger, agents(server.url, "gpu", ["a1", "a2", "a3"],
                                                        heartbeat=HEARTBEAT, ttl=TTL) as procs:
        sessions = [(await ledger.create_session("gpu", session_id=f"s{i}"))[0] for i in range(12)]

        async def all_owned() -> dict[str, str | None] | None:
            o = await owners(ledger, sessions)
            return o if all(o.values()) else None

        placed = await eventually(all_owned, what="every session claimed")
        async with consumers(server.url, watchdog=False):
            victim = max(procs, key=lambda a: list(placed.values()).count(a))
            lost = [s for s, o in placed.items() if o == victim]
            procs[victim].kill9()

            async def moved() -> bool:
                now = await owners(ledger, lost)
                return all(o not in (None, victim) for o in now.values())

            await eventually(moved, timeout=TTL + HEARTBEAT + 10, interval=0.05, what="failover of the lost sessions")
        # (How fast is measured in bench/failover.py: timings do not belong in tests.)
        [death] = [r for r in await ledger.store.history("agent", victim)
                   if isinstance(r, Recorded) and isinstance(r.event, ev.AgentDeclaredDead)]
        dead = death.event
        assert dead.reason == "missed_heartbeats" and dead.evidence.dead_after == TTL
        assert dead.evidence.last_heartbeat_seq is not None and dead.producer.id == "monitor"
        last_beat = dead.evidence.last_heartbeat_at
        for sid in lost:
            final = [r for r in await ledger.store.history("session", sid)
                     if isinstance(r.event, ev.SessionClaimed)][-1]
            claim = final.event
            assert claim.previous_owner == victim and claim.reason == "failover" and claim.causation_id == dead.event_id
            # In order on the log's own clock: the last beat, a ttl of silence, the death, then the new claim.
            assert last_beat + timedelta(seconds=TTL) <= death.stored_at <= final.stored_at


async def test_sigterm_moves_sessions_at_once_without_waiting_for_the_ttl(server: EmbeddedServer):
    async with ledger_on(server.url) as ledger, agents(server.url, "gpu", ["a1", "a2"], ttl=30.0) as procs:
        sessions = [(await ledger.create_session("gpu", session_id=f"s{i}"))[0] for i in range(6)]
        await eventually(lambda: _all(owners(ledger, sessions)), what="every session claimed")
        # No liveness monitor: with a 30 s ttl nothing but the goodbye itself can move them.
        async with consumers(server.url, watchdog=False, monitor=False):
            placed = await owners(ledger, sessions)
            lost = [s for s, o in placed.items() if o == "a1"]
            assert await procs["a1"].terminate() == 0

            async def with_a2() -> bool:
                return set((await owners(ledger, lost)).values()) <= {"a2"}

            await eventually(with_a2, timeout=20, interval=0.02, what="a1's sessions moving after its goodbye")
        [goodbye] = [e for e in await events(ledger.store, "agent", "a1") if isinstance(e, ev.AgentGoodbye)]
        for sid in lost:
            claim = [e for e in await events(ledger.store, "session", sid) if isinstance(e, ev.SessionClaimed)][-1]
            assert (claim.previous_owner, claim.causation_id) == ("a1", goodbye.event_id)


async def _all(result) -> bool:  # type: ignore[no-untyped-def]
    return all((await result).values())


async def test_a_death_is_declared_once_by_three_monitor_replicas(server: EmbeddedServer):
    async with ledger_on(server.url) as ledger, agents(server.url, "gpu", ["a1"], heartbeat=HEARTBEAT,
                                                        ttl=TTL) as procs:
        async with consumers(server.url, name="r1", reclaimer=False, watchdog=False) as r1, \
                consumers(server.url, name="r2", reclaimer=False, watchdog=False) as r2, \
                consumers(server.url, name="r3", reclaimer=False, watchdog=False) as r3:
            procs["a1"].kill9()

            async def declared() -> list[ev.Event]:
                return [e for e in await events(ledger.store, "agent", "a1") if isinstance(e, ev.AgentDeclaredDead)]

            await eventually(declared, timeout=TTL + 5, what="the death declaration")
            # Every replica past the point where it could write one of its own: each has folded the death (so
            # judges a1 no more) and has no append left in flight.
            await eventually(lambda: all(getattr(r.follower.state.ledger.agents.get("a1"), "status", None) == lc.A_DEAD
                                         and r.store.appends_in_flight == 0 for r in (r1, r2, r3)),
                             timeout=TTL + 5, what="every replica knowing a1 dead, with nothing left to write")
        assert len(await declared()) == 1


async def test_the_breaker_trips_when_most_of_a_pool_dies_together(server: EmbeddedServer):
    names = ["a1", "a2", "a3", "a4"]
    async with ledger_on(server.url) as ledger, agents(server.url, "gpu", names, heartbeat=HEARTBEAT,
                                                        ttl=TTL, capacity=20) as procs:
        sessions = [(await ledger.create_session("gpu", session_id=f"s{i}"))[0] for i in range(8)]
        await eventually(lambda: _all(owners(ledger, sessions)), what="every session claimed")
        async with consumers(server.url, watchdog=False) as running:
            placed = await owners(ledger, sessions)
            survivor = max(names, key=lambda a: list(placed.values()).count(a))
            for name in names:
                if name != survivor:
                    procs[name].kill9()

            async def tripped() -> list[ev.Event]:
                return [e for e in await events(ledger.store, "pool", "gpu")
                        if isinstance(e, ev.PoolBreakerTripped)]

            [trip] = await eventually(tripped, timeout=TTL + 5, what="the breaker tripping")
            assert trip.agents == 4 and len(trip.dead) == 3 and "of 4 agents died" in trip.reason
            await eventually(lambda: all(running.follower.state.ledger.agents[n].status == lc.A_DEAD
                                         for n in names if n != survivor), timeout=TTL + 5, what="deaths")
            held = [s for s, o in placed.items() if o != survivor]
            # The reclaimer's chance, taken for certain: a step of its own on a state that holds the deaths and
            # the trip (its loop may step too) - it plans no claim and the sessions stay where they were.
            from consumers.reclaim_rules import ClaimFor

            reclaimer = running.parts["reclaimer"]
            plan = await reclaimer.step(running.follower.clock.now(ev.utcnow))  # type: ignore[attr-defined]
            assert not [a for a in plan if isinstance(a, ClaimFor) and a.session_id in held], plan
            assert set((await owners(ledger, held)).values()) <= set(names) - {survivor}
            # An operator closes the breaker: the held sessions move to the survivor.
            result = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "ledgerctl", "pool",
                                                              "reset-breaker", "gpu", "--nats-url", server.url],
                                             capture_output=True, text=True, timeout=30)
            assert result.returncode == 0 and "breaker closed" in result.stdout, result.stderr

            async def with_survivor() -> bool:
                return set((await owners(ledger, held)).values()) == {survivor}

            await eventually(with_survivor, timeout=10, what="held sessions moving once the breaker closed")


async def test_two_reclaimers_and_self_claiming_agents_never_make_two_owners(server: EmbeddedServer):
    async with ledger_on(server.url) as ledger, agents(server.url, "gpu", ["a1", "a2", "a3"], heartbeat=HEARTBEAT,
                                                        ttl=TTL, capacity=100) as procs:
        async with consumers(server.url, name="x", watchdog=False), \
                consumers(server.url, name="y", watchdog=False, monitor=False):
            sessions = [(await ledger.create_session("gpu", session_id=f"s{i}"))[0] for i in range(60)]
            await eventually(lambda: _all(owners(ledger, sessions)), timeout=20, what="every session claimed")
            procs["a2"].kill9()

            async def none_with_a2() -> bool:
                o = await owners(ledger, sessions)
                return all(v in ("a1", "a3") for v in o.values())

            await eventually(none_with_a2, timeout=TTL + 10, what="a2's sessions re-owned")
    assert await claims_in_a_clean_log(server.url) >= 60


async def claims_in_a_clean_log(url: str) -> int:
    """The whole log, checked: every claim names the claim it replaces; no overlap, no stale write."""
    async with ledger_on(url) as ledger:
        items = []
        async for batch in ledger.store.replay("ledger.session.>"):
            items += [i for i in batch if isinstance(i, Recorded)]
        registrations: dict[str, list[int]] = {}
        async for batch in ledger.store.replay("ledger.agent.*.registered.*"):
            for r in batch:
                registrations.setdefault(r.event.agent_id, []).append(r.seq)
    lookup = lc.registrations_lookup(registrations)
    by_session: dict[str, list[Recorded]] = {}
    for r in items:
        by_session.setdefault(r.event.session_id, []).append(r)
    claims = 0
    for sid, history in by_session.items():
        state, anomalies = lc.fold(lc.evolve_session, history, lookup)
        assert anomalies == [], (sid, anomalies)
        claims += state.claims
    # And by the independent checker, which shares no code with the fold above.
    check = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "ledgerctl", "check", "--nats-url", url],
                                    capture_output=True, text=True, timeout=120, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    return claims


async def test_consumers_killed_as_they_fail_an_agent_over_and_restarted_still_make_one_owner(server: EmbeddedServer):
    def start_consumers() -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "ledgerctl", "consumers", "--grace", "0.3", "--nats-url",
                                 server.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    async with ledger_on(server.url) as ledger, agents(server.url, "gpu", ["a1", "a2", "a3"], heartbeat=HEARTBEAT,
                                                        ttl=TTL, capacity=200) as procs:
        first = start_consumers()
        try:
            sessions = [(await ledger.create_session("gpu", session_id=f"s{i}"))[0] for i in range(150)]
            await eventually(lambda: _all(owners(ledger, sessions)), timeout=30, what="every session claimed")
            procs["a1"].kill9()

            async def declared() -> bool:
                return any(isinstance(e, ev.AgentDeclaredDead) for e in await events(ledger.store, "agent", "a1"))

            await eventually(declared, timeout=TTL + 10, what="a1's death")
        finally:
            first.kill()  # as soon as the death is seen: the failover may be done, half done or not begun
            first.communicate()
        second = start_consumers()
        try:
            async def none_with_a1() -> bool:
                return all(v in ("a2", "a3") for v in (await owners(ledger, sessions)).values())

            await eventually(none_with_a1, timeout=TTL + 15, what="a1's sessions re-owned after the restart")
        finally:
            second.kill()
            second.communicate()
    assert await claims_in_a_clean_log(server.url) >= 150


async def test_a_draining_agents_sessions_are_handed_off_then_it_is_drained(server: EmbeddedServer):
    from ledger.agent import Agent

    async with ledger_on(server.url) as ledger, agents(server.url, "gpu", ["b"], heartbeat=HEARTBEAT, ttl=TTL):
        async with Agent(ledger, agent_id="a", pool="gpu", capacity=5, heartbeat=HEARTBEAT, ttl=TTL) as a:
            sessions = [(await ledger.create_session("gpu", session_id=f"s{i}"))[0] for i in range(3)]
            for sid in sessions:
                with contextlib.suppress(LedgerError):  # b may be faster for some; that is fine
                    await a.claim(sid)
            mine = list(a.owned)
            async with consumers(server.url, watchdog=False, monitor=False):
                await a.drain(deadline=600, reason="upgrade")
                await eventually(lambda: not a.owned, timeout=10, what="hand-off of a's sessions")

                async def drained() -> bool:
                    state, _ = await ledger.agent("a")
                    return state.status == lc.A_DRAINED

                await eventually(drained, timeout=10, what="a drained")
            for sid in mine:
                claim = [e for e in await events(ledger.store, "session", sid)
                         if isinstance(e, ev.SessionClaimed)][-1]
                assert (claim.agent_id, claim.reason, claim.previous_owner) == ("b", "drain", "a")


async def test_failure_reports_make_an_agent_suspect(server: EmbeddedServer):
    async with ledger_on(server.url) as ledger, agents(server.url, "gpu", ["a1"], heartbeat=HEARTBEAT, ttl=5.0):
        async with consumers(server.url, reclaimer=False, watchdog=False):
            # Three clients (one reporting three times counts once: its newest report).
            for reporter in ("operator-r1", "operator-r2", "operator-r2", "operator-r3"):
                await Writer(ledger.store, ev.Producer(id=reporter, instance="i")).report_unreachable(
                    "a1", error="connection refused")

            async def suspected() -> list[ev.Event]:
                return [e for e in await events(ledger.store, "agent", "a1") if isinstance(e, ev.AgentSuspected)]

            [suspicion] = await eventually(suspected, timeout=5, what="the suspicion")
            assert suspicion.reason == "unreachable_reports" and suspicion.evidence.reports == 3


async def test_no_death_is_declared_for_a_broker_outage(server: EmbeddedServer):
    # a2, in a pool of its own (no breaker between them), is the marker: killed once it is back, its death
    # proves the monitor got past its grace and judged - a1 too, in the same pass or an earlier one.
    async with agents(server.url, "gpu", ["a1"], heartbeat=HEARTBEAT, ttl=TTL) as procs, \
            agents(server.url, "cpu", ["a2"], heartbeat=HEARTBEAT, ttl=TTL) as marker:
        async with consumers(server.url, reclaimer=False, watchdog=False, grace=3.0) as running:
            monitor = running.parts["monitor"]
            server.kill()
            for p in (procs["a1"], marker["a2"]):
                await p.says("fenced")  # they cannot beat: each fences itself
            await asyncio.to_thread(server.start)
            await eventually(lambda: monitor.grace_reason.startswith("connection"), what="grace after reconnect")
            # The agents come back as new incarnations inside the grace window.
            await eventually(lambda: all(running.follower.state.ledger.agents[a].incarnation > 1 for a in ("a1", "a2")),
                             timeout=10, what="the agents re-registering")
            marker["a2"].kill9()
            async with ledger_on(server.url) as ledger:
                async def marker_dead() -> bool:
                    return any(isinstance(e, ev.AgentDeclaredDead) for e in await events(ledger.store, "agent", "a2"))

                await eventually(marker_dead, timeout=3.0 + TTL + 10, what="the marker's death, after the grace")
                history = await events(ledger.store, "agent", "a1")
        assert not [e for e in history if isinstance(e, ev.AgentDeclaredDead)]
        assert [e for e in history if isinstance(e, ev.AgentFenced)]


async def route_state(ledger, rid: str) -> lc.RouteState:  # type: ignore[no-untyped-def]
    state, _ = await ledger.route(rid)
    return state


async def reaches(ledger, rid: str, *states: str, timeout: float = 10) -> lc.RouteState:  # type: ignore[no-untyped-def]
    async def there() -> lc.RouteState | None:
        st = await route_state(ledger, rid)
        return st if st.state in states else None

    return await eventually(there, timeout=timeout, what=f"route {rid} reaching {states}")


async def test_the_route_watchdog_drives_a_route_to_running_and_handles_stale_health(server: EmbeddedServer):
    from ledger.agent import Agent

    async with ledger_on(server.url) as ledger, consumers(server.url, reclaimer=False, monitor=False):
        async with Agent(ledger, agent_id="a1", pool="gpu", heartbeat=HEARTBEAT, ttl=TTL) as agent:
            sid, _ = await ledger.create_session("gpu", session_id="s1")
            await ledger.create_route("r1", session_id=sid, endpoint="chat",
                                      probe=ev.Probe(initial_delay=30, stale_after=0.6))
            await agent.claim(sid)
            await reaches(ledger, "r1", lc.STARTING)
            await agent.report_resource(sid, "pod/1", address="10.0.0.9:8000")
            warming = await reaches(ledger, "r1", lc.WARMING_UP)
            assert warming.address == "10.0.0.9:8000"
            await agent.report_health("r1", healthy=True, detail="200 OK")
            running = await reaches(ledger, "r1", lc.RUNNING)
            assert running.traffic == lc.TRAFFIC_ACTIVE

            async def traffic(expected: str) -> bool:
                return (await route_state(ledger, "r1")).traffic == expected

            await eventually(lambda: traffic(lc.TRAFFIC_INACTIVE), what="deactivation on stale health")
            await agent.report_health("r1", healthy=True)
            await eventually(lambda: traffic(lc.TRAFFIC_ACTIVE), what="reactivation on a fresh probe")
            await ledger.terminate_session(sid, reason="done")
            await reaches(ledger, "r1", lc.TERMINATED)
        history = await events(ledger.store, "route", "r1")
        steps = [(e.from_state, e.to_state, e.traffic) for e in history if isinstance(e, ev.RouteTransitioned)]
        assert steps[:3] == [(lc.PENDING, lc.STARTING, None), (lc.STARTING, lc.WARMING_UP, None),
                             (lc.WARMING_UP, lc.RUNNING, lc.TRAFFIC_ACTIVE)]
        assert steps[-2:] == [(lc.RUNNING, lc.TERMINATING, None), (lc.TERMINATING, lc.TERMINATED, None)]
        reasons = [e.reason for e in history if isinstance(e, ev.RouteTransitioned)]
        assert any("health stale" in r for r in reasons) and any("terminated (done)" in r for r in reasons)
        assert all(e.producer.id == "watchdog" for e in history if isinstance(e, ev.RouteTransitioned))


async def test_route_failure_paths(server: EmbeddedServer):
    from ledger.agent import Agent

    async with ledger_on(server.url) as ledger, consumers(server.url, reclaimer=False, monitor=False):
        async with Agent(ledger, agent_id="a1", pool="gpu", capacity=10, heartbeat=HEARTBEAT, ttl=TTL) as agent:
            for i in range(4):
                await ledger.create_session("gpu", session_id=f"s{i}")
            # 1. STARTING, then its session ends: FAILED_TO_START.
            await ledger.create_route("ended", session_id="s0", endpoint="e")
            await agent.claim("s0")
            await reaches(ledger, "ended", lc.STARTING)
            await ledger.terminate_session("s0", reason="user")
            failed = await reaches(ledger, "ended", lc.FAILED_TO_START)
            assert "terminated (user)" in failed.reason
            # 2. STARTING past its start timeout: FAILED_TO_START.
            await ledger.create_route("slow", session_id="s1", endpoint="e", start_timeout=0.5)
            await agent.claim("s1")
            slow = await reaches(ledger, "slow", lc.FAILED_TO_START)
            assert "start_timeout 0.5s" in slow.reason
            # 3. WARMING_UP without a passing probe within its initial delay: TERMINATING, then stop timeout.
            await ledger.create_route("sick", session_id="s2", endpoint="e", stop_timeout=0.5,
                                      probe=ev.Probe(initial_delay=0.5))
            await agent.claim("s2")
            await agent.report_resource("s2", "pod/2", address="10.0.0.2:80")
            await reaches(ledger, "sick", lc.WARMING_UP)
            await agent.report_health("sick", healthy=False, detail="503")
            sick = await reaches(ledger, "sick", lc.TERMINATING, lc.TERMINATED)
            assert "initial_delay 0.5s" in sick.reason or sick.state == lc.TERMINATED
            done = await reaches(ledger, "sick", lc.TERMINATED)
            assert "stop_timeout 0.5s" in done.reason
            # 4. No probe configured: straight to RUNNING once the session runs.
            await ledger.create_route("plain", session_id="s3", endpoint="e")
            await agent.claim("s3")
            await agent.report_resource("s3", "pod/3", address="10.0.0.3:80")
            plain = await reaches(ledger, "plain", lc.RUNNING)
            assert plain.reason == "no health probe configured"


@pytest.mark.parametrize("skew", [60.0, -60.0])
async def test_a_monitor_with_a_skewed_clock_judges_by_the_servers(server: EmbeddedServer, skew: float):
    real = ev.CLOCK.get()
    skewed = ev.CLOCK.set(lambda: real() + timedelta(seconds=skew))  # this machine's clock is off (for our tasks)
    try:
        async with ledger_on(server.url) as ledger, agents(server.url, "gpu", ["a1", "a2"], heartbeat=HEARTBEAT,
                                                            ttl=TTL) as procs:
            async with consumers(server.url, reclaimer=False, watchdog=False):
                procs["a2"].kill9()

                async def declared() -> list[Recorded]:
                    return [r for r in await ledger.store.history("agent", "a2")
                            if isinstance(r, Recorded) and isinstance(r.event, ev.AgentDeclaredDead)]

                # Judged by our clock, a2 would never die (behind); ahead, a1 would have died at the first check,
                # before a2's ttl ran out: a2's death is the barrier after which a1's verdict would be there.
                [death] = await eventually(declared, timeout=TTL + 20, what="a2's death declaration")
                assert [e for e in await events(ledger.store, "agent", "a1")
                        if isinstance(e, (ev.AgentSuspected, ev.AgentDeclaredDead))] == []
                # ... and the evidence is in the server's time: judged a ttl after the last beat and before the
                # death was stored, both on the server's clock (ours would be a minute off either way).
                evidence = death.event.evidence
                assert evidence.last_heartbeat_at + timedelta(seconds=TTL) <= evidence.observed_at <= death.stored_at
    finally:
        ev.CLOCK.reset(skewed)


async def test_agents_that_do_not_claim_for_themselves_run_what_the_reclaimer_gives_them(server: EmbeddedServer):
    async with ledger_on(server.url) as ledger, agents(server.url, "gpu", ["a1", "a2"], heartbeat=HEARTBEAT, ttl=TTL,
                                                        self_claim=False) as procs:
        sessions = [(await ledger.create_session("gpu", session_id=f"s{i}"))[0] for i in range(6)]
        # Nobody claims without a reclaimer: the agents only take what they are given. Barrier: each agent
        # has lived three heartbeats (each a turn of a self-claimer's loop) since the sessions existed.
        async def beats() -> dict[str, int]:
            newest = {name: await ledger.store.last("hb", name) for name in procs}
            return {name: r.event.beat for name, r in newest.items() if isinstance(r, Recorded)}

        since = await beats()

        async def three_more() -> bool:
            now = await beats()
            return all(now.get(name, -1) >= since.get(name, -1) + 3 for name in procs)

        await eventually(three_more, what="three heartbeats of each agent since the sessions were created")
        assert set((await owners(ledger, sessions)).values()) == {None}
        async with consumers(server.url, watchdog=False):
            await eventually(lambda: _all(owners(ledger, sessions)), what="the reclaimer placing every session")
            placed = await owners(ledger, sessions)
            assert sorted(placed.values()) == ["a1"] * 3 + ["a2"] * 3  # least loaded first: an even spread
            assert await procs["a1"].terminate() == 0

            async def all_with_a2() -> bool:
                return set((await owners(ledger, sessions)).values()) == {"a2"}

            await eventually(all_with_a2, what="a1's sessions moving to a2 after its goodbye")
