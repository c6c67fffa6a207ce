"""The event store on a real 3-node nats-server cluster (R3 streams)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

from ledger import subjects
from ledger.client import Ledger
from ledger.errors import Conflict
from ledger.events import Producer
from ledger.ids import new_id
from ledger.server import EmbeddedCluster
from ledger.settings import Settings
from ledger.store import EventStore
from conftest import wait_for_jetstream
from test_agent import race_agents
from test_store import created, race

pytestmark = pytest.mark.cluster


async def test_streams_are_replicated_three_times(cluster_store: EventStore):
    for name in (subjects.LEDGER_STREAM, subjects.HEARTBEAT_STREAM, subjects.DLQ_STREAM):
        info = await cluster_store.nc.jsm().stream_info(name)
        assert info.config.num_replicas == 3
        assert info.cluster is not None and len(info.cluster.replicas or []) == 2


async def test_fifty_appenders_race_one_wins_on_the_cluster(cluster_store: EventStore, cluster_settings: Settings,
                                                            nats_cluster: EmbeddedCluster, uid: str):
    s1 = await cluster_store.append(created(uid), expect=0)
    # Spread the racers over all three nodes.
    results: list[int | None] = []
    for url in nats_cluster.urls:
        results += await race(url, cluster_settings, uid, s1, racers=17)
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    history = await cluster_store.history("session", uid, min_last_seq=winners[0])
    assert [r.seq for r in history] == [s1, winners[0]]


async def test_concurrent_racers_on_all_nodes_at_once(cluster_store: EventStore, cluster_settings: Settings,
                                                      nats_cluster: EmbeddedCluster, uid: str):
    s1 = await cluster_store.append(created(uid), expect=0)
    rounds = await asyncio.gather(*(race(url, cluster_settings, uid, s1, racers=17) for url in nats_cluster.urls))
    winners = [r for results in rounds for r in results if r is not None]
    assert len(winners) == 1


async def test_a_retried_append_is_one_fact_on_the_cluster(cluster_store: EventStore, uid: str):
    event = created(uid)
    first = await cluster_store.append(event, expect=0)
    # The same event again, even with its (now stale) expectation: a duplicate ack, not a conflict.
    assert await cluster_store.append(event, expect=0) == first
    assert len(await cluster_store.history("session", uid, min_last_seq=first)) == 1


async def wait_for_stream(url: str, stream: str, timeout: float = 30.0) -> None:
    """Poll until the stream has a leader again (after a node was killed)."""
    deadline = asyncio.get_running_loop().time() + timeout
    nc = await nats.connect(url.split(","))
    try:
        while True:
            try:
                await nc.jsm().stream_info(stream)
                return
            except Exception:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.2)
    finally:
        await nc.close()


@pytest.fixture
async def own_cluster(tmp_path: Path) -> AsyncIterator[EmbeddedCluster]:
    cluster = EmbeddedCluster(tmp_path / "cluster")
    await asyncio.to_thread(cluster.start)
    try:
        await wait_for_jetstream(cluster.url)
        yield cluster
    finally:
        await asyncio.to_thread(cluster.stop)


RECOVERY_PATIENCE = 120.0
"""Seconds a check after a fault waits for the cluster to elect its leaders: much longer on a loaded machine."""


@pytest.mark.timeout(400)
async def test_killing_the_stream_leader_mid_load_loses_no_acknowledged_event(own_cluster: EmbeddedCluster,
                                                                              uid: str):
    settings = Settings(nats_url=own_cluster.url, replicas=3, request_timeout=1.0, append_deadline=60)
    async with EventStore.connect(settings, ensure=True) as store:
        info = await store.nc.jsm().stream_info(subjects.LEDGER_STREAM)
        leader = next(s for s in own_cluster.servers if s.config.name == info.cluster.leader)
        futures = []
        for n in range(600):
            futures.append(await store.submit(created(f"{uid}-{n}"), expect=0))
            if n == 200:
                leader.kill()
        results = await asyncio.gather(*futures, return_exceptions=True)
        acked = {n: r for n, r in enumerate(results) if isinstance(r, int)}
        assert not [r for r in results if not isinstance(r, (int, Conflict))], results
        # A Conflict on create-if-absent here can only mean an earlier attempt of ours landed.
        assert len(acked) >= 590

    survivors = ",".join(s.url for s in own_cluster.servers if s is not leader)
    await wait_for_stream(survivors, subjects.LEDGER_STREAM, timeout=RECOVERY_PATIENCE)
    async with EventStore.connect(Settings(nats_url=survivors, replicas=3), check=False) as reader:
        stored: dict[str, list[int]] = {}
        # A one-shot read, told to wait through the elections (both cores busy: they can take a while).
        async for batch in reader.replay(subjects.family_filter("session"), patience=RECOVERY_PATIENCE):
            for rec in batch:
                stored.setdefault(rec.event.session_id, []).append(rec.seq)
    for n, seq in acked.items():
        assert stored.get(f"{uid}-{n}") == [seq], f"acknowledged event {n} (seq {seq}) missing or doubled"
    assert all(len(v) == 1 for v in stored.values()), "an event was stored twice"


async def test_fifty_agents_race_to_claim_one_session_on_the_cluster(cluster_store: EventStore,
                                                                     cluster_settings: Settings, uid: str):
    ledger = Ledger(cluster_store, Producer(id="test", instance=new_id()))
    sid, seq = await ledger.create_session("p", session_id=f"{uid}-s")
    await race_agents(cluster_settings, sid, f"{uid}-racer", 50)
    claims = [r for r in await cluster_store.history("session", sid, min_last_seq=seq + 1)
              if r.event.type_tag() == "session.claimed"]
    assert len(claims) == 1


async def test_a_projector_following_through_a_leader_kill_ends_in_the_rebuilds_state(own_cluster: EmbeddedCluster,
                                                                                      tmp_path: Path):
    from ledger.events import AgentHeartbeat
    from projection_helpers import dump
    from projections.projector import Projector
    from projections.rebuild import rebuild
    from projections.settings import ProjectionSettings

    settings = Settings(nats_url=own_cluster.url, replicas=3, request_timeout=1.0, append_deadline=60)
    me = Producer(id="a1", instance="i")
    async with EventStore.connect(settings, ensure=True) as store:
        info = await store.nc.jsm().stream_info(subjects.LEDGER_STREAM)
        leader = next(s for s in own_cluster.servers if s.config.name == info.cluster.leader)
        async with Projector(store, ProjectionSettings(db=str(tmp_path / "live.sqlite3"))) as projector:
            await projector.ready(timeout=30)
            futures = []
            for n in range(400):
                futures.append(await store.submit(created(f"s{n}"), expect=0))
                futures.append(await store.submit(AgentHeartbeat(producer=me, agent_id="a1", instance_id="i",
                                                                 incarnation=1, beat=n)))
                if n == 150:
                    leader.kill()  # the projector's consumers may have lived there too
            await asyncio.gather(*futures, return_exceptions=True)
            survivors = ",".join(s.url for s in own_cluster.servers if s is not leader)
            await wait_for_stream(survivors, subjects.LEDGER_STREAM, timeout=RECOVERY_PATIENCE)
            await projector.wait_for(await store.last_seq(subjects.LEDGER_STREAM), timeout=60)
            await projector.wait_for(await store.last_seq(subjects.HEARTBEAT_STREAM), subjects.HEARTBEAT_STREAM,
                                     timeout=60)
        await rebuild(store, ProjectionSettings(db=str(tmp_path / "rebuilt.sqlite3")))
    live = dump(tmp_path / "live.sqlite3")
    assert live == dump(tmp_path / "rebuilt.sqlite3")
    assert len(live["sessions"]) >= 390  # nearly every create landed; each one exactly once


async def test_without_a_replicas_setting_the_cluster_streams_keep_their_three(cluster_store: EventStore):
    from ledger.streams import check_streams

    async with EventStore.connect(Settings(nats_url=cluster_store.settings.nats_url), check=False) as plain:
        assert plain.settings.replicas is None
        assert await check_streams(plain.nc.jsm(), plain.settings) == {
            subjects.LEDGER_STREAM: {}, subjects.HEARTBEAT_STREAM: {}, subjects.DLQ_STREAM: {}}
        reports = await plain.ensure_streams()
        assert [r.action for r in reports] == ["ok", "ok", "ok"]
        info = await plain.nc.jsm().stream_info(subjects.LEDGER_STREAM)
        assert info.config.num_replicas == 3
    # Saying it explicitly still changes it: that is how a stream grows from R1 to R3.
    async with EventStore.connect(Settings(nats_url=cluster_store.settings.nats_url, replicas=1), check=False) as one:
        assert (await check_streams(one.nc.jsm(), one.settings))[subjects.LEDGER_STREAM] == {"num_replicas": (1, 3)}
