"""The same store behaviour on a testcontainers NATS container (opt-in: LEDGER_TEST_DOCKER=1)."""

from __future__ import annotations

import os

import pytest
from conftest import docker_engine_reachable
from test_store import claimed, created

from ledger.errors import Conflict
from ledger.settings import Settings
from ledger.store import EventStore

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(os.environ.get("LEDGER_TEST_DOCKER") != "1", reason="opt-in: set LEDGER_TEST_DOCKER=1"),
]


@pytest.fixture(scope="module")
def container_url() -> str:
    if not docker_engine_reachable():
        pytest.skip("LEDGER_TEST_DOCKER=1 but no Docker engine is reachable")
    from testcontainers.community.nats import NatsContainer

    with NatsContainer("nats:2.14", jetstream=True) as container:
        yield container.nats_uri()


async def test_compare_and_set_on_a_container(container_url: str, uid: str):
    async with EventStore.connect(Settings(nats_url=container_url), ensure=True) as store:
        s1 = await store.append(created(uid), expect=0)
        await store.append(claimed(uid, "a1"), expect=s1)
        with pytest.raises(Conflict):
            await store.append(claimed(uid, "a2"), expect=s1)
        assert len(await store.history("session", uid)) == 2
