"""The agent SDK on a real nats-server: incarnations, heartbeats, lease and self-fencing, goodbye, drain."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from helpers import eventually

from ledger import events as ev
from ledger import lifecycle as lc
from ledger.agent import Agent
from ledger.codec import Recorded
from ledger.errors import (
    CapacityExhausted,
    Draining,
    Fenced,
    IllegalTransition,
    NotClaimable,
    NotFound,
    StaleToken,
    Superseded,
)
from ledger.ids import new_id
from ledger.settings import Settings
from ledger.store import EventStore
from ledger.writer import Writer
from ledgerctl.server import EmbeddedServer


def agent_of(ledger: Writer, agent_id: str, **kw: object) -> Agent:
    options = {"pool": "p", "heartbeat": 0.1, "ttl": 2.0, **kw}
    return Agent(ledger, agent_id=agent_id, **options)  # type: ignore[arg-type]


async def beats(store: EventStore, agent_id: str) -> list[ev.AgentHeartbeat]:
    return [r.event for r in await store.history("hb", agent_id) if isinstance(r, Recorded)]


async def events_of(store: EventStore, family: str, entity_id: str) -> list[ev.Event]:
    return [r.event for r in await store.history(family, entity_id) if isinstance(r, Recorded)]


async def test_register_beat_and_say_goodbye_once(ledger: Writer, uid: str):
    agent_id = f"{uid}-a"
    async with agent_of(ledger, agent_id) as agent:
        incarnation = agent.incarnation
        history = await ledger.store.history("agent", agent_id)
        assert history[0].seq == incarnation and isinstance(history[0].event, ev.AgentRegistered)
        await eventually(lambda: beats(ledger.store, agent_id), what="a heartbeat")
        got = await eventually(lambda: _at_least(beats(ledger.store, agent_id), 3), what="three heartbeats")
        assert all(b.incarnation == incarnation and b.instance_id == agent.instance_id for b in got)
        assert [b.beat for b in got] == sorted(b.beat for b in got)
        await agent.goodbye("first")
    goodbyes = [e for e in await events_of(ledger.store, "agent", agent_id) if isinstance(e, ev.AgentGoodbye)]
    assert [(g.incarnation, g.reason) for g in goodbyes] == [(incarnation, "first")]
    state, _ = await ledger.agent(agent_id)
    assert state.status == lc.A_GONE


async def _at_least(result: object, n: int) -> object:
    items = await result  # type: ignore[misc]
    return items if len(items) >= n else None


async def test_heartbeats_flow_while_the_work_loop_is_blocked(ledger: Writer, uid: str):
    agent_id = f"{uid}-busy"
    async with agent_of(ledger, agent_id, heartbeat=0.05) as agent:
        queue: asyncio.Queue[int] = asyncio.Queue(maxsize=1)
        queue.put_nowait(0)
        before = len(await beats(ledger.store, agent_id))

        async def more_beats() -> bool:
            return len(await beats(ledger.store, agent_id)) >= before + 10

        blocked = asyncio.create_task(queue.put(1))  # the work loop: stuck on a full queue
        await eventually(more_beats, what="heartbeats while the work loop is blocked")
        assert not blocked.done() and agent.fenced is None
        blocked.cancel()


async def test_a_superseded_incarnation_is_fenced_and_its_late_events_change_nothing(ledger: Writer, uid: str):
    agent_id = f"{uid}-a"
    old = agent_of(ledger, agent_id)
    async with old:
        async with agent_of(ledger, agent_id) as new:
            await eventually(lambda: old.superseded, what="the old process noticing it was replaced")
            with pytest.raises(Superseded):
                await old.claim("anything")
            # Late events of the old incarnation, written raw as a confused process would:
            await ledger.store.append(ev.AgentHeartbeat(
                producer=old.producer, agent_id=agent_id, instance_id=old.instance_id,
                incarnation=old.incarnation, beat=999))
            await ledger.store.append(ev.AgentGoodbye(
                producer=old.producer, agent_id=agent_id, instance_id=old.instance_id, incarnation=old.incarnation))
            records = [r for r in await ledger.store.history("agent", agent_id) if isinstance(r, Recorded)]
            state, anomalies = lc.fold(lc.evolve_agent, records)
            assert (state.status, state.incarnation, state.instance_id) == (lc.A_ALIVE, new.incarnation,
                                                                           new.instance_id)
            assert [a.kind for _, a in anomalies] == [lc.SUPERSEDED_INCARNATION]
            new_incarnation = new.incarnation
        # The old process leaving writes no goodbye of its own (it would change nothing).
    goodbyes = [e for e in await events_of(ledger.store, "agent", agent_id) if isinstance(e, ev.AgentGoodbye)]
    assert sorted(g.incarnation for g in goodbyes) == sorted([old.incarnation, new_incarnation])


async def test_claims_and_their_refusals(ledger: Writer, uid: str):
    sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
    other, _ = await ledger.create_session("p", session_id=f"{uid}-s2")
    async with agent_of(ledger, f"{uid}-a", capacity=1) as a, agent_of(ledger, f"{uid}-b") as b:
        claim = await a.claim(sid)
        state, last = await ledger.session(sid)
        assert (state.owner, state.token, last) == (a.agent_id, claim.token, claim.token)
        assert a.owned == {sid: claim}
        with pytest.raises(NotClaimable, match="owned by"):
            await b.claim(sid)
        with pytest.raises(NotClaimable, match="already owned"):
            await a.claim(sid)
        with pytest.raises(CapacityExhausted):
            await a.claim(other)
        with pytest.raises(NotFound):
            await b.claim(f"{uid}-nope")
        await ledger.terminate_session(other)
        with pytest.raises(NotClaimable, match="terminated"):
            await b.claim(other)


async def test_writes_under_a_stale_token_are_refused(ledger: Writer, uid: str):
    sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
    lost: list[tuple[str, str]] = []
    async with agent_of(ledger, f"{uid}-a", on_lost=lambda s, why: lost.append((s, why))) as a, \
            agent_of(ledger, f"{uid}-b") as b:
        first = await a.claim(sid)
        await a.report_resource(sid, "pod/1")
        await a.drain()  # a take-over applies only from an owner that may be replaced: here, one that drains
        second = await b.claim(sid, reason="drain", previous_token=first.token)  # a hand-off
        with pytest.raises(StaleToken) as e:
            await a.report_resource(sid, "pod/zombie", token=first.token)
        assert (e.value.held, e.value.current, e.value.owner) == (first.token, second.token, b.agent_id)
        with pytest.raises((StaleToken, NotFound)):
            await a.release(sid)
        await eventually(lambda: lost, what="a noticing it lost the session")
        assert lost[0][0] == sid and "taken over" in lost[0][1]
        state, _ = await ledger.session(sid)
        assert (state.owner, state.platform_resource_id) == (b.agent_id, None)  # the new owner runs it anew
        await b.release(sid, reason="idle")
        state, _ = await ledger.session(sid)
        assert (state.status, state.reason) == (lc.S_RELEASED, "idle")


async def test_fifty_agents_race_to_claim_one_session(settings: Settings, ledger: Writer, uid: str):
    sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
    await race_agents(settings, sid, f"{uid}-racer", 50)
    history = await events_of(ledger.store, "session", sid)
    assert len([e for e in history if isinstance(e, ev.SessionClaimed)]) == 1


async def race_agents(settings: Settings, sid: str, prefix: str, n: int) -> None:
    async with contextlib.AsyncExitStack() as stack:
        agents = []
        for i in range(n):
            ledger = await stack.enter_async_context(Writer.connect(settings, producer_id=f"{prefix}-{i}"))
            agents.append(await stack.enter_async_context(agent_of(ledger, f"{prefix}-{i}", heartbeat=1.0)))
        go = asyncio.Event()

        async def attempt(agent: Agent) -> bool:
            await go.wait()
            try:
                await agent.claim(sid)
                return True
            except NotClaimable:
                return False

        tasks = [asyncio.create_task(attempt(a)) for a in agents]
        await asyncio.sleep(0)
        go.set()
        wins = await asyncio.gather(*tasks)
        assert sum(wins) == 1
        assert sum(len(a.owned) for a in agents) == 1


async def test_drain_refuses_new_claims_and_ends_drained(ledger: Writer, uid: str):
    s1, _ = await ledger.create_session("p", session_id=f"{uid}-s1")
    s2, _ = await ledger.create_session("p", session_id=f"{uid}-s2")
    async with agent_of(ledger, f"{uid}-a") as a, agent_of(ledger, f"{uid}-b") as b:
        held = await a.claim(s1)
        await a.drain(deadline=600, reason="upgrade")
        with pytest.raises(Draining):
            await a.claim(s2)
        state, _ = await ledger.agent(a.agent_id)
        assert state.status == lc.A_DRAINING and state.drain_deadline is not None
        await b.claim(s1, reason="drain", previous_token=held.token)  # the hand-off

        async def drained() -> bool:
            st, _ = await ledger.agent(a.agent_id)
            return st.status == lc.A_DRAINED

        await eventually(drained, what="the drained event once the last session moved")


async def test_a_declared_dead_agent_fences_and_returns_as_a_new_incarnation(ledger: Writer, uid: str):
    sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
    async with agent_of(ledger, f"{uid}-a") as a:
        await a.claim(sid)
        first = a.incarnation
        await ledger.store.append(ev.AgentDeclaredDead(producer=ev.Producer(id="monitor-test", instance=new_id()),
                                                       agent_id=a.agent_id, incarnation=first,
                                                       reason="missed_heartbeats"))
        await eventually(lambda: a.incarnation > first and a.fenced is None, what="re-registration")
        assert a.owned == {}
        state, _ = await ledger.agent(a.agent_id)
        assert state.incarnation == a.incarnation and state.status == lc.A_ALIVE


async def test_unreachable_reports_are_recorded(ledger: Writer, uid: str):
    async with agent_of(ledger, f"{uid}-a") as a:
        for _ in range(3):
            await ledger.report_unreachable(a.agent_id, error="connection refused", incarnation=a.incarnation)
        state, _ = await ledger.agent(a.agent_id)
        assert state.unreachable_reports == 3 and state.status == lc.A_ALIVE


@pytest.fixture
async def private(fresh_server: EmbeddedServer) -> AsyncIterator[tuple[EmbeddedServer, Writer]]:
    settings = Settings(nats_url=fresh_server.url, request_timeout=0.5, append_deadline=20)
    async with EventStore.connect(settings, ensure=True) as store:
        yield fresh_server, Writer(store, ev.Producer(id="operator-test", instance=new_id()))


async def test_beats_resume_after_a_broker_restart(private: tuple[EmbeddedServer, Writer]):
    server, ledger = private
    async with agent_of(ledger, "a1", heartbeat=0.1, ttl=10.0) as a:
        await eventually(lambda: a.stats.beats_acked >= 2, what="first beats")
        await asyncio.to_thread(server.restart)
        acked = a.stats.beats_acked
        await eventually(lambda: a.stats.beats_acked >= acked + 3, timeout=20, what="beats after the restart")
        assert a.fenced is None
        stored = await beats(ledger.store, "a1")
        assert stored[-1].incarnation == a.incarnation


async def test_no_acknowledged_beat_within_ttl_fences_then_a_new_incarnation(
        private: tuple[EmbeddedServer, Writer]):
    server, ledger = private
    sid, _ = await ledger.create_session("p", session_id="s1")
    fenced: list[str] = []
    async with agent_of(ledger, "a1", heartbeat=0.1, ttl=1.0, on_fenced=fenced.append) as a:
        await a.claim(sid)
        first = a.incarnation
        server.kill()
        await eventually(lambda: a.fenced, timeout=5, what="self-fencing")
        assert "no heartbeat acknowledged" in a.fenced and fenced and a.owned == {}
        with pytest.raises(Fenced):
            await a.claim(sid)
        with pytest.raises(Fenced):
            await a.report_resource(sid, "pod/x")
        await asyncio.to_thread(server.start)
        await eventually(lambda: a.fenced is None and a.incarnation > first, timeout=30,
                         what="a new incarnation after the broker came back")
        registrations = await ledger.registrations("a1")
        assert registrations[-1] == a.incarnation and first in registrations
        history = [r.event for r in await ledger.store.history("agent", "a1")]
        fenced_events = [e for e in history if isinstance(e, ev.AgentFenced)]
        assert [(f.incarnation, f.ttl) for f in fenced_events] == [(first, 1.0)]
        assert "no heartbeat acknowledged" in fenced_events[0].reason


async def test_route_transitions_by_the_owner_carry_its_token(ledger: Writer, uid: str):
    sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
    rid = f"{uid}-r"
    async with agent_of(ledger, f"{uid}-a") as a, agent_of(ledger, f"{uid}-b") as b:
        held = await a.claim(sid)
        await ledger.create_route(rid, session_id=sid, endpoint="chat")
        await a.transition_route(rid, lc.STARTING, reason="session starting")
        route, _ = await ledger.route(rid)
        assert route.state == lc.STARTING
        last = [r.event for r in await ledger.store.history("route", rid)][-1]
        assert last.token == held.token
        with pytest.raises(IllegalTransition) as e:
            await a.transition_route(rid, lc.RUNNING)
        assert (e.value.current, e.value.requested) == (lc.STARTING, lc.RUNNING)
        await a.drain()  # the hand-off: a take-over applies only from an owner that may be replaced
        await b.claim(sid, reason="drain", previous_token=held.token)
        with pytest.raises((StaleToken, NotFound)):
            await a.transition_route(rid, lc.WARMING_UP, address="10.0.0.7:8000")
        route, _ = await ledger.route(rid)
        assert route.state == lc.STARTING
        await b.transition_route(rid, lc.WARMING_UP, address="10.0.0.7:8000")
        route, _ = await ledger.route(rid)
        assert (route.state, route.address) == (lc.WARMING_UP, "10.0.0.7:8000")


async def test_an_agent_on_a_connection_too_slow_for_its_lease_says_so(ledger: Writer, uid: str,
                                                                       caplog: pytest.LogCaptureFixture):
    slow = ledger.store.settings.replace(ping_interval=5.0, max_outstanding_pings=2)  # ~15 s to notice
    fast = slow.for_lease(8.0)
    warned = "notices a silent server only after"
    for settings, expected in ((slow, True), (fast, False)):
        caplog.clear()
        async with EventStore.connect(settings) as store:
            agent = Agent(Writer(store, ledger.producer), agent_id=f"{uid}-{expected}", pool="p", heartbeat=1.0,
                          ttl=8.0)
            with caplog.at_level("WARNING", logger="ledger.agent"):
                async with agent:
                    pass
        assert (warned in caplog.text) is expected, caplog.text


async def test_the_watch_names_an_unreadable_message_it_skips(ledger: Writer, uid: str,
                                                              caplog: pytest.LogCaptureFixture):
    agent_id = f"{uid}-a"
    with caplog.at_level("WARNING", logger="ledger.agent"):
        async with agent_of(ledger, agent_id, ttl=5.0) as agent:
            await ledger.store.nc.jetstream().publish(f"ledger.agent.{agent_id}.goodbye.{agent_id}", b"[[[")
            await eventually(lambda: "watch skips unreadable" in caplog.text, what="the watch's log line")
            assert agent.fenced is None  # and an unreadable goodbye changed nothing


def test_a_heartbeat_of_an_agent_owning_thousands_of_sessions_still_encodes():
    from ledger import codec
    from ledger.agent import beat_sessions

    owned = {f"session-{i:06d}-{'x' * 100}": None for i in range(5000)}  # ~600 KB of ids
    beat = ev.AgentHeartbeat(producer=ev.Producer(id="a", instance="i"), agent_id="a", instance_id="i",
                             incarnation=1, beat=1, load=len(owned), capacity=10_000, sessions=beat_sessions(owned))
    codec.encode(beat)  # would raise InvalidInput (oversized) with every id listed
    assert 0 < len(beat.sessions) < len(owned) and list(beat.sessions) == sorted(owned)[:len(beat.sessions)]
    assert beat_sessions({"s1", "s2"}) == ("s1", "s2")
