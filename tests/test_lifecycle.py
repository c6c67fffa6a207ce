"""The per-entity folds and lifecycle rules (pure: no server)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from ledger import codec
from ledger import events as ev
from ledger import lifecycle as lc

T0 = datetime(2026, 11, 1, tzinfo=UTC)
A1 = ev.Producer(id="a1", instance="i1")
A2 = ev.Producer(id="a2", instance="i2")
CLI = ev.Producer(id="cli", instance="c")
MONITOR = ev.Producer(id="monitor", instance="m")
RECLAIMER = ev.Producer(id="reclaimer", instance="r")


class Log:
    """Stores events with increasing sequences, as the stream would."""

    def __init__(self) -> None:
        self._seq = itertools.count(1)

    def __call__(self, event: ev.Event) -> codec.Recorded:
        seq = next(self._seq)
        return codec.Recorded("LEDGER", seq, codec.subject_of(event), seq, event)


def at(n: int) -> datetime:
    return T0 + timedelta(seconds=n)


@pytest.fixture
def log() -> Log:
    return Log()


def registered(agent: str = "a1", instance: str = "i1") -> ev.AgentRegistered:
    return ev.AgentRegistered(producer=ev.Producer(id=agent, instance=instance), agent_id=agent,
                              instance_id=instance, pool="p", time=at(0))


def test_registration_starts_an_incarnation_and_supersedes_the_old(log: Log):
    first, _ = lc.evolve_agent(None, log(registered()))
    assert (first.status, first.incarnation, first.reason) == (lc.A_ALIVE, 1, "registered")
    second, anomaly = lc.evolve_agent(first, log(registered(instance="i2")))
    assert anomaly is None and second.incarnation == 2 and second.instance_id == "i2"
    late_goodbye = ev.AgentGoodbye(producer=A1, agent_id="a1", instance_id="i1", incarnation=1)
    after, anomaly = lc.evolve_agent(second, log(late_goodbye))
    assert after is second
    assert anomaly.kind == lc.SUPERSEDED_INCARNATION


def test_agent_lifecycle(log: Log):
    state, _ = lc.evolve_agent(None, log(registered()))
    inc = state.incarnation
    suspicion = log(ev.AgentSuspected(producer=MONITOR, agent_id="a1", incarnation=inc, reason="missed_heartbeats",
                                      time=at(20)))
    state, a = lc.evolve_agent(state, suspicion)
    assert a is None and state.status == lc.A_ALIVE and state.suspected_at == suspicion.stored_at  # not its own time
    state, a = lc.evolve_agent(state, log(ev.AgentDraining(producer=A1, agent_id="a1", incarnation=inc,
                                                           deadline=at(3600), reason="upgrade")))
    assert a is None and state.status == lc.A_DRAINING and state.drain_deadline == at(3600)
    state, a = lc.evolve_agent(state, log(ev.AgentDrained(producer=A1, agent_id="a1", incarnation=inc)))
    assert a is None and state.status == lc.A_DRAINED
    state, a = lc.evolve_agent(state, log(ev.AgentGoodbye(producer=A1, agent_id="a1", instance_id="i1",
                                                          incarnation=inc)))
    assert a is None and (state.status, state.reason) == (lc.A_GONE, "goodbye: shutdown")
    again, a = lc.evolve_agent(state, log(ev.AgentGoodbye(producer=A1, agent_id="a1", instance_id="i1",
                                                          incarnation=inc)))
    assert again is state and a.kind == lc.ILLEGAL_TRANSITION


def test_drained_needs_draining_and_dead_stays_dead(log: Log):
    state, _ = lc.evolve_agent(None, log(registered()))
    same, a = lc.evolve_agent(state, log(ev.AgentDrained(producer=A1, agent_id="a1", incarnation=1)))
    assert same is state and a.kind == lc.ILLEGAL_TRANSITION and "while agent is alive" in a.detail
    dead, a = lc.evolve_agent(state, log(ev.AgentDeclaredDead(producer=MONITOR, agent_id="a1", incarnation=1,
                                                              reason="missed_heartbeats")))
    assert a is None and dead.status == lc.A_DEAD
    _, a = lc.evolve_agent(dead, log(ev.AgentDraining(producer=A1, agent_id="a1", incarnation=1, deadline=at(9))))
    assert a.kind == lc.ILLEGAL_TRANSITION


def test_events_for_unknown_agents_or_future_incarnations_are_flagged(log: Log):
    _, a = lc.evolve_agent(None, log(ev.AgentDrained(producer=A1, agent_id="a1", incarnation=1)))
    assert a.kind == lc.UNKNOWN_ENTITY
    state, _ = lc.evolve_agent(None, log(registered()))
    _, a = lc.evolve_agent(state, log(ev.AgentDrained(producer=A1, agent_id="a1", incarnation=99)))
    assert a.kind == lc.UNKNOWN_INCARNATION


def created(sid: str = "s1") -> ev.SessionCreated:
    return ev.SessionCreated(producer=CLI, session_id=sid, pool="p")


def claim(agent: str, prev: int | None = None, reason: str = "initial") -> ev.SessionClaimed:
    return ev.SessionClaimed(producer=RECLAIMER, session_id="s1", agent_id=agent, instance_id="i", incarnation=1,
                             reason=reason, previous_token=prev)


def test_session_claim_fencing(log: Log):
    s, _ = lc.evolve_session(None, log(created()))
    assert s.status == lc.S_PENDING
    claimed_rec = log(claim("a1"))
    s, a = lc.evolve_session(s, claimed_rec)
    assert a is None and (s.status, s.owner, s.token, s.claims) == (lc.S_ASSIGNED, "a1", claimed_rec.seq, 1)
    # A second claim that does not name the current token would make two owners: flagged, not applied.
    same, a = lc.evolve_session(s, log(claim("a2")))
    assert same is s and a.kind == lc.OVERLAPPING_CLAIM
    # A hand-off that names the current token is a legal takeover.
    takeover = log(claim("a2", prev=s.token, reason="drain"))
    s, a = lc.evolve_session(s, takeover)
    assert a is None and (s.owner, s.token, s.claim_reason, s.claims) == ("a2", takeover.seq, "drain", 2)
    # The old owner's writes under its old token are refused.
    stale = ev.SessionResourceReported(producer=A1, session_id="s1", agent_id="a1", incarnation=1,
                                       token=claimed_rec.seq, platform_resource_id="pod-1")
    same, a = lc.evolve_session(s, log(stale))
    assert same is s and a.kind == lc.STALE_TOKEN
    ok = ev.SessionResourceReported(producer=A2, session_id="s1", agent_id="a2", incarnation=1,
                                    token=takeover.seq, platform_resource_id="pod-2")
    s, a = lc.evolve_session(s, log(ok))
    assert a is None and s.platform_resource_id == "pod-2"
    # Right token, wrong agent: refused too.
    forged = ev.SessionReleased(producer=A1, session_id="s1", agent_id="a1", incarnation=1, token=takeover.seq)
    _, a = lc.evolve_session(s, log(forged))
    assert a.kind == lc.STALE_TOKEN and "belongs to a2" in a.detail


def test_session_orphan_release_terminate(log: Log):
    s, _ = lc.evolve_session(None, log(created()))
    s, _ = lc.evolve_session(s, log(claim("a1")))
    token = s.token
    _, a = lc.evolve_session(s, log(ev.SessionOrphaned(producer=RECLAIMER, session_id="s1", reason="owner_dead",
                                                       previous_token=token - 1)))
    assert a.kind == lc.STALE_TOKEN
    s, a = lc.evolve_session(s, log(ev.SessionOrphaned(producer=RECLAIMER, session_id="s1", reason="owner_dead",
                                                       previous_owner="a1", previous_token=token)))
    assert a is None and (s.status, s.owner, s.reason) == (lc.S_ORPHANED, None, "owner_dead")
    _, a = lc.evolve_session(s, log(ev.SessionOrphaned(producer=RECLAIMER, session_id="s1", reason="again")))
    assert a.kind == lc.ILLEGAL_TRANSITION
    s, _ = lc.evolve_session(s, log(claim("a2", reason="failover")))
    s, a = lc.evolve_session(s, log(ev.SessionReleased(producer=A2, session_id="s1", agent_id="a2",
                                                       incarnation=1, token=s.token, reason="idle")))
    assert a is None and (s.status, s.reason, s.owner) == (lc.S_RELEASED, "idle", None)
    s, a = lc.evolve_session(s, log(ev.SessionTerminated(producer=CLI, session_id="s1")))
    assert a is None and s.status == lc.S_TERMINATED
    _, a = lc.evolve_session(s, log(claim("a3")))
    assert a.kind == lc.AFTER_FINAL


def test_terminate_with_a_stale_token_is_refused(log: Log):
    s, _ = lc.evolve_session(None, log(created()))
    s, _ = lc.evolve_session(s, log(claim("a1")))
    _, a = lc.evolve_session(s, log(ev.SessionTerminated(producer=CLI, session_id="s1", token=s.token + 100)))
    assert a.kind == lc.STALE_TOKEN


def test_duplicate_create_and_unknown_session(log: Log):
    s, _ = lc.evolve_session(None, log(created()))
    _, a = lc.evolve_session(s, log(created()))
    assert a.kind == lc.DUPLICATE
    _, a = lc.evolve_session(None, log(claim("a1")))
    assert a.kind == lc.UNKNOWN_ENTITY


def transition(frm: str, to: str, **kw: object) -> ev.RouteTransitioned:
    return ev.RouteTransitioned(producer=CLI, route_id="r1", from_state=frm, to_state=to, **kw)  # type: ignore[arg-type]


def test_route_happy_path_and_status(log: Log):
    r, _ = lc.evolve_route(None, log(ev.RouteCreated(producer=CLI, route_id="r1", session_id="s1", endpoint="e")))
    assert lc.route_status(r.state) == ("PROVISIONING", "PENDING")
    for frm, to in [(lc.PENDING, lc.STARTING), (lc.STARTING, lc.WARMING_UP), (lc.WARMING_UP, lc.RUNNING)]:
        r, a = lc.evolve_route(r, log(transition(frm, to, address="10.0.0.1:80" if to == lc.WARMING_UP else None)))
        assert a is None and r.state == to
    assert (r.traffic, r.address, lc.route_status(r.state)) == (lc.TRAFFIC_ACTIVE, "10.0.0.1:80", ("RUNNING", None))
    since = r.state_since
    r, a = lc.evolve_route(r, log(transition(lc.RUNNING, lc.RUNNING, traffic=lc.TRAFFIC_INACTIVE,
                                             reason="health stale")))
    assert a is None and r.traffic == lc.TRAFFIC_INACTIVE and r.state_since == since
    r, _ = lc.evolve_route(r, log(transition(lc.RUNNING, lc.TERMINATING)))
    r, _ = lc.evolve_route(r, log(transition(lc.TERMINATING, lc.TERMINATED)))
    _, a = lc.evolve_route(r, log(ev.RouteHealthReported(producer=CLI, route_id="r1", healthy=True, checked_at=T0)))
    assert a.kind == lc.AFTER_FINAL


def test_illegal_route_transitions_are_flagged_not_applied(log: Log):
    r, _ = lc.evolve_route(None, log(ev.RouteCreated(producer=CLI, route_id="r1", session_id="s1", endpoint="e")))
    same, a = lc.evolve_route(r, log(transition(lc.PENDING, lc.RUNNING)))
    assert same is r and a.kind == lc.ILLEGAL_TRANSITION and "PENDING -> RUNNING" in a.detail
    same, a = lc.evolve_route(r, log(transition(lc.STARTING, lc.WARMING_UP)))
    assert same is r and "but the route is PENDING" in a.detail


@pytest.mark.parametrize("frm, to, ok", [
    (lc.PENDING, lc.STARTING, True), (lc.STARTING, lc.FAILED_TO_START, True), (lc.WARMING_UP, lc.TERMINATING, True),
    (lc.TERMINATING, lc.TERMINATED, True), (lc.PENDING, lc.WARMING_UP, False), (lc.TERMINATED, lc.PENDING, False),
    (lc.FAILED_TO_START, lc.RUNNING, False), (lc.RUNNING, lc.WARMING_UP, False),
])
def test_route_transition_table(frm: str, to: str, ok: bool):
    error = lc.route_transition_error(frm, to)
    assert (error is None) == ok
    if not ok:
        assert frm in error and to in error


def test_unknown_route_state_is_named():
    assert "unknown route state 'FLYING'" in lc.route_transition_error(lc.PENDING, "FLYING")


def test_writes_by_a_superseded_incarnation_are_flagged(log: Log):
    reg1, reg2 = log(registered()), log(registered(instance="i2"))
    lookup = lc.registrations_lookup({"a1": [reg1.seq, reg2.seq]})
    s, _ = lc.evolve_session(None, log(created()), lookup)
    zombie = ev.SessionClaimed(producer=A1, session_id="s1", agent_id="a1", instance_id="i1",
                               incarnation=reg1.seq)
    same, a = lc.evolve_session(s, log(zombie), lookup)
    assert same is s and a.kind == lc.SUPERSEDED_INCARNATION
    current = ev.SessionClaimed(producer=A1, session_id="s1", agent_id="a1", instance_id="i2",
                                incarnation=reg2.seq)
    s, a = lc.evolve_session(s, log(current), lookup)
    assert a is None and s.owner_incarnation == reg2.seq
    _, a = lc.evolve_session(s, log(claim("never-registered", prev=s.token)), lookup)
    assert a.kind == lc.UNKNOWN_ENTITY
    # As of a position before the second registration, the first incarnation was current.
    assert lookup("a1", reg2.seq) == reg1.seq and lookup("a1", reg1.seq) is None


def test_route_writes_under_a_stale_session_token_are_flagged(log: Log):
    history = [log(created()), log(claim("a1"))]
    first_token = history[-1].seq
    history.append(log(claim("a2", prev=first_token, reason="drain")))
    token_at = lc.claims_lookup("s1", history)
    r, _ = lc.evolve_route(None, log(ev.RouteCreated(producer=CLI, route_id="r1", session_id="s1", endpoint="e")),
                           token_at)
    same, a = lc.evolve_route(r, log(transition(lc.PENDING, lc.STARTING, token=first_token)), token_at)
    assert same is r and a.kind == lc.STALE_TOKEN
    r, a = lc.evolve_route(r, log(transition(lc.PENDING, lc.STARTING, token=history[-1].seq)), token_at)
    assert a is None and r.state == lc.STARTING
    # no token: not an owner write
    r, a = lc.evolve_route(r, log(transition(lc.STARTING, lc.FAILED_TO_START)), token_at)
    assert a is None


def test_an_agent_that_fenced_itself_is_fenced_until_it_registers_again(log: Log):
    state, _ = lc.evolve_agent(None, log(registered()))
    fenced, a = lc.evolve_agent(state, log(ev.AgentFenced(producer=A1, agent_id="a1", incarnation=1,
                                                          reason="lease expired", fenced_at=at(30))))
    assert a is None and (fenced.status, fenced.reason) == (lc.A_FENCED, "fenced itself: lease expired")
    _, a = lc.evolve_agent(fenced, log(ev.AgentDraining(producer=A1, agent_id="a1", incarnation=1, deadline=at(99))))
    assert a.kind == lc.ILLEGAL_TRANSITION
    back, a = lc.evolve_agent(fenced, log(registered(instance="i1")))
    assert a is None and back.status == lc.A_ALIVE and back.incarnation > fenced.incarnation


def test_pool_breaker_opens_once_and_closes_once(log: Log):
    trip = ev.PoolBreakerTripped(producer=MONITOR, pool="gpu", reason="3 of 4 died", dead=("a", "b", "c"), agents=4)
    pool, a = lc.evolve_pool(None, log(trip))
    assert a is None and pool.breaker_open and pool.trips == 1
    same, a = lc.evolve_pool(pool, log(trip))
    assert same is pool and a.kind == lc.ILLEGAL_TRANSITION
    closed, a = lc.evolve_pool(pool, log(ev.PoolBreakerReset(producer=CLI, pool="gpu", reason="operator")))
    assert a is None and not closed.breaker_open and closed.reason == "operator"
    _, a = lc.evolve_pool(None, log(ev.PoolBreakerReset(producer=CLI, pool="gpu", reason="operator")))
    assert a.kind == lc.ILLEGAL_TRANSITION
