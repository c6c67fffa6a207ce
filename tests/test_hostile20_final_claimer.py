"""Hostile tests of the final_claimer rule: a claim for an incarnation gone, dead or fenced at the claim applies
nowhere. Claims race goodbyes, deaths, fences, re-registrations and drains; the whole-log fold retires the claimer
at once (retain 0) or after its default retain (time jumps); forged claims and owner writes come from whoever holds
an agent's or the reclaimer's credentials. Every fold (whole-log, `lc.SessionFold`) and the checker must keep one
owner and token per session, and what the reclaimer plans must apply.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from histories import CLI, MONITOR, RECLAIMER, Builder, histories
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hostile15_placement import (
    AGENTS,
    PLACEMENTS,
    SESSIONS,
    _fold_session,
    _ledger,
    _raw,
    _register,
    me,
    populated,
)
from test_hostile15_placement import _step as placement_step

from ledger import check as ck
from ledger import codec, decide
from ledger import events as ev
from ledger import lifecycle as lc
from ledger.codec import Recorded
from ledger.errors import LedgerError
from projections.state import LedgerState, LifecycleState

RACE_ACTIONS = ("register", "claim", "claim", "decided_claim", "takeover", "takeover", "release", "goodbye", "dead",
                "drain", "orphan", "fence", "final_then_claim", "final_then_claim", "final_then_takeover",
                "owner_write", "wait", "drained")


def _race_step(draw: st.DrawFn, b: Builder, action: str) -> None:
    agent = draw(st.sampled_from(AGENTS))
    sid = draw(st.sampled_from(SESSIONS))
    state = b.model.ledger.sessions.get(sid)
    cur = b.model.ledger.agents.get(agent)
    match action:
        case "fence":
            if cur is not None:
                b.add(ev.AgentFenced(producer=me(agent), agent_id=agent, incarnation=cur.incarnation,
                                     reason="lease lost", fenced_at=b.now()))
        case "drained":
            if cur is not None:
                b.add(ev.AgentDrained(producer=me(agent), agent_id=agent, incarnation=cur.incarnation))
        case "wait":  # past the default retain: the whole-log fold lets go of what has been final since
            b.clock += 700
        case "final_then_claim" | "final_then_takeover":
            # A claim decided while the claimer was alive, landing right after its goodbye, death or fence (a
            # reclaimer an event behind, or the agent's own late claim), with or without the owner's token.
            if cur is None or state is None:
                return
            previous = state.token if action == "final_then_takeover" else None
            final = draw(st.sampled_from(("goodbye", "dead", "fence")))
            if final == "goodbye":
                b.add(ev.AgentGoodbye(producer=me(agent), agent_id=agent, instance_id="i",
                                      incarnation=cur.incarnation))
            elif final == "dead":
                b.add(ev.AgentDeclaredDead(producer=MONITOR, agent_id=agent, reason="ttl",
                                           incarnation=cur.incarnation))
            else:
                b.add(ev.AgentFenced(producer=me(agent), agent_id=agent, incarnation=cur.incarnation,
                                     reason="lease lost", fenced_at=b.now()))
            if draw(st.booleans()):
                b.clock += draw(st.sampled_from((1, 700)))
            b.add(ev.SessionClaimed(producer=draw(st.sampled_from((me(agent), RECLAIMER))), session_id=sid,
                                    agent_id=agent, instance_id="i", incarnation=cur.incarnation,
                                    previous_token=previous, reason="failover"))
        case "owner_write":  # the owner's (forged, or a zombie's) release or checkpoint, whatever its state
            if state is not None and state.owner is not None and state.token is not None:
                if draw(st.booleans()):
                    b.add(ev.SessionReleased(producer=me(state.owner), session_id=sid, agent_id=state.owner,
                                             incarnation=state.owner_incarnation or 0, token=state.token))
                else:
                    b.add(ev.SessionCheckpointed(producer=me(state.owner), session_id=sid, agent_id=state.owner,
                                                 incarnation=state.owner_incarnation or 0, token=state.token,
                                                 data=b"x"))
        case _:
            placement_step(draw, b, action)


@st.composite
def race_histories(draw: st.DrawFn, owner_writes: bool = True) -> Builder:
    b = populated(draw)
    actions = RACE_ACTIONS if owner_writes else tuple(a for a in RACE_ACTIONS if a not in ("owner_write", "release"))
    for action in draw(st.lists(st.sampled_from(actions), min_size=5, max_size=40)):
        _race_step(draw, b, action)
    return b


def _whole(items: list[Any], retain: float) -> tuple[LedgerState, dict[str, set[tuple[int, str]]], set[str]]:
    whole = LedgerState(ledger=LifecycleState(retain=retain))
    flagged: dict[str, set[tuple[int, str]]] = {}
    retired_sessions: set[str] = set()
    for change in whole.apply_all(items):
        if change.kind == "session" and change.anomaly is not None:
            flagged.setdefault(change.id, set()).add((change.anomaly.seq, change.anomaly.kind))
        retired_sessions |= {r.id for r in change.retired if r.kind == "session"}
    return whole, flagged, retired_sessions


def _agree(items: list[Any], retain: float) -> None:
    """SessionFold gives the whole-log fold's state and flags for every session it did not retire, but for one
    documented difference: a claim for a claimer the whole-log fold retired is unknown_entity there and
    final_claimer (or foreign_placement) here: neither applies."""
    whole, flagged, retired = _whole(items, retain)
    ledger = [r for r in items if isinstance(r, Recorded) and r.stream == "LEDGER"]
    for sid in {r.event.entity_id for r in ledger if r.event.family == "session"} - retired:
        records = [r for r in ledger if r.event.family == "session" and r.event.entity_id == sid]
        folded = _fold_session(ledger, records)
        assert folded.state == whole.ledger.sessions.get(sid), sid
        mine = {(seq, a.kind) for seq, a in folded.anomalies}
        theirs = flagged.get(sid, set())
        # A retired agent's claims and writes are for nobody there (unknown_entity) and flagged on what its
        # registrations and history say here (final_claimer, foreign_placement, superseded_incarnation...):
        # applied by neither, as the equal states say.
        mine_at, theirs_at = dict(mine), dict(theirs)
        assert len(mine_at) == len(mine) and len(theirs_at) == len(theirs)
        assert mine_at.keys() == theirs_at.keys(), (sid, mine, theirs)
        for seq, kind in theirs_at.items():
            assert kind == mine_at[seq] or kind == lc.UNKNOWN_ENTITY, (sid, seq, mine_at[seq], kind)


_SLOW = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("retain", [0.0, 600.0], ids=["retain-0", "retain-default"])
@_SLOW
@given(b=race_histories(owner_writes=False))
def test_session_fold_agrees_with_the_whole_log_on_claims_racing_final_statuses(retain: float, b: Builder):
    """Q1: claims racing goodbyes, deaths, fences, re-registrations and drains; the claimer retired at once or
    after a time jump: one state, one set of flags, but for the documented unknown_entity/final_claimer."""
    _agree(b.items, retain)


@pytest.mark.parametrize("retain", [0.0, 600.0], ids=["retain-0", "retain-default"])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=histories())
def test_session_fold_agrees_with_the_whole_log_on_generated_histories_for_either_retain(retain: float, items: list):
    """Q1 on the general generator (forged producers, duplicates, stale tokens), retain 0 as well, owner writes by
    an agent gone, dead or fenced at the write included."""
    _agree(items, retain)


@_SLOW
@given(b=race_histories(owner_writes=False))
def test_the_checker_keeps_the_folds_owner_and_token_for_every_session_on_racing_claims(b: Builder):
    """Q2: the independent checker ends with the folds' (whole-log and SessionFold) owner and token."""
    whole, _, _ = _whole(b.items, 600.0)
    ledger = _ledger(b)
    checker = ck.fold(_raw(ledger))
    for sid in SESSIONS:
        s, state = checker.sessions.get(sid), whole.ledger.sessions.get(sid)
        folded = _fold_session(ledger, [r for r in ledger if r.event.family == "session" and r.event.entity_id == sid])
        assert folded.state == state
        assert ((s.owner, s.token) if s else None) == ((state.owner, state.token) if state else None), sid


