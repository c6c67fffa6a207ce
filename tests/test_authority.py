"""Who may write what (issue 10, brief invariant 11): the producer token's role, the folds' flag, the SDK's refusal.

The pure part folds hand-made and generated events; the server part runs two real agents, the consumers and
the projector on a private nats-server, and forges a2's lifecycle through subjects ending in a1.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import msgspec
import pytest
from fleet import consumers, ledger_on
from helpers import eventually
from histories import histories
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from samples import all_samples

from ledger import authority, codec
from ledger import events as ev
from ledger import lifecycle as lc
from ledger.agent import Agent
from ledger.errors import InvalidInput, NotAuthorized
from ledger.subjects import HEARTBEAT_STREAM, LEDGER_STREAM
from ledger.writer import Writer
from ledgerctl.server import EmbeddedServer
from projections.projector import Projector
from projections.query import Query
from projections.settings import ProjectionSettings
from projections.state import LedgerState

A1 = ev.Producer(id="a1", instance="i1")
A2 = ev.Producer(id="a2", instance="i2")
CLI = ev.Producer(id="cli", instance="c")
MONITOR = ev.Producer(id="monitor", instance="m")
RECLAIMER = ev.Producer(id="reclaimer-east", instance="r")
WATCHDOG = ev.Producer(id="watchdog", instance="w")


class Log:
    """Stores events with increasing sequences in their stream, as the server would."""

    def __init__(self) -> None:
        self._seq = {LEDGER_STREAM: itertools.count(1), HEARTBEAT_STREAM: itertools.count(1)}

    def __call__(self, event: ev.Event) -> codec.Recorded:
        stream = HEARTBEAT_STREAM if type(event).family == "hb" else LEDGER_STREAM
        seq = next(self._seq[stream])
        return codec.Recorded(stream, seq, codec.subject_of(event), seq * 1_000_000_000, event)


def fleet(log: Log) -> LedgerState:
    """a1 and a2 registered; s1 created and claimed by a2 (for itself); a route r1 of s1."""
    state = LedgerState()
    for p in (A1, A2):
        state.apply(log(ev.AgentRegistered(producer=p, agent_id=p.id, instance_id=p.instance, pool="p")))
    state.apply(log(ev.SessionCreated(producer=CLI, session_id="s1", pool="p")))
    state.apply(log(ev.SessionClaimed(producer=A2, session_id="s1", agent_id="a2", instance_id="i2",
                                      incarnation=state.agents["a2"].incarnation)))
    state.apply(log(ev.RouteCreated(producer=A2, route_id="r1", session_id="s1", endpoint="e")))
    assert state.ledger.anomalies == 0 and state.sessions["s1"].owner == "a2" and "r1" in state.routes
    return state


# --- roles -------------------------------------------------------------------------------------------------

tokens = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,20}", fullmatch=True)
agent_ids = tokens.filter(lambda t: not any(t == p or t.startswith(p + "-")
                                            for p in (*authority.SERVICE_ROLES, *authority.OPERATOR_ALIASES)))


@given(role=st.sampled_from(authority.SERVICE_ROLES), replica=tokens)
def test_a_role_name_followed_by_a_replica_name_is_that_role(role: str, replica: str):
    assert authority.role_of(role) == role
    assert authority.role_of(f"{role}-{replica}") == role
    assert authority.reserved_agent_id_problem(f"{role}-{replica}") is not None


@given(alias=st.sampled_from(authority.OPERATOR_ALIASES), replica=tokens)
def test_the_cli_and_the_demo_are_operators(alias: str, replica: str):
    assert authority.role_of(alias) == authority.role_of(f"{alias}-{replica}") == authority.OPERATOR


@given(agent_id=agent_ids)
def test_every_other_token_is_an_agent_and_never_a_role(agent_id: str):
    assert authority.role_of(agent_id) == authority.AGENT
    assert authority.reserved_agent_id_problem(agent_id) is None


def test_every_event_type_has_writers_and_every_writer_is_a_role_self_or_owner():
    assert set(authority.WRITERS) == {cls.type_tag() for cls in ev.EVENT_TYPES}
    for writers in authority.WRITERS.values():
        assert writers and writers <= {*authority.ROLES, authority.SELF, authority.OWNER}


# --- the rule, for one event -------------------------------------------------------------------------------

PRODUCERS = st.sampled_from(("a1", "a2", "agent-1", "monitor", "monitor-b", "reclaimer", "reclaimer-x", "watchdog",
                             "operator", "operator-ann", "cli", "demo"))


@given(sample=st.sampled_from(all_samples()), producer=PRODUCERS, owner=st.sampled_from((None, "a1", "agent-1")))
def test_writer_problem_lets_through_exactly_what_the_table_says(sample: ev.Event, producer: str, owner: str | None):
    event = msgspec.structs.replace(sample, producer=ev.Producer(id=producer, instance="x"))
    writers = authority.WRITERS[event.type_tag()]
    role = authority.role_of(producer)
    subject = getattr(event, "agent_id", None)
    allowed = (role in writers
               or (role == authority.AGENT and authority.SELF in writers and producer == subject)
               or (role == authority.AGENT and authority.OWNER in writers and producer == owner))
    problem = lc.writer_problem(event, owner)
    assert (problem is None) == allowed
    if problem is not None:
        assert problem.kind == lc.UNAUTHORIZED_PRODUCER and producer in problem.detail
        assert not authority.role_may_write(role, event.type_tag()) or role == authority.AGENT


def test_an_owner_write_whose_owner_the_caller_cannot_tell_is_left_to_the_fold_that_can():
    route = ev.RouteTransitioned(producer=A1, route_id="r1", from_state="PENDING", to_state="STARTING")
    assert lc.writer_problem(route) is None  # one history only: a1 may own the session
    assert lc.writer_problem(route, "a2").kind == lc.UNAUTHORIZED_PRODUCER
    assert lc.writer_problem(route, None).kind == lc.UNAUTHORIZED_PRODUCER
    assert lc.writer_problem(msgspec.structs.replace(route, producer=MONITOR), lc.UNKNOWN_OWNER) is not None


# --- every fold flags it first -----------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda inc: ev.AgentGoodbye(producer=A1, agent_id="a2", instance_id="i2", incarnation=inc, reason="forged"),
    lambda inc: ev.AgentFenced(producer=A1, agent_id="a2", incarnation=inc, reason="forged", fenced_at=ev.utcnow()),
    lambda inc: ev.AgentDeclaredDead(producer=A1, agent_id="a2", incarnation=inc, reason="forged"),
    lambda inc: ev.AgentSuspected(producer=A1, agent_id="a2", incarnation=inc, reason="forged"),
    lambda inc: ev.AgentDraining(producer=A1, agent_id="a2", incarnation=inc, deadline=ev.utcnow()),
    lambda inc: ev.AgentRegistered(producer=A1, agent_id="a2", instance_id="i1", pool="p"),
    lambda inc: ev.AgentDeclaredDead(producer=RECLAIMER, agent_id="a2", incarnation=inc, reason="not mine to say"),
], ids=["goodbye", "fenced", "declared_dead", "suspected", "draining", "registered", "dead-by-reclaimer"])
def test_a_forged_lifecycle_event_for_a2_changes_nothing(make):  # type: ignore[no-untyped-def]
    log = Log()
    state = fleet(log)
    before = state.agents["a2"]
    change = state.apply(log(make(before.incarnation)))
    assert change.anomaly is not None and change.anomaly.kind == lc.UNAUTHORIZED_PRODUCER
    assert change.anomaly.producer in ("a1", "reclaimer-east") and change.anomaly.entity_id == "a2"
    assert state.agents["a2"] is before and state.sessions["s1"].owner == "a2"


def test_a_beat_for_a2_on_a_subject_ending_in_a1_does_not_keep_a2_alive():
    log = Log()
    state = fleet(log)
    inc = state.agents["a2"].incarnation
    change = state.apply(log(ev.AgentHeartbeat(producer=A1, agent_id="a2", instance_id="i2", incarnation=inc,
                                               beat=1)))
    assert change.anomaly is not None and change.anomaly.kind == lc.UNAUTHORIZED_PRODUCER
    assert state.current_beat("a2") is None and "a2" not in state.beats
    own = log(ev.AgentHeartbeat(producer=A2, agent_id="a2", instance_id="i2", incarnation=inc, beat=2))
    assert state.apply(own).applied and state.current_beat("a2").seq == own.seq


def test_session_writes_by_producers_that_may_not_write_them_are_flagged():
    log = Log()
    state = fleet(log)
    inc1, inc2, token = state.agents["a1"].incarnation, state.agents["a2"].incarnation, state.sessions["s1"].token
    forged = [
        ev.SessionCreated(producer=A1, session_id="s9", pool="p"),  # agents do not create sessions
        ev.SessionClaimed(producer=A1, session_id="s1", agent_id="a2", instance_id="i2", incarnation=inc2,
                          previous_token=token),  # a claim for another agent, not by the reclaimer
        ev.SessionClaimed(producer=MONITOR, session_id="s1", agent_id="a1", instance_id="i1", incarnation=inc1,
                          previous_token=token),
        ev.SessionReleased(producer=A1, session_id="s1", agent_id="a2", incarnation=inc2, token=token),
        ev.SessionResourceReported(producer=RECLAIMER, session_id="s1", agent_id="a2", incarnation=inc2,
                                   token=token, platform_resource_id="pod"),
        ev.SessionOrphaned(producer=MONITOR, session_id="s1", reason="owner_dead", previous_token=token),
        ev.SessionTerminated(producer=A1, session_id="s1", token=token),  # a1 does not own s1
        ev.RouteTransitioned(producer=A1, route_id="r1", from_state="PENDING", to_state="STARTING", token=token),
        ev.RouteHealthReported(producer=RECLAIMER, route_id="r1", healthy=False, checked_at=ev.utcnow()),
        ev.RouteCreated(producer=A1, route_id="r9", session_id="s1", endpoint="e"),
        ev.PoolBreakerTripped(producer=CLI, pool="p", reason="forged"),
        ev.PoolBreakerReset(producer=A1, pool="p", reason="forged"),
    ]
    sessions, routes, pools = dict(state.sessions), dict(state.routes), dict(state.ledger.pools)
    for event in forged:
        change = state.apply(log(event))
        assert change.anomaly is not None and change.anomaly.kind == lc.UNAUTHORIZED_PRODUCER, event.type_tag()
    assert (state.sessions, state.routes, state.ledger.pools) == (sessions, routes, pools)
    # The same writes by who may write them apply.
    allowed = [
        ev.RouteTransitioned(producer=A2, route_id="r1", from_state="PENDING", to_state="STARTING", token=token),
        ev.RouteTransitioned(producer=WATCHDOG, route_id="r1", from_state="STARTING", to_state="FAILED_TO_START"),
        ev.RouteHealthReported(producer=A2, route_id="r1", healthy=True, checked_at=ev.utcnow()),
        ev.SessionResourceReported(producer=A2, session_id="s1", agent_id="a2", incarnation=inc2, token=token,
                                   platform_resource_id="pod"),
        ev.SessionOrphaned(producer=RECLAIMER, session_id="s1", reason="owner_dead", previous_token=token),
        ev.SessionClaimed(producer=RECLAIMER, session_id="s1", agent_id="a1", instance_id="i1", incarnation=inc1),
        ev.SessionTerminated(producer=A1, session_id="s1", token=None),  # its owner now
        ev.PoolBreakerTripped(producer=MONITOR, pool="p", reason="mass death"),
        ev.PoolBreakerReset(producer=CLI, pool="p", reason="operator"),
    ]
    for event in allowed:
        change = state.apply(log(event))
        assert change.applied, (event.type_tag(), change.anomaly)
    assert state.sessions["s1"].status == lc.S_TERMINATED


def test_a_route_write_is_judged_on_who_owned_the_session_at_that_point_of_the_log():
    """The entity history and the SDK fold one route with claims_lookup: the owner as of each event."""
    log = Log()
    history = [log(ev.SessionCreated(producer=CLI, session_id="s1", pool="p")),
               log(ev.SessionClaimed(producer=A1, session_id="s1", agent_id="a1", instance_id="i1", incarnation=1))]
    created = log(ev.RouteCreated(producer=A1, route_id="r1", session_id="s1", endpoint="e"))
    history.append(log(ev.SessionClaimed(producer=RECLAIMER, session_id="s1", agent_id="a2", instance_id="i2",
                                         incarnation=1, previous_token=history[-1].seq, reason="failover")))
    late = log(ev.RouteTransitioned(producer=A1, route_id="r1", from_state="PENDING", to_state="STARTING"))
    session_at = lc.claims_lookup("s1", history)
    route, anomalies = lc.fold(lc.evolve_route, [created, late], session_at)
    assert route is not None and route.state == lc.PENDING  # created while a1 owned s1; moved after it lost it
    assert [(seq, a.kind) for seq, a in anomalies] == [(late.seq, lc.UNAUTHORIZED_PRODUCER)]


def test_the_claim_decision_refuses_what_the_fold_would_flag():
    from ledger.decide import AgentRef, decide_claim

    log = Log()
    state = fleet(log)
    pending = lc.SessionState(session_id="s9", pool="p", platform="default", region="default", labels={},
                              idle_ttl=None, status=lc.S_PENDING, created_at=ev.utcnow())
    a2 = AgentRef("a2", "i2", state.agents["a2"].incarnation)
    with pytest.raises(NotAuthorized, match="only the reclaimer or the agent itself"):
        decide_claim(pending, "s9", a2, producer=A1, reason="initial")
    for producer in (A2, RECLAIMER):
        claim = decide_claim(pending, "s9", a2, producer=producer, reason="initial")
        assert lc.writer_problem(claim) is None


# --- properties over generated histories -------------------------------------------------------------------


def _authorized(event: ev.Event, owner_before: str | None) -> bool:
    writers = authority.WRITERS[event.type_tag()]
    producer = event.producer.id
    role = authority.role_of(producer)
    if role in writers:
        return True
    if role != authority.AGENT:
        return False
    return ((authority.SELF in writers and producer == getattr(event, "agent_id", None))
            or (authority.OWNER in writers and producer == owner_before))


@hsettings(max_examples=150, deadline=None)
@given(items=histories())
def test_the_folds_never_apply_an_event_its_producer_may_not_write(items: list):  # type: ignore[type-arg]
    state = LedgerState()
    applied = unauthorized = 0
    for item in items:
        if not isinstance(item, codec.Recorded):
            state.apply(item)
            continue
        e = item.event
        session_id = getattr(e, "session_id", None) or (state.routes[e.route_id].session_id
                                                        if isinstance(e, ev.RouteEvent) and e.route_id in
                                                        state.routes else None)
        before = state.sessions.get(session_id) if session_id else None
        ok = _authorized(e, before.owner if before is not None else None)
        change = state.apply(item)
        if change is None:
            continue
        if change.applied:
            applied += 1
            assert ok, (e.type_tag(), e.producer.id)
        elif change.anomaly is not None and change.anomaly.kind == lc.UNAUTHORIZED_PRODUCER:
            unauthorized += 1
            assert not ok
        elif not ok:
            raise AssertionError(f"{e.type_tag()} by {e.producer.id} flagged for another reason first: "
                                 f"{change.anomaly}")
    # The generator's histories stay meaningful: most of what they hold is written by who may write it.
    assert unauthorized <= max(3, len(items) // 3)


# --- the SDK refuses at the edge ---------------------------------------------------------------------------


async def test_an_agent_id_may_not_create_or_terminate_sessions(store, uid: str):  # type: ignore[no-untyped-def]
    scheduler = Writer(store, ev.Producer(id="scheduler", instance="x"))
    with pytest.raises(NotAuthorized) as refused:
        await scheduler.create_session("p", session_id=f"{uid}-s1")
    message = str(refused.value)
    assert "\n" not in message and "operator" in message and "'cli'" in message and "scheduler" in message
    assert isinstance(refused.value, InvalidInput)
    operator = Writer(store, ev.Producer(id="operator-sched", instance="x"))
    sid, _ = await operator.create_session("p", session_id=f"{uid}-s1")
    with pytest.raises(NotAuthorized):
        await scheduler.terminate_session(sid)
    with pytest.raises(NotAuthorized):
        await scheduler.create_route(f"{uid}-r1", session_id=sid, endpoint="e")
    monitor = Writer(store, ev.Producer(id="monitor-x", instance="x"))
    with pytest.raises(NotAuthorized):
        await monitor.create_route(f"{uid}-r1", session_id=sid, endpoint="e")
    await operator.create_route(f"{uid}-r1", session_id=sid, endpoint="e")
    with pytest.raises(NotAuthorized):  # an agent that does not own the route's session
        await scheduler.transition_route(f"{uid}-r1", lc.STARTING)
    with pytest.raises(NotAuthorized):
        await monitor.append(ev.SessionOrphaned(producer=monitor.producer, session_id=sid, reason="not mine"))
    state, _ = await operator.session(sid)
    route, _ = await operator.route(f"{uid}-r1")
    assert state.status == lc.S_PENDING and route.state == lc.PENDING  # nothing refused was written
    await operator.terminate_session(sid)


@pytest.mark.parametrize("agent_id", ["monitor", "reclaimer-x", "watchdog-2", "operator", "cli", "demo-1"])
async def test_an_agent_may_not_take_a_roles_name(ledger: Writer, agent_id: str):
    with pytest.raises(NotAuthorized, match="reserved"):
        Agent(ledger, agent_id=agent_id, pool="p")


async def test_an_agent_writes_routes_of_the_sessions_it_owns_only(ledger: Writer, uid: str):
    async with Agent(ledger, agent_id=f"{uid}-a1", pool=uid, heartbeat=0.5, ttl=10) as a1, \
            Agent(ledger, agent_id=f"{uid}-a2", pool=uid, heartbeat=0.5, ttl=10) as a2:
        sid, _ = await ledger.create_session(uid, session_id=f"{uid}-s1")
        await a1.claim(sid)
        await a1.ledger.create_route(f"{uid}-r1", session_id=sid, endpoint="e")  # its owner may
        with pytest.raises(NotAuthorized):
            await a2.ledger.create_route(f"{uid}-r2", session_id=sid, endpoint="e")
        with pytest.raises(NotAuthorized):
            await a2.ledger.report_health(f"{uid}-r1", healthy=True)
        await a1.transition_route(f"{uid}-r1", lc.STARTING)
        await a1.report_health(f"{uid}-r1", healthy=True)
        route, _ = await ledger.route(f"{uid}-r1")
        assert route.state == lc.STARTING and route.healthy is True


async def test_a_death_forged_by_an_agent_does_not_count_toward_the_pool_breaker(store, uid: str):  # type: ignore[no-untyped-def]
    """The monitor counts the pool's recent deaths to trip its breaker before a mass failure moves sessions; a
    death written by a1 for a2 (flagged by the fold) must not count, or a1 could trip it at the first real death."""
    from consumers.follow import Follower
    from consumers.monitor import LivenessMonitor

    follower = Follower(store, heartbeats=False)
    monitor = LivenessMonitor(Writer(store, MONITOR), follower)
    log = Log()
    items = []
    for p in (A1, A2):
        items.append(log(ev.AgentRegistered(producer=p, agent_id=p.id, instance_id=p.instance, pool=uid)))
    inc2 = items[-1].seq
    items.append(log(ev.AgentDeclaredDead(producer=A1, agent_id="a2", incarnation=inc2, reason="forged")))
    changes = follower.state.apply_all(items)
    monitor._heard(LEDGER_STREAM, items, changes)
    assert list(monitor._deaths[uid]) == [] and follower.state.agents["a2"].status == lc.A_ALIVE
    real = log(ev.AgentDeclaredDead(producer=MONITOR, agent_id="a2", incarnation=inc2, reason="missed"))
    monitor._heard(LEDGER_STREAM, [real], follower.state.apply_all([real]))
    assert [agent for agent, _ in monitor._deaths[uid]] == ["a2"]


# --- two real agents, the consumers and the projector ------------------------------------------------------


async def test_a_forged_goodbye_fenced_and_death_for_a2_through_subjects_ending_in_a1_change_nothing(
        server: EmbeddedServer, tmp_path: Path):
    """a1 may publish `ledger.*.*.*.a1`; it publishes a2's goodbye, fenced, death and a beat there. a2 keeps its
    incarnation and its session (no re-registration), the projection shows s1 owned by a2 and the forgeries
    flagged, and neither the monitor nor the reclaimer moves a2's session."""
    db = str(tmp_path / "p.sqlite3")
    async with ledger_on(server.url) as ledger, \
            Agent(ledger, agent_id="a1", pool="cpu", heartbeat=0.2, ttl=3.0) as a1, \
            Agent(ledger, agent_id="a2", pool="gpu", capacity=4, heartbeat=0.2, ttl=3.0) as a2, \
            consumers(server.url), Projector(ledger.store, ProjectionSettings(db=db)) as projector:
        sid, _ = await ledger.create_session("gpu", session_id="s1")
        await eventually(lambda: sid in a2.owned, timeout=20, what="the reclaimer giving s1 to a2")
        incarnation, token = a2.incarnation, a2.owned[sid].token
        as_a1 = ev.Producer(id=a1.agent_id, instance=a1.instance_id)
        forged = [
            ev.AgentGoodbye(producer=as_a1, agent_id="a2", instance_id=a2.instance_id, incarnation=incarnation,
                            reason="forged by a1"),
            ev.AgentFenced(producer=as_a1, agent_id="a2", incarnation=incarnation, reason="forged by a1",
                           fenced_at=ev.utcnow()),
            ev.AgentDeclaredDead(producer=as_a1, agent_id="a2", incarnation=incarnation, reason="forged by a1"),
            ev.SessionOrphaned(producer=as_a1, session_id=sid, reason="forged by a1", previous_owner="a2",
                               previous_token=token),
        ]
        seqs = []
        for event in forged:
            assert codec.subject_of(event).endswith(".a1")  # what a1's server permissions let it publish
            seqs.append(await ledger.store.append(event))
        # A witness stored after the forgeries: once a2's watch and the reclaimer have handled it, they have
        # judged every forgery.
        witness, witness_seq = await ledger.create_session("gpu", session_id="s2")
        await eventually(lambda: witness in a2.owned, timeout=20, what="the reclaimer giving s2 to a2")
        assert (a2.incarnation, a2.fenced, a2.superseded) == (incarnation, None, False)
        assert a2.owned[sid].token == token
        state, _ = await ledger.agent("a2")
        assert state.incarnation == incarnation and state.status == lc.A_ALIVE
        session, _ = await ledger.session(sid)
        assert (session.status, session.owner, session.token) == (lc.S_ASSIGNED, "a2", token)
        await projector.wait_for(witness_seq, timeout=20)
        async with Query.open(db) as q:
            flags = {f.seq: (f.kind, f.producer) for f in (await q.anomalies()).items}
            assert {s: flags.get(s) for s in seqs} == {s: (lc.UNAUTHORIZED_PRODUCER, "a1") for s in seqs}
            # The agents, the consumers and the operator wrote nothing else their roles may not write.
            assert sorted(s for s, (kind, _) in flags.items() if kind == lc.UNAUTHORIZED_PRODUCER) == seqs
            row = next(s for s in (await q.sessions(pool="gpu")).items if s.session_id == sid)
            assert (row.state, row.owner, row.token) == ("assigned", "a2", token)
            agent_row = next(a for a in (await q.agents(pool="gpu")).items if a.agent_id == "a2")
            assert (agent_row.incarnation, agent_row.status) == (incarnation, "alive")
        registrations = await ledger.registrations("a2")
        assert registrations == [incarnation]  # a2 never registered again


def test_the_cli_says_in_one_line_who_may_create_a_session_and_run_as_an_agent(settings, uid: str):  # type: ignore[no-untyped-def]
    from test_cli_entities import ledger_cli, ok, one_line_error

    one_line_error(ledger_cli(settings, "session", "create", "--pool", "p", "--session-id", f"{uid}-s", "--as",
                              "scheduler"), "scheduler", "operator")
    one_line_error(ledger_cli(settings, "agent", "--agent-id", "monitor-2", "--pool", "p"), "reserved")
    assert f"created session {uid}-s" in ok(ledger_cli(settings, "session", "create", "--pool", "p", "--session-id",
                                                       f"{uid}-s", "--as", "operator-ann"))
    assert f"terminated session {uid}-s" in ok(ledger_cli(settings, "session", "terminate", f"{uid}-s"))  # as cli
