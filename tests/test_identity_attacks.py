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
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import start_binary_server
from helpers import eventually
from hypothesis import given
from hypothesis import strategies as st
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import api
from test_permissions import Conn, Secured, connect, ledger_as, pulls_handled, recorded, refused_publish, start_secured

from consumers.follow import Follower
from consumers.liveness_rules import LivenessSettings
from consumers.monitor import LivenessMonitor
from ledger import codec, decide, subjects
from ledger import events as ev
from ledger import lifecycle as lc
from ledger.connection import open_connection
from ledger.errors import AuthFailed, InvalidInput, LedgerError, TlsFailed
from ledger.settings import Settings, redact_url
from ledger.writer import Writer
from ledgerctl import permissions
from ledgerctl.cli import cli
from ledgerctl.server import EmbeddedServer


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Secured]:
    """A server of its own per test: the attacks leave forged events, consumers and agents behind."""
    s = start_secured(tmp_path)
    try:
        yield s
    finally:
        s.server.stop()


@pytest.fixture
async def admin(secured: Secured) -> AsyncIterator[Writer]:
    async with ledger_as(secured, permissions.ADMIN, "admin") as (ledger, _):
        yield ledger


async def register(ledger: Writer, pool: str, *, heartbeat: float = 60.0, ttl: float = 600.0) -> int:
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


# --- reply subjects: the server publishes where the requester says -------------------------------------------------


async def test_a1_cannot_forge_a2s_goodbye_through_a_direct_get_reply(secured: Secured, admin: Writer):
    async with ledger_as(secured, "agent-a2", "a2") as (a2, _):
        incarnation = await register(a2, "p-reply")
    a1 = await connect(secured, "agent-a1")
    try:
        forged = codec.encode(ev.AgentGoodbye(producer=ev.Producer(id="a2", instance="x"), agent_id="a2",
                                              instance_id="x", incarnation=incarnation, reason="forged by a1"))
        stored = await a1.nc.jetstream().publish("ledger.hb.a1.heartbeat.a1", forged.payload, headers=forged.headers,
                                                 timeout=5)
        get = f"$JS.API.DIRECT.GET.{subjects.HEARTBEAT_STREAM}"
        await a1.nc.publish(get, json.dumps({"seq": stored.seq}).encode(), reply="ledger.agent.a2.goodbye.a2")
        # Barriers: the same get answered to us (so the steered one was answered), then an append acknowledged
        # after the steered answer was queued for LEDGER.
        await a1.nc.request(get, json.dumps({"seq": stored.seq}).encode(), timeout=5)
        await a1.nc.jetstream().publish("ledger.agent.a2.unreachable_reported.a1", b"{}", timeout=5)
    finally:
        await a1.nc.close()
    state, _ = await admin.agent("a2")
    assert state is not None and state.status == lc.A_ALIVE, f"a1 said goodbye for a2: {state.status} ({state.reason})"


async def test_no_server_answer_steered_by_a1_lands_on_a_subject_a1_may_not_publish(secured: Secured,
                                                                                    admin: Writer):
    a1 = await connect(secured, "agent-a1")
    try:
        await a1.nc.jetstream().publish("ledger.hb.a1.heartbeat.a1", b"{}", timeout=5)
        relay = await a1.nc.jsm(timeout=5).add_consumer(subjects.HEARTBEAT_STREAM, api.ConsumerConfig(
            ack_policy=api.AckPolicy.NONE, filter_subject="ledger.hb.a1.>"))
        steered = {
            f"$JS.API.STREAM.INFO.{subjects.LEDGER_STREAM}": (b"", "ledger.session.s-next.created.cli"),
            "ledger.hb.a1.heartbeat.a1": (b"{}", "ledger.agent.a2.registered.a2"),  # its PubAck
            f"$JS.API.CONSUMER.MSG.NEXT.{subjects.HEARTBEAT_STREAM}.{relay.name}": (
                json.dumps({"batch": 1, "expires": 10**9}).encode(), "ledger.pool.p.breaker_tripped.monitor"),
        }
        for subject, (body, reply) in steered.items():
            await a1.nc.publish(subject, body, reply=reply)
        await a1.nc.flush()
        jsm = admin.store.nc.jsm()
        # Barriers: each steered request answered (a request of the same kind answered to us after it, the pull
        # handled), then an append to LEDGER acknowledged after what they queued for it.
        await a1.nc.jsm(timeout=5).stream_info(subjects.LEDGER_STREAM)
        await a1.nc.jetstream().publish("ledger.hb.a1.heartbeat.a1", b"{}", timeout=5)
        await pulls_handled(a1, subjects.HEARTBEAT_STREAM, relay.name)
        await a1.nc.jetstream().publish("ledger.agent.a1.unreachable_reported.a1", b"{}", timeout=5)
        info = await jsm.stream_info(subjects.LEDGER_STREAM, subjects_filter=">")
    finally:
        await a1.nc.close()
    landed = {k: v for k, v in (info.state.subjects or {}).items() if k != "ledger.agent.a1.unreachable_reported.a1"}
    assert not landed, f"a1 wrote on other producers' subjects: {landed}"


