"""Hostile tests of issue 9's changes: forged events by another client against the agent's watch, the
heartbeat fold, the eligibility rule and `ledger check`. Real nats-server; forgeries are appended raw, as a
hostile client would. Waiting is bounded polling on a condition (helpers.eventually), never a bare sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

from fleet import consumers, ledger_on
from helpers import authorized, eventually
from test_agent_judges import FORGER, agent_of

from consumers.follow import Follower
from consumers.reclaimer import Reclaimer
from ledger import codec
from ledger import events as ev
from ledger import lifecycle as lc
from ledger.agent import Agent
from ledger.codec import Recorded
from ledger.errors import LedgerError
from ledger.ids import new_id
from ledger.subjects import HEARTBEAT_STREAM
from ledger.writer import Writer
from ledgerctl.cli.check import run_check
from ledgerctl.server import EmbeddedServer
from projections.beats import KEEP, evolve_beat, of_incarnation


async def agrees_with_the_ledger(ledger: Writer, agent: Agent, session_ids: list[str]) -> bool:
    """The agent runs exactly the sessions the fold gives its current incarnation, and the fold's current
    incarnation of the agent is the agent's own."""
    state, _ = await ledger.agent(agent.agent_id)
    if state is None or state.incarnation != agent.incarnation:
        return False
    for sid in session_ids:
        session, _ = await ledger.session(sid)
        if lc.owns(session, agent.agent_id, agent.incarnation) != (sid in agent.owned):
            return False
    return True


async def test_a_forged_registration_naming_the_agents_own_instance_does_not_leave_it_a_zombie_owner(
        ledger: Writer, uid: str):
    """A registration carrying the agent's own instance id (visible in the log) is not 'another process', so
    superseded_by ignores it; but every fold takes it as the agent's current incarnation. The agent must not
    go on claiming as the old incarnation (the fold flags each claim superseded_incarnation while the agent
    runs the session: two owners once anyone else claims it) nor stay alive in its own eyes while the log
    declares the forged incarnation dead."""
    sessions = [f"{uid}-s{i}" for i in range(3)]
    for sid in sessions:
        await ledger.create_session("p", session_id=sid)
    async with agent_of(ledger, f"{uid}-a1") as a1:
        await ledger.store.append(authorized(ev.AgentRegistered(
            producer=FORGER, agent_id=a1.agent_id, instance_id=a1.instance_id, pool="p", platform="default",
            region="default", labels={}, capacity=4, heartbeat_interval=0.1, ttl=2.0)))
        for sid in sessions:
            with contextlib.suppress(LedgerError):  # refused is fine: what matters is that the agent and the fold agree
                await a1.claim(sid)
        try:
            await eventually(lambda: agrees_with_the_ledger(ledger, a1, sessions), timeout=15.0,
                             what="a1 and the fold agreeing on its incarnation and its sessions")
        except AssertionError:
            state, _ = await ledger.agent(a1.agent_id)
            seen = [(await ledger.session(sid))[0] for sid in sessions]
            raise AssertionError(f"a1 incarnation {a1.incarnation} owns {sorted(a1.owned)}; the fold: agent "
                                 f"incarnation {state and state.incarnation} {state and state.status}, sessions "
                                 f"{[(s.status, s.owner_incarnation) for s in seen]}") from None


# --- the heartbeat fold -------------------------------------------------------------------------------------


def _hb(seq: int, agent_id: str, incarnation: int, beat: int, producer: ev.Producer) -> Recorded:
    e = ev.AgentHeartbeat(producer=producer, agent_id=agent_id, instance_id="i", incarnation=incarnation, beat=beat)
    return Recorded(HEARTBEAT_STREAM, seq, codec.subject_of(e), seq * 1_000_000, e)


