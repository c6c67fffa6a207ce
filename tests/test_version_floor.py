"""The version floor on every connection: a server below 2.11.0 ignores the entity-wide compare-and-set header.

Against a stand-in that speaks just enough NATS protocol to say it is 2.9.10, always; and against Debian's
real nats-server 2.9.10 when it is installed (`apt-get install nats-server`; .ci/run installs it).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ledger.errors import ConnectedServerTooOld, Unavailable
from ledger.settings import Settings
from ledger.store import EventStore
from ledgerctl import server as srv
from ledgerctl.server import MIN_VERSION, binary_version, free_port

LEDGER = [sys.executable, "-m", "ledgerctl"]
DEBIAN_PATHS = ("/usr/sbin/nats-server", "/usr/bin/nats-server")


class OldServer:
    """A TCP server on loopback that introduces itself as nats-server `version` and answers PING with PONG."""

    def __init__(self, version: str = "2.9.10") -> None:
        self.version = version
        self.port = free_port()
        self.connects = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="old-nats")
        self._server: asyncio.base_events.Server | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        info = {"server_id": "OLD", "server_name": "old", "version": self.version, "proto": 1, "go": "go1.19",
                "host": "127.0.0.1", "port": self.port, "headers": True, "max_payload": 1048576, "jetstream": True,
                "client_id": 1}
        writer.write(f"INFO {json.dumps(info)}\r\n".encode())
        try:
            while line := await reader.readline():
                if line.startswith(b"CONNECT"):
                    self.connects += 1
                elif line.startswith(b"PING"):
                    writer.write(b"PONG\r\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def __enter__(self) -> OldServer:
        self._thread.start()
        assert self._ready.wait(10), "the stand-in server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    return subprocess.run([*LEDGER, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False)


def assert_refused(result: subprocess.CompletedProcess[str], url: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for needle in ("nats-server 2.9.10", url, "too old", "2.11.0", "Nats-Expected-Last-Subject-Sequence-Subject",
                   "upgrade"):
        assert needle in lines[0], lines[0]


def commands(url: str, tmp_path: Path) -> dict[str, list[str]]:
    return {
        "init": ["init", "--nats-url", url],
        "up": ["up", "--nats-url", url, "--data-dir", str(tmp_path / "up"), "--db", str(tmp_path / "p.sqlite3")],
        "agent": ["agent", "--agent-id", "a1", "--pool", "gpu", "--nats-url", url],
        "session create": ["session", "create", "--pool", "gpu", "--nats-url", url],
    }


@pytest.fixture
def old_server() -> Iterator[OldServer]:
    with OldServer() as s:
        yield s


@pytest.mark.timeout(30)
async def test_the_sdk_refuses_a_server_below_the_floor(old_server: OldServer):
    with pytest.raises(ConnectedServerTooOld, match="nats-server 2.9.10 at .* is too old"):
        async with EventStore.connect(Settings(nats_url=old_server.url)):
            pass
    assert old_server.connects == 1  # it did get that far: refused for its version, not for being unreachable


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", ["init", "up", "agent", "session create"])
def test_every_command_refuses_a_server_below_the_floor(old_server: OldServer, tmp_path: Path, command: str):
    assert_refused(run_cli(*commands(old_server.url, tmp_path)[command]), old_server.url)


@pytest.mark.timeout(30)
async def test_a_server_at_the_floor_is_not_refused_for_its_version():
    with OldServer(".".join(map(str, MIN_VERSION))) as s:
        # The stand-in has no JetStream: the connection passes the floor, and the stream check goes unanswered.
        with pytest.raises(Unavailable, match=r"JetStream did not answer \$JS\.API\.STREAM\.INFO"):
            async with EventStore.connect(Settings(nats_url=s.url, request_timeout=1.0)):
                pass


# --- Debian's nats-server 2.9.10 ----------------------------------------------------------------------------------


def debian_binary() -> str | None:
    """An installed nats-server below the floor (Debian bookworm ships 2.9.10), if there is one."""
    for path in (shutil.which("nats-server"), *DEBIAN_PATHS):
        if path and os.access(path, os.X_OK):
            try:
                if binary_version(path) < MIN_VERSION:
                    return path
            except Exception:  # noqa: BLE001 - not a nats-server we can use here
                continue
    return None


needs_debian = pytest.mark.skipif(debian_binary() is None,
                                  reason="no nats-server older than 2.11.0 installed (apt-get install nats-server)")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def debian_server(tmp_path: Path) -> Iterator[str]:
    binary = debian_binary()
    assert binary is not None
    port = free_port()
    with open(tmp_path / "nats.log", "wb") as log:  # the child keeps its own copy
        proc = subprocess.Popen([binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp_path / "js")],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not _port_open(port):
            assert proc.poll() is None, (tmp_path / "nats.log").read_text()
            assert time.monotonic() < deadline, "Debian's nats-server did not listen within 20 s"
            time.sleep(0.05)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@needs_debian
def test_the_embedded_server_never_picks_debians_old_binary():
    path, version = srv.find_binary()
    assert version >= MIN_VERSION and path != debian_binary()


@needs_debian
@pytest.mark.timeout(30)
async def test_the_sdk_refuses_debians_nats_server(debian_server: str):
    with pytest.raises(ConnectedServerTooOld, match=r"nats-server 2\.9\.10 at .* is too old"):
        async with EventStore.connect(Settings(nats_url=debian_server), ensure=True):
            pass


@needs_debian
@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", ["init", "up", "agent", "session create"])
def test_every_command_refuses_debians_nats_server(debian_server: str, tmp_path: Path, command: str):
    assert_refused(run_cli(*commands(debian_server, tmp_path)[command]), debian_server)


@pytest.mark.timeout(60)
async def test_a_reconnect_to_a_node_below_the_floor_ends_the_connection(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture):
    # The first node is new enough; when it goes, the client's next URL is an old one: the reconnect is
    # refused like a first connect (closed, one error line), never used for compare-and-set writes.
    from conftest import create_streams, start_binary_server
    from helpers import eventually

    caplog.set_level("ERROR", logger="ledger.connection")
    good = start_binary_server(tmp_path / "good")
    try:
        await create_streams(good.url)
        with OldServer() as old:
            settings = Settings(nats_url=f"{good.url},{old.url}", randomize_servers=False, ping_interval=0.5,
                                reconnect_time_wait=0.2)
            async with EventStore.connect(settings) as store:
                assert store.nc.connected_server_version.minor >= MIN_VERSION[1]
                good.stop()
                await eventually(lambda: store.nc.is_closed, timeout=30, interval=0.1,
                                 what="the connection closed after reconnecting to 2.9.10")
                assert old.connects >= 1
            refusals = [r.getMessage() for r in caplog.records if "2.9.10" in r.getMessage()]
            assert refusals and "closing the connection" in refusals[0], caplog.text
    finally:
        good.stop()