async def test_a1_cannot_replay_a2s_registration_through_a_pull_reply(secured: Secured, admin: Writer):
    jsm = admin.store.nc.jsm()
    config = (await jsm.stream_info(subjects.LEDGER_STREAM)).config
    config.duplicate_window = 1.0  # the default 120 s only delays the attack; the test need not wait for it
    await jsm.update_stream(config)
    async with ledger_as(secured, "agent-a2", "a2") as (a2, _):
        incarnation = await register(a2, "p-replay")
    a1 = await connect(secured, "agent-a1")
    try:
        js = a1.nc.jetstream()
        marker = {"Nats-Msg-Id": f"window-{incarnation}"}
        await js.publish("ledger.agent.a2.unreachable_reported.a1", b"{}", headers=marker, timeout=5)

        async def window_passed() -> bool:  # the server says so: the same id is no longer a duplicate
            ack = await js.publish("ledger.agent.a2.unreachable_reported.a1", b"{}", headers=marker, timeout=5)
            return not ack.duplicate

        await eventually(window_passed, timeout=20, interval=0.2, what="the duplicate window to pass")
        relay = await a1.nc.jsm(timeout=5).add_consumer(subjects.LEDGER_STREAM, api.ConsumerConfig(
            ack_policy=api.AckPolicy.NONE, filter_subject="ledger.agent.a2.registered.a2"))
        await a1.nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{subjects.LEDGER_STREAM}.{relay.name}",
                            json.dumps({"batch": 1, "expires": 10**9}).encode(), reply="ledger.agent.zz.goodbye.zz")
        await a1.nc.flush()

        # Handled means delivered, if at all, and queued for the stream already: a message acknowledged after it
        # is stored after it.
        await pulls_handled(a1, subjects.LEDGER_STREAM, relay.name)
        await js.publish("ledger.agent.a2.unreachable_reported.a1", b"{}", timeout=5)
    finally:
        await a1.nc.close()
    state, _ = await admin.agent("a2")
    assert state is not None and state.incarnation == incarnation, \
        f"a2 has an incarnation it never registered: {state.incarnation} (registered {incarnation})"


# --- liveness: what one agent can make the monitor believe --------------------------------------------------------


async def test_an_agent_squatting_the_monitors_death_event_id_cannot_keep_a_silent_agent_alive(
        secured: Secured, admin: Writer):
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


async def test_an_append_whose_event_id_another_user_took_first_is_not_reported_as_written(secured: Secured,
                                                                                         admin: Writer):
    async with ledger_as(secured, "agent-a1", "a1") as (a1, _):
        taken = await a1.report_unreachable("a2", error="squat")
        squatted = next(e for e in await recorded(admin.store, "agent", "a2")).event_id
    async with ledger_as(secured, permissions.OPERATOR, "cli") as (operator, _):
        created = ev.SessionCreated(producer=operator.producer, session_id="s-victim", pool="p", event_id=squatted)
        try:
            seq = await operator.store.append(created)
        except LedgerError as refused:
            assert "s-victim" in str(refused) or squatted in str(refused)
            seq = None
    assert seq != taken, f"the operator's session creation 'landed' at #{taken}: a1's report"
    state, _ = await admin.session("s-victim")
    assert (seq is None) == (state is None)


async def test_one_reporter_alone_cannot_make_an_agent_suspect(secured: Secured, admin: Writer):
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


