"""The event store on a real 3-node nats-server cluster (R3 streams)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import nats
import pytest
from conftest import wait_for_jetstream
from helpers import eventually
from store_contract import StoreContract, created
from test_agent import race_agents

from ledger import subjects
from ledger.agent import Agent
from ledger.codec import Recorded
from ledger.errors import Conflict
from ledger.events import Producer
from ledger.ids import new_id
from ledger.settings import Settings
from ledger.store import EventStore
from ledger.writer import Writer
from ledgerctl.server import EmbeddedCluster

pytestmark = pytest.mark.cluster


async def test_streams_are_replicated_three_times(cluster_store: EventStore):
    for name in (subjects.LEDGER_STREAM, subjects.HEARTBEAT_STREAM, subjects.DLQ_STREAM):
        info = await cluster_store.nc.jsm().stream_info(name)
        assert info.config.num_replicas == 3
        assert info.cluster is not None and len(info.cluster.replicas or []) == 2


class TestStoreOnTheCluster(StoreContract):
    """The store contract on R3 streams, racers spread over the three nodes."""

    @pytest.fixture
    def settings(self, cluster_settings: Settings) -> Settings:
        return cluster_settings

    @pytest.fixture
    def node_urls(self, nats_cluster: EmbeddedCluster) -> list[str]:
        return list(nats_cluster.urls)


async def test_on_r3_a_retry_with_its_now_stale_expectation_is_still_one_fact(cluster_store: EventStore, uid: str):
    # R3 de-duplicates before it checks the expectation: a duplicate ack, not a conflict (a single node answers
    # "wrong last sequence" here; the appender resolves both alike when it retries: see the store contract).
    event = created(uid)
    first = await cluster_store.append(event, expect=0)
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
    ledger = Writer(cluster_store, Producer(id="operator-test", instance=new_id()))
    sid, seq = await ledger.create_session("p", session_id=f"{uid}-s")
    await race_agents(cluster_settings, sid, f"{uid}-racer", 50)
    claims = [r for r in await cluster_store.history("session", sid, min_last_seq=seq + 1)
              if r.event.type_tag() == "session.claimed"]
    assert len(claims) == 1


async def test_a_projector_following_through_a_leader_kill_ends_in_the_rebuilds_state(own_cluster: EmbeddedCluster,
                                                                                      tmp_path: Path):
    from projection_helpers import dump

    from ledger.events import AgentHeartbeat
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


async def stream_leaders(store: EventStore) -> dict[str, str]:
    """Stream name -> the server that leads it now."""
    return {name: (await store.nc.jsm().stream_info(name)).cluster.leader  # type: ignore[union-attr]
            for name in (subjects.LEDGER_STREAM, subjects.HEARTBEAT_STREAM)}


async def freeze_under_agents(cluster: EmbeddedCluster, uid: str, ttl: float,
                              pick: Callable[[dict[str, str]], str]) -> dict[str, object]:
    """Three agents (ttl `ttl`, one session each) connected first to the node `pick` chooses, all cluster URLs
    known; that node frozen (SIGSTOP) until every agent has had 1.5 x ttl of heartbeats acknowledged since.
    Returns what to assert: fences seen, incarnations and sessions before / after, the nodes they moved to."""
    base = Settings(nats_url=cluster.url, replicas=3)
    async with EventStore.connect(base, ensure=True) as admin:
        leaders = await stream_leaders(admin)
    frozen = next(s for s in cluster.servers if s.config.name == pick(leaders))
    assert frozen.pid is not None
    order = [frozen.url, *(s.url for s in cluster.servers if s is not frozen)]
    settings = base.replace(nats_url=",".join(order), randomize_servers=False).for_lease(ttl)
    heartbeat = ttl / 6
    fences: list[str] = []
    async with contextlib.AsyncExitStack() as stack:
        agents: list[Agent] = []
        for i in range(3):
            ledger = await stack.enter_async_context(Writer.connect(settings, producer_id=f"{uid}-a{i}"))
            agent = await stack.enter_async_context(Agent(
                ledger, agent_id=f"{uid}-a{i}", pool=uid, heartbeat=heartbeat, ttl=ttl,
                on_fenced=lambda why, i=i: fences.append(f"a{i}: {why}")))
            operator = Writer(ledger.store, Producer(id="operator-test", instance=new_id()))  # creates sessions
            sid, _ = await operator.create_session(uid, session_id=f"{uid}-s{i}")
            await agent.claim(sid)
            agents.append(agent)
        assert {a.store.nc.connected_url.port for a in agents} == {frozen.config.port}  # type: ignore[union-attr]
        before = [(a.incarnation, sorted(a.owned)) for a in agents]
        acked = [a.stats.beats_acked for a in agents]
        enough = int(1.5 * ttl / heartbeat)
        os.kill(frozen.pid, signal.SIGSTOP)
        try:
            await eventually(lambda: fences or all(a.stats.beats_acked >= n + enough
                                                   for a, n in zip(agents, acked, strict=False)),
                             timeout=20 * ttl, interval=0.1, what=f"{enough} heartbeats of each agent acknowledged")
            moved_to = {a.store.nc.connected_url.port for a in agents}  # type: ignore[union-attr]
            after = [(a.incarnation, sorted(a.owned)) for a in agents]
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
        async with EventStore.connect(base) as reader:
            written = [r.event.type_tag() for batch in [b async for b in reader.replay(
                [subjects.family_filter("agent")], patience=RECOVERY_PATIENCE)] for r in batch
                if isinstance(r, Recorded) and r.event.agent_id.startswith(uid)]  # type: ignore[attr-defined]
    return {"fences": fences, "before": before, "after": after, "moved_to": moved_to, "frozen": frozen.config.port,
            "written": written}


@pytest.mark.timeout(300)
async def test_freezing_a_node_that_leads_no_stream_fences_no_agent_connected_to_it(own_cluster: EmbeddedCluster,
                                                                                   uid: str):
    # A node leading neither LEDGER nor LEDGER_HB: of three nodes and two streams there is always one.
    names = [s.config.name for s in own_cluster.servers]
    seen = await freeze_under_agents(own_cluster, uid, ttl=6.0,
                                     pick=lambda leaders: next(n for n in names if n not in leaders.values()))
    assert seen["fences"] == []
    assert seen["after"] == seen["before"]  # same incarnations, same sessions
    assert seen["frozen"] not in seen["moved_to"]  # type: ignore[operator]
    assert "agent.fenced" not in seen["written"] and "agent.declared_dead" not in seen["written"]
    assert seen["written"].count("agent.registered") == 3, seen["written"]


@pytest.mark.timeout(300)
async def test_freezing_the_heartbeat_streams_leader_fences_no_agent_whose_ttl_outlasts_an_election(
        own_cluster: EmbeddedCluster, uid: str):
    # Heartbeats cannot be acknowledged until the other two nodes elect a new leader: nats-server's Raft
    # waits 4-9 s for that (measured here: first acknowledgement 4-7 s after the freeze, unloaded). A ttl
    # shorter than an election cannot survive its leader's freeze; one well beyond it must.
    seen = await freeze_under_agents(own_cluster, uid, ttl=20.0,
                                     pick=lambda leaders: leaders[subjects.HEARTBEAT_STREAM])
    assert seen["fences"] == []
    assert seen["after"] == seen["before"]
    assert seen["frozen"] not in seen["moved_to"]  # type: ignore[operator]
    assert "agent.fenced" not in seen["written"] and "agent.declared_dead" not in seen["written"]
