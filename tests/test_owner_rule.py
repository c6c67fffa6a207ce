"""One rule for owner writes, claims and supersession: the SDK's decisions and the fold agree (pure)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from histories import histories
from hypothesis import given
from hypothesis import strategies as st

from ledger import codec, decide
from ledger import events as ev
from ledger import lifecycle as lc
from ledger.errors import LedgerError, NotClaimable, NotFound, StaleToken, Superseded
from projections.state import LedgerState

T0 = datetime(2026, 11, 1, tzinfo=UTC)
SID = "s1"
AGENTS = ("a1", "a2")
WRITE_SEQ = 100


def session(status: str, owner: str | None, owner_incarnation: int | None, token: int | None) -> lc.SessionState:
    return lc.SessionState(session_id=SID, pool="p", platform="default", region="default", labels={}, idle_ttl=None,
                           status=status, created_at=T0, owner=owner, owner_incarnation=owner_incarnation,
                           token=token, last_seq=10)


states = st.one_of(st.none(), st.builds(
    session, st.sampled_from(lc.SESSION_STATES), st.sampled_from((*AGENTS, None)),
    st.sampled_from((1, 2, 3, None)), st.sampled_from((5, 6, None))))


def write(kind: str, agent_id: str, incarnation: int, token: int) -> codec.Recorded:
    producer = ev.Producer(id=agent_id, instance="i")
    event: ev.Event
    if kind == "release":
        event = ev.SessionReleased(producer=producer, session_id=SID, agent_id=agent_id, incarnation=incarnation,
                                   token=token)
    else:
        event = ev.SessionResourceReported(producer=producer, session_id=SID, agent_id=agent_id,
                                           incarnation=incarnation, token=token, platform_resource_id="pod")
    return codec.Recorded("LEDGER", WRITE_SEQ, codec.subject_of(event), WRITE_SEQ, event)


def refusal(state: lc.SessionState | None, who: decide.AgentRef, token: int,
            current: lc.CurrentIncarnation | None) -> type[LedgerError] | None:
    try:
        decide.check_owner(state, SID, who, token, current)
    except LedgerError as e:
        return type(e)
    return None


@given(state=states, kind=st.sampled_from(("release", "resource")), agent_id=st.sampled_from(AGENTS),
       incarnation=st.sampled_from((1, 2, 3)), token=st.sampled_from((5, 6, 7)),
       registered=st.one_of(st.none(), st.just("unchecked"), st.sampled_from((1, 2, 3))))
def test_check_owner_refuses_exactly_the_owner_writes_the_fold_flags(
        state: lc.SessionState | None, kind: str, agent_id: str, incarnation: int, token: int,
        registered: int | str | None):
    """`registered`: the writer's current incarnation (None: never registered; "unchecked": no lookup)."""
    if registered == "unchecked":
        current, incarnation_at = None, None
    else:
        def current(a: str) -> int | None:
            return registered if a == agent_id else None  # type: ignore[return-value]

        def incarnation_at(a: str, seq: int) -> int | None:
            assert seq == WRITE_SEQ
            return current(a)
    who = decide.AgentRef(agent_id, "i", incarnation)
    after, anomaly = lc.evolve_session(state, write(kind, agent_id, incarnation, token), incarnation_at)
    refused = refusal(state, who, token, current)
    assert (refused is None) == (anomaly is None), (anomaly, refused)
    if anomaly is None:
        assert after is not state
        return
    assert after is state
    if state is None:
        assert refused is NotFound
    elif anomaly.kind in (lc.SUPERSEDED_INCARNATION, lc.UNKNOWN_ENTITY):
        assert refused is Superseded
    else:
        assert anomaly.kind in (lc.STALE_TOKEN, lc.AFTER_FINAL) and refused is StaleToken


