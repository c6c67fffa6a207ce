"""`ledger up` says "ready" only once it has caught up, tells how far it is until then, and stops at any moment.

Catching up is held here without timing anything: the stack's consumers write on a connection that loses every
acknowledgement (`EventStore.drop_replies`), so the watchdog's first step - ending a route whose session ended,
found in the fold - waits on an ack for as long as the test wants.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from helpers import eventually

from ledger import events as ev
from ledger import lifecycle as lc
from ledger.settings import Settings
from ledger.writer import Writer
from ledgerctl.cli.up import SHUTDOWN_PATIENCE, serve, until_stopped
from ledgerctl.server import EmbeddedServer
from ledgerctl.stack import Stack, UpSettings, running_stack

STOP_BOUND = 20.0
"""Seconds the tests give a stop. The issue's bound is 5 s and `ledger up` cancels what is left of an ordered
shutdown after SHUTDOWN_PATIENCE (3.5 s); the margin is for a loaded, shared test machine, not for the code."""

LEDGER = [sys.executable, "-m", "ledgerctl"]


async def route_of_an_ended_session(url: str, route_id: str = "r1") -> None:
    """A route the watchdog must end (PENDING -> TERMINATING) as soon as it sees the fold: its session ended."""
    async with Writer.connect(Settings(nats_url=url), producer_id="operator-test") as ops:
        await ops.create_session("gpu", session_id="s1")
        await ops.create_route(route_id, session_id="s1", endpoint="chat")
        await ops.terminate_session("s1", reason="done")


def settings(server: EmbeddedServer, tmp_path: Path) -> UpSettings:
    # Acks re-sent every 0.5 s, and an append waits for one up to 120 s: the test decides when it comes.
    return UpSettings(nats_url=server.url, data_dir=tmp_path, db=tmp_path / "projection.sqlite3",
                      connection=Settings(nats_url=server.url, request_timeout=0.5, append_deadline=120.0))


def lose_acks(stack: Stack) -> None:
    """Called as the stack has started, before any consumer wrote (the consumers wait for the fold first)."""
    stack.store.drop_replies(lambda msg: False)


async def test_up_is_caught_up_only_once_the_consumers_worked_off_the_fold_and_says_how_far_until_then(
        server: EmbeddedServer, tmp_path: Path):
    await route_of_an_ended_session(server.url)
    said: list[str] = []
    stop = asyncio.Event()
    async with running_stack(settings(server, tmp_path), lambda line: None) as stack:
        lose_acks(stack)
        ready = asyncio.create_task(stack.until_caught_up(stop, said.append, every=0.05))
        await eventually(lambda: stack.store.appends_in_flight > 0, timeout=20, what="the watchdog's write")
        await eventually(lambda: len(said) >= 3, timeout=20, what="progress lines")
        assert not ready.done() and not stack.caught_up
        assert stack.projector.caught_up.is_set()  # the projector is done; the watchdog is not
        last = stack.follower.state.ledger.seq
        assert all(re.fullmatch(r"catching up: LEDGER [\d,]+ / [\d,]+, LEDGER_HB [\d,]+ / [\d,]+ \(.*\)", line)
                   for line in said), said
        assert said[-1].startswith(f"catching up: LEDGER {last:,} / {last:,},") and said[-1].endswith("(watchdog)")

        stack.store.drop_replies(None)  # the next re-sent append is acknowledged: the first step completes
        assert await asyncio.wait_for(ready, STOP_BOUND) is True
        assert stack.caught_up and stack.consumers.catching_up() == []
        routes = stack.follower.state.ledger.routes
        # (then TERMINATED at once, the session being over; a retired route would be gone from the fold)
        await eventually(lambda: "r1" not in routes or routes["r1"].state in (lc.TERMINATING, lc.TERMINATED),
                         what="the route ending")


async def test_a_stop_while_catching_up_with_a_write_waiting_on_its_ack_ends_up_within_the_bound(
        server: EmbeddedServer, tmp_path: Path):
    await route_of_an_ended_session(server.url)
    stop, started = asyncio.Event(), asyncio.Event()
    stacks: list[Stack] = []

    def on_start(stack: Stack) -> None:
        lose_acks(stack)
        stacks.append(stack)
        started.set()

    up = asyncio.create_task(until_stopped(serve(settings(server, tmp_path), stop, on_start), stop, started))
    await eventually(lambda: stacks and stacks[0].store.appends_in_flight > 0, timeout=20,
                     what="the watchdog's write waiting on its ack")
    assert not stacks[0].caught_up
    stop.set()  # what SIGINT and SIGTERM do (`stop_signals`)
    await asyncio.wait_for(up, STOP_BOUND)
    assert up.result() is None
    assert SHUTDOWN_PATIENCE < 5


async def test_sigterm_while_ledger_up_is_still_starting_ends_it(tmp_path: Path):
    """Before the stack watches `stop` - here `ledger up` is still connecting, to a "server" that accepts and
    never answers (a frozen one), with a minute's patience - SIGTERM cancels the start itself."""
    connected = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def frozen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # never a byte back (no INFO): the client waits for its connect timeout
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
        out, err = await asyncio.to_thread(proc.communicate, timeout=STOP_BOUND)
        assert proc.returncode == 0, err
        assert "ready" not in out and out.rstrip().endswith("stopped") and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_sigterm_to_ledger_up_catching_up_on_a_log_ends_it_cleanly(server: EmbeddedServer, tmp_path: Path):
    """The process as a user runs it: a log with entities to catch up on, SIGTERM as soon as the consumers run
    (whether or not catching up is over by then, it must end: exit 0, "stopped")."""
    async with Writer.connect(Settings(nats_url=server.url), producer_id="operator-test") as ops:
        futures = [await ops.store.submit(ev.SessionCreated(producer=ops.producer, session_id=f"s{i}", pool="gpu"))
                   for i in range(2000)]  # pipelined: a log to catch up on, written in a moment
        await asyncio.gather(*futures)
    proc = subprocess.Popen([*LEDGER, "up", "--nats-url", server.url, "--db", str(tmp_path / "p.sqlite3"),  # noqa: ASYNC220
                             "--no-http", "--no-query-service"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(100):  # the lines before "consumers" (each read ends when the process ends its output)
            line = await asyncio.to_thread(proc.stdout.readline)  # type: ignore[union-attr]
            assert line, proc.stderr.read()  # type: ignore[union-attr]
            if line.startswith("consumers"):
                break
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.to_thread(proc.communicate, timeout=STOP_BOUND)
        assert proc.returncode == 0, err
        assert out.rstrip().endswith("stopped") and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()




def test_the_last_resort_exits_a_process_that_a_stop_could_not_end():
    """What `ledger up` arms on a stop: the process exits even while its only thread is held (here: sleeping
    in a loop that would last a minute), saying it was forced."""
    hold = ("from ledgerctl.cli.up import exit_after; import time\n"
            "exit_after(0.2)\n"
            "for _ in range(600): time.sleep(0.1)\n")
    result = subprocess.run([sys.executable, "-c", hold], capture_output=True, text=True, timeout=STOP_BOUND,
                            check=False)
    assert result.returncode == 1 and "stopped (forced" in result.stderr