async def test_reports_in_bulk_from_one_agent_never_make_a_beating_agent_dead(secured: Secured, admin: Writer):
    """Death comes from missed heartbeats only: however many reports a1 writes, a2 (beating within its ttl) is
    not declared dead, and nothing but the monitor may declare it (the server refuses a1's declaration)."""
    async with ledger_as(secured, "agent-a2", "a2") as (a2, _):
        incarnation = await register(a2, "p-bulk", heartbeat=60.0, ttl=300.0)
    async with ledger_as(secured, "agent-a1", "a1") as (a1, conn):
        futures = [await a1.store.submit(ev.AgentUnreachableReported(producer=a1.producer, agent_id="a2",
                                                                     incarnation=incarnation)) for _ in range(50)]
        last = max([await f for f in futures])
        await refused_publish(conn, "ledger.agent.a2.declared_dead.a1", b"{}")
    async with monitor_as_service(secured, LivenessSettings(grace=0)) as monitor:
        await caught_up_to(monitor, last)
        for later in (0, 10, 20):  # within a2's ttl of its registration (no beat needed yet)
            written = await monitor.check(monitor.follower.clock.now(ev.utcnow) + timedelta(seconds=later))
            assert not [e for e in written if isinstance(e, ev.AgentDeclaredDead)], written
    state, _ = await admin.agent("a2")
    assert state is not None and state.status == lc.A_ALIVE and state.unreachable_reports == 50


# --- sessions and routes: what one agent can do to another's ------------------------------------------------------


async def a_session_owned_by_a2(secured: Secured, pool: str) -> tuple[str, int, int]:
    """(session id, a2's claim token, a2's incarnation): a session a live a2 owns."""
    async with ledger_as(secured, permissions.OPERATOR, "cli") as (operator, _):
        sid, _ = await operator.create_session(pool)
    async with ledger_as(secured, "agent-a2", "a2") as (a2, _):
        incarnation = await register(a2, pool)
        token = await a2.claim_session(sid, decide.AgentRef("a2", a2.producer.instance, incarnation))
    return sid, token, incarnation


async def test_a1_writing_for_a2_through_every_subject_it_may_use_changes_nothing(secured: Secured, admin: Writer):
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


async def test_a1_cannot_take_a_live_a2s_session_by_naming_its_token(secured: Secured, admin: Writer):
    sid, token, _ = await a_session_owned_by_a2(secured, "p-take")
    async with ledger_as(secured, "agent-a1", "a1") as (a1, _):
        mine = await register(a1, "p-take")
        with contextlib.suppress(LedgerError):
            await a1.store.append(ev.SessionClaimed(producer=a1.producer, session_id=sid, agent_id="a1",
                                                    instance_id=a1.producer.instance, incarnation=mine,
                                                    reason="failover", previous_owner="a2", previous_token=token))
    state, _ = await admin.session(sid)
    assert state is not None and state.owner == "a2", f"a1 took a live a2's session: owner {state.owner}"


async def test_a1_cannot_squat_the_id_of_a_session_or_route_before_it_is_created(secured: Secured, admin: Writer):
    """Any agent may publish on any session's or route's subjects under its own token (a claim for itself, an
    owner's transition): one such event on an id not created yet must not make the operator's creation of that
    id "already exist" (the folds flag it; the creation applies)."""
    async with ledger_as(secured, "agent-a1", "a1") as (a1, _):
        mine = await register(a1, "p-squat")
        await a1.store.append(ev.SessionClaimed(producer=a1.producer, session_id="s-planned", agent_id="a1",
                                                instance_id=a1.producer.instance, incarnation=mine))
        await a1.store.append(ev.RouteTransitioned(producer=a1.producer, route_id="r-planned", from_state=lc.PENDING,
                                                   to_state=lc.STARTING))
    async with ledger_as(secured, permissions.OPERATOR, "cli") as (operator, _):
        sid, _ = await operator.create_session("p-squat", session_id="s-planned")
        await operator.create_route("r-planned", session_id=sid, endpoint="http://x")
        with pytest.raises(InvalidInput, match="already exists"):  # a second creation still conflicts
            await operator.create_session("p-squat", session_id="s-planned")
        with pytest.raises(InvalidInput, match="already exists"):
            await operator.create_route("r-planned", session_id=sid, endpoint="http://y")
    session, _ = await admin.session("s-planned")
    route, _ = await admin.route("r-planned")
    assert session is not None and session.status == lc.S_PENDING and route is not None and route.endpoint == "http://x"


# --- the JetStream API: what an agent's read rights reach -------------------------------------------------------


async def api_request(conn: Conn, subject: str, body: dict[str, object]) -> dict[str, object]:
    """JetStream's answer; a refusal by the server's permissions (no answer comes) as an error too."""
    try:
        reply = await conn.nc.request(subject, json.dumps(body).encode(), timeout=5)
    except (NatsTimeout, NoRespondersError):
        return {"error": {"description": "no answer (refused)"}}
    return json.loads(reply.data)