def test_the_incarnation_that_counts_is_the_one_that_claimed():
    """Before: the fold let a new incarnation write under its predecessor's token (decide refused it), and
    decide let a superseded incarnation write (the fold refused it). Now both refuse both."""
    held = session(lc.S_ASSIGNED, "a1", 1, 5)
    successor = decide.AgentRef("a1", "i2", 2)
    _, anomaly = lc.evolve_session(held, write("resource", "a1", 2, 5), lambda a, seq: 2)
    assert anomaly is not None and anomaly.kind == lc.STALE_TOKEN
    assert refusal(held, successor, 5, None) is StaleToken
    zombie = decide.AgentRef("a1", "i1", 1)
    _, anomaly = lc.evolve_session(held, write("resource", "a1", 1, 5), lambda a, seq: 2)
    assert anomaly is not None and anomaly.kind == lc.SUPERSEDED_INCARNATION
    assert refusal(held, zombie, 5, lambda a: 2) is Superseded
    assert refusal(held, zombie, 5, lambda a: 1) is None


PLACEMENTS = (("p", "default", "default"), ("q", "default", "default"), ("p", "gpu", "default"),
              ("p", "default", "eu"))


def registered_as(agent_id: str, incarnation: int, placement: tuple[str, str, str]) -> lc.AgentState:
    pool, platform, region = placement
    rec = codec.Recorded("LEDGER", incarnation, f"ledger.agent.{agent_id}.registered.{agent_id}", incarnation,
                         ev.AgentRegistered(producer=ev.Producer(id=agent_id, instance="i"), agent_id=agent_id,
                                            instance_id="i", pool=pool, platform=platform, region=region))
    state, problem = lc.evolve_agent(None, rec)
    assert problem is None and state is not None
    return state


@given(state=states, agent_id=st.sampled_from((*AGENTS, "ghost")), incarnation=st.sampled_from((1, 2, 3)),
       previous=st.sampled_from((5, 6, None)), reason=st.sampled_from(("initial", "failover")),
       placement=st.sampled_from(PLACEMENTS), told=st.booleans())
def test_every_claim_decide_claim_produces_is_one_the_fold_applies(
        state: lc.SessionState | None, agent_id: str, incarnation: int, previous: int | None, reason: str,
        placement: tuple[str, str, str], told: bool):
    """Also where the claimer registered: a claim decide lets through for an agent of another pool, platform or
    region than the session's never happens when it is told (`AgentRef.placement`), and the fold flags exactly
    those (foreign_placement), judged on the claimer's registration (`registered_at`) or, in the whole-log fold,
    its agent state (`agent_at`)."""
    who = decide.AgentRef(agent_id, "i", incarnation, placement if told else None)
    registered = registered_as(agent_id, incarnation, placement)
    foreign = state is not None and placement != lc.placement_of(state)
    try:
        event = decide.decide_claim(state, SID, who, producer=ev.Producer(id=agent_id, instance="i"),
                                    reason=reason, previous_token=previous)
    except NotClaimable as refused:
        if told and foreign and "pool/platform/region" in str(refused):
            # Refused for its placement alone: the fold flags the same claim for it, on either lookup.
            assert state is not None
            event = ev.SessionClaimed(producer=ev.Producer(id=agent_id, instance="i"), session_id=SID,
                                      agent_id=agent_id, instance_id="i", incarnation=incarnation, reason=reason,
                                      previous_token=previous if state.status == lc.S_ASSIGNED else None)
            rec = codec.Recorded("LEDGER", WRITE_SEQ, codec.subject_of(event), WRITE_SEQ, event)
            def claimer(a: str, seq: int) -> lc.AgentState | None:
                return registered if a == agent_id else None  # (an owner not registered may be replaced)

            for lookups in ((None, None, claimer), (None, claimer)):
                problem = lc.session_event_problem(state, rec, *lookups)
                assert problem is not None and problem.kind == lc.FOREIGN_PLACEMENT
        return
    except LedgerError:
        return
    assert not (told and foreign)
    rec = codec.Recorded("LEDGER", WRITE_SEQ, codec.subject_of(event), WRITE_SEQ, event)
    assert lc.session_event_problem(state, rec, lambda a, seq: incarnation if a == agent_id else None) is None
    problem = lc.session_event_problem(state, rec, lambda a, seq: incarnation if a == agent_id else None, None,
                                       lambda a, seq: registered if a == agent_id else None)
    assert (problem is not None) == foreign
    assert problem is None or problem.kind == lc.FOREIGN_PLACEMENT
    after, _ = lc.evolve_session(state, rec)
    assert lc.owns(after, agent_id, incarnation)


