"""Hostile tests of the agent's newest watch (issue 9): every agent's registrations followed and cached, its
own lifecycle folded with evolve_agent, compare-and-set re-registration. Real nats-server; forgeries are
appended raw (nats-py) or with a forged producer, as a hostile client would. Waiting is bounded polling on a
condition (helpers.eventually), never a bare sleep.
"""

from __future__ import annotations

from datetime import timedelta

from fleet import consumers, ledger_on
from helpers import authorized, eventually
from test_agent_judges import FORGER, agent_of, given_by_a_reclaimer

from ledger import events as ev
from ledger import lifecycle as lc
from ledger.agent import Agent
from ledger.subjects import event_subject
from ledger.writer import Writer
from ledgerctl.server import EmbeddedServer


async def test_an_unreadable_message_on_the_agents_registration_subject_does_not_keep_it_fenced_for_ever(
        ledger: Writer, uid: str):
    """Garbage published raw on `ledger.agent.<id>.registered.*` is no registration (every reader skips it),
    yet it is the subject's last sequence: a re-registration whose compare-and-set expects the last
    registration the watch knows of conflicts with it, every time. Fenced by a forged goodbye, the agent must
    still come back as a new incarnation."""
    async with agent_of(ledger, f"{uid}-a1") as a1:
        first = a1.incarnation
        js = ledger.store.nc.jetstream()
        await js.publish(event_subject("agent", a1.agent_id, "registered", "mallory"), b"\x00not an event")
        await ledger.store.append(authorized(ev.AgentGoodbye(
            producer=FORGER, agent_id=a1.agent_id, instance_id=a1.instance_id, incarnation=first, reason="forged")))
        await eventually(lambda: a1.fenced is not None or a1.incarnation != first, timeout=10,
                         what="the agent fencing itself on the forged goodbye")
        await eventually(lambda: a1.fenced is None and a1.incarnation > first and not a1.superseded, timeout=15,
                         what="the agent registering again past the unreadable message")
        state, _ = await ledger.agent(a1.agent_id)
        assert state is not None and state.incarnation == a1.incarnation and state.status == lc.A_ALIVE


async def test_a_forged_drain_and_drained_for_an_agent_holding_a_session_does_not_strand_the_session(
        server: EmbeddedServer):
    """A forged AgentDraining (deadline already past) then a forged AgentDrained for a live agent holding a
    session: the fold says 'drained'. The agent drains (takes no new claims) but keeps the session; the
    reclaimer hands off only a draining or gone owner's sessions, and the monitor judges only alive or
    draining agents - so nothing ever moves the session, and the agent holds it, draining, for ever."""
    async with ledger_on(server.url) as ledger, \
            Agent(ledger, agent_id="a1", pool="gpu", capacity=3, heartbeat=0.2, ttl=30.0) as a1:
        sid, _ = await ledger.create_session("gpu", session_id="s1")
        await a1.claim(sid)
        await ledger.store.append(authorized(ev.AgentDraining(
            producer=FORGER, agent_id="a1", incarnation=a1.incarnation, deadline=ev.utcnow() - timedelta(hours=1),
            reason="forged")))
        await ledger.store.append(authorized(ev.AgentDrained(producer=FORGER, agent_id="a1",
                                                             incarnation=a1.incarnation, reason="forged")))
        state, _ = await ledger.agent("a1")
        assert state is not None and state.status == lc.A_DRAINED  # every reader applies the forgery
        async with Agent(ledger, agent_id="a2", pool="gpu", capacity=3, heartbeat=0.2, ttl=30.0) as a2, \
                consumers(server.url):
            agents = {"a1": a1, "a2": a2}

            async def served_by_a_live_owner() -> bool:
                session, _ = await ledger.session(sid)
                if session is None or session.status != lc.S_ASSIGNED or session.owner not in agents:
                    return False
                owner, _ = await ledger.agent(session.owner)
                return (owner is not None and owner.status == lc.A_ALIVE
                        and owner.incarnation == session.owner_incarnation
                        and agents[session.owner].incarnation == owner.incarnation
                        and sid in agents[session.owner].owned
                        and all(sid not in a.owned for name, a in agents.items() if name != session.owner))

            await eventually(served_by_a_live_owner, timeout=20,
                             what="s1 served by an agent the log says is alive, and by no other")


async def test_a_forged_goodbye_during_a_drain_does_not_undo_the_drain(ledger: Writer, uid: str):
    """The process asked to drain (no new claims, its sessions handed off). A forged goodbye for its incarnation
    fences it and it registers again - as an agent that is not draining: one forged event silently undoes the
    drain, and every claimer may give it sessions again."""
    async with agent_of(ledger, f"{uid}-a1") as a1:
        sid, _ = await ledger.create_session("p", session_id=f"{uid}-s1")
        await a1.claim(sid)
        await a1.drain(deadline=3600.0, reason="maintenance")
        first = a1.incarnation
        await ledger.store.append(authorized(ev.AgentGoodbye(
            producer=FORGER, agent_id=a1.agent_id, instance_id=a1.instance_id, incarnation=first, reason="forged")))
        await eventually(lambda: a1.fenced is None and a1.incarnation > first, timeout=15,
                         what="the agent registering again after the forged goodbye")

        async def the_log_says_it_drains() -> bool:
            state, _ = await ledger.agent(a1.agent_id)
            return (state is not None and state.incarnation == a1.incarnation
                    and state.status in (lc.A_DRAINING, lc.A_DRAINED))

        # It owns nothing now (fenced, it dropped s1), so it may as well have drained already.
        await eventually(the_log_says_it_drains, timeout=10, what="the new incarnation draining in the log")
        assert a1.draining