@pytest.mark.xfail(strict=True, reason=(
    "`$JS.API.CONSUMER.CREATE.<stream>` (granted to every role to read) refuses a durable_name in the body but "
    "not a `name` with action update: any agent can rewrite a consumer whose name it knows - drop its "
    "durability, change its filter, set inactive_threshold so the server deletes it. Server permissions cannot "
    "look into the body; see the report for the options (reads without consumers, or durables in another "
    "account)"))
async def test_an_agent_cannot_rewrite_or_expire_a_durable_consumer_it_knows_the_name_of(secured: Secured):
    admin_conn = await connect(secured, permissions.ADMIN)
    a1 = await connect(secured, "agent-a1")
    try:
        jsm = admin_conn.nc.jsm()
        await jsm.add_consumer(subjects.LEDGER_STREAM, api.ConsumerConfig(
            durable_name="audit", ack_policy=api.AckPolicy.EXPLICIT, filter_subject="ledger.session.>"))
        before = (await jsm.consumer_info(subjects.LEDGER_STREAM, "audit")).config
        # nats-py's own add_consumer(durable_name=...) goes to a subject a1 may not use; the body does not care.
        answer = await api_request(a1, f"$JS.API.CONSUMER.CREATE.{subjects.LEDGER_STREAM}", {
            "stream_name": subjects.LEDGER_STREAM, "action": "update",
            "config": {"name": "audit", "ack_policy": "explicit", "filter_subject": "ledger.agent.>",
                       "inactive_threshold": 10**9 * 3600}})
        after = (await jsm.consumer_info(subjects.LEDGER_STREAM, "audit")).config
        assert "error" in answer and after == before, f"a1 rewrote admin's durable consumer: {after}"
    finally:
        await a1.nc.close()
        await admin_conn.nc.close()


async def test_forbidden_api_and_system_subjects_are_refused_to_an_agent(secured: Secured, admin: Writer):
    """Everything outside an agent's list: stream admin, leader step-downs (a step-down would put the liveness
    monitor in its grace period), KV and object stores, the account purge, $SYS, acks and other users' inboxes
    (a forged PubAck or API reply)."""
    forbidden = [
        "$JS.API.STREAM.CREATE.KV_x", "$JS.API.STREAM.CREATE.OBJ_x", "$KV.x.y", "$O.x.C.y",
        "$JS.API.ACCOUNT.PURGE", "$JS.API.STREAM.LEADER.STEPDOWN.LEDGER", "$JS.API.META.LEADER.STEPDOWN",
        "$JS.API.STREAM.PEER.REMOVE.LEDGER", "$JS.API.STREAM.SNAPSHOT.LEDGER", "$JS.API.STREAM.RESTORE.LEDGER",
        "$JS.API.STREAM.MSG.DELETE.LEDGER", "$JS.API.CONSUMER.PAUSE.LEDGER.x", "$JS.API.CONSUMER.DELETE.LEDGER.x",
        "$JS.API.CONSUMER.CREATE.LEDGER.x", "$JS.API.CONSUMER.LIST.LEDGER", "$JS.API.CONSUMER.NAMES.LEDGER",
        "$JS.API.CONSUMER.INFO.LEDGER.x", "$JS.API.STREAM.LIST", "$JS.API.ACCOUNT.STREAM.MOVE.LEDGER",
        "$JS.API.SERVER.REMOVE", "$SYS.REQ.SERVER.PING", "$SYS.REQ.ACCOUNT.PING.CONNZ", "$JS.ACK.LEDGER.c.1.1.1.1.0",
        "_INBOX.x", "_INBOX_agent-a2.x.1", "_INBOX_service.x.1", "$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.LEDGER",
        "ledger.dlq.LEDGER.malformed", "ledger.pool.p.breaker_reset.a1", "ledger.session.s.created.a1",
    ]
    conn = await connect(secured, "agent-a1")
    try:
        for subject in forbidden:
            await conn.nc.publish(subject, b"{}")
        await conn.nc.flush()
        await eventually(lambda: all(conn.violations(f'"{s}"') for s in forbidden), timeout=10,
                         what="a violation for each forbidden subject")
        assert conn.nc.is_connected  # refused, not disconnected: the agent's connection goes on
    finally:
        await conn.nc.close()
    assert sorted(s.config.name for s in await admin.store.nc.jsm().streams_info()) == sorted(
        [subjects.LEDGER_STREAM, subjects.HEARTBEAT_STREAM, subjects.DLQ_STREAM])