@given(tokens=st.dictionaries(st.sampled_from([f"s{i}" for i in range(12)]), st.integers(1, 10_000), max_size=12),
       capacity=st.integers(1, 12))
def test_an_agent_over_capacity_gives_up_exactly_its_newest_extra_claims(tokens: dict[str, int], capacity: int):
    extra = decide.excess_sessions(tokens, capacity)
    assert len(extra) == max(0, len(tokens) - capacity) and len(set(extra)) == len(extra)
    kept = set(tokens) - set(extra)
    assert all(tokens[e] >= tokens[k] for e in extra for k in kept)
    assert decide.excess_sessions(tokens, capacity) == extra  # the same holdings, the same answer
    assert decide.excess_sessions({k: tokens[k] for k in kept}, capacity) == []


@given(regs=st.lists(st.tuples(st.integers(1, 50), st.sampled_from(("me", "other", "third"))), max_size=8),
       incarnation=st.integers(1, 50))
def test_only_a_later_registration_by_another_process_supersedes(regs: list[tuple[int, str]], incarnation: int):
    by = lc.superseded_by(regs, incarnation, "me")
    later_by_others = [seq for seq, instance in regs if seq > incarnation and instance != "me"]
    assert by == (max(later_by_others) if later_by_others else None)
    # What a lagging replica answers (only registrations up to some point) never supersedes by itself.
    assert lc.superseded_by([r for r in regs if r[0] <= incarnation], incarnation, "me") is None


async def test_an_owner_termination_under_a_stale_token_is_refused_before_it_is_written(store):
    from ledger.writer import Writer

    ledger = Writer(store, ev.Producer(id="operator-ops", instance="i"))
    sid, _ = await ledger.create_session("p")
    with pytest.raises(StaleToken):
        await ledger.terminate_session(sid, token=12345)  # the fold would flag it: it is never written
    state, last = await ledger.session(sid)
    assert state is not None and state.status == lc.S_PENDING


# --- take-overs: a claim naming the current token applies only while the owner may be replaced ----------------

REPLACEABLE = {lc.A_GONE: lc.OWNER_GONE, lc.A_DEAD: lc.OWNER_DEAD, lc.A_FENCED: lc.OWNER_FENCED,
               lc.A_DRAINING: lc.OWNER_DRAINING, lc.A_DRAINED: lc.OWNER_DRAINING}
AGENT_STATUSES = (lc.A_ALIVE, *REPLACEABLE)


def agent_state(agent_id: str, incarnation: int, status: str, *, suspected: bool = False) -> lc.AgentState:
    return lc.AgentState(agent_id=agent_id, incarnation=incarnation, instance_id="i", pool="p", platform="default",
                         region="default", labels={}, capacity=4, heartbeat_interval=1.0, ttl=5.0,
                         registered_at=T0, status=status, reason=status, status_since=T0, status_seq=incarnation,
                         cause_id=f"cause-{status}", suspected_at=T0 if suspected else None, last_seq=incarnation)


def claim_rec(agent_id: str, incarnation: int, previous: int | None, *, producer: str | None = None,
              seq: int = WRITE_SEQ) -> codec.Recorded:
    event = ev.SessionClaimed(producer=ev.Producer(id=producer or agent_id, instance="i"), session_id=SID,
                              agent_id=agent_id, instance_id="i", incarnation=incarnation, previous_token=previous,
                              reason="failover")
    return codec.Recorded("LEDGER", seq, codec.subject_of(event), seq, event)


