"""Forged or inconsistent liveness events against the running consumers, on a real server.

Each forgery here was reproduced against the consumers: a heartbeat naming an
incarnation that was never registered, an incarnation that died before its
first beat, a goodbye written for a live agent alone in its pool, and the
reclaimer's own pipelined claims. None may strand a session, loop, or put an
agent past its capacity.
"""

from __future__ import annotations

import asyncio
import contextlib

from fleet import agents, consumers, events, ledger_on
from helpers import eventually

from consumers.follow import Follower
from consumers.reclaimer import Reclaimer
from ledger import events as ev
from ledger import lifecycle as lc
from ledger.agent import Agent
from ledger.codec import Recorded
from ledger.decide import AgentRef
from ledger.ids import new_id
from ledger.writer import Writer
from ledgerctl.server import EmbeddedServer
from projections.health import agent_health

HEARTBEAT, TTL = 0.2, 1.5




async def last_beat_seq(ledger: Writer, agent_id: str) -> int:
    newest = await ledger.store.last("hb", agent_id)
    return newest.seq if isinstance(newest, Recorded) else 0


async def test_a_forged_heartbeat_of_an_unregistered_incarnation_neither_kills_nor_immortalises(
        server: EmbeddedServer):
    async with ledger_on(server.url) as ledger, agents(server.url, "gpu", ["a1"], heartbeat=HEARTBEAT,
                                                        ttl=TTL) as procs:
        async with consumers(server.url, watchdog=False) as running:
            state = running.follower.state
            registered, _ = await ledger.agent("a1")

            async def forge() -> int:
                return await ledger.append(ev.AgentHeartbeat(
                    producer=ev.Producer(id="a1", instance="forger"), agent_id="a1", instance_id="forger",
                    incarnation=10**12, beat=1))

            forged = await forge()

            def beating_after_the_forgery() -> bool:
                beat = state.current_beat("a1")
                return beat is not None and beat.seq > forged

            await eventually(beating_after_the_forgery, what="a real beat after the forged one counting")
            now = running.follower.clock.now(ev.utcnow)
            assert agent_health(state.agents["a1"], state.beats["a1"], now)[0] == "alive"
            assert state.agents["a1"].incarnation == registered.incarnation
            procs["a1"].kill9()
            again = await forge()  # now the newest beat on a1's subject is a forged one, not a beat "not yet seen"
            await eventually(lambda: state.heartbeats.seq >= again, what="the monitor seeing the second forgery")

            async def declared() -> list[ev.Event]:
                return [e for e in await events(ledger.store, "agent", "a1") if isinstance(e, ev.AgentDeclaredDead)]

            [dead] = await eventually(declared, timeout=TTL + 10, what="the death of the agent that stopped beating")
            assert dead.incarnation == registered.incarnation and dead.evidence.last_heartbeat_seq > forged


async def test_an_incarnation_that_dies_before_its_first_beat_is_declared_dead_from_its_registration(
        server: EmbeddedServer):
    async with ledger_on(server.url) as ledger:
        async with agents(server.url, "gpu", ["a1"], heartbeat=HEARTBEAT, ttl=TTL) as procs:
            await eventually(lambda: last_beat_seq(ledger, "a1"), what="a beat of the first incarnation")
            procs["a1"].kill9()
        # It comes back as a new incarnation, is given a session, and crashes before its first beat.
        second = await ledger.store.append(ev.AgentRegistered(
            producer=ev.Producer(id="a1", instance="i2"), agent_id="a1", instance_id="i2", pool="gpu",
            heartbeat_interval=HEARTBEAT, ttl=TTL))
        sid, _ = await ledger.create_session("gpu", session_id="s1")
        reclaimer = Writer(ledger.store, ev.Producer(id="reclaimer-test", instance=new_id()))  # claims for others
        await reclaimer.claim_session(sid, AgentRef("a1", "i2", second))
        async with consumers(server.url, watchdog=False):
            async def declared() -> list[ev.Event]:
                return [e for e in await events(ledger.store, "agent", "a1")
                        if isinstance(e, ev.AgentDeclaredDead) and e.incarnation == second]

            [dead] = await eventually(declared, timeout=TTL + 10, what="the second incarnation's death")
            assert "since registering" in dead.evidence.detail and dead.evidence.last_heartbeat_seq is None

            async def freed() -> bool:
                state, _ = await ledger.session(sid)
                return state.status == lc.S_ORPHANED and state.reason == "owner_dead"

            await eventually(freed, timeout=10, what="the session of the dead incarnation set free")