async def test_headers_on_an_agents_own_subjects_cannot_roll_up_expire_schedule_or_batch(secured: Secured,
                                                                                        admin: Writer):
    """Headers a1 may put on what it publishes: a rollup would purge the log, a TTL expire the event, a schedule
    publish onto another subject later; the streams' settings refuse each (and doctor checks those settings)."""
    conn = await connect(secured, "agent-a1")
    refused = {
        "Nats-Rollup": ({"Nats-Rollup": "all"}, 10111), "Nats-TTL": ({"Nats-TTL": "1s"}, 10166),
        "Nats-Schedule": ({"Nats-Schedule": "@at 2020-01-01T00:00:00Z",
                           "Nats-Schedule-Target": "ledger.agent.a2.goodbye.a2"}, 10188),
        "Nats-Incr": ({"Nats-Incr": "1"}, 10168),
        "Nats-Batch-Id": ({"Nats-Batch-Id": "b", "Nats-Batch-Sequence": "1", "Nats-Batch-Commit": "1"}, 10174),
    }
    try:
        for subject in ("ledger.hb.a1.heartbeat.a1", "ledger.agent.a2.unreachable_reported.a1"):
            for name, (headers, code) in refused.items():
                reply = await conn.nc.request(subject, b"{}", headers=headers, timeout=5)
                assert json.loads(reply.data).get("error", {}).get("err_code") == code, (subject, name, reply.data)
    finally:
        await conn.nc.close()
    for stream in (subjects.LEDGER_STREAM, subjects.HEARTBEAT_STREAM):
        assert (await admin.store.nc.jsm().stream_info(stream)).state.messages == 0


async def test_a_push_consumer_cannot_relay_an_agents_bytes_onto_the_api_or_the_monitors_advisories(
        secured: Secured, admin: Writer):
    """An agent may create push consumers. Delivered onto `$JS.API.STREAM.UPDATE.LEDGER`, its own heartbeat bytes
    (a stream config with max_age 1 s) would be an update under nobody's permissions; onto the leader-election
    advisory the service user listens to, a fake election at every delivery (or idle heartbeat) would hold the
    liveness monitor in its grace period for ever. The server counts neither the API's internal subscriptions
    nor a subscription to `$JS.EVENT` subjects as delivery interest: nothing is delivered, the consumer goes."""
    a1 = await connect(secured, "agent-a1")
    service = await connect(secured, permissions.SERVICE)
    jsm_admin = admin.store.nc.jsm()
    try:
        await service.nc.subscribe(permissions.LEADER_ADVISORY)
        await service.nc.flush()
        before = (await jsm_admin.stream_info(subjects.LEDGER_STREAM)).config
        shortened = before.as_dict() | {"max_age": 10**9}
        await a1.nc.jetstream().publish("ledger.hb.a1.heartbeat.a1", json.dumps(shortened).encode(), timeout=5)
        jsm = a1.nc.jsm(timeout=5)
        for target in ("$JS.API.STREAM.UPDATE.LEDGER", "$JS.API.STREAM.DELETE.LEDGER_DLQ",
                       "$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.LEDGER"):
            relay = await jsm.add_consumer(subjects.HEARTBEAT_STREAM, api.ConsumerConfig(
                deliver_subject=target, ack_policy=api.AckPolicy.NONE, filter_subject="ledger.hb.a1.>",
                idle_heartbeat=0.5))
            state = await jsm_admin.consumer_info(subjects.HEARTBEAT_STREAM, relay.name)
            assert not state.push_bound and state.delivered.stream_seq == 0, target
        assert service.errors == [] and a1.errors == []
    finally:
        await a1.nc.close()
        await service.nc.close()
    assert (await jsm_admin.stream_info(subjects.LEDGER_STREAM)).config.max_age == before.max_age
    assert subjects.DLQ_STREAM in [s.config.name for s in await jsm_admin.streams_info()]


# --- the other roles -----------------------------------------------------------------------------------------


STREAM_ADMIN = [f"$JS.API.STREAM.{verb}.{stream}" for verb in ("CREATE", "UPDATE", "DELETE", "PURGE", "MSG.DELETE")
                for stream in (subjects.LEDGER_STREAM, subjects.HEARTBEAT_STREAM, subjects.DLQ_STREAM)]