@pytest.mark.parametrize("status", AGENT_STATUSES)
@pytest.mark.parametrize("suspected", [False, True])
def test_an_owner_may_be_replaced_exactly_when_the_log_has_lost_it(status: str, suspected: bool):
    held = session(lc.S_ASSIGNED, "a1", 1, 5)
    owner = agent_state("a1", 1, status, suspected=suspected)
    # Only silent or suspect is not lost: the monitor declares it dead first, and then it may be replaced.
    expected = (REPLACEABLE[status], f"cause-{status}") if status in REPLACEABLE else None
    assert lc.owner_replaceable(held, owner) == expected
    assert lc.owner_replaceable(held, agent_state("a1", 7, lc.A_ALIVE)) == (lc.OWNER_SUPERSEDED, None)
    assert lc.owner_replaceable(held, None) == (lc.OWNER_UNKNOWN, None)
    for unowned in (lc.S_PENDING, lc.S_ORPHANED, lc.S_RELEASED, lc.S_TERMINATED):
        assert lc.owner_replaceable(session(unowned, None, None, None), owner) is None
    # The reclaimer's rule is the same function (one rule, not two copies).
    from consumers import reclaim_rules as rr

    assert rr.owner_problem(held, {"a1": owner}) == expected
    # The fold: a2's self-claim naming the token applies exactly when a1 may be replaced.
    anomaly = lc.session_event_problem(held, claim_rec("a2", 3, 5), lambda a, seq: {"a1": 1, "a2": 3}[a],
                                       lambda a, seq: owner if a == "a1" else None)
    assert (anomaly is None) == (expected is not None)
    if anomaly is not None:
        assert anomaly.kind == lc.LIVE_OWNER and "a1" in anomaly.detail


def test_a_self_claim_naming_a_live_owners_token_is_flagged_and_changes_nothing():
    """The attack: any agent reads the token from LEDGER and names it. Failed before: the fold applied it."""
    held = session(lc.S_ASSIGNED, "a1", 1, 5)
    alive = agent_state("a1", 1, lc.A_ALIVE)
    after, anomaly = lc.evolve_session(held, claim_rec("a2", 3, 5), lambda a, seq: {"a1": 1, "a2": 3}[a],
                                       lambda a, seq: alive if a == "a1" else None)
    assert after is held and anomaly is not None and anomaly.kind == lc.LIVE_OWNER
    # The reclaimer giving it away names the token just the same: no better while a1 is alive.
    _, anomaly = lc.evolve_session(held, claim_rec("a2", 3, 5, producer="reclaimer"), None,
                                   lambda a, seq: alive if a == "a1" else None)
    assert anomaly is not None and anomaly.kind == lc.LIVE_OWNER
    with pytest.raises(NotClaimable, match="alive"):
        decide.decide_claim(held, SID, decide.AgentRef("a2", "i", 3), producer=ev.Producer(id="a2", instance="i"),
                            reason="failover", previous_token=5, owner=alive)
    # Once the log says a1 is dead, the same claim is a failover, and applies.
    dead = agent_state("a1", 1, lc.A_DEAD)
    after, anomaly = lc.evolve_session(held, claim_rec("a2", 3, 5), None, lambda a, seq: dead)
    assert anomaly is None and after is not None and after.owner == "a2"


owners = st.one_of(st.none(), st.builds(agent_state, st.just("a1"), st.sampled_from((1, 2)),
                                        st.sampled_from(AGENT_STATUSES)))


@given(state=states, owner=owners, agent_id=st.sampled_from(AGENTS), incarnation=st.sampled_from((1, 2, 3)),
       previous=st.sampled_from((5, 6, None)), reclaimer=st.booleans())
def test_decide_claim_refuses_exactly_the_take_overs_the_fold_flags(
        state: lc.SessionState | None, owner: lc.AgentState | None, agent_id: str, incarnation: int,
        previous: int | None, reclaimer: bool):
    """The SDK never writes a take-over the folds flag, and refuses none they apply (but its no-op re-claim)."""
    producer = ev.Producer(id="reclaimer" if reclaimer else agent_id, instance="i")
    owner_at = {state.owner: owner} if state is not None and state.owner is not None else {}
    try:
        event = decide.decide_claim(state, SID, decide.AgentRef(agent_id, "i", incarnation), producer=producer,
                                    reason="failover", previous_token=previous,
                                    owner=next(iter(owner_at.values()), lc.NO_OWNER_STATE))
    except LedgerError:
        event = None
    if event is not None:
        written = codec.Recorded("LEDGER", WRITE_SEQ, codec.subject_of(event), WRITE_SEQ, event)
        problem = lc.session_event_problem(state, written, None, lambda a, seq: owner_at.get(a))
        # The claimer's own state is the caller's to vouch for (decide_claim is not told it); the one lookup here
        # gives the owner's state, which for a claim by the owner itself is also the claimer's.
        assert problem is None or (problem.kind == lc.FINAL_CLAIMER and agent_id == state.owner), problem
    flagged = lc.session_event_problem(state, claim_rec(agent_id, incarnation, previous, producer=producer.id),
                                       None, lambda a, seq: owner_at.get(a))
    if flagged is not None and flagged.kind == lc.LIVE_OWNER:
        assert event is None


