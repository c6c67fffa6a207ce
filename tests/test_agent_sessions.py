"""The agent's per-session state and its own writes about itself, on a real nats-server.

A drain the server refused is written again until the log says it (not dropped with a warning), and a
session the agent stops owning - fenced, taken over, released, drained away - leaves no trace behind.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest
from helpers import eventually
from nats.js.api import DiscardPolicy

from ledger import events as ev
from ledger import lifecycle as lc
from ledger.agent import Agent
from ledger.ids import new_id
from ledger.settings import Settings
from ledger.store import EventStore
from ledger.writer import Writer
from ledgerctl.server import EmbeddedServer

MONITOR = ev.Producer(id="monitor-test", instance="m")


def agent_of(ledger: Writer, agent_id: str, **kw: object) -> Agent:
    options = {"pool": "p", "heartbeat": 0.1, "ttl": 3.0, **kw}
    return Agent(ledger, agent_id=agent_id, **options)  # type: ignore[arg-type]


@pytest.fixture
async def private(fresh_server: EmbeddedServer) -> AsyncIterator[Writer]:
    """A server of our own: the tests change the LEDGER stream's limits. The server answers a message over
    the limit with 503, which the store retries as "try later" until `append_deadline`."""
    settings = Settings(nats_url=fresh_server.url, request_timeout=0.5, append_deadline=2)
    async with EventStore.connect(settings, ensure=True) as store:
        yield Writer(store, ev.Producer(id="operator-test", instance=new_id()))


async def _room_for(store: EventStore, more: int) -> None:
    """Let the LEDGER stream take only `more` further messages: the server refuses the rest."""
    jsm = store.nc.jsm()
    info = await jsm.stream_info("LEDGER")
    config = info.config
    config.max_msgs, config.discard = info.state.messages + more, DiscardPolicy.NEW
    await jsm.update_stream(config)


async def _no_limit(store: EventStore) -> None:
    jsm = store.nc.jsm()
    config = (await jsm.stream_info("LEDGER")).config
    config.max_msgs, config.discard = -1, DiscardPolicy.OLD
    await jsm.update_stream(config)


def _said(caplog: pytest.LogCaptureFixture, *words: str) -> bool:
    return any(all(w in r.getMessage() for w in words) for r in caplog.records)


async def _status(ledger: Writer, agent: Agent) -> tuple[int, str] | None:
    state, _ = await ledger.agent(agent.agent_id)
    return (state.incarnation, state.status) if state is not None else None


async def test_a_drain_refused_when_the_agent_comes_back_is_written_again(
        private: Writer, caplog: pytest.LogCaptureFixture):
    """Declared dead while draining, the agent fences and registers again - and must drain again, or any claimer
    could hand it sessions. The server refuses that drain: it is written again once it can be, then drained."""
    ledger = private
    caplog.set_level(logging.INFO, logger="ledger.agent")
    sid, _ = await ledger.create_session("p", session_id="s1")
    async with agent_of(ledger, "a1") as a:
        await a.claim(sid)
        await a.drain(deadline=600, reason="upgrade")
        first = a.incarnation
        # Room for the death, the agent's fenced record and its new registration - not for its drain.
        await _room_for(ledger.store, 3)
        await ledger.store.append(ev.AgentDeclaredDead(producer=MONITOR, agent_id="a1", incarnation=first,
                                                       reason="missed_heartbeats"))
        await eventually(lambda: a.incarnation > first and a.fenced is None, what="a new incarnation")
        await eventually(lambda: _said(caplog, f"drain of incarnation {a.incarnation} not written"),
                         what="the server refusing the drain")
        await _no_limit(ledger.store)
        await eventually(lambda: _drained(ledger, a), timeout=20, what="the new incarnation drained")


async def _drained(ledger: Writer, agent: Agent) -> bool:
    """The log says the agent's current incarnation drained."""
    return await _status(ledger, agent) == (agent.incarnation, lc.A_DRAINED)


async def test_a_drained_refused_after_the_last_session_moved_is_written_again(
        private: Writer, caplog: pytest.LogCaptureFixture):
    ledger = private
    caplog.set_level(logging.INFO, logger="ledger.agent")
    sid, _ = await ledger.create_session("p", session_id="s1")
    async with agent_of(ledger, "a1") as a, agent_of(ledger, "b1") as b:
        held = await a.claim(sid)
        await a.drain(deadline=600, reason="upgrade")
        await _room_for(ledger.store, 1)  # b's hand-off claim, not a's drained
        await b.claim(sid, reason="drain", previous_token=held.token)
        await eventually(lambda: not a.owned, what="a losing the session")
        await eventually(lambda: _said(caplog, "drained not written"), what="the server refusing the drained")
        await _no_limit(ledger.store)
        await eventually(lambda: _drained(ledger, a), timeout=20, what="a drained")


