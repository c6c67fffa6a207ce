"""The projector on a real nats-server and a real SQLite file: catch-up, live, flags, dead letters, restarts."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from conftest import start_binary_server
from nats.js.errors import NotFoundError
from projection_helpers import dump

from ledger import codec
from ledger import events as ev
from ledger.settings import Settings
from ledger.store import EventStore
from ledger.subjects import DLQ_STREAM, HEARTBEAT_STREAM, LEDGER_STREAM
from ledgerctl.server import EmbeddedServer
from projections.errors import DatabaseBusy, StreamChanged
from projections.projector import Projector
from projections.query import Query
from projections.rebuild import rebuild
from projections.settings import ProjectionSettings

CLI = ev.Producer(id="cli", instance="test")


@pytest.fixture(scope="module")
def projection_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """A server of this module's own: its streams hold only what these tests wrote."""
    server = start_binary_server(tmp_path_factory.mktemp("projection-nats"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def pstore(projection_server: EmbeddedServer) -> AsyncIterator[EventStore]:
    async with EventStore.connect(Settings(nats_url=projection_server.url), ensure=True) as store:
        yield store


def settings_for(tmp_path: Path, name: str = "p", **over: object) -> ProjectionSettings:
    return ProjectionSettings(db=str(tmp_path / f"{name}.sqlite3"), **over)  # type: ignore[arg-type]


def producer(agent: str) -> ev.Producer:
    return ev.Producer(id=agent, instance=f"{agent}-i")


async def register(store: EventStore, agent: str, pool: str, instance: str = "i1") -> int:
    return await store.append(ev.AgentRegistered(producer=producer(agent), agent_id=agent, instance_id=instance,
                                                 pool=pool, capacity=4))


async def test_catches_up_then_follows_and_answers(pstore: EventStore, tmp_path: Path, uid: str):
    agent, session, pool = f"{uid}-a", f"{uid}-s", f"{uid}-pool"
    inc = await register(pstore, agent, pool)
    await pstore.append(ev.AgentHeartbeat(producer=producer(agent), agent_id=agent, instance_id="i1",
                                          incarnation=inc, beat=1, load=1, capacity=4))
    await pstore.append(ev.SessionCreated(producer=CLI, session_id=session, pool=pool), expect=0)
    token = await pstore.append(ev.SessionClaimed(producer=producer(agent), session_id=session, agent_id=agent,
                                                  instance_id="i1", incarnation=inc))
    async with Projector(pstore, settings_for(tmp_path)) as projector:
        await projector.ready(timeout=20)
        async with Query.open(settings_for(tmp_path).db) as q:
            agents = (await q.agents(pool=pool)).items
            assert [(a.agent_id, a.health, a.incarnation, a.sessions, a.load) for a in agents] == [
                (agent, "alive", inc, 1, 1)]
            s = (await q.sessions(pool=pool)).items[0]
            assert (s.state, s.owner, s.token, s.owner_health, s.claims) == ("assigned", agent, token, "alive", 1)
            pools = {p.pool: p for p in (await q.pools()).items}
            assert pools[pool].free_capacity == 3 and pools[pool].sessions == {"assigned": 1}

        # Live: a later event lands without a restart.
        released = await pstore.append(ev.SessionReleased(producer=producer(agent), session_id=session,
                                                          agent_id=agent, incarnation=inc, token=token, reason="idle"))
        await projector.wait_for(released)
        async with Query.open(settings_for(tmp_path).db) as q:
            s = (await q.sessions(pool=pool)).items[0]
            assert (s.state, s.owner, s.reason) == ("released", None, "idle")


async def test_a_raw_illegal_route_transition_is_flagged_and_not_applied(pstore: EventStore, tmp_path: Path,
                                                                        uid: str):
    route = f"{uid}-r"
    await pstore.append(ev.RouteCreated(producer=CLI, route_id=route, session_id=f"{uid}-s", endpoint="e"))
    # A raw publisher skips STARTING and WARMING_UP: the SDK would refuse this, the log cannot.
    illegal = await pstore.append(ev.RouteTransitioned(producer=CLI, route_id=route, from_state="PENDING",
                                                       to_state="RUNNING"))
    async with Projector(pstore, settings_for(tmp_path)) as projector:
        await projector.ready(timeout=20)
    async with Query.open(settings_for(tmp_path).db, pstore) as q:
        r = next(r for r in (await q.routes()).items if r.route_id == route)
        assert (r.status, r.sub_status, r.traffic) == ("PROVISIONING", "PENDING", "INACTIVE")
        flags = (await q.anomalies(entity_kind="route", entity_id=route)).items
        assert [(a.seq, a.kind, a.event_type) for a in flags] == [(illegal, "illegal_transition", "route.transitioned")]
        assert "PENDING -> RUNNING" in flags[0].detail
        history = await q.history("route", route)
        assert [(e.type, e.applied, e.anomaly.kind if e.anomaly else None) for e in history.entries] == [
            ("route.created", True, None), ("route.transitioned", False, "illegal_transition")]


async def test_a_superseded_incarnations_goodbye_changes_nothing(pstore: EventStore, tmp_path: Path, uid: str):
    agent, pool, session = f"{uid}-a", f"{uid}-pool", f"{uid}-s"
    old = await register(pstore, agent, pool, instance="old")
    new = await register(pstore, agent, pool, instance="new")  # the process restarted
    await pstore.append(ev.SessionCreated(producer=CLI, session_id=session, pool=pool))
    claim = await pstore.append(ev.SessionClaimed(producer=producer(agent), session_id=session, agent_id=agent,
                                                  instance_id="new", incarnation=new))
    # The old process says goodbye late, and beats once more.
    goodbye = await pstore.append(ev.AgentGoodbye(producer=producer(agent), agent_id=agent, instance_id="old",
                                                  incarnation=old))
    new_beat = await pstore.append(ev.AgentHeartbeat(producer=producer(agent), agent_id=agent, instance_id="new",
                                                     incarnation=new, beat=1))
    late_beat = await pstore.append(ev.AgentHeartbeat(producer=producer(agent), agent_id=agent, instance_id="old",
                                                      incarnation=old, beat=99))
    async with Projector(pstore, settings_for(tmp_path)) as projector:
        await projector.ready(timeout=20)
    async with Query.open(settings_for(tmp_path).db) as q:
        a = (await q.agents(pool=pool)).items[0]
        assert (a.incarnation, a.instance_id, a.status, a.health, a.sessions) == (new, "new", "alive", "alive", 1)
        s = (await q.sessions(pool=pool)).items[0]
        assert (s.state, s.owner, s.token) == ("assigned", agent, claim)
        # The late beat is kept under its own incarnation (the heartbeat fold cannot tell a stale incarnation
        # from a registered one below a forged one) and never counts for the registered incarnation.
        assert a.last_heartbeat_seq == new_beat != late_beat
        flags = {(f.stream, f.seq): f.kind for f in (await q.anomalies(entity_id=agent)).items}
        assert flags == {(LEDGER_STREAM, goodbye): "superseded_incarnation"}


async def dlq_message(store: EventStore, stream: str, seq: int) -> tuple[str, dict[str, str], bytes]:
    """The dead letter of stream message `seq` (found by its subject's last message for each reason)."""
    jsm = store.nc.jsm()
    for reason in ("malformed", "unknown-type", "invalid", "wrong-subject", "oversized"):
        try:
            msg = await jsm.get_last_msg(DLQ_STREAM, f"ledger.dlq.{stream}.{reason}")
        except NotFoundError:
            continue
        if msg.headers and msg.headers.get("Ledger-Dlq-Seq") == str(seq):
            return msg.subject, msg.headers, msg.data or b""
    raise AssertionError(f"no dead letter for {stream} #{seq}")


async def test_bad_messages_are_dead_lettered_and_the_projector_keeps_going(pstore: EventStore, tmp_path: Path,
                                                                           uid: str):
    js = pstore.nc.jetstream()
    session = f"{uid}-s"
    bad = {
        "malformed": (f"ledger.session.{session}.created.cli", b"{not json"),
        "unknown-type": (f"ledger.session.{session}.teleported.cli",
                         b'{"type": "session.teleported", "session_id": "x"}'),
        "wrong-subject": (f"ledger.session.{uid}-other.created.cli",
                          codec.encode_payload(ev.SessionCreated(producer=CLI, session_id=session, pool="p"))),
    }
    seqs = {reason: (await js.publish(subject, data)).seq for reason, (subject, data) in bad.items()}
    good = await pstore.append(ev.SessionCreated(producer=CLI, session_id=session, pool=f"{uid}-pool"))
    async with Projector(pstore, settings_for(tmp_path)) as projector:
        await projector.wait_for(good, timeout=20)
    for reason, seq in seqs.items():
        subject, headers, data = await dlq_message(pstore, LEDGER_STREAM, seq)
        assert subject == f"ledger.dlq.LEDGER.{reason}"
        assert headers["Ledger-Dlq-Subject"] == bad[reason][0] and data == bad[reason][1]
        assert headers["Ledger-Dlq-Reason"].startswith(reason) and headers["Nats-Msg-Id"] == f"dlq:LEDGER:{seq}"
    async with Query.open(settings_for(tmp_path).db) as q:
        counts = {(d.stream, d.reason): d.count for d in await q.dead_letters()}
        assert all(counts[(LEDGER_STREAM, reason)] >= 1 for reason in bad)
        assert [s.session_id for s in (await q.sessions(pool=f"{uid}-pool")).items] == [session]
    # A second projection of the same log does not dead-letter the same messages twice.
    before = (await pstore.nc.jsm().stream_info(DLQ_STREAM)).state.messages
    async with Projector(pstore, settings_for(tmp_path, "again")) as again:
        await again.wait_for(good, timeout=20)
    assert (await pstore.nc.jsm().stream_info(DLQ_STREAM)).state.messages == before


async def test_a_restart_resumes_from_the_checkpoint(pstore: EventStore, tmp_path: Path, uid: str):
    pool = f"{uid}-pool"
    async with Projector(pstore, settings_for(tmp_path)) as projector:
        await projector.ready(timeout=20)
        first = projector.committed[LEDGER_STREAM]
    last = 0
    for n in range(5):
        last = await pstore.append(ev.SessionCreated(producer=CLI, session_id=f"{uid}-s{n}", pool=pool))
    async with Projector(pstore, settings_for(tmp_path)) as projector:
        assert projector.committed[LEDGER_STREAM] == first  # loaded, not replayed
        await projector.wait_for(last, timeout=20)
        assert projector.events == last - first  # only what came after the checkpoint
    await rebuild(pstore, settings_for(tmp_path, "rebuilt"))
    assert dump(tmp_path / "p.sqlite3") == dump(tmp_path / "rebuilt.sqlite3")


async def test_one_file_has_one_projector(pstore: EventStore, tmp_path: Path):
    async with Projector(pstore, settings_for(tmp_path)):
        with pytest.raises(DatabaseBusy, match="another projector"):
            async with Projector(pstore, settings_for(tmp_path)):
                pass
        with pytest.raises(DatabaseBusy):
            await rebuild(pstore, settings_for(tmp_path))


async def test_a_projection_of_another_stream_is_refused(fresh_server: EmbeddedServer, tmp_path: Path):
    settings = Settings(nats_url=fresh_server.url)
    async with EventStore.connect(settings, ensure=True) as store:
        await store.append(ev.SessionCreated(producer=CLI, session_id="s1", pool="p"))
        async with Projector(store, settings_for(tmp_path)) as projector:
            await projector.ready(timeout=20)
        await store.nc.jsm().delete_stream(LEDGER_STREAM)  # someone made the stream anew
        await store.ensure_streams()
        with pytest.raises(StreamChanged, match="ledger rebuild"):
            async with Projector(store, settings_for(tmp_path)):
                pass


async def test_rebuild_equals_the_projection_maintained_live(fresh_server: EmbeddedServer, tmp_path: Path):
    settings = Settings(nats_url=fresh_server.url)
    async with EventStore.connect(settings, ensure=True) as store:
        async with Projector(store, settings_for(tmp_path, snapshot_every=50)) as projector:
            await projector.ready(timeout=20)
            last = 0
            for n in range(300):  # a live fleet: the projector commits while events keep coming
                agent = f"a{n % 7}"
                if n % 50 == 0:
                    last = await register(store, agent, "p", instance=f"i{n}")
                await store.append(ev.AgentHeartbeat(producer=producer(agent), agent_id=agent, instance_id="i",
                                                     incarnation=n, beat=n))
                last = await store.append(ev.SessionCreated(producer=CLI, session_id=f"s{n}", pool="p"))
                if n % 9 == 0:
                    await store.nc.jetstream().publish(f"ledger.session.s{n}.created.cli", b"\x00garbage")
            last = await store.last_seq(LEDGER_STREAM)
            await projector.wait_for(last, timeout=30)
            await projector.wait_for(await store.last_seq(HEARTBEAT_STREAM), HEARTBEAT_STREAM, timeout=30)
        await rebuild(store, settings_for(tmp_path, "rebuilt"))
    assert dump(tmp_path / "p.sqlite3") == dump(tmp_path / "rebuilt.sqlite3")


async def test_a_pools_breaker_shows_in_the_pools_view_and_its_history(pstore: EventStore, tmp_path: Path, uid: str):
    pool = f"{uid}-pool"
    monitor = ev.Producer(id="monitor", instance="m")
    await register(pstore, f"{uid}-a", pool)
    tripped = await pstore.append(ev.PoolBreakerTripped(producer=monitor, pool=pool, reason="3 of 4 agents died",
                                                        agents=4))
    async with Projector(pstore, settings_for(tmp_path)) as projector:
        await projector.wait_for(tripped, timeout=20)
        async with Query.open(settings_for(tmp_path).db, pstore) as q:
            view = next(p for p in (await q.pools()).items if p.pool == pool)
            assert (view.breaker_open, view.breaker_reason, view.breaker_trips) == (True, "3 of 4 agents died", 1)
        reset = await pstore.append(ev.PoolBreakerReset(producer=CLI, pool=pool, reason="operator"))
        await projector.wait_for(reset, timeout=20)
    async with Query.open(settings_for(tmp_path).db, pstore) as q:
        assert not next(p for p in (await q.pools()).items if p.pool == pool).breaker_open
        assert next(p for p in (await q.pools(as_of=tripped)).items if p.pool == pool).breaker_open
        history = await q.history("pool", pool)
        assert [(e.type, e.changes.get("breaker_open")) for e in history.entries] == [
            ("pool.breaker_tripped", [None, True]), ("pool.breaker_reset", [True, False])]