@given(status=st.sampled_from(AGENT_STATUSES), owner_incarnation=st.sampled_from((1, 2)),
       registered=st.sampled_from((1, 2)), breaker=st.booleans(), load=st.integers(0, 3))
def test_every_take_over_the_reclaimers_rules_plan_is_one_the_fold_applies(
        status: str, owner_incarnation: int, registered: int, breaker: bool, load: int):
    """Both claimers plan with `reclaim_rules.plan` (the reclaimer for any agent, a self-claiming agent with
    itself as the only candidate): whatever they take over from a1, the fold applies; from a live a1, nothing."""
    from consumers import reclaim_rules as rr

    held = session(lc.S_ASSIGNED, "a1", owner_incarnation, 5)
    agents = {"a1": agent_state("a1", registered, status), "a2": agent_state("a2", 3, lc.A_ALIVE)}
    pools = {"p": lc.PoolState(pool="p", breaker_open=breaker)}
    me = rr.Capacity(agent=decide.AgentRef("a2", "i", 3), load=load, capacity=4)
    plan = rr.plan([held], agents, {("p", "default", "default"): [me]}, pools)
    takeovers = [a for a in plan if isinstance(a, rr.ClaimFor)]
    replaceable = lc.owner_replaceable(held, agents["a1"]) is not None
    held_by_breaker = breaker and status == lc.A_DEAD and registered == owner_incarnation
    assert bool(takeovers) == (replaceable and not held_by_breaker)
    for c in takeovers:
        for producer in ("reclaimer", "a2"):
            event = decide.decide_claim(held, SID, c.agent, producer=ev.Producer(id=producer, instance="i"),
                                        reason=c.reason, previous_token=c.previous_token, owner=agents["a1"])
            rec = codec.Recorded("LEDGER", WRITE_SEQ, codec.subject_of(event), WRITE_SEQ, event)
            assert lc.session_event_problem(held, rec, lambda a, seq: agents[a].incarnation,
                                            lambda a, seq: agents.get(a)) is None


@given(items=histories())
def test_one_sessions_history_folded_with_its_agents_histories_agrees_with_the_whole_log(items: list):
    """`Writer.session` folds one session's history with `lc.SessionFold`, reading an agent's registrations or
    history only when the fold asks: the same state and the same flagged events (and kinds) as the whole-log fold,
    whose agent states are current as of each event - and it asks nothing twice, reads the history only of agents
    that owned the session or were refused it on their state (claimers of applied claims, of final_claimer ones),
    and the registrations only of agents named by events their producer may write."""
    whole = LedgerState()
    flagged: dict[str, set[tuple[int, str]]] = {}
    for change in whole.apply_all(items):
        if change.kind == "session" and change.anomaly is not None:
            flagged.setdefault(change.id, set()).add((change.anomaly.seq, change.anomaly.kind))
    ledger = [r for r in items if isinstance(r, codec.Recorded) and r.stream == "LEDGER"]
    for sid in {r.event.entity_id for r in ledger if r.event.family == "session"}:
        records = [r for r in ledger if r.event.family == "session" and r.event.entity_id == sid]
        folded = lc.SessionFold(records)
        asked: list[tuple[str, str]] = []
        while (need := folded.advance()) is not None:
            asked.append(need)
            what, agent = need
            history = [r for r in ledger if r.event.family == "agent" and r.event.entity_id == agent]
            folded.learn(what, agent, history if what == lc.HISTORY
                         else [r for r in history if isinstance(r.event, ev.AgentRegistered)])
        assert folded.state == whole.sessions.get(sid)
        assert {(seq, a.kind) for seq, a in folded.anomalies} == flagged.get(sid, set())
        assert len(asked) == len(set(asked))
        refused = {seq for seq, a in folded.anomalies if a.kind != lc.FINAL_CLAIMER}  # final: refused on a read
        owners = {r.event.agent_id for r in records if isinstance(r.event, ev.SessionClaimed) and r.seq not in refused}
        assert {a for what, a in asked if what == lc.HISTORY} <= owners
        named = {getattr(r.event, "agent_id", None) for r in records if lc.writer_problem(r.event) is None}
        assert {a for what, a in asked if what == lc.REGISTRATIONS} <= named


