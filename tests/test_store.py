"""The event store on a real nats-server: the store contract on a single node, and what needs a server of its own
(crashes, outages, missing streams)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from helpers import eventually
from store_contract import StoreContract, claimed, created, submit_beats

from ledger.errors import AppendTimeout, StreamMissing
from ledger.settings import Settings
from ledger.store import EventStore
from ledgerctl.server import EmbeddedServer

__all__ = ["claimed", "created", "submit_beats"]  # other test modules take their events from here


class TestStoreOnOneNode(StoreContract):
    """The contract on the shared single node (a container with LEDGER_TEST_DOCKER=1: see conftest)."""


async def test_append_rides_out_a_server_crash(fresh_server: EmbeddedServer, uid: str,
                                               caplog: pytest.LogCaptureFixture):
    settings = Settings(nats_url=fresh_server.url, request_timeout=0.5, append_deadline=30)
    async with EventStore.connect(settings, ensure=True) as store:
        heard: list[str] = []
        store.add_connection_listener(heard.append)
        s1 = await store.append(created(uid), expect=0)
        fresh_server.kill()
        caplog.set_level(logging.DEBUG, logger="ledger.appender")
        pending = asyncio.create_task(store.append(claimed(uid, "a1"), expect=s1))
        # Past the point where it could have given up: the outage is noticed and the append re-sent, not failed.
        await eventually(lambda: "disconnected" in heard and any("attempt 2" in r.getMessage() for r in caplog.records),
                         timeout=30, what="the outage noticed and the append re-sent")
        assert not pending.done()
        await asyncio.to_thread(fresh_server.start)
        s2 = await asyncio.wait_for(pending, 30)
        history = await store.history("session", uid)
        assert [r.seq for r in history] == [s1, s2]
        assert heard[:2] == ["disconnected", "reconnected"]


async def test_append_gives_up_as_ambiguous_when_the_server_stays_down(fresh_server: EmbeddedServer, uid: str):
    settings = Settings(nats_url=fresh_server.url, request_timeout=0.2, append_deadline=1.0)
    async with EventStore.connect(settings, ensure=True) as store:
        fresh_server.kill()
        # It re-sends before it gives up (bounded here only so that a hang fails instead of waiting for ever).
        with pytest.raises(AppendTimeout, match=r"after ([2-9]|\d\d+) attempts .* may have landed"):
            await asyncio.wait_for(store.append(created(uid)), 60)


async def test_missing_streams_are_reported_at_connect(fresh_server: EmbeddedServer):
    with pytest.raises(StreamMissing, match="ledger init"):
        async with EventStore.connect(Settings(nats_url=fresh_server.url)):
            pass