CONSUMER_ADMIN = [f"$JS.API.CONSUMER.{verb}.{subjects.LEDGER_STREAM}.c"
                  for verb in ("CREATE", "DELETE", "DURABLE.CREATE")]


async def all_refused(secured: Secured, user: str, refused: list[str]) -> None:
    conn = await connect(secured, user)
    try:
        for subject in refused:
            await conn.nc.publish(subject, b"{}")
        await conn.nc.flush()
        await eventually(lambda: all(conn.violations(f'"{s}"') for s in refused), timeout=10,
                         what=f"a violation for each of {len(refused)} subjects as {user}")
    finally:
        await conn.nc.close()


async def test_the_reader_writes_nothing_the_operator_and_service_change_no_stream(secured: Secured, admin: Writer):
    every_event = [subjects.event_subject(cls.family, "x", cls.verb(), producer) for cls in ev.EVENT_TYPES
                   for producer in ("reader", "a1", "cli", "operator", "monitor", "reclaimer", "watchdog")]
    await all_refused(secured, permissions.READER, [*every_event, *STREAM_ADMIN, *CONSUMER_ADMIN,
                                                    "ledger.dlq.LEDGER.malformed", "$JS.API.STREAM.CREATE.X"])
    await all_refused(secured, permissions.OPERATOR, [*STREAM_ADMIN, *CONSUMER_ADMIN, "ledger.dlq.LEDGER.x",
                                                      "ledger.agent.a1.declared_dead.operator",
                                                      "ledger.session.x.claimed.reclaimer"])
    await all_refused(secured, permissions.SERVICE, [*STREAM_ADMIN, *CONSUMER_ADMIN,
                                                     "ledger.session.x.created.monitor",
                                                     "ledger.agent.a1.goodbye.monitor", "ledger.agent.a1.goodbye.a1",
                                                     "ledger.hb.a1.heartbeat.a1", "ledger.session.x.created.cli"])
    assert (await admin.store.last_seq()) == 0
    assert sorted(s.config.name for s in await admin.store.nc.jsm().streams_info()) == sorted(
        [subjects.LEDGER_STREAM, subjects.HEARTBEAT_STREAM, subjects.DLQ_STREAM])


# --- faults: a revoked agent ------------------------------------------------------------------------------------


def revoke(secured: Secured, user: str) -> None:
    """Take `user` out of the generated auth.conf (what an operator does to revoke it) and reload the server."""
    manifest = json.loads((secured.creds / "auth.json").read_text())
    kept = {u: key for u, key in manifest["users"].items() if u != user}
    (secured.creds / "auth.conf").write_text(permissions.render_authorization(kept, replicas=manifest["replicas"]))
    assert secured.server.pid is not None
    os.kill(secured.server.pid, signal.SIGHUP)


async def test_a_revoked_agent_is_cut_off_at_the_reload_and_cannot_come_back(secured: Secured):
    conn = await connect(secured, "agent-a1")
    try:
        revoke(secured, "agent-a1")
        await eventually(lambda: conn.nc.is_closed, timeout=10,
                         what="the server closing the revoked agent's connection")
    finally:
        await conn.nc.close()
    settings = Settings(nats_url=secured.url, nkey_seed_file=str(secured.creds / "agent-a1.nk"),
                        inbox_prefix=permissions.inbox_prefix("agent-a1"))
    with pytest.raises(AuthFailed, match="authorization violation") as refused:
        await open_connection(settings)
    assert "\n" not in str(refused.value)


def spawn_cli_agent(secured: Secured, agent_id: str, out: Path) -> subprocess.Popen[bytes]:
    user = permissions.agent_user(agent_id)
    env = {**os.environ, "LEDGER_NATS_URL": secured.url, "LEDGER_NKEY_SEED_FILE": str(secured.creds / f"{user}.nk"),
           "LEDGER_INBOX_PREFIX": permissions.inbox_prefix(user)}
    with open(out / "stdout", "wb") as stdout, open(out / "stderr", "wb") as stderr:
        return subprocess.Popen([sys.executable, "-m", "ledgerctl", "agent", "--agent-id", agent_id,
                                 "--pool", "p-revoked", "--heartbeat", "0.2", "--ttl", "2"],
                                env=env, stdout=stdout, stderr=stderr)


