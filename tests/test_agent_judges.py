"""An agent judges what its watch delivers by the fold's rule: forged or inconsistent events never make it
gain, lose, loop or spin (issue 9, section 2). Real nats-server; forgeries are appended raw, as a hostile
client would.

"The watch has judged event X" is observed through a later, legitimate event that the agent visibly acts
on (the watch is ordered): never by sleeping.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from helpers import authorized, eventually

from ledger import events as ev
from ledger import lifecycle as lc
from ledger.agent import Agent
from ledger.codec import Recorded
from ledger.ids import new_id
from ledger.settings import Settings
from ledger.store import EventStore
from ledger.writer import Writer

FORGER = ev.Producer(id="mallory", instance="m-1")


def agent_of(ledger: Writer, agent_id: str, **kw: object) -> Agent:
    options = {"pool": "p", "heartbeat": 0.1, "ttl": 2.0, "capacity": 4, **kw}
    return Agent(ledger, agent_id=agent_id, **options)  # type: ignore[arg-type]


async def given_by_a_reclaimer(ledger: Writer, agent: Agent, session_id: str) -> None:
    """A legitimate claim for `agent` written by someone else; returns once the agent runs it."""
    await ledger.create_session("p", session_id=session_id)
    reclaimer = Writer(ledger.store, ev.Producer(id="reclaimer-test", instance=new_id()))  # claims for others
    await reclaimer.claim_session(session_id, agent.ref, reason="failover")
    await eventually(lambda: session_id in agent.owned, what=f"{agent.agent_id} gaining {session_id}")


async def test_a_forged_overlapping_claim_does_not_make_a_second_owner(ledger: Writer, uid: str):
    s1, _ = await ledger.create_session("p", session_id=f"{uid}-s1")
    async with agent_of(ledger, f"{uid}-a1") as a1, agent_of(ledger, f"{uid}-a2") as a2:
        held = await a1.claim(s1)
        forged = await ledger.store.append(authorized(ev.SessionClaimed(
            producer=FORGER, session_id=s1, agent_id=a2.agent_id, instance_id=a2.instance_id,
            incarnation=a2.incarnation, reason="failover", previous_token=held.token - 1)))
        await given_by_a_reclaimer(ledger, a2, f"{uid}-m2")  # a2's watch is past the forgery
        await given_by_a_reclaimer(ledger, a1, f"{uid}-m1")  # and a1's
        state, _ = await ledger.session(s1)
        assert (state.owner, state.token) == (a1.agent_id, held.token)  # the fold refuses the forgery
        assert s1 not in a2.owned, f"a2 runs {s1} on the forged claim #{forged}"
        assert a1.owned[s1] == held


async def test_a_forged_claim_for_an_unregistered_agent_does_not_strand_the_session(ledger: Writer, uid: str):
    s2, _ = await ledger.create_session("p", session_id=f"{uid}-s2")
    lost: list[tuple[str, str]] = []
    async with agent_of(ledger, f"{uid}-a1", on_lost=lambda sid, why: lost.append((sid, why))) as a1:
        held = await a1.claim(s2)
        await ledger.store.append(authorized(ev.SessionClaimed(
            producer=FORGER, session_id=s2, agent_id=f"{uid}-ghost", instance_id="g", incarnation=1,
            reason="failover", previous_owner=a1.agent_id, previous_token=held.token)))
        await given_by_a_reclaimer(ledger, a1, f"{uid}-m1")
        state, _ = await ledger.session(s2)
        assert (state.status, state.owner) == (lc.S_ASSIGNED, a1.agent_id)
        assert a1.owned.get(s2) == held and lost == []
        # It is still the owner in every sense: its owner writes go through.
        await a1.report_resource(s2, "pod/still-here")
        state, _ = await ledger.session(s2)
        assert state.platform_resource_id == "pod/still-here"


async def test_a_forged_orphaning_under_a_stale_token_changes_nothing_and_a_real_one_does(ledger: Writer, uid: str):
    sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
    async with agent_of(ledger, f"{uid}-a1") as a1:
        held = await a1.claim(sid)
        await ledger.store.append(authorized(ev.SessionOrphaned(producer=FORGER, session_id=sid, reason="owner_dead",
                                                     previous_token=held.token + 1000)))
        await given_by_a_reclaimer(ledger, a1, f"{uid}-m1")
        assert a1.owned.get(sid) == held
        await ledger.store.append(authorized(ev.SessionOrphaned(producer=FORGER, session_id=sid, reason="owner_dead",
                                                     previous_owner=a1.agent_id, previous_token=held.token)))
        await eventually(lambda: sid not in a1.owned, what="the agent dropping a session the fold orphaned")


async def test_a_forged_claim_for_the_agent_on_an_owned_session_is_not_taken(ledger: Writer, uid: str):
    """The claim names the agent and its incarnation, but the session has another owner and the claim does
    not name that owner's token: the projection flags it (overlapping_claim), so the agent must not run it."""
    sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
    gained: list[str] = []
    async with agent_of(ledger, f"{uid}-a1") as a1, \
            agent_of(ledger, f"{uid}-a2", on_gained=lambda claim, by: gained.append(claim.session_id)) as a2:
        await a1.claim(sid)
        await ledger.store.append(authorized(ev.SessionClaimed(
            producer=FORGER, session_id=sid, agent_id=a2.agent_id, instance_id=a2.instance_id,
            incarnation=a2.incarnation, reason="failover")))
        await given_by_a_reclaimer(ledger, a2, f"{uid}-m2")
        assert sid not in a2.owned and gained == [f"{uid}-m2"]