# --- one record per owned session: nothing is left of a session the agent no longer owns ----------------------


def _no_trace(agent: Agent, sid: str) -> bool:
    """Nothing kept about the session anywhere: not owned, no activity, no idle TTL wanted, no record, and
    the watch past everything the agent judged of it."""
    return (sid not in agent.owned and sid not in agent.activity() and sid not in agent.needs_idle_ttl()
            and agent.sessions.get(sid) is None and agent.sessions.traces(sid) == [])


async def _owned_and_busy(agent: Agent, ledger: Writer, sid: str) -> None:
    await agent.claim(sid)
    agent.learn_idle_ttl(sid, 30.0)
    record = agent.sessions.get(sid)
    assert record is not None and record.idle_ttl == 30.0 and agent.sessions.traces(sid) == ["record"]


async def test_a_fence_leaves_no_trace_of_the_sessions_it_dropped(ledger: Writer, uid: str):
    sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
    lost: list[tuple[str, str]] = []
    async with agent_of(ledger, f"{uid}-a", on_lost=lambda s, why: lost.append((s, why))) as a:
        await _owned_and_busy(a, ledger, sid)
        first, token = a.incarnation, a.owned[sid].token
        async with a.busy(sid):
            await ledger.store.append(ev.AgentDeclaredDead(producer=MONITOR, agent_id=a.agent_id, incarnation=first,
                                                           reason="missed_heartbeats"))
            await eventually(lambda: a.fenced or a.incarnation > first, what="the fence")
            assert lost == [(sid, "fenced")] and sid not in a.activity()
        await eventually(lambda: _no_trace(a, sid), what="no trace of the fenced session")
        await eventually(lambda: a.incarnation > first and a.fenced is None, what="a new incarnation")
        # ours again: a new record, not the old one's busy count or idle TTL
        await a.claim(sid, reason="failover", previous_token=token)
        assert a.activity()[sid].in_flight == 0 and a.needs_idle_ttl() == [] and a.activity()[sid].idle_ttl is None


async def test_a_session_taken_over_released_or_terminated_leaves_no_trace(ledger: Writer, uid: str):
    taken, _ = await ledger.create_session("p", session_id=f"{uid}-taken")
    released, _ = await ledger.create_session("p", session_id=f"{uid}-released")
    ended, _ = await ledger.create_session("p", session_id=f"{uid}-ended")
    async with agent_of(ledger, f"{uid}-a", capacity=3) as a, agent_of(ledger, f"{uid}-b") as b:
        for sid in (taken, released, ended):
            await _owned_and_busy(a, ledger, sid)
        await a.release(released)
        await a.terminate(ended)
        await a.drain(deadline=600)  # a take-over applies only from an owner that may be replaced
        await b.claim(taken, reason="drain", previous_token=a.owned[taken].token)
        for sid in (taken, released, ended):
            await eventually(lambda sid=sid: _no_trace(a, sid), what=f"no trace of {sid}")
        assert a.owned == {} and a.activity() == {}
        await eventually(lambda: _drained(ledger, a), what="a drained")


async def test_a_failing_task_of_the_agent_is_logged_when_it_fails_and_not_kept(caplog: pytest.LogCaptureFixture):
    from ledger.agent.supervision import TaskSet

    async def broken() -> None:
        raise RuntimeError("a bug")

    supervised = TaskSet("agent-x")
    with caplog.at_level(logging.ERROR, logger="ledger.agent"):
        task = supervised.spawn(broken(), "drained")
        await eventually(lambda: supervised.failures == 1, what="the failure noticed")
    assert task.done() and len(supervised) == 0
    assert [(r.getMessage(), r.exc_info is not None) for r in caplog.records] == \
        [("agent-x-drained failed: a bug", True)]
    await supervised.stop()


async def test_a_vital_task_that_fails_is_reported_to_its_owner(caplog: pytest.LogCaptureFixture):
    from ledger.agent.supervision import TaskSet

    async def broken() -> None:
        raise RuntimeError("a bug")

    async def ends_well() -> None:
        return None

    reported: list[str] = []
    supervised = TaskSet("agent-x", on_vital_failure=reported.append)
    with caplog.at_level(logging.CRITICAL, logger="ledger.agent"):
        supervised.spawn(ends_well(), "heartbeat", vital=True)
        supervised.spawn(broken(), "drained")
        supervised.spawn(broken(), "watch", vital=True)
        await eventually(lambda: supervised.failures == 2 and len(supervised) == 0, what="every task done")
    assert reported == ["agent-x-watch"]