async def test_a_revoked_agent_process_fences_itself_and_says_why_in_one_line(secured: Secured, tmp_path: Path):
    """Revoked, `ledger agent` fences itself, says once that the server refuses its credentials (not only "no
    heartbeat acknowledged" and "the cluster may be electing a leader"), keeps trying, and stops cleanly on
    SIGTERM without asyncio's "Future exception was never retrieved" for the appends it gave up on."""
    proc = spawn_cli_agent(secured, "a1", tmp_path)
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    try:
        await eventually(lambda: "registered a1" in stdout.read_text(), timeout=30, what="the agent registering")
        revoke(secured, "agent-a1")
        await eventually(lambda: "fenced" in stdout.read_text(), timeout=30, what="the agent fencing itself")
        # Long enough for the fenced record's append to time out (its deadline) while the server refuses us.
        await eventually(lambda: "authorization" in stderr.read_text().lower(), timeout=30,
                         what="a line saying the server refused the agent's credentials")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    errors = stderr.read_text()
    assert proc.returncode == 0, errors
    assert "Traceback" not in errors and "never retrieved" not in errors, errors
    assert len([ln for ln in errors.splitlines() if "authorization" in ln.lower()]) <= 3, errors  # not one a retry


# --- faults: TLS ---------------------------------------------------------------------------------------------------


@pytest.fixture
def tls_secured(tmp_path: Path) -> Iterator[Secured]:
    s = start_secured(tmp_path, tls=True)
    try:
        yield s
    finally:
        s.server.stop()