def _plan_and_decide(b: Builder, retain: float) -> list[str]:
    """What the reclaimer plans from the whole-log fold (its projection), each claim decided on what the SDK reads
    (SessionFold of the session's history, the owner's state from its history) and appended: the sessions whose
    planned claim the SDK refused, or whose written claim the projection then did not apply."""
    from consumers import reclaim_rules as rules

    whole, _, _ = _whole(b.items, retain)
    agents = whole.ledger.agents
    eligible: dict[tuple[str, str, str], list[rules.Capacity]] = {}
    for a in agents.values():
        if a.status == lc.A_ALIVE:
            who = decide.AgentRef(a.agent_id, a.instance_id, a.incarnation, lc.placement_of(a))
            eligible.setdefault(lc.placement_of(a), []).append(rules.Capacity(agent=who, load=0, capacity=99))
    ledger = _ledger(b)
    stuck = []
    seq = b.seq["LEDGER"]
    for action in rules.plan(whole.ledger.sessions.values(), agents, eligible, whole.ledger.pools):
        if not isinstance(action, rules.ClaimFor):
            continue
        sid = action.session_id
        folded = _fold_session(ledger, [r for r in ledger if r.event.family == "session" and r.event.entity_id == sid])
        sdk = folded.state
        owner: Any = lc.NO_OWNER_STATE
        if sdk is not None and sdk.status == lc.S_ASSIGNED and sdk.owner is not None:
            owner = lc.AgentTimeline([r for r in ledger if r.event.family == "agent"
                                      and r.event.entity_id == sdk.owner]).at(2**62)
        try:
            event = decide.decide_claim(sdk, sid, action.agent, producer=RECLAIMER, reason=action.reason,
                                        previous_token=action.previous_token, owner=owner)
        except LedgerError:
            stuck.append(sid)
            continue
        seq += 1
        rec = Recorded("LEDGER", seq, codec.subject_of(event), b.items[-1].timestamp_ns + seq, event)
        change = whole.apply(rec)
        if change is None or change.anomaly is not None:
            stuck.append((sid, change.anomaly.kind if change and change.anomaly else None))
    return stuck


