"""Hostile tests of issue 10: an attacker holding ONE role's generated credentials, and faults.

Every attack runs against a real nats-server started with the configuration `ledger auth init` generates
(tests/test_permissions.py's fixtures), and, where the attack aims at a decision, against the consumer that
makes it (the liveness monitor) or the folds. A test marked xfail(strict) is an attack that still gets
through: its reason names what lets it through, and the test passes once that is fixed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from helpers import eventually
from nats.js import api
from test_permissions import REFUSED, Conn, Secured, connect, ledger_as, recorded, refused_publish, refused_request
from test_permissions import start_secured

from consumers.follow import Follower
from consumers.liveness_rules import LivenessSettings
from consumers.monitor import LivenessMonitor
from ledger import codec, decide, permissions, subjects
from ledger import events as ev
from ledger import lifecycle as lc
from ledger.client import Ledger
from ledger.errors import LedgerError


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Secured]:
    """A server of its own per test: the attacks leave forged events, consumers and agents behind."""
    s = start_secured(tmp_path)
    try:
        yield s
    finally:
        s.server.stop()


@pytest.fixture
async def admin(secured: Secured) -> AsyncIterator[Ledger]:
    async with ledger_as(secured, permissions.ADMIN, "admin") as (ledger, _):
        yield ledger


async def register(ledger: Ledger, pool: str, *, heartbeat: float = 60.0, ttl: float = 600.0) -> int:
    """Register the ledger's producer as an agent (its incarnation is the registration's sequence)."""
    return await ledger.store.append(ev.AgentRegistered(
        producer=ledger.producer, agent_id=ledger.producer.id, instance_id=ledger.producer.instance, pool=pool,
        heartbeat_interval=heartbeat, ttl=ttl))


@contextlib.asynccontextmanager
async def monitor_as_service(secured: Secured, settings: LivenessSettings) -> AsyncIterator[LivenessMonitor]:
    """The liveness monitor as `ledger up` runs it (the service user, producer `monitor`), caught up on the log.

    Its judging loop is not started: the test calls `check` itself, at a time of its choosing.
    """
    async with ledger_as(secured, permissions.SERVICE, "monitor") as (service, _):
        follower = Follower(service.store)
        monitor = LivenessMonitor(service, follower, settings)
        task = asyncio.create_task(follower.run())
        try:
            await asyncio.wait_for(follower.caught_up.wait(), 20)
            await asyncio.wait_for(follower.heartbeats_caught_up.wait(), 20)
            yield monitor
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def caught_up_to(monitor: LivenessMonitor, seq: int) -> None:
    await eventually(lambda: monitor.follower.state.ledger.seq >= seq, timeout=10, what=f"the monitor at #{seq}")


# --- liveness: what one agent can make the monitor believe --------------------------------------------------------


@pytest.mark.xfail(strict=True, reason=(
    "msg-id squatting: the monitor's death event id is predictable (dead-<agent>-<incarnation>); a1 may publish "
    "an event with that Nats-Msg-Id on a LEDGER subject of its own, and the monitor's declaration is then a "
    "duplicate: ledger/appender.py settles a duplicate PubAck as success (seq of a1's message) without checking "
    "that the stored message is ours, the monitor records the verdict as written and never retries"))
async def test_an_agent_squatting_the_monitors_death_event_id_cannot_keep_a_silent_agent_alive(
        secured: Secured, admin: Ledger):
    async with ledger_as(secured, "agent-a2", "a2") as (a2, _):
        incarnation = await register(a2, "p-squat", heartbeat=0.2, ttl=1.0)  # and never beats: a crash
    async with ledger_as(secured, "agent-a1", "a1") as (a1, conn):
        # An unreachable report for a2 is a LEDGER event a1 may write; its event id is the Nats-Msg-Id.
        squat = await a1.store.append(ev.AgentUnreachableReported(
            producer=a1.producer, agent_id="a2", incarnation=incarnation, event_id=f"dead-a2-{incarnation}"))
    assert conn.unexpected_violations() == []
    async with monitor_as_service(secured, LivenessSettings(grace=0)) as monitor:
        await caught_up_to(monitor, squat)
        written = await monitor.check(monitor.follower.clock.now(ev.utcnow) + timedelta(seconds=30))
        assert [type(e) for e in written] == [ev.AgentDeclaredDead]  # the monitor believes it declared a2 dead
    deaths = [e for e in await recorded(admin.store, "agent", "a2") if isinstance(e, ev.AgentDeclaredDead)]
    assert deaths and deaths[0].producer.id == "monitor", "a2's death never reached the log"


@pytest.mark.xfail(strict=True, reason=(
    "consumers/monitor.py counts every unreachable report toward report_threshold (deque of (seq, time), no "
    "reporter): one agent publishing three reports on `ledger.agent.a2.unreachable_reported.a1` makes a live a2 "
    "suspect (not eligible for sessions); the threshold should count distinct reporters (producer tokens, which "
    "the server binds)"))
async def test_one_reporter_alone_cannot_make_an_agent_suspect(secured: Secured, admin: Ledger):
    async with ledger_as(secured, "agent-a2", "a2") as (a2, _):
        incarnation = await register(a2, "p-reports")
    async with ledger_as(secured, "agent-a1", "a1") as (a1, _):
        for _ in range(5):
            last = await a1.report_unreachable("a2", incarnation=incarnation, error="connection refused")
    settings = LivenessSettings(grace=0, report_threshold=3)
    async with monitor_as_service(secured, settings) as monitor:
        await caught_up_to(monitor, last)
        assert await monitor.check(monitor.follower.clock.now(ev.utcnow)) == [], "a1 alone made a2 suspect"
        # Three reporters do (the rule still works when it is not one voice repeated).
        async with ledger_as(secured, "agent-a3", "a3") as (a3, _), \
                ledger_as(secured, permissions.OPERATOR, "cli") as (operator, _):
            await a3.report_unreachable("a2", incarnation=incarnation)
            last = await operator.report_unreachable("a2", incarnation=incarnation)
        await caught_up_to(monitor, last)
        written = await monitor.check(monitor.follower.clock.now(ev.utcnow))
        assert [type(e) for e in written] == [ev.AgentSuspected]


# --- sessions and routes: what one agent can do to another's ------------------------------------------------------


async def a_session_owned_by_a2(secured: Secured, pool: str) -> tuple[str, int, int]:
    """(session id, a2's claim token, a2's incarnation): a session a live a2 owns."""
    async with ledger_as(secured, permissions.OPERATOR, "cli") as (operator, _):
        sid, _ = await operator.create_session(pool)
    async with ledger_as(secured, "agent-a2", "a2") as (a2, _):
        incarnation = await register(a2, pool)
        token = await a2.claim_session(sid, decide.AgentRef("a2", a2.producer.instance, incarnation))
    return sid, token, incarnation


async def test_a1_writing_for_a2_through_every_subject_it_may_use_changes_nothing(secured: Secured, admin: Ledger):
    """Every verb a1 may publish, aimed at a2: on a2's session and route, naming a2 or a2's token, signed a1.
    The server lets them land (the subjects end in a1); the folds flag each one, and a2's session, route and
    liveness are as before. What the server refuses (a2's own entity, a2's producer token) is refused."""
    sid, token, incarnation = await a_session_owned_by_a2(secured, "p-forge")
    async with ledger_as(secured, "agent-a2", "a2") as (a2, _):
        await a2.create_route("r-forge", session_id=sid, endpoint="http://a2")
        await a2.transition_route("r-forge", lc.STARTING, token=token)
    session_before, _ = await admin.session(sid)
    route_before, _ = await admin.route("r-forge")
    async with ledger_as(secured, "agent-a1", "a1") as (a1, conn):
        me = a1.producer
        mine = await register(a1, "p-forge")
        forged: list[ev.Event] = [
            ev.SessionClaimed(producer=me, session_id=sid, agent_id="a2", instance_id="x", incarnation=incarnation,
                              previous_token=token, reason="failover"),
            ev.SessionReleased(producer=me, session_id=sid, agent_id="a2", incarnation=incarnation, token=token),
            ev.SessionReleased(producer=me, session_id=sid, agent_id="a1", incarnation=mine, token=token),
            ev.SessionResourceReported(producer=me, session_id=sid, agent_id="a2", incarnation=incarnation,
                                       token=token, platform_resource_id="evil", address="http://evil"),
            ev.SessionTerminated(producer=me, session_id=sid, token=token, reason="forged"),
            ev.RouteTransitioned(producer=me, route_id="r-forge", from_state=lc.STARTING, to_state=lc.TERMINATING,
                                 token=token, reason="forged"),
            ev.RouteHealthReported(producer=me, route_id="r-forge", healthy=False, checked_at=ev.utcnow()),
            ev.RouteCreated(producer=me, route_id="r-forge", session_id=sid, endpoint="http://evil"),
        ]
        for event in forged:
            out = codec.encode(event)
            await conn.nc.jetstream().publish(out.subject, out.payload, headers=out.headers, timeout=5)
        # a2's lifecycle and beats are a2's own entity only: refused, whichever producer token a1 signs with.
        payload = codec.encode(ev.AgentHeartbeat(producer=ev.Producer(id="a2", instance="x"), agent_id="a2",
                                                 instance_id="x", incarnation=incarnation, beat=99)).payload
        await refused_publish(conn, "ledger.hb.a2.heartbeat.a1", payload)
        await refused_publish(conn, "ledger.agent.a2.fenced.a1", b"{}")
        await refused_publish(conn, "ledger.agent.a2.declared_dead.monitor", b"{}")
    session_after, _ = await admin.session(sid)
    route_after, _ = await admin.route("r-forge")
    assert session_after == session_before and session_after.owner == "a2"
    assert route_after == route_before and route_after.state == lc.STARTING
    history = [r for r in await admin.store.history("session", sid) if isinstance(r, codec.Recorded)]
    _, anomalies = lc.fold(lc.evolve_session, history)
    forged_seqs = {r.seq for r in history if r.event.producer.id == "a1"}
    assert forged_seqs and {seq for seq, _ in anomalies} >= forged_seqs  # each one flagged, none applied


@pytest.mark.xfail(strict=True, reason=(
    "lifecycle.claim_problem accepts a self-claim of an ASSIGNED session whenever it names the current token "
    "(previous_token), whatever the owner's state: any agent may read the token from LEDGER and take a live "
    "agent's session. A take-over should apply only when the owner may be replaced (reclaim_rules.owner_problem: "
    "gone, dead, fenced, draining, superseded) - the fold would need the agents' states as of the claim"))
async def test_a1_cannot_take_a_live_a2s_session_by_naming_its_token(secured: Secured, admin: Ledger):
    sid, token, _ = await a_session_owned_by_a2(secured, "p-take")
    async with ledger_as(secured, "agent-a1", "a1") as (a1, _):
        mine = await register(a1, "p-take")
        with contextlib.suppress(LedgerError):
            await a1.store.append(ev.SessionClaimed(producer=a1.producer, session_id=sid, agent_id="a1",
                                                    instance_id=a1.producer.instance, incarnation=mine,
                                                    reason="failover", previous_owner="a2", previous_token=token))
    state, _ = await admin.session(sid)
    assert state is not None and state.owner == "a2", f"a1 took a live a2's session: owner {state.owner}"


@pytest.mark.xfail(strict=True, reason=(
    "a creation is a compare-and-set expecting 0 on the whole entity filter (ledger.<family>.<id>.>): one event "
    "a1 may publish there - a flagged claim or route transition, signed a1 - makes the operator's create "
    "'already exist'. Expecting 0 on the creation verb only (ledger.<family>.<id>.created.*) keeps two creators "
    "apart and ignores what the folds ignore (ledger/client.py create_session, create_route)"))
async def test_a1_cannot_squat_the_id_of_a_session_or_route_before_it_is_created(secured: Secured, admin: Ledger):
    async with ledger_as(secured, "agent-a1", "a1") as (a1, _):
        mine = await register(a1, "p-squat")
        await a1.store.append(ev.SessionClaimed(producer=a1.producer, session_id="s-planned", agent_id="a1",
                                                instance_id=a1.producer.instance, incarnation=mine))
        await a1.store.append(ev.RouteTransitioned(producer=a1.producer, route_id="r-planned", from_state=lc.PENDING,
                                                   to_state=lc.STARTING))
    async with ledger_as(secured, permissions.OPERATOR, "cli") as (operator, _):
        sid, _ = await operator.create_session("p-squat", session_id="s-planned")
        await operator.create_route("r-planned", session_id=sid, endpoint="http://x")
    assert (await admin.session("s-planned"))[0] is not None and (await admin.route("r-planned"))[0] is not None
