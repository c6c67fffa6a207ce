"""Idle sessions are released after their idle TTL; a busy one never is."""

from __future__ import annotations

import asyncio

import pytest
from helpers import eventually

from consumers.idle import IdleReaper, select_idle
from ledger import events as ev
from ledger import lifecycle as lc
from ledger.agent import Activity, Agent
from ledger.errors import NotFound
from ledger.ids import new_id
from ledger.store import EventStore
from ledger.writer import Writer


def test_selection_never_picks_a_busy_or_fresh_session():
    activity = {
        "idle": Activity(idle_for=10, in_flight=0, idle_ttl=5),
        "idler": Activity(idle_for=20, in_flight=0, idle_ttl=5),
        "busy": Activity(idle_for=99, in_flight=1, idle_ttl=5),
        "fresh": Activity(idle_for=1, in_flight=0, idle_ttl=5),
        "no-ttl": Activity(idle_for=99, in_flight=0, idle_ttl=None),
    }
    assert select_idle(activity) == ["idler", "idle"]


async def test_idle_sessions_are_released_and_busy_ones_kept(store: EventStore, uid: str):
    ledger = Writer(store, ev.Producer(id="operator-test", instance=new_id()))
    idle, _ = await ledger.create_session("p", session_id=f"{uid}-idle", idle_ttl=0.2)
    busy, _ = await ledger.create_session("p", session_id=f"{uid}-busy", idle_ttl=0.2)
    forever, _ = await ledger.create_session("p", session_id=f"{uid}-forever")
    later, _ = await ledger.create_session("p", session_id=f"{uid}-later", idle_ttl=0.2)
    async with Agent(ledger, agent_id=f"{uid}-a", pool="p", capacity=4, heartbeat=0.5, ttl=5) as agent:
        for sid in (idle, busy, forever):
            await agent.claim(sid)
        reaper = IdleReaper(agent, every=0.05)
        task = asyncio.create_task(reaper.run())
        try:
            async with agent.busy(busy):
                await eventually(lambda: idle not in agent.owned, what="the idle session released")
                # A barrier: `later`, claimed only now with the same TTL, goes idle after `busy` would have; once
                # the reaper has released it, it has passed `busy` by - which stays, as work is in flight.
                await agent.claim(later)
                await eventually(lambda: later not in agent.owned, what="the later idle session released")
                assert busy in agent.owned
            await eventually(lambda: busy not in agent.owned, what="the session released once idle again")
            assert forever in agent.owned
        finally:
            task.cancel()
    for sid in (idle, later, busy):
        state, _ = await ledger.session(sid)
        assert state.status == lc.S_RELEASED and state.reason.startswith("idle for")
    with pytest.raises(NotFound):
        async with agent.busy(idle):
            pass