@pytest.mark.parametrize("forgery", ["goodbye", "fenced"])
async def test_the_log_saying_the_agent_is_finished_makes_it_come_back_as_a_new_incarnation(
        ledger: Writer, uid: str, forgery: str):
    sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
    fenced: list[str] = []
    async with agent_of(ledger, f"{uid}-a", on_fenced=fenced.append) as a:
        await a.claim(sid)
        first = a.incarnation
        if forgery == "goodbye":
            event: ev.Event = authorized(ev.AgentGoodbye(producer=FORGER, agent_id=a.agent_id,
                                                         instance_id=a.instance_id, incarnation=first, reason="forged"))
        else:
            event = authorized(ev.AgentFenced(producer=FORGER, agent_id=a.agent_id, incarnation=first,
                                              reason="forged", fenced_at=ev.utcnow()))
        await ledger.store.append(event)
        await eventually(lambda: a.incarnation > first and a.fenced is None, what="a new incarnation")
        assert len(fenced) == 1 and "the log says" in fenced[0]
        assert a.owned == {} and not a.superseded
        state, _ = await ledger.agent(a.agent_id)
        assert (state.status, state.incarnation, state.instance_id) == (lc.A_ALIVE, a.incarnation, a.instance_id)
        # It wrote no AgentFenced of its own on top: the log already said why the incarnation ended.
        history = [r.event for r in await ledger.store.history("agent", a.agent_id) if isinstance(r, Recorded)]
        assert [e for e in history if isinstance(e, ev.AgentFenced) and e.producer.instance == a.instance_id] == []
        # The new incarnation works as owner again.
        s2, _ = await ledger.create_session("p", session_id=f"{uid}-s2")
        claim = await a.claim(s2)
        assert claim.token > a.incarnation and a.owned == {s2: claim}