def test_four_forged_beats_never_hide_the_registered_incarnations_beats_nor_its_next_incarnations():
    """KEEP (4) one-shot forged beats of high incarnations are not a flood: with the top slots ordered by
    incarnation they push the real one out for good. The agent then looks dead while it beats, is declared
    dead, registers again (a new incarnation, still below the forged ones) and that one's beats are refused
    as 'below the 4 highest' too: dead, re-register, dead ... for ever, from four messages."""
    me = ev.Producer(id="a1", instance="i")
    state, seq = None, 0
    for b in range(1, 4):  # the real incarnation 10 beats
        seq += 1
        state, _ = evolve_beat(state, _hb(seq, "a1", 10, b, me))
    for k in range(KEEP):  # four forged beats, once each
        seq += 1
        state, _ = evolve_beat(state, _hb(seq, "a1", 10**12 + k, 1, FORGER))
    seq += 1
    state, _ = evolve_beat(state, _hb(seq, "a1", 10, 4, me))  # the real one beats on
    assert of_incarnation(state, 10) is not None and of_incarnation(state, 10).seq == seq, \
        "the registered incarnation's newest beat is lost behind four forged ones"
    seq += 1
    state, _ = evolve_beat(state, _hb(seq, "a1", 50, 1, me))  # its next incarnation (registered at #50)
    assert of_incarnation(state, 50) is not None and of_incarnation(state, 50).seq == seq, \
        "a new incarnation's beats are refused for ever"


# --- ledger check on what the real consumers write in a race ----------------------------------------------




async def test_check_is_clean_when_a_lagging_reclaimer_claims_for_an_agent_the_monitor_just_declared_dead(
        server: EmbeddedServer):
    """The monitor and the reclaimer are separate consumers; a claim's compare-and-set guards the session, not
    the agent. A reclaimer whose view is one event behind the monitor's writes a claim for an agent declared
    dead a moment before - the system's own race, which it repairs (the next plan orphans or moves the
    session). `ledger check` must not call the system's own log a violation, or it is not clean after a
    fault campaign by chance."""
    async with ledger_on(server.url) as ledger, \
            Agent(ledger, agent_id="a1", pool="gpu", capacity=3, heartbeat=0.2, ttl=30.0) as a1:
        sid, _ = await ledger.create_session("gpu", session_id="s1")
        follower = Follower(ledger.store)
        following = asyncio.create_task(follower.run())
        try:
            await eventually(lambda: sid in follower.state.sessions and follower.state.current_beat("a1"),
                             what="the reclaimer's follower seeing s1 and a beat of a1")
        finally:
            following.cancel()  # from here the reclaimer's view lags one event behind the monitor's
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await following
        monitor = ev.Producer(id="liveness-monitor", instance=new_id())
        await ledger.store.append(ev.AgentDeclaredDead(producer=monitor, agent_id="a1", incarnation=a1.incarnation,
                                                       reason="missed_heartbeats"))
        reclaimer = Reclaimer(Writer(ledger.store, ev.Producer(id="reclaimer", instance=new_id())), follower)
        actions = await reclaimer.step(follower.clock.now(ev.utcnow))
        assert [type(a).__name__ for a in actions] == ["ClaimFor"]  # the lagging view gives s1 to a1
        report = await run_check(ledger.store)
        assert report.clean, [(v.kind, v.seq, v.detail) for v in report.violations]


# --- codec constraints against what the SDK itself writes ----------------------------------------------------


async def test_a_forged_death_with_a_reason_of_the_longest_allowed_text_does_not_keep_the_agent_from_coming_back(
        ledger: Writer, uid: str):
    """The agent fences on a death written about it and writes down why (AgentFenced) before registering again;
    its reason quotes the forged one's. A forged reason of exactly the allowed 4096 characters makes that
    reason longer than the codec allows: the fence record can never be written, and the agent, which writes
    it before its new registration, never comes back."""
    async with agent_of(ledger, f"{uid}-a1") as a1:
        first = a1.incarnation
        await ledger.store.append(authorized(ev.AgentDeclaredDead(
            producer=FORGER, agent_id=a1.agent_id, incarnation=first, reason="x" * 4096)))
        await eventually(lambda: a1.incarnation > first and a1.fenced is None, timeout=15.0,
                         what="a1 registered again after the forged death")