async def session_moves(ledger: Writer, sid: str, after: int) -> list[ev.Event]:
    return [r.event for r in await ledger.store.history("session", sid)
            if isinstance(r, Recorded) and r.seq > after and isinstance(r.event, (ev.SessionClaimed,
                                                                                  ev.SessionOrphaned))]


async def test_a_forged_goodbye_for_a_live_agent_alone_in_its_pool_starts_no_claim_orphan_loop(
        server: EmbeddedServer):
    async with ledger_on(server.url) as ledger, agents(server.url, "gpu", ["a1"], heartbeat=HEARTBEAT, ttl=TTL):
        async with consumers(server.url, watchdog=False):
            sid, _ = await ledger.create_session("gpu", session_id="s1")

            async def owned_by_a_live_incarnation() -> bool:
                session, _ = await ledger.session(sid)
                agent, _ = await ledger.agent("a1")
                return (session.status == lc.S_ASSIGNED and session.owner == "a1" and agent.status == lc.A_ALIVE
                        and session.owner_incarnation == agent.incarnation)

            await eventually(owned_by_a_live_incarnation, what="s1 claimed by a1")
            agent, _ = await ledger.agent("a1")
            goodbye = await ledger.append(ev.AgentGoodbye(
                producer=ev.Producer(id="a1", instance="forger"), agent_id="a1", instance_id=agent.instance_id,
                incarnation=agent.incarnation, reason="forged"))
            # Let the process and both claimers run for ten of the agent's heartbeats (each beat in the log is
            # evidence the agent process is running), then count how often s1 moved.
            start = await last_beat_seq(ledger, "a1")

            async def ten_beats_later() -> bool:
                return await last_beat_seq(ledger, "a1") >= start + 10

            await eventually(ten_beats_later, timeout=30, what="ten more beats of a1")
            moves = await session_moves(ledger, sid, goodbye)
            # An orphaning for the goodbye and, once the agent came back as a new incarnation, one claim: a
            # handful at most - the loop wrote dozens a second.
            assert len(moves) <= 4, [type(e).__name__ for e in moves]
            await eventually(owned_by_a_live_incarnation, timeout=TTL + 10,
                             what="s1 owned by a live incarnation of a1 again")


async def test_the_reclaimers_pipelined_claims_never_push_an_agent_past_its_capacity(server: EmbeddedServer):
    async with ledger_on(server.url) as ledger, \
            Agent(ledger, agent_id="a1", pool="gpu", capacity=3, heartbeat=HEARTBEAT, ttl=30.0):
        sessions = [(await ledger.create_session("gpu", session_id=f"s{i}"))[0] for i in range(8)]
        follower = Follower(ledger.store)
        following = asyncio.create_task(follower.run())
        try:
            await eventually(lambda: len(follower.state.sessions) == 8 and follower.state.current_beat("a1"),
                             what="the follower seeing the sessions and a beat of a1")
        finally:
            following.cancel()  # from here the reclaimer's view stands still: its claims stay unseen
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await following
        reclaimer = Reclaimer(Writer(ledger.store, ev.Producer(id="reclaimer", instance=new_id())), follower)
        now = follower.clock.now(ev.utcnow)
        for _ in range(3):  # consecutive plans before the first claims are seen, as under load
            await reclaimer.step(now)
        owners = [(await ledger.session(sid))[0].owner for sid in sessions]
        assert owners.count("a1") == 3, owners