async def test_a_claim_for_an_agent_that_has_drained_does_not_leave_the_session_with_it(server: EmbeddedServer):
    """The fold applies a claim whatever its agent's status (a lagging reclaimer's, or a forged one), so a
    session can be given to an agent that has already said it drained. Nobody moves a drained agent's
    sessions (the reclaimer hands off only a draining, gone, dead or fenced owner's) and the monitor never
    judges a drained agent: the session stays with an agent that asked to leave, and is stranded once it
    stops."""
    async with ledger_on(server.url) as ledger, \
            Agent(ledger, agent_id="a1", pool="gpu", capacity=3, heartbeat=0.2, ttl=30.0) as a1:
        await a1.drain(deadline=3600.0, reason="maintenance")
        state, _ = await ledger.agent("a1")
        assert state is not None and state.status == lc.A_DRAINED
        sid, _ = await ledger.create_session("gpu", session_id="s1")
        await ledger.store.append(authorized(ev.SessionClaimed(producer=FORGER, session_id=sid, agent_id="a1",
                                                    instance_id=a1.instance_id, incarnation=a1.incarnation,
                                                    reason="initial")))
        async with Agent(ledger, agent_id="a2", pool="gpu", capacity=3, heartbeat=0.2, ttl=30.0) as a2, \
                consumers(server.url):
            async def with_a2_only() -> bool:
                session, _ = await ledger.session(sid)
                return (session is not None and session.owner == "a2" and sid in a2.owned
                        and sid not in a1.owned)

            await eventually(with_a2_only, timeout=20, what="s1 handed from the drained a1 to a2")


async def test_a_flood_of_registrations_of_made_up_agents_is_not_kept_by_the_watch(ledger: Writer, uid: str):
    """The watch follows every agent's registrations; a flood of them (made-up agents, no session names them)
    must cost it no memory and no reads, and it still judges what comes after."""
    async with agent_of(ledger, f"{uid}-a1") as a1:
        await given_by_a_reclaimer(ledger, a1, f"{uid}-s0")
        known = set(a1.watch.registrations.known)
        for i in range(300):
            await ledger.store.submit(authorized(ev.AgentRegistered(
                producer=FORGER, agent_id=f"{uid}-ghost{i}", instance_id=f"g{i}", pool="p", platform="default",
                region="default", labels={}, capacity=4, heartbeat_interval=0.1, ttl=2.0)))
        await given_by_a_reclaimer(ledger, a1, f"{uid}-s1")  # the watch is past the flood
        assert set(a1.watch.registrations.known) == known


async def test_forged_lifecycle_events_for_a_huge_incarnation_of_the_agent_change_nothing(ledger: Writer, uid: str):
    """Death, goodbye, fence, drain and drained for an incarnation that never registered: every fold flags
    them (unknown incarnation), so the agent neither fences, drains nor loses a session."""
    async with agent_of(ledger, f"{uid}-a1") as a1:
        await given_by_a_reclaimer(ledger, a1, f"{uid}-s0")
        first, huge, aid = a1.incarnation, 10**12, a1.agent_id
        for forged in (ev.AgentDeclaredDead(producer=FORGER, agent_id=aid, incarnation=huge, reason="forged"),
                       ev.AgentGoodbye(producer=FORGER, agent_id=aid, instance_id=a1.instance_id, incarnation=huge,
                                       reason="forged"),
                       ev.AgentFenced(producer=FORGER, agent_id=aid, incarnation=huge, reason="forged",
                                      fenced_at=ev.utcnow(), ttl=2.0),
                       ev.AgentDraining(producer=FORGER, agent_id=aid, incarnation=huge,
                                        deadline=ev.utcnow() - timedelta(hours=1), reason="forged"),
                       ev.AgentDrained(producer=FORGER, agent_id=aid, incarnation=huge, reason="forged")):
            await ledger.store.append(authorized(forged))
        await given_by_a_reclaimer(ledger, a1, f"{uid}-s1")  # the watch is past the forgeries
        assert (a1.incarnation, a1.fenced, a1.draining) == (first, None, False)
        assert {f"{uid}-s0", f"{uid}-s1"} <= set(a1.owned)
        state, _ = await ledger.agent(aid)
        assert state is not None and (state.incarnation, state.status) == (first, lc.A_ALIVE)


async def test_an_acknowledgement_never_moves_the_agent_back_to_an_older_incarnation(ledger: Writer, uid: str):
    """The watch adopted a later copy of our registration (every fold takes the newest as current); the
    original's acknowledgement, arriving after, must not move the agent back to the older sequence."""
    async with agent_of(ledger, f"{uid}-a") as a:
        newest = a.incarnation
        a._adopt(newest - 1, 0.0, a.registration.event())  # the late acknowledgement of an older copy
        assert a.incarnation == newest and a.fenced is None