def client_cert(creds: Path, out: Path, *, not_before: datetime, not_after: datetime) -> tuple[str, str]:
    """A client certificate signed by the deployment's own CA, valid only between the two times given."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca = x509.load_pem_x509_certificate((creds / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((creds / "ca-key.pem").read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agent-a1")]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    name = f"cert-{not_before:%Y%m%d%H%M}"
    (out / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / f"{name}-key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
    return str(out / f"{name}.pem"), str(out / f"{name}-key.pem")


def tls_settings(secured: Secured, **overrides: object) -> Settings:
    base: dict[str, object] = {
        "nats_url": secured.url, "nkey_seed_file": str(secured.creds / "agent-a1.nk"),
        "inbox_prefix": permissions.inbox_prefix("agent-a1"), "tls_ca_file": str(secured.creds / "ca.pem"),
        "tls_cert_file": str(secured.creds / "agent-a1-cert.pem"),
        "tls_key_file": str(secured.creds / "agent-a1-key.pem"), "connect_timeout": 3}
    return Settings(**{**base, **overrides})  # type: ignore[arg-type]


async def one_line_failure(settings: Settings, error: type[Exception]) -> str:
    with pytest.raises(error) as failed:
        await asyncio.wait_for(open_connection(settings), 20)  # within seconds, not a 90 s hang
    message = str(failed.value)
    assert "\n" not in message and message, message
    return message


async def test_an_expired_or_not_yet_valid_client_certificate_is_a_one_line_tls_failure(tls_secured: Secured,
                                                                                        tmp_path: Path):
    nc = await open_connection(tls_settings(tls_secured))  # the generated certificate works
    await nc.close()
    now = datetime.now(UTC)
    expired = client_cert(tls_secured.creds, tmp_path, not_before=now - timedelta(days=30),
                          not_after=now - timedelta(days=1))
    future = client_cert(tls_secured.creds, tmp_path, not_before=now + timedelta(days=1),
                         not_after=now + timedelta(days=30))
    for cert, key in (expired, future):
        message = await one_line_failure(tls_settings(tls_secured, tls_cert_file=cert, tls_key_file=key), TlsFailed)
        assert message.startswith("TLS handshake with") and "expired or not yet valid" in message, message


async def test_a_tls_server_and_a_client_without_tls_settings_is_a_one_line_tls_failure(tls_secured: Secured):
    plain = tls_settings(tls_secured, nats_url=tls_secured.url.replace("tls://", "nats://"), tls_ca_file=None,
                         tls_cert_file=None, tls_key_file=None)
    message = await one_line_failure(plain, TlsFailed)
    assert "127.0.0.1" in message, message
    # With the CA but no client certificate: the server requires one.
    message = await one_line_failure(tls_settings(tls_secured, tls_cert_file=None, tls_key_file=None), TlsFailed)
    assert "client certificate" in message, message


# --- secrets -------------------------------------------------------------------------------------------------------


PRINTABLE_BUT_COMMA = st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters=",")
"""A password as a user types it into a URL, unencoded (a comma would split the URL list: not a password)."""


@given(st.text(PRINTABLE_BUT_COMMA, min_size=1, max_size=20), st.sampled_from(["nats", "tls", ""]))
def test_a_url_never_shows_its_password_whatever_the_password_holds(password: str, scheme: str):
    secret = f"Zq9{password}"
    prefix = f"{scheme}://" if scheme else ""
    urls = [f"{prefix}user:{secret}@127.0.0.1:4222", f"nats://127.0.0.1:1,{prefix}user:{secret}@127.0.0.1:4222"]
    if ":" not in secret:  # a token (with a colon, the URL itself says user:password)
        urls.append(f"{prefix}{secret}@127.0.0.1:4222")
    for url in urls:
        shown = redact_url(url)
        assert secret not in shown and "***@" in shown, (url, shown)


def test_generated_secrets_are_never_printed_and_only_their_owner_reads_them(tmp_path: Path):
    out = tmp_path / "creds"
    runner = CliRunner()
    printed = [runner.invoke(cli, ["auth", "init", "--out", str(out), "--agent", "a1", "--tls", "--host",
                                   "127.0.0.1"], catch_exceptions=False),
               runner.invoke(cli, ["auth", "add-agent", "a9", "--out", str(out)], catch_exceptions=False)]
    assert [r.exit_code for r in printed] == [0, 0], [r.output for r in printed]
    output = "".join(r.output for r in printed)
    files = [p for p in out.rglob("*") if p.is_file()]  # DIR and the per-consumer directories server/, users/*/
    secrets = [p for p in files if p.suffix == ".nk" or p.name.endswith("-key.pem")]
    assert len(secrets) >= 2 * 6 and (out / "ca-key.pem") in secrets
    for path in secrets:
        assert path.stat().st_mode & 0o777 == 0o600, path
        lines = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("-----")]
        assert lines and not [ln for ln in lines if ln in output], path  # not a line of it
    assert out.stat().st_mode & 0o777 == 0o700
    assert not re.search(r"\bSU[A-Z2-7]{50,}", output)  # no user seed
    for public in [p for p in files if p not in secrets]:
        text = public.read_text()
        assert "PRIVATE KEY" not in text and not re.search(r"\bSU[A-Z2-7]{50,}", text), public


@pytest.fixture
def password_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    server = start_binary_server(tmp_path / "nats", extra='authorization { user: "u", password: "S3cr3t-pw" }\n')
    try:
        yield server
    finally:
        server.stop()


def ledger_run(*args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run([sys.executable, "-m", "ledgerctl", "-vv", *args], check=False, capture_output=True,
                            text=True, timeout=60, env={**os.environ, **(env or {})})
    return result.stdout + result.stderr


def test_no_command_prints_a_password_not_at_debug_nor_in_an_error(password_server: EmbeddedServer):
    port = password_server.config.port
    url = f"nats://u:S3cr3t-pw@127.0.0.1:{port}"
    said = [
        ledger_run("init", "--nats-url", url),
        ledger_run("doctor", "--json", "--nats-url", url),
        ledger_run("doctor", "--nats-url", f"nats://127.0.0.1:{port}", "--user", "u",
                   env={"LEDGER_PASSWORD": "S3cr3t-pw"}),
        ledger_run("session", "create", "--pool", "p", "--nats-url", url),
        ledger_run("doctor", "--nats-url", f"nats://u:S3cr3t-pw-wrong@127.0.0.1:{port}"),  # refused
        ledger_run("session", "show", "x", "--nats-url", "nats://u:S3cr3t-pw@127.0.0.1:1"),  # unreachable
        ledger_run("session", "show", "x", "--nats-url", "nats://u:S3cr3t/pw@127.0.0.1:1"),  # unparsable
        ledger_run("session", "show", "x", "--nats-url", "nats://S3cr3t-token@127.0.0.1:1"),
    ]
    for output in said:
        assert "S3cr3t" not in output, output
    assert "authorization violation" in said[4] and "cannot reach NATS" in said[5]


def test_no_container_of_the_compose_file_holds_another_roles_secrets():
    import yaml

    services = yaml.safe_load((Path(__file__).parent.parent / "docker-compose.yml").read_text())["services"]
    whole = {name: [v for v in svc.get("volumes", []) if str(v).split(":")[0].rstrip("/") == "./deploy/secrets"]
             for name, svc in services.items() if name != "ledger-auth"}  # it writes them all: it must see them
    assert not {name: vols for name, vols in whole.items() if vols}, whole
