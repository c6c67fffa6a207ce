"""The liveness monitor's and the reclaimer's rules (pure: no server)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
from hypothesis import example, given, settings
from hypothesis import strategies as st

from consumers import liveness_rules as lr
from consumers import reclaim_rules as rr
from ledger import codec
from ledger import lifecycle as lc
from ledger.decide import AgentRef
from projections.beats import Beat
from projections.health import HealthPolicy

T0 = datetime(2026, 11, 1, tzinfo=UTC)
SETTINGS = lr.LivenessSettings()


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def agent(agent_id: str = "a1", *, status: str = lc.A_ALIVE, pool: str = "p", incarnation: int = 10,
          **more: object) -> lc.AgentState:
    base = dict(agent_id=agent_id, incarnation=incarnation, instance_id="i", pool=pool, platform="default",
                region="default", labels={}, capacity=4, heartbeat_interval=5.0, ttl=30.0, registered_at=at(0),
                status=status, reason="registered", status_since=at(0), status_seq=incarnation,
                cause_id=f"evt-{agent_id}-{status}")
    return lc.AgentState(**{**base, **more})  # type: ignore[arg-type]


def test_a_beating_agent_is_fine():
    assert lr.judge(agent(), lr.LastBeat(40, at(95)), [], at(100), SETTINGS) is None


def test_missed_beats_make_an_agent_suspect_then_dead():
    beat = lr.LastBeat(40, at(100))
    assert lr.judge(agent(), beat, [], at(114), SETTINGS) is None
    suspect = lr.judge(agent(), beat, [], at(116), SETTINGS)
    assert (suspect.kind, suspect.reason, suspect.event_id) == (lr.SUSPECT, lr.MISSED_HEARTBEATS, "suspect-a1-10-b40")
    assert suspect.evidence.last_heartbeat_seq == 40 and suspect.evidence.heartbeat_interval == 5.0
    # Once suspected (after that beat), no new suspicion; death after ttl.
    suspected = agent(suspected_at=at(116), suspect_reason=lr.MISSED_HEARTBEATS)
    assert lr.judge(suspected, beat, [], at(125), SETTINGS) is None
    dead = lr.judge(suspected, beat, [], at(131), SETTINGS)
    assert (dead.kind, dead.event_id) == (lr.DEAD, "dead-a1-10")
    assert dead.evidence.dead_after == 30.0 and dead.evidence.last_heartbeat_at == at(100)
    assert "31.0s since a beat" in dead.evidence.detail


def test_an_agent_that_never_beat_is_timed_from_its_registration():
    dead = lr.judge(agent(), None, [], at(31), SETTINGS)
    assert dead.kind == lr.DEAD and "since registering" in dead.evidence.detail


def test_a_custom_dead_after_overrides_the_agents_ttl():
    settings = lr.LivenessSettings(policy=HealthPolicy(dead_after=50))
    assert lr.judge(agent(suspected_at=at(20)), lr.LastBeat(1, at(0)), [], at(45), settings) is None
    assert lr.judge(agent(), lr.LastBeat(1, at(0)), [], at(51), settings).kind == lr.DEAD


def test_failure_reports_make_an_agent_suspect_before_its_beats_lapse():
    beat = lr.LastBeat(40, at(99))
    two = [(50, at(70)), (51, at(95))]
    assert lr.judge(agent(), beat, two, at(100), SETTINGS) is None
    old_and_new = [(49, at(10)), *two]  # the first is outside the 60 s window
    assert lr.judge(agent(), beat, old_and_new, at(100), SETTINGS) is None
    three = [*two, (52, at(98))]
    verdict = lr.judge(agent(), beat, three, at(100), SETTINGS)
    assert (verdict.kind, verdict.reason, verdict.evidence.reports) == (lr.SUSPECT, lr.UNREACHABLE_REPORTS, 3)


def test_overdue_counts_missed_beats_whether_or_not_suspected():
    beat = lr.LastBeat(40, at(100))
    assert not lr.overdue(agent(), beat, at(114), SETTINGS)
    assert lr.overdue(agent(suspected_at=at(116)), beat, at(116), SETTINGS)
    assert not lr.overdue(agent(status=lc.A_DEAD), beat, at(200), SETTINGS)


def test_decided_agents_are_left_alone():
    for status in (lc.A_DEAD, lc.A_GONE, lc.A_DRAINED, lc.A_FENCED):
        assert lr.judge(agent(status=status), None, [], at(999), SETTINGS) is None
    assert lr.judge(agent(status=lc.A_DRAINING), None, [], at(999), SETTINGS).kind == lr.DEAD


def test_the_breaker_trips_when_most_of_a_pool_dies_together():
    pool = [agent("a1"), agent("a2"), agent("a3", status=lc.A_DEAD), agent("a4", status=lc.A_DEAD)]
    deaths = [("a3", at(90)), ("a4", at(95))]
    call = lr.breaker_before_death(pool, deaths, {"a2"}, at(100), SETTINGS)
    assert call.trip and call.dead == ("a2", "a3", "a4") and call.agents == 4
    assert "3 of 4 agents died" in call.reason
    # One death in four is business as usual; so are old deaths.
    assert not lr.breaker_before_death(pool, [("a3", at(10))], {"a2"}, at(100), SETTINGS).trip
    # Tiny pools never trip.
    assert not lr.breaker_before_death([agent("a1"), agent("a2")], [], {"a1"}, at(100), SETTINGS).trip
    # Agents overdue together trip it at the first death, before any session moves.
    everyone = [agent(f"a{i}") for i in range(1, 5)]
    first = lr.breaker_before_death(everyone, [], {"a1", "a2", "a3"}, at(100), SETTINGS)
    assert first.trip and first.dead == ("a1", "a2", "a3")


def test_the_breaker_resets_once_the_pool_recovered():
    tripped = lc.PoolState(pool="p", breaker_open=True, reason="x", trips=1, agents_at_trip=4)
    back = [agent("a1"), agent("a2"), agent("a5")]
    assert lr.breaker_recovered(tripped, back, [("a2", at(90))], at(100), SETTINGS) is None  # died recently
    assert lr.breaker_recovered(tripped, back[:1], [], at(200), SETTINGS) is None  # one alive, two needed
    assert "recovered: 3 agents alive" in lr.breaker_recovered(tripped, back, [("a2", at(90))], at(200), SETTINGS)


def session(sid: str, status: str = lc.S_ASSIGNED, owner: str | None = "a1", *, incarnation: int = 10,
            token: int | None = 5, pool: str = "p", seq: int = 1) -> lc.SessionState:
    return lc.SessionState(session_id=sid, pool=pool, platform="default", region="default", labels={},
                           idle_ttl=None, status=status, created_at=T0,
                           owner=owner if status == lc.S_ASSIGNED else None,
                           owner_incarnation=incarnation if status == lc.S_ASSIGNED else None,
                           token=token if status == lc.S_ASSIGNED else None, last_seq=seq, cause_id=f"c-{sid}")


def capacity(agent_id: str, load: int, cap: int = 4) -> rr.Capacity:
    return rr.Capacity(agent=AgentRef(agent_id, "i", 20), load=load, capacity=cap)


def eligible(*caps: rr.Capacity) -> dict[tuple[str, str, str], list[rr.Capacity]]:
    return {("p", "default", "default"): list(caps)}


def test_a_dead_owners_sessions_go_to_the_least_loaded_agents():
    agents = {"a1": agent("a1", status=lc.A_DEAD), "b": agent("b"), "c": agent("c")}
    sessions = [session(f"s{i}", seq=i) for i in range(3)]
    actions = rr.plan(sessions, agents, eligible(capacity("b", 2), capacity("c", 0)), {})
    assert [(a.session_id, a.agent.agent_id, a.reason, a.previous_token) for a in actions] == [
        ("s0", "c", "failover", 5), ("s1", "c", "failover", 5), ("s2", "b", "failover", 5)]
    assert all(a.cause_id == "evt-a1-dead" and a.why == rr.OWNER_DEAD for a in actions)


def test_without_an_eligible_agent_lost_sessions_are_orphaned_and_waiting_ones_wait():
    agents = {"a1": agent("a1", status=lc.A_GONE)}
    sessions = [session("s1"), session("s2", lc.S_PENDING), session("s3", lc.S_ORPHANED)]
    actions = rr.plan(sessions, agents, {}, {})
    assert actions == [rr.Orphan(session_id="s1", reason=rr.OWNER_GONE, previous_token=5, previous_owner="a1",
                                 cause_id="evt-a1-gone")]
    full = eligible(capacity("b", 4))
    assert [type(a) for a in rr.plan(sessions, agents, full, {})] == [rr.Orphan]


def test_orphaned_and_pending_sessions_are_claimed_when_an_agent_appears():
    sessions = [session("new", lc.S_PENDING, seq=9), session("lost", lc.S_ORPHANED, seq=20)]
    actions = rr.plan(sessions, {}, eligible(capacity("b", 0, cap=1), capacity("c", 0, cap=1)), {})
    assert [(a.session_id, a.reason, a.previous_token) for a in actions] == [
        ("lost", "failover", None), ("new", "initial", None)]


def test_superseded_unknown_and_fenced_owners_lose_their_sessions():
    agents = {"a1": agent("a1", incarnation=99), "f": agent("f", status=lc.A_FENCED)}
    sessions = [session("s1"), session("s2", owner="ghost"), session("s3", owner="f")]
    actions = rr.plan(sessions, agents, eligible(capacity("b", 0)), {})
    assert [a.why for a in actions] == [rr.OWNER_SUPERSEDED, rr.OWNER_UNKNOWN, rr.OWNER_FENCED]


def test_draining_agents_hand_off_only_to_an_eligible_agent():
    agents = {"a1": agent("a1", status=lc.A_DRAINING)}
    assert rr.plan([session("s1")], agents, {}, {}) == []
    [handoff] = rr.plan([session("s1")], agents, eligible(capacity("b", 0)), {})
    assert (handoff.reason, handoff.previous_token, handoff.why) == ("drain", 5, rr.OWNER_DRAINING)


def test_an_open_breaker_holds_dead_owners_sessions_but_not_goodbyes():
    agents = {"a1": agent("a1", status=lc.A_DEAD), "a2": agent("a2", status=lc.A_GONE)}
    pools = {"p": lc.PoolState(pool="p", breaker_open=True, reason="3 of 4 died")}
    actions = rr.plan([session("s1"), session("s2", owner="a2")], agents, eligible(capacity("b", 0)), pools)
    assert isinstance(actions[0], rr.Hold) and "breaker open" in actions[0].why
    assert isinstance(actions[1], rr.ClaimFor) and actions[1].why == rr.OWNER_GONE


def test_healthy_owners_keep_their_sessions_and_skipped_ones_are_left_alone():
    agents = {"a1": agent("a1"), "a2": agent("a2", status=lc.A_DEAD)}
    assert rr.plan([session("s1")], agents, eligible(capacity("b", 0)), {}) == []
    assert rr.plan([session("s2", owner="a2")], agents, eligible(capacity("b", 0)), {}, skip={"s2"}) == []


def test_sessions_only_go_to_their_own_pool_platform_and_region():
    agents = {"a1": agent("a1", status=lc.A_DEAD)}
    other = {("q", "default", "default"): [capacity("b", 0)]}
    [orphan] = rr.plan([session("s1")], agents, other, {})
    assert isinstance(orphan, rr.Orphan)
    assert msgspec.structs.asdict(orphan)["previous_owner"] == "a1"


def test_one_eligibility_rule_refuses_every_agent_that_must_not_take_sessions():
    def beat_at(seconds: float, incarnation: int = 10) -> Beat:
        return Beat(agent_id="a1", incarnation=incarnation, instance_id="i", seq=1, beat=1, sent_at=at(seconds),
                    stored_ns=codec.to_ns(at(seconds)), load=0, capacity=4, sessions=0)

    fresh = beat_at(99)
    assert rr.ineligible(agent(), fresh, at(100)) is None
    assert rr.ineligible(agent(), fresh, at(100), incarnation=10) is None
    refused = {
        "unregistered": rr.ineligible(None, fresh, at(100)),
        "superseded": rr.ineligible(agent(), fresh, at(100), incarnation=9),
        "gone": rr.ineligible(agent(status=lc.A_GONE), fresh, at(100)),
        "dead": rr.ineligible(agent(status=lc.A_DEAD), fresh, at(100)),
        "fenced": rr.ineligible(agent(status=lc.A_FENCED), fresh, at(100)),
        "draining": rr.ineligible(agent(status=lc.A_DRAINING), fresh, at(100)),
        "suspected": rr.ineligible(agent(suspected_at=at(99.5), suspect_reason="reports"), fresh, at(100)),
        "silent": rr.ineligible(agent(), beat_at(80), at(100)),
        "another incarnation's beat": rr.ineligible(agent(), beat_at(99, incarnation=3), at(100)),
    }
    assert all(refused.values()), refused
    assert "suspect" in refused["suspected"] and "gone" in refused["gone"]


@settings(max_examples=300, deadline=None)
@given(status=st.sampled_from([lc.A_ALIVE, lc.A_DRAINING, lc.A_DRAINED, lc.A_DEAD, lc.A_GONE, lc.A_FENCED]),
       suspected=st.one_of(st.none(), st.floats(0, 200)), beat_age=st.one_of(st.none(), st.floats(0, 100)),
       asking=st.sampled_from([None, 9, 10, 11]))
@example(status=lc.A_ALIVE, suspected=None, beat_age=1.0, asking=10)  # eligible: checked
def test_an_agent_the_claimers_may_give_a_session_is_never_one_the_reclaimer_takes_it_from(
        status: str, suspected: float | None, beat_age: float | None, asking: int | None):
    """No pair of claimers and reclaimer can feed each other a claim -> orphan loop: whoever the one rule lets
    take a session, for the incarnation it claims for, owns it without problem in the reclaimer's eyes."""
    now = at(200)
    a = agent(status=status, suspected_at=at(suspected) if suspected is not None else None)
    beat = None if beat_age is None else Beat(agent_id="a1", incarnation=10, instance_id="i", seq=1, beat=1,
                                              sent_at=at(200 - beat_age), stored_ns=codec.to_ns(at(200 - beat_age)),
                                              load=0, capacity=4, sessions=0)
    if rr.ineligible(a, beat, now, incarnation=asking) is not None:
        return
    claimed_for = asking if asking is not None else a.incarnation
    session = lc.SessionState(session_id="s1", pool="p", platform="default", region="default", labels={},
                              idle_ttl=None, status=lc.S_ASSIGNED, created_at=at(0), owner="a1",
                              owner_incarnation=claimed_for, token=5)
    assert rr.owner_problem(session, {"a1": a}) is None
    assert rr.plan([session], {"a1": a}, {}, {}) == []