async def test_a_health_detail_of_the_longest_allowed_text_does_not_hold_a_route_back(server: EmbeddedServer):
    """The watchdog quotes a route's health detail in the reason of the transition it writes. A detail of the
    full 4096 characters the codec allows (a probe's output, or anyone's report) makes that reason too long to
    encode: the transition is refused on every tick, and a healthy route stays WARMING_UP for ever."""
    async with ledger_on(server.url) as ledger, \
            Agent(ledger, agent_id="a1", pool="gpu", capacity=3, heartbeat=0.2, ttl=30.0) as a1:
        sid, _ = await ledger.create_session("gpu", session_id="s1")
        await a1.claim(sid)
        await a1.report_resource(sid, "pod/1", address="127.0.0.1:9")
        await ledger.create_route("r1", session_id=sid, endpoint="http://127.0.0.1:9/",
                                  probe=ev.Probe(initial_delay=3600.0))
        async with consumers(server.url):
            async def route_is(state: str) -> bool:
                route, _ = await ledger.route("r1")
                return route is not None and route.state == state

            await eventually(lambda: route_is(lc.WARMING_UP), timeout=15.0, what="r1 warming up")
            await ledger.report_health("r1", healthy=True, detail="x" * ev.MAX_TEXT)
            await eventually(lambda: route_is(lc.RUNNING), timeout=15.0, what="healthy r1 running")
            # The same with a session ended for a reason of the full length: its route must still be ended.
            await a1.terminate(sid, reason="y" * ev.MAX_TEXT)
            await eventually(lambda: route_is(lc.TERMINATED), timeout=15.0, what="r1 ended with its session")


# --- the agent's watch: reads per forged event ------------------------------------------------------------


async def given_by_a_reclaimer(ledger: Writer, agent: Agent, session_id: str) -> None:
    """A legitimate claim for `agent` written by someone else; returns once the agent runs it (its watch is
    then past everything appended before)."""
    await ledger.create_session("p", session_id=session_id)
    reclaimer = Writer(ledger.store, ev.Producer(id="reclaimer-test", instance=new_id()))  # claims for others
    await reclaimer.claim_session(session_id, agent.ref, reason="failover")
    await eventually(lambda: session_id in agent.owned, timeout=30.0, what=f"{agent.agent_id} gaining {session_id}")


async def test_forged_claims_for_the_agent_cost_its_watch_a_bounded_number_of_reads_each(ledger: Writer, uid: str):
    """Each claim naming the agent makes its watch fold the session's history, reading the registrations of
    every agent that history names. A session carrying claims for many made-up agents (each flagged, cheap
    to write) turns every later forged claim for the agent into that many reads, one after the other in the
    watch: the server is hammered and the agent is deaf to its real sessions meanwhile."""
    ghosts, forged_claims = 100, 5
    sid, _ = await ledger.create_session("p", session_id=f"{uid}-x")
    async with agent_of(ledger, f"{uid}-b") as b, agent_of(ledger, f"{uid}-a1") as a1:
        await b.claim(sid)  # a real owner: every forged claim for a1 below is flagged, so a1 never caches it
        for i in range(ghosts):
            await ledger.store.append(authorized(ev.SessionClaimed(
                producer=FORGER, session_id=sid, agent_id=f"{uid}-ghost{i}", instance_id="g", incarnation=1,
                reason="initial")))
        store = a1.store
        reads = [0]
        real_read = store.read

        async def counting_read(*args: object, **kw: object) -> object:
            reads[0] += 1
            return await real_read(*args, **kw)

        store.read = counting_read  # type: ignore[method-assign]
        per_round = []
        try:
            for round_ in range(2):
                reads[0] = 0
                for _ in range(forged_claims):
                    await ledger.store.append(authorized(ev.SessionClaimed(
                        producer=FORGER, session_id=sid, agent_id=a1.agent_id, instance_id=a1.instance_id,
                        incarnation=a1.incarnation, reason="initial", previous_token=10**9)))
                await given_by_a_reclaimer(ledger, a1, f"{uid}-m{round_}")
                per_round.append(reads[0])
        finally:
            del store.read
        assert sid not in a1.owned and sid in b.owned
        # Each agent's registrations are read about once, ever (here: the ghosts, in the first round - a few
        # twice, when two judgments race before the first read is cached); beyond that a handful per judged
        # claim (its history) and the barrier's own reads. Without the cache it would be ghosts x claims.
        bound = 4 * (forged_claims + 1) + 10
        assert per_round[0] <= ghosts + ghosts // 4 + bound and per_round[1] <= bound, f"{per_round} reads per round"