@pytest.mark.parametrize("retain", [0.0, 600.0], ids=["retain-0", "retain-default"])
@_SLOW
@given(b=race_histories(owner_writes=False))
def test_every_claim_the_reclaimer_plans_after_racing_claims_is_written_and_applies(retain: float, b: Builder):
    """Q3: no forged or late claim leaves a session whose planned claim the SDK refuses or the projection flags."""
    assert _plan_and_decide(b, retain) == []


@pytest.mark.parametrize("retain", [0.0, 600.0], ids=["retain-0", "retain-default"])
@_SLOW
@given(b=race_histories(owner_writes=True))
def test_owner_writes_by_a_final_owner_leave_every_fold_alike(retain: float, b: Builder):
    """Q1/Q3 with owner writes (releases, checkpoints) by the owner, those by an owner gone, dead or fenced at the
    write included (final_owner: not applied by any fold)."""
    _agree(b.items, retain)
    assert _plan_and_decide(b, retain) == []


def test_a_release_by_an_owner_retired_by_the_whole_log_fold_strands_its_session():
    """The sibling of the retired-claimer case, for owner writes: a0 owns s0 and says goodbye; nobody moves the
    session (the reclaimer is down) for longer than `retain`, so the whole-log fold lets go of a0. Then a0's
    credentials write a release under its token. Every fold flags it (final_owner, or an unknown agent's write
    once the whole-log fold let a0 go) and leaves s0 with a0 for a take-over, which the reclaimer plans and
    applies. Before the final_owner rule the SDK saw it released and the projection flagged every take-over."""
    b = Builder()
    r0 = _register(b, "a0", PLACEMENTS[0])
    _register(b, "a1", PLACEMENTS[0])
    b.add(ev.SessionCreated(producer=CLI, session_id="s0", pool="p"))
    token = b.add(ev.SessionClaimed(producer=me("a0"), session_id="s0", agent_id="a0", instance_id="i",
                                    incarnation=r0)).seq
    b.add(ev.AgentGoodbye(producer=me("a0"), agent_id="a0", instance_id="i", incarnation=r0))
    b.clock += 700
    b.add(ev.SessionCreated(producer=CLI, session_id="s1", pool="p"))  # the clock moves on: a0 is let go
    b.add(ev.SessionReleased(producer=me("a0"), session_id="s0", agent_id="a0", incarnation=r0, token=token))
    assert _plan_and_decide(b, 600.0) == []  # before the rule: [("s0", "overlapping_claim")], at every step
    _agree(b.items, 600.0)


