"""Hostile cases for the heartbeat stream's persist mode (issue 13): an existing stream created either way is
reported as right by `check_streams` and `ledger doctor`, and a single-node ledger grown to three replicas can
still take its replicas setting."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest
from click.testing import CliRunner
from conftest import wait_for_jetstream
from nats.js.api import PersistMode

from ledger import streams, subjects
from ledger.errors import StreamMismatch
from ledger.settings import Settings
from ledger.store import EventStore
from ledgerctl.cli import cli
from ledgerctl.server import EmbeddedCluster, EmbeddedServer


async def create_heartbeats(url: str, mode: PersistMode | None, replicas: int = 1) -> None:
    spec = next(s for s in streams.specs(Settings(nats_url=url, replicas=replicas))
                if s.name == subjects.HEARTBEAT_STREAM)
    spec.persist_mode = mode
    spec.num_replicas = replicas
    nc = await nats.connect(servers=url.split(","))
    try:
        await nc.jetstream().add_stream(spec)
    finally:
        await nc.close()


@pytest.mark.parametrize("mode", [None, PersistMode.DEFAULT, PersistMode.ASYNC])
async def test_check_streams_and_doctor_see_no_difference_whichever_mode_it_was_created_with(
        fresh_server: EmbeddedServer, mode: PersistMode | None):
    await create_heartbeats(fresh_server.url, mode)
    async with EventStore.connect(Settings(nats_url=fresh_server.url), check=False) as store:
        await store.ensure_streams()  # the other streams; the heartbeat one is kept as it is
        assert await store.check_streams() == {name: {} for name in (await store.check_streams())}
        kept = (await store.nc.jsm().stream_info(subjects.HEARTBEAT_STREAM)).config.persist_mode
        assert kept in ((None, PersistMode.DEFAULT) if mode != PersistMode.ASYNC else (PersistMode.ASYNC,))
    args = ["doctor", "--nats-url", fresh_server.url, "--db", "/nonexistent/p.sqlite3"]
    out = await asyncio.to_thread(CliRunner().invoke, cli, args)  # the CLI runs its own event loop
    streams_lines = [line for line in out.output.splitlines() if "streams" in line.lower() or "LEDGER" in line]
    assert streams_lines, out.output
    assert not [line for line in streams_lines if "FAIL" in line or "differs" in line], out.output


async def test_an_r1_ledger_grown_to_three_replicas_says_how_in_one_line(tmp_path: Path):
    # JetStream refuses an async persist mode on a replicated stream and never changes it in an update: the
    # heartbeat stream of a single node must be removed to grow (its beats are replaced within one interval).
    cluster = EmbeddedCluster(tmp_path / "cluster")
    cluster.start()
    try:
        await wait_for_jetstream(cluster.url)
        await create_heartbeats(cluster.url, PersistMode.ASYNC, replicas=1)
        async with EventStore.connect(Settings(nats_url=cluster.url, replicas=3), check=False) as store:
            with pytest.raises(StreamMismatch) as refused:
                await store.ensure_streams()
    finally:
        cluster.stop()
    assert "\n" not in str(refused.value)
    assert f"nats stream rm {subjects.HEARTBEAT_STREAM}" in str(refused.value) and "ledger init" in str(refused.value)