async def test_a_superseded_agent_stops_for_good_and_its_beat_loop_ends(ledger: Writer, uid: str):
    agent_id = f"{uid}-a"
    old = agent_of(ledger, agent_id)
    async with old, agent_of(ledger, agent_id) as new:
        await eventually(lambda: old.superseded, what="the old process noticing it was replaced")
        beat_task = old._tasks[0]
        assert beat_task.get_name().endswith("-heartbeat")
        # Parked for good, not spinning on a wake-up time in the past: the task has nothing left to do.
        await eventually(beat_task.done, what="the superseded agent's beat loop ending")
        assert beat_task.exception() is None
        await asyncio.wait_for(old.wait_stopped(), timeout=10)  # a replaced process stops for good
        assert old.fenced and new.fenced is None
        registrations = await ledger.registrations(agent_id)
        assert registrations == [old.incarnation, new.incarnation]  # it did not come back
    assert old.goodbye_seq is None and new.goodbye_seq is not None


async def test_an_agent_over_capacity_releases_its_newest_extra_session(ledger: Writer, uid: str):
    own = [(await ledger.create_session("p", session_id=f"{uid}-s{i}"))[0] for i in range(2)]
    extra, _ = await ledger.create_session("p", session_id=f"{uid}-extra")
    lost: list[tuple[str, str]] = []
    async with agent_of(ledger, f"{uid}-a", capacity=2, on_lost=lambda sid, why: lost.append((sid, why))) as a:
        held = [await a.claim(sid) for sid in own]
        # A reclaimer's claim that raced the agent's own: it now holds 3 of 2.
        reclaimer = Writer(ledger.store, ev.Producer(id="reclaimer-test", instance=new_id()))
        await reclaimer.claim_session(extra, a.ref, reason="failover")

        async def released() -> lc.SessionState | None:
            state, _ = await ledger.session(extra)
            return state if state.status == lc.S_RELEASED else None

        state = await eventually(released, what="the extra session released")
        assert "over capacity" in (state.reason or "")
        await eventually(lambda: extra not in a.owned, what="the agent dropping it")
        assert dict(a.owned.items()) == dict(zip(own, held, strict=False))
        assert [sid for sid, _ in lost] == [extra]
        for sid in own:
            s, _ = await ledger.session(sid)
            assert (s.status, s.owner) == (lc.S_ASSIGNED, a.agent_id)