def test_the_checker_counts_a_take_over_of_a_live_owner_as_flagged_and_keeps_the_session_with_it():
    """The independent checker agrees: not a violation (every fold flags it), not applied (the owner keeps the
    session, so its writes stay clean and the would-be owner's are stale). Failed before: the checker applied it."""
    from ledger import check as ck

    stored: list[ck.RawMessage] = []

    def add(event: ev.Event) -> int:
        out = codec.encode(event)
        seq = len(stored) + 1
        stored.append(ck.RawMessage("LEDGER", seq, out.subject, 1_700_000_000_000_000_000 + seq * 10**8,
                                    out.payload))
        return seq

    def me(agent: str) -> ev.Producer:
        return ev.Producer(id=agent, instance="i")

    a1 = add(ev.AgentRegistered(producer=me("a1"), agent_id="a1", instance_id="i", pool="p", ttl=3600))
    a2 = add(ev.AgentRegistered(producer=me("a2"), agent_id="a2", instance_id="i", pool="p", ttl=3600))
    add(ev.SessionCreated(producer=me("cli"), session_id=SID, pool="p"))
    token = add(ev.SessionClaimed(producer=me("a1"), session_id=SID, agent_id="a1", instance_id="i", incarnation=a1))
    taken = add(ev.SessionClaimed(producer=me("a2"), session_id=SID, agent_id="a2", instance_id="i", incarnation=a2,
                                  previous_token=token, reason="failover"))
    add(ev.SessionResourceReported(producer=me("a1"), session_id=SID, agent_id="a1", incarnation=a1, token=token,
                                   platform_resource_id="pod"))
    report = ck.check(stored)
    assert report.clean, report.violations
    assert report.flagged == {ck.LIVE_OWNER: 1}
    stale = add(ev.SessionReleased(producer=me("a2"), session_id=SID, agent_id="a2", incarnation=a2, token=taken))
    assert [(v.kind, v.seq) for v in ck.check(stored).violations] == [(ck.STALE_TOKEN, stale)]
    stored.pop()
    # A drain hand-off: a1 draining may be replaced, and the take-over applies.
    add(ev.AgentDraining(producer=me("a1"), agent_id="a1", incarnation=a1, deadline=T0))
    handed = add(ev.SessionClaimed(producer=me("a2"), session_id=SID, agent_id="a2", instance_id="i",
                                   incarnation=a2, previous_token=token, reason="drain"))
    add(ev.SessionReleased(producer=me("a2"), session_id=SID, agent_id="a2", incarnation=a2, token=handed))
    report = ck.check(stored)
    assert report.clean, report.violations
    assert report.flagged == {ck.LIVE_OWNER: 1}


