"""A bounded fault campaign: kill -9 and restart the stream leader, freeze a node, kill -9 the projector and
the consumers, kill -9 a single fsync'ing server - all under steady load; after each fault the log keeps
every acknowledged append, `ledger check` is clean, the projection equals a rebuild (every table), no agent
stays fenced and no session is stranded."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_for_jetstream
from projection_helpers import NOT_COMPARED, STATE_TABLES, dump

from ledgerctl.server import EmbeddedCluster, EmbeddedServer, ServerConfig, free_port
from projections.schema import TABLES


def test_the_equivalence_helper_compares_every_table_of_the_projection(tmp_path: Path):
    assert set(STATE_TABLES) | set(NOT_COMPARED) == set(TABLES)
    assert not set(STATE_TABLES) & set(NOT_COMPARED)
    # And a difference in any compared table is seen: here, a pool's breaker.
    from projections.schema import statements

    files = [tmp_path / "a.sqlite3", tmp_path / "b.sqlite3"]
    for i, path in enumerate(files):
        with sqlite3.connect(path) as conn:
            for sql in statements():
                conn.execute(sql)
            conn.execute("INSERT INTO pools VALUES ('p', ?, '{}')", (i,))
    assert dump(files[0]) != dump(files[1])


# --- the campaign ---------------------------------------------------------------------------------------------

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from campaign import ClusterCampaign, FaultResult, NodeCampaign, create_streams  # noqa: E402

FREEZE = 6.0
"""Seconds a node stays frozen: long against the agents' 4 s ttl, short enough for CI."""


def assert_whole(result: FaultResult, live: Path, rebuilt: Path) -> None:
    assert result.acks_checked > 0, result
    assert result.servers_whole, f"after {result.fault}: the cluster did not become whole again"
    assert result.missing == [], f"after {result.fault}: acknowledged appends missing {result.missing[:5]}"
    assert result.violations == [], f"after {result.fault}: `ledger check` found {result.violations[:5]}"
    assert result.unsettled_agents == [], (
        f"after {result.fault}: agents not alive and beating {result.unsettled_agents}")
    assert result.lost_owner_sessions == [], f"after {result.fault}: sessions left with a lost owner"
    assert result.projection_equal, f"after {result.fault}: projection != rebuild in {result.differing_tables}"
    assert dump(live) == dump(rebuilt)  # and by the tests' own equivalence helper


def ledger_check_exit(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ledgerctl", "check", "--nats-url", url], capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.mark.cluster
@pytest.mark.timeout(300)
async def test_a_fault_campaign_on_the_cluster_keeps_every_invariant(tmp_path: Path):
    cluster = EmbeddedCluster(tmp_path / "cluster")
    await asyncio.to_thread(cluster.start)
    try:
        await wait_for_jetstream(cluster.url)
        await create_streams(cluster.url, 3)
        async with ClusterCampaign(cluster, tmp_path / "c", rng=random.Random(9), say=lambda _: None) as c:
            await c.round(FREEZE)
            faults = [r.fault for r in c.results]
            assert faults == ["kill -9 stream leader", f"SIGSTOP {FREEZE:g}s stream leader", "kill -9 projector",
                              "kill -9 consumers"]
            assert c.fleet.projector.starts == 2 and c.fleet.consumers.starts == 2
            assert c.results[-1].acks_checked > c.results[0].acks_checked  # the load went on throughout
            for i, result in enumerate(c.results):
                assert_whole(result, tmp_path / "c" / f"live-{i}.sqlite3", tmp_path / "c" / f"rebuilt-{i}.sqlite3")
            done = ledger_check_exit(cluster.url)
            assert done.returncode == 0, done.stdout + done.stderr
    finally:
        await asyncio.to_thread(cluster.stop)


@pytest.mark.timeout(200)
async def test_kill_9_of_a_single_fsyncing_node_under_load_keeps_every_invariant(tmp_path: Path):
    server = EmbeddedServer(ServerConfig(data_dir=tmp_path / "nats", port=free_port(), sync_always=True))
    await asyncio.to_thread(server.start)
    try:
        await create_streams(server.url, 1)
        async with NodeCampaign(server, tmp_path / "n", rng=random.Random(3), say=lambda _: None) as n:
            await n.kill_server()
            await n.kill_child(n.fleet.projector)
            for i, result in enumerate(n.results):
                assert_whole(result, tmp_path / "n" / f"live-{i}.sqlite3", tmp_path / "n" / f"rebuilt-{i}.sqlite3")
            done = ledger_check_exit(server.url)
            assert done.returncode == 0, done.stdout + done.stderr
    finally:
        await asyncio.to_thread(server.stop)
