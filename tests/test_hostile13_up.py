"""Hostile stops of `ledger up` (issue 13): SIGTERM twice while it is held connecting to a frozen server, and
SIGINT (twice) while it is catching up on a log - each must end it cleanly: exit 0, "stopped", no traceback."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

from test_up_catch_up import LEDGER, STOP_BOUND

from ledger import events as ev
from ledger.settings import Settings
from ledger.writer import Writer
from ledgerctl.server import EmbeddedServer


def ended(proc: subprocess.Popen[str], out: str, err: str) -> None:
    assert proc.returncode == 0, err
    assert out.rstrip().endswith("stopped") and "Traceback" not in err and "forced" not in err, (out, err)


async def test_sigterm_twice_while_held_by_a_frozen_server(tmp_path: Path):
    connected = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def frozen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        connected.set()

    server = await asyncio.start_server(frozen, "127.0.0.1", 0)
    url = f"nats://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    proc = subprocess.Popen([*LEDGER, "up", "--nats-url", url, "--db", str(tmp_path / "p.sqlite3"),  # noqa: ASYNC220
                             "--no-http", "--no-query-service"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "LEDGER_CONNECT_TIMEOUT": "60"})
    try:
        await asyncio.wait_for(connected.wait(), STOP_BOUND)
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGTERM)  # an impatient supervisor: the second must not undo or crash the first
        out, err = await asyncio.to_thread(proc.communicate, timeout=STOP_BOUND)
        ended(proc, out, err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_sigint_twice_while_catching_up(server: EmbeddedServer, tmp_path: Path):
    async with Writer.connect(Settings(nats_url=server.url), producer_id="operator-test") as ops:
        futures = [await ops.store.submit(ev.SessionCreated(producer=ops.producer, session_id=f"s{i}", pool="gpu"))
                   for i in range(2000)]
        await asyncio.gather(*futures)
    proc = subprocess.Popen([*LEDGER, "up", "--nats-url", server.url, "--db", str(tmp_path / "p.sqlite3"),  # noqa: ASYNC220
                             "--no-http", "--no-query-service"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for _ in range(100):  # until the first line about catching up (or the consumers starting)
            line = await asyncio.to_thread(proc.stdout.readline)  # type: ignore[union-attr]
            assert line, proc.stderr.read()  # type: ignore[union-attr]
            seen.append(line)
            if line.startswith(("catching up", "projector catching up", "consumers")):
                break
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.to_thread(proc.communicate, timeout=STOP_BOUND)
        ended(proc, out, err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