async def test_an_agents_watch_keeps_a_session_a_live_agent_claims_by_naming_its_token(ledger, uid: str):
    """a2 writes a self-claim of a1's session naming its token: a1 keeps running it, a2 never runs it, and the SDK
    refuses to write such a take-over at all. Failed before: a1 lost the session, a2 gained it."""
    from helpers import eventually

    from ledger.agent import Agent
    from ledger.writer import Writer

    lost: list[str] = []

    def agent_of(agent_id: str, **kw: object) -> Agent:
        return Agent(Writer(ledger.store, ev.Producer(id=agent_id, instance=agent_id)), agent_id=agent_id,
                     pool="p", heartbeat=0.1, ttl=5.0, **kw)  # type: ignore[arg-type]

    sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
    async with agent_of(f"{uid}-a1", on_lost=lambda s, why: lost.append(s)) as a1, agent_of(f"{uid}-a2") as a2:
        held = await a1.claim(sid)
        with pytest.raises(NotClaimable, match="alive"):
            await a2.claim(sid, reason="failover", previous_token=held.token)
        forged = await ledger.store.append(ev.SessionClaimed(
            producer=a2.producer, session_id=sid, agent_id=a2.agent_id, instance_id=a2.instance_id,
            incarnation=a2.incarnation, reason="failover", previous_owner=a1.agent_id, previous_token=held.token))
        # Both watches have judged the forged claim (a watch judges each session's events in order).
        await eventually(lambda: a1.judged_through(sid) >= forged and a2.judged_through(sid) >= forged,
                         what="both watches past the take-over")
        state, _ = await ledger.session(sid)
        assert state is not None and (state.owner, state.token) == (a1.agent_id, held.token)
        assert a1.owned.get(sid) == held and not lost, f"a1 lost {sid} on #{forged}"
        assert sid not in a2.owned
        # Once a1 drains, the hand-off is a take-over the log allows: it moves, and a1 notices.
        await a1.drain()
        claim = await a2.claim(sid, reason="drain", previous_token=held.token)
        await eventually(lambda: lost == [sid] and sid in a2.owned, what="the hand-off")
        state, _ = await ledger.session(sid)
        assert state is not None and (state.owner, state.token) == (a2.agent_id, claim.token)


def test_claims_for_made_up_agents_add_no_agent_history_to_read():
    """Reading a session reads a claimer's registrations only where its claim may apply, and a history only of the
    owner a take-over would replace: 50 claims for agents never registered after a1's (cheap to forge, each
    flagged overlapping) cost no read, and a2's take-over of live a1 reads a1's history, nothing of a2's."""
    def registered(agent_id: str, seq: int) -> codec.Recorded:
        event = ev.AgentRegistered(producer=ev.Producer(id=agent_id, instance="i"), agent_id=agent_id,
                                   instance_id="i", pool="p")
        return codec.Recorded("LEDGER", seq, codec.subject_of(event), seq, event)

    agents = {"a1": [registered("a1", 1)], "a2": [registered("a2", 60)]}
    created = ev.SessionCreated(producer=ev.Producer(id="cli", instance="c"), session_id=SID, pool="p")
    records = [codec.Recorded("LEDGER", 2, codec.subject_of(created), 2, created), claim_rec("a1", 1, None, seq=3),
               *(claim_rec(f"ghost{i}", 1, None, seq=4 + i) for i in range(50)), claim_rec("a2", 60, 3, seq=70)]
    folded = lc.SessionFold(records)
    asked = []
    while (need := folded.advance()) is not None:
        asked.append(need)
        folded.learn(*need, agents.get(need[1], []))
    assert asked == [(lc.REGISTRATIONS, "a1"), (lc.HISTORY, "a1")]
    assert folded.state is not None and (folded.state.owner, folded.state.token) == ("a1", 3)
    assert [a.kind for _, a in folded.anomalies] == [lc.OVERLAPPING_CLAIM] * 50 + [lc.LIVE_OWNER]


def test_a_refused_write_under_the_current_token_by_a_newer_incarnation_says_so() -> None:
    """A fenced agent that re-registered still holds its predecessor's token: the refusal names the incarnations,
    not "token 6 is stale; the current claim is 6" (what a CI run once printed)."""
    state = session(lc.S_ASSIGNED, "a1", 1, 6)
    with pytest.raises(StaleToken) as refused:
        decide.check_owner(state, SID, decide.AgentRef("a1", "i", 2), 6)
    assert str(refused.value) == ("session s1: token 6 is stale; write by a1 incarnation 2 under token 6, which "
                                  "incarnation 1 holds")
    with pytest.raises(StaleToken) as other:  # an old token keeps the plain wording
        decide.check_owner(state, SID, decide.AgentRef("a1", "i", 1), 5)
    assert str(other.value) == "session s1: token 5 is stale; the current claim is 6 (owner a1)"