async def test_claims_by_many_claimers_read_each_claimers_history_from_the_start_once(ledger: Any, uid: str):
    """Q5: every applied (or final_claimer) claim now reads its claimer's history. The reclaimer's path - claims
    for three agents, alive and dead, on many sessions, each decided on Writer.session - reads an agent's history
    from the start (a wildcard read from seq 1) at most once per agent, then only what follows."""
    from test_known_agents import reads_of
    from test_reads_attack import _registered

    from ledger.writer import Writer

    store = ledger.store
    agents = [f"{uid}-c{i}" for i in range(3)]
    incs = {a: await store.append(_registered(a)) for a in agents}
    await store.append(ev.AgentDeclaredDead(producer=MONITOR, agent_id=agents[2], reason="ttl",
                                            incarnation=incs[agents[2]]))
    async with Writer.connect(ledger.store.settings, producer_id="reclaimer") as reclaimer:
        with reads_of(reclaimer.store) as reads:
            for i in range(12):
                sid, _ = await ledger.create_session("p", session_id=f"{uid}-s{i}")
                agent = agents[i % 3]
                await reclaimer.claim_session(sid, decide.AgentRef(agent, f"i-{agent}", incs[agent]))
                state, _ = await reclaimer.session(sid)
                assert state is not None
                assert state.status == (lc.S_PENDING if agent == agents[2] else lc.S_ASSIGNED), state
        from_start = [what for what, after in reads if after == 0 and what.startswith("agent:")]
        assert sorted(from_start) == sorted(f"agent:{a}" for a in agents), from_start


async def test_an_agent_whose_claim_lands_after_its_own_death_loses_it_without_leaking_or_hanging(
        ledger: Any, uid: str):
    """Q4: the monitor declares the agent dead while its claim is in flight (written right before the claim, so
    the claim lands after it): the claim is final_claimer in every fold; the agent raises at most a LedgerError,
    fences, registers again, and owns nothing of it; the session stays pending and a claim for the new
    incarnation applies."""
    from helpers import eventually

    from ledger.agent import Agent

    sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
    async with Agent(ledger, agent_id=f"{uid}-a", pool="p", heartbeat=0.2, ttl=5.0) as agent:
        dead_inc = agent.incarnation
        await ledger.store.append(ev.AgentDeclaredDead(producer=MONITOR, agent_id=agent.agent_id, reason="ttl",
                                                       incarnation=dead_inc))
        with contextlib.suppress(LedgerError):  # the watch saw the death first: refused before or after the write
            await agent.claim(sid)
        await eventually(lambda: agent.incarnation != dead_inc and agent.fenced is None, timeout=20.0,
                         what="the agent registered again")
        state, _ = await ledger.session(sid)
        assert state is not None and state.status == lc.S_PENDING, state
        assert sid not in agent.sessions
        claim = await agent.claim(sid)
        state, _ = await ledger.session(sid)
        assert state is not None and state.owner == agent.agent_id and state.token == claim.token
        assert state.owner_incarnation == agent.incarnation