# --- route timers: stored time, not the writer's ----------------------------------------------------------


async def _running_route(ledger: Writer, a1: Agent, probe: ev.Probe) -> str:
    sid, _ = await ledger.create_session("gpu", session_id="s1")
    await a1.claim(sid)
    await a1.report_resource(sid, "pod/1", address="127.0.0.1:9")
    await ledger.create_route("r1", session_id=sid, endpoint="http://127.0.0.1:9/", probe=probe)
    return sid


async def _route(ledger: Writer) -> lc.RouteState:
    route, _ = await ledger.route("r1")
    assert route is not None
    return route


async def test_a_health_report_dated_in_the_future_does_not_keep_a_route_from_going_stale(server: EmbeddedServer):
    """Staleness is judged on the report's own `checked_at`. One healthy report dated a year ahead (a forger,
    or a prober whose clock is off) keeps the route ACTIVE for that long after its probes stopped: the brief
    judges such decisions by the time the server stored the event, as the monitor does for beats."""
    async with ledger_on(server.url) as ledger, \
            Agent(ledger, agent_id="a1", pool="gpu", capacity=3, heartbeat=0.2, ttl=30.0) as a1:
        await _running_route(ledger, a1, ev.Probe(initial_delay=3600.0, stale_after=1.0))
        async with consumers(server.url):
            await eventually(lambda: _route(ledger), what="r1 exists")
            await eventually(lambda: _route_state(ledger, lc.WARMING_UP), timeout=15.0, what="r1 warming up")
            await ledger.store.append(authorized(ev.RouteHealthReported(
                producer=FORGER, route_id="r1", healthy=True, checked_at=ev.utcnow() + timedelta(days=365))))
            await eventually(lambda: _route_state(ledger, lc.RUNNING, lc.TRAFFIC_ACTIVE), timeout=15.0,
                             what="r1 running")
            # No probe reports after that one: the route must go stale (INACTIVE) about a second later.
            await eventually(lambda: _route_state(ledger, lc.RUNNING, lc.TRAFFIC_INACTIVE), timeout=15.0,
                             what="r1 deactivated once its only health report is stale")


async def test_a_transition_dated_in_the_future_does_not_hold_off_the_start_timeout(server: EmbeddedServer):
    """A route's time in its state is counted from the transition's own `time`: one legal transition dated a
    year ahead (PENDING -> STARTING, whoever wrote it) holds off start_timeout for a year."""
    async with ledger_on(server.url) as ledger, \
            Agent(ledger, agent_id="a1", pool="gpu", capacity=3, heartbeat=0.2, ttl=30.0) as a1:
        sid, _ = await ledger.create_session("gpu", session_id="s1")
        await a1.claim(sid)  # claimed, but never reports an address: the route can only time out
        await ledger.create_route("r1", session_id=sid, endpoint="http://127.0.0.1:9/", start_timeout=1.0)
        await ledger.store.append(authorized(ev.RouteTransitioned(
            producer=FORGER, route_id="r1", from_state=lc.PENDING, to_state=lc.STARTING, reason="forged",
            time=ev.utcnow() + timedelta(days=365))))
        async with consumers(server.url):
            await eventually(lambda: _route_state(ledger, lc.FAILED_TO_START), timeout=15.0,
                             what="r1 failed to start after its start_timeout of 1 s")


async def _route_state(ledger: Writer, state: str, traffic: str | None = None) -> bool:
    route = await _route(ledger)
    return route.state == state and (traffic is None or route.traffic == traffic)
