"""Real-server fixtures: a nats-server on free loopback ports, single node and a 3-node cluster.

With LEDGER_TEST_DOCKER=1 and a reachable Docker engine, the single node is a
testcontainers NATS container instead; otherwise (and on the development
machines, which have no Docker engine) it is the nats-server binary.

No test sees the caller's LEDGER_* settings (an exported LEDGER_DB or LEDGER_NATS_URL, as the README's
`ledger up` hint suggests): they are cleared for the session and again for each test, so the commands a test
runs as subprocesses inherit only what the test itself sets. The suite's own switches (LEDGER_TEST_*) stay.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.errors import Error as NatsError

from ledger import events as ev
from ledger.ids import new_id
from ledger.settings import Settings
from ledger.store import EventStore
from ledger.writer import Writer
from ledgerctl.server import EmbeddedCluster, EmbeddedServer, ServerConfig, free_port

SUITE_SWITCHES = "LEDGER_TEST_"


def callers_ledger_settings() -> list[str]:
    """The LEDGER_* variables in this process's environment that are not the suite's own switches."""
    return [k for k in os.environ if k.startswith("LEDGER_") and not k.startswith(SUITE_SWITCHES)]


@pytest.fixture(scope="session", autouse=True)
def _no_callers_ledger_settings_in_the_session() -> Iterator[None]:
    """For the session-scoped servers and what they run (autouse: set up before any other session fixture)."""
    with pytest.MonkeyPatch.context() as mp:
        for name in callers_ledger_settings():
            mp.delenv(name)
        yield


@pytest.fixture(autouse=True)
def _no_ledger_settings_but_the_tests_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever an earlier test left in os.environ is gone too; a test's monkeypatch.setenv comes after this."""
    for name in callers_ledger_settings():
        monkeypatch.delenv(name)


def docker_opted_in() -> bool:
    return os.environ.get("LEDGER_TEST_DOCKER") == "1"


class RunningNats:
    """What tests need of a server: its URL, and (for binaries) a way to crash and restart it."""

    def __init__(self, url: str, server: EmbeddedServer | None = None) -> None:
        self.url = url
        self.server = server


@functools.cache
def docker_engine_reachable() -> bool:
    if "DOCKER_HOST" not in os.environ and not Path("/var/run/docker.sock").exists():
        return False  # (asking anyway leaks the docker client's failed socket: a ResourceWarning, an error here)
    try:
        import docker

        client = docker.from_env(timeout=3)
    except ImportError:
        return False
    except docker.errors.DockerException:
        return False
    try:
        return bool(client.ping())
    except (docker.errors.DockerException, OSError):  # an API error; the socket's (requests' errors are OSErrors)
        return False
    finally:
        client.close()


def start_binary_server(base: Path, **config: object) -> EmbeddedServer:
    cfg = ServerConfig(data_dir=base, port=free_port(), name=f"t-{uuid.uuid4().hex[:6]}", sync_always=False,
                       **config)  # type: ignore[arg-type]
    return EmbeddedServer(cfg).start()


async def wait_for_jetstream(url: str, timeout: float = 30.0) -> None:
    """Poll until JetStream answers (a cluster needs a meta leader first)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            nc = await nats.connect(url.split(","), connect_timeout=2, max_reconnect_attempts=1)
            try:
                await nc.jetstream().account_info()
                return
            finally:
                await nc.close()
        except (NatsError, OSError, TimeoutError) as e:  # not ready yet
            last = e
            await asyncio.sleep(0.1)
    raise TimeoutError(f"JetStream at {url} not ready after {timeout} s: {last!r}")


async def create_streams(url: str, **settings: object) -> None:
    async with EventStore.connect(Settings(nats_url=url, **settings), ensure=True):  # type: ignore[arg-type]
        pass


@pytest.fixture(scope="session")
def nats_container() -> Iterator[str]:
    """A testcontainers NATS container with the ledger's streams (opt-in: LEDGER_TEST_DOCKER=1); its URL."""
    if not docker_opted_in():
        pytest.skip("opt-in: set LEDGER_TEST_DOCKER=1")
    if not docker_engine_reachable():
        pytest.skip("LEDGER_TEST_DOCKER=1 but no Docker engine is reachable")
    from testcontainers.community.nats import NatsContainer

    with NatsContainer("nats:2.14", jetstream=True) as container:
        asyncio.run(create_streams(container.nats_uri()))
        yield container.nats_uri()


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[RunningNats]:
    """The shared single node, with the ledger's streams (tests keep apart by unique ids)."""
    if docker_opted_in() and docker_engine_reachable():
        yield RunningNats(request.getfixturevalue("nats_container"))
        return
    server = start_binary_server(tmp_path_factory.mktemp("nats"))
    try:
        asyncio.run(create_streams(server.url))
        yield RunningNats(server.url, server)
    finally:
        server.stop()


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A server of this test's own, for tests that crash it or need empty streams."""
    server = start_binary_server(tmp_path / "nats")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A server of this test's own with the ledger's streams, for tests that read or check whole streams."""
    s = start_binary_server(tmp_path / "nats")
    try:
        asyncio.run(create_streams(s.url))
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="session")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedCluster]:
    cluster = EmbeddedCluster(tmp_path_factory.mktemp("cluster"))
    cluster.start()
    try:
        asyncio.run(wait_for_jetstream(cluster.url))
        asyncio.run(create_streams(cluster.url, replicas=3))
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def settings(nats_server: RunningNats) -> Settings:
    return Settings(nats_url=nats_server.url)


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[EventStore]:
    async with EventStore.connect(settings, ensure=True) as s:
        yield s


@pytest.fixture
def cluster_settings(nats_cluster: EmbeddedCluster) -> Settings:
    return Settings(nats_url=nats_cluster.url, replicas=3)


@pytest.fixture
async def cluster_store(cluster_settings: Settings) -> AsyncIterator[EventStore]:
    async with EventStore.connect(cluster_settings, ensure=True) as s:
        yield s


_ids = itertools.count(1)


@pytest.fixture
async def ledger(store: EventStore) -> Writer:
    """The SDK's client on the shared server, writing as a test operator."""
    return Writer(store, ev.Producer(id="operator-test", instance=new_id()))


@pytest.fixture
def uid() -> str:
    """A prefix that makes this test's entity ids unique on a shared server."""
    return f"t{next(_ids)}-{uuid.uuid4().hex[:8]}"