def spawn_ledger_agent(agent_id: str, pool: str, nats_url: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "ledgerctl", "agent", "--agent-id", agent_id, "--pool", pool,
                             "--heartbeat", "0.2", "--ttl", "2", "--no-self-claim", "--nats-url", nats_url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


async def test_a_superseded_ledger_agent_process_exits_and_does_not_claim_a_goodbye(
        store: EventStore, settings: Settings, uid: str):
    agent_id = f"{uid}-proc"
    proc = spawn_ledger_agent(agent_id, f"{uid}-p", settings.nats_url)
    try:
        assert proc.stdout is not None
        first = await asyncio.to_thread(proc.stdout.readline)
        assert "registered" in first, first + (proc.stderr.read() if proc.stderr else "")
        ledger = Writer(store, ev.Producer(id=agent_id, instance=new_id()))
        async with agent_of(ledger, agent_id):  # a newer process of the same agent
            out, err = await asyncio.to_thread(proc.communicate, timeout=30)  # it stops by itself
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert "goodbye written" not in out.replace("no goodbye written", "") and "no goodbye written" in out
    assert "superseded" in out


async def test_a_claim_that_lands_after_the_agent_registered_again_is_not_run(ledger: Writer, uid: str):
    """The claim was decided for incarnation N; before it landed the agent fenced itself and registered as M
    (the compare-and-set guards the session's history, not the agent's). The fold flags the claim
    (superseded_incarnation): the agent must not run it either."""
    from ledger.errors import Fenced

    sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
    async with agent_of(ledger, f"{uid}-a") as a:
        first = a.incarnation
        store = a.store
        real_append = store.append

        async def append_after_a_new_incarnation(event: ev.Event, **kw: object) -> int:
            if isinstance(event, ev.SessionClaimed) and event.session_id == sid:
                await ledger.store.append(authorized(ev.AgentGoodbye(producer=FORGER, agent_id=a.agent_id,
                                                          instance_id=a.instance_id, incarnation=first)))
                await eventually(lambda: a.incarnation > first and a.fenced is None, what="a new incarnation")
            return await real_append(event, **kw)

        store.append = append_after_a_new_incarnation  # type: ignore[method-assign]
        try:
            with pytest.raises(Fenced, match="landed for incarnation"):
                await a.claim(sid)
        finally:
            del store.append
        assert sid not in a.owned
        state, _ = await ledger.session(sid)
        assert state is not None and state.status == lc.S_PENDING  # the fold did not apply it either
        await given_by_a_reclaimer(ledger, a, f"{uid}-later")  # the watch went past the claim
        assert sid not in a.owned


async def test_an_agent_acts_only_on_what_the_fold_applies_to_its_own_lifecycle(ledger: Writer, uid: str):
    """A death written about a drained agent is refused by the fold (dead only from alive or draining): the
    agent must not act on it either - no fencing, no new incarnation."""
    async with agent_of(ledger, f"{uid}-a") as a:
        first = a.incarnation
        await a.drain(deadline=60)
        await eventually(lambda: _status(ledger, a.agent_id, lc.A_DRAINED), what="drained in the log")
        await ledger.store.append(authorized(ev.AgentDeclaredDead(
            producer=FORGER, agent_id=a.agent_id, incarnation=first, reason="forged")))
        # Then a forged goodbye, which the fold does apply: once the agent reacts to that, it has judged the death.
        await ledger.store.append(authorized(ev.AgentGoodbye(
            producer=FORGER, agent_id=a.agent_id, instance_id=a.instance_id, incarnation=first)))
        await eventually(lambda: a.incarnation > first, what="a new incarnation after the goodbye")
        fences = [r for r in await ledger.store.history("agent", a.agent_id)
                  if isinstance(r, Recorded) and isinstance(r.event, ev.AgentFenced)]
        assert fences == []  # the refused death made it write no fence record of its own


async def test_a_drain_written_about_the_agent_makes_it_drain(ledger: Writer, uid: str):
    """The log says the agent drains (the reclaimer hands its sessions off, nothing claims for it): the agent
    behaves so and writes that it drained, instead of idling outside the fleet until it restarts."""
    async with agent_of(ledger, f"{uid}-a") as a:
        await ledger.store.append(authorized(ev.AgentDraining(
            producer=FORGER, agent_id=a.agent_id, incarnation=a.incarnation, deadline=ev.utcnow(), reason="forged")))
        await eventually(lambda: a.draining, what="the agent draining")
        await eventually(lambda: _status(ledger, a.agent_id, lc.A_DRAINED), what="drained in the log")
        history = [r for r in await ledger.store.history("agent", a.agent_id) if isinstance(r, Recorded)]
        _, anomalies = lc.fold(lc.evolve_agent, history)
        assert anomalies == []  # one drained, not two


async def _status(ledger: Writer, agent_id: str, status: str) -> bool:
    state, _ = await ledger.agent(agent_id)
    return state is not None and state.status == status


async def test_a_re_registration_the_watch_sees_before_its_acknowledgement_is_judged_as_ours(ledger: Writer,
                                                                                             uid: str):
    """The watch may deliver the agent's new registration before the append's acknowledgement: what follows it
    in the log (here a second forged goodbye) must still be judged as about this process."""
    async with agent_of(ledger, f"{uid}-a") as a:
        store, real_submit, waiting = a.store, a.store.submit, []

        async def acknowledged_after_the_watch_saw_it(event: ev.Event, **kw: object) -> asyncio.Future[int]:
            future = await real_submit(event, **kw)
            if not isinstance(event, ev.AgentRegistered):
                return future
            late: asyncio.Future[int] = asyncio.get_running_loop().create_future()

            async def later() -> None:
                seq = await future
                await eventually(lambda: seq in a.watch.registrations.known.get(a.agent_id, []),
                                 what="the watch seeing it")
                late.set_result(seq)

            waiting.append(asyncio.create_task(later()))
            return late

        store.submit = acknowledged_after_the_watch_saw_it  # type: ignore[method-assign]
        try:
            for _ in range(2):
                before = a.incarnation
                await ledger.store.append(authorized(ev.AgentGoodbye(producer=FORGER, agent_id=a.agent_id,
                                                          instance_id=a.instance_id, incarnation=before)))
                await eventually(lambda before=before: a.incarnation > before and a.fenced is None,
                                 what="a new incarnation")
        finally:
            del store.submit
            await asyncio.gather(*waiting)


async def test_a_re_registration_that_would_land_after_another_process_registered_does_not(ledger: Writer,
                                                                                           uid: str):
    """Fenced, the agent re-registers; meanwhile a replacement process registered the same agent id. Landing
    late, the old process's registration would supersede the replacement, and no process would be left."""
    async with agent_of(ledger, f"{uid}-a") as a:
        store, real_submit = a.store, a.store.submit
        replacement: list[int] = []

        async def a_replacement_registers_first(event: ev.Event, **kw: object) -> asyncio.Future[int]:
            if isinstance(event, ev.AgentRegistered) and not replacement and event.instance_id == a.instance_id:
                replacement.append(0)  # (the store is shared: this append comes through here too)
                replacement[0] = (await ledger.store.append(ev.AgentRegistered(
                    producer=ev.Producer(id=a.agent_id, instance="replacement"), agent_id=a.agent_id,
                    instance_id="replacement", pool="p")))
            return await real_submit(event, **kw)

        store.submit = a_replacement_registers_first  # type: ignore[method-assign]
        try:
            await ledger.store.append(authorized(ev.AgentGoodbye(producer=FORGER, agent_id=a.agent_id,
                                                      instance_id=a.instance_id, incarnation=a.incarnation)))
            await eventually(lambda: a.superseded, what="the old process superseded")
        finally:
            del store.submit
        registrations = await ledger.registrations(a.agent_id)
        assert registrations[-1] == replacement[0]  # the replacement is still the current incarnation


async def test_a_goodbye_waits_for_a_re_registration_in_flight_and_is_said_for_it(ledger: Writer, uid: str):
    """Leaving while a re-registration is in flight: the goodbye is said for the incarnation that lands,
    not for the old one, so no incarnation is left that never beats (and is later declared dead)."""
    store, real_submit = ledger.store, ledger.store.submit
    a = agent_of(ledger, f"{uid}-a")

    async def stored_once_closing(event: ev.Event, **kw: object) -> asyncio.Future[int]:
        if not (isinstance(event, ev.AgentRegistered) and a.incarnation):
            return await real_submit(event, **kw)  # the first registration goes through
        late: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def later() -> None:  # sent, but stored only after the goodbye began (the appender retrying)
            await eventually(lambda: a._closing, what="the agent leaving")
            late.set_result(await (await real_submit(event, **kw)))

        tasks.append(asyncio.get_running_loop().create_task(later()))
        return late

    tasks: list[asyncio.Task[None]] = []
    store.submit = stored_once_closing  # type: ignore[method-assign]
    try:
        async with a:
            first = a.incarnation
            await ledger.store.append(authorized(ev.AgentGoodbye(producer=FORGER, agent_id=a.agent_id,
                                                      instance_id=a.instance_id, incarnation=first)))
            await eventually(lambda: a.registration.in_flight is not None, what="a re-registration in flight")
    finally:
        del store.submit
        await asyncio.gather(*tasks)
    registrations = await ledger.registrations(a.agent_id)
    goodbyes = [r.event.incarnation for r in await ledger.store.history("agent", a.agent_id)
                if isinstance(r, Recorded) and isinstance(r.event, ev.AgentGoodbye) and r.event.producer == a.producer]
    assert len(registrations) == 2 and goodbyes == [registrations[-1]]
