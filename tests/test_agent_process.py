"""Agent processes and signals: one goodbye, exit code 0, whatever races; the reference agent."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import eventually

from ledger import events as ev
from ledger import lifecycle as lc
from ledger.codec import Recorded
from ledger.ids import new_id
from ledger.settings import Settings
from ledger.store import EventStore
from ledger.writer import Writer

HERE = Path(__file__).parent


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=HERE)


def wait_for_line(proc: subprocess.Popen[str], needle: str, timeout: float = 20.0) -> list[str]:
    lines: list[str] = []
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"process ended before {needle!r}: {''.join(lines)}{proc.stderr.read()}")  # type: ignore[union-attr]
        lines.append(line)
        if needle in line:
            return lines


async def goodbyes(store: EventStore, agent_id: str) -> list[ev.AgentGoodbye]:
    return [r.event for r in await store.history("agent", agent_id)
            if isinstance(r, Recorded) and isinstance(r.event, ev.AgentGoodbye)]


@pytest.mark.parametrize("mode", ["exit-races-sigterm", "sigterm-interrupts-body", "sigterm-and-sigint",
                                  "sigterm-during-goodbye"])
async def test_goodbye_is_written_once_whatever_races(store: EventStore, settings: Settings, uid: str, mode: str):
    agent_id = f"{uid}-{mode}"
    proc = spawn(str(HERE / "agent_script.py"), settings.nats_url, agent_id, mode)
    out, err = await asyncio.to_thread(proc.communicate, timeout=30)
    assert proc.returncode == 0, err
    assert "exited cleanly" in out and "Traceback" not in err
    assert len(await goodbyes(store, agent_id)) == 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_to_a_ledger_agent_process_gives_one_goodbye_and_exit_0(
        store: EventStore, settings: Settings, uid: str, sig: signal.Signals):
    agent_id = f"{uid}-agent"
    proc = spawn("-m", "ledgerctl", "agent", "--agent-id", agent_id, "--pool", f"{uid}-pool", "--heartbeat", "0.2",
                 "--ttl", "2", "--nats-url", settings.nats_url)
    try:
        await asyncio.to_thread(wait_for_line, proc, "registered")
        proc.send_signal(sig)
        out, err = await asyncio.to_thread(proc.communicate, timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "goodbye written" in out and "Traceback" not in err
    [goodbye] = await goodbyes(store, agent_id)
    assert goodbye.reason == f"signal {sig.name}"


async def test_reference_agents_share_a_pool_and_take_over_on_goodbye(store: EventStore, settings: Settings,
                                                                       uid: str):
    pool = f"{uid}-pool"
    ledger = Writer(store, ev.Producer(id="operator-test", instance=new_id()))
    sessions = [(await ledger.create_session(pool, session_id=f"{uid}-s{i}"))[0] for i in range(6)]
    procs = {name: spawn("-m", "ledgerctl", "agent", "--agent-id", f"{uid}-{name}", "--pool", pool, "--capacity", "6",
                         "--heartbeat", "0.2", "--ttl", "2", "--nats-url", settings.nats_url)
             for name in ("a", "b")}
    try:
        async def owners() -> dict[str, str | None]:
            return {sid: (await ledger.session(sid))[0].owner for sid in sessions}

        async def all_owned() -> dict[str, str | None] | None:
            o = await owners()
            return o if all(o.values()) else None

        await eventually(all_owned, timeout=20, what="every session claimed")
        # b may have claimed all six before a even started: a SIGTERM before a's handlers exist kills it
        # without a goodbye. "registered" is printed once they are installed.
        await asyncio.to_thread(wait_for_line, procs["a"], "registered")
        procs["a"].send_signal(signal.SIGTERM)
        await asyncio.to_thread(procs["a"].communicate, timeout=30)
        assert procs["a"].returncode == 0

        async def all_with_b() -> bool:
            return set((await owners()).values()) == {f"{uid}-b"}

        await eventually(all_with_b, timeout=20, what="b taking over a's sessions after its goodbye")
        for sid in sessions:
            state, _ = await ledger.session(sid)
            assert state.status == lc.S_ASSIGNED
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                await asyncio.to_thread(proc.communicate, timeout=30)
    assert all(p.returncode == 0 for p in procs.values())


async def test_a_reference_agent_with_report_address_says_where_each_session_it_gains_runs(
        store: EventStore, settings: Settings, uid: str):
    pool = f"{uid}-pool"
    ledger = Writer(store, ev.Producer(id="operator-test", instance=new_id()))
    sessions = [(await ledger.create_session(pool, session_id=f"{uid}-s{i}"))[0] for i in range(3)]
    procs = {name: spawn("-m", "ledgerctl", "agent", "--agent-id", f"{uid}-{name}", "--pool", pool, "--capacity", "3",
                         "--heartbeat", "0.2", "--ttl", "2", "--report-address", "{agent}.test:9000",
                         "--nats-url", settings.nats_url)
             for name in ("a", "b")}
    try:
        async def reported_by(agent_ids: set[str]) -> bool:
            states = [(await ledger.session(sid))[0] for sid in sessions]
            return all(s.owner in agent_ids and s.address == f"{s.owner}.test:9000"
                       and s.platform_resource_id == f"{s.owner}/{s.session_id}" for s in states)

        await eventually(lambda: reported_by({f"{uid}-a", f"{uid}-b"}), timeout=20,
                         what="every session claimed and its address reported")
        await asyncio.to_thread(wait_for_line, procs["a"], "registered")
        procs["a"].send_signal(signal.SIGTERM)
        await asyncio.to_thread(procs["a"].communicate, timeout=30)
        # The claim cleared a's address; b reports its own for the sessions it took over.
        await eventually(lambda: reported_by({f"{uid}-b"}), timeout=20, what="b reporting the sessions it took over")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                await asyncio.to_thread(proc.communicate, timeout=30)
    assert all(p.returncode == 0 for p in procs.values())


async def test_a_reference_agent_with_report_health_reports_the_probed_routes_of_its_sessions(
        store: EventStore, settings: Settings, uid: str):
    pool = f"{uid}-pool"
    ledger = Writer(store, ev.Producer(id="operator-test", instance=new_id()))
    sid, _ = await ledger.create_session(pool, session_id=f"{uid}-s")
    await ledger.create_route(f"{uid}-probed", session_id=sid, endpoint="e", probe=ev.Probe(period=0.2))
    await ledger.create_route(f"{uid}-unprobed", session_id=sid, endpoint="e")
    for route_id in (f"{uid}-probed", f"{uid}-unprobed"):  # the watchdog's moves, as an operator may make them
        await ledger.transition_route(route_id, lc.STARTING)
        await ledger.transition_route(route_id, lc.WARMING_UP)
    proc = spawn("-m", "ledgerctl", "agent", "--agent-id", f"{uid}-a", "--pool", pool, "--heartbeat", "0.2",
                 "--ttl", "2", "--report-health", "--nats-url", settings.nats_url)
    try:
        async def reports(route_id: str) -> list[ev.RouteHealthReported]:
            return [r.event for r in await store.history("route", route_id)
                    if isinstance(r, Recorded) and isinstance(r.event, ev.RouteHealthReported)]

        async def reported_twice() -> bool:
            return len(await reports(f"{uid}-probed")) >= 2  # once per period, not once

        await eventually(reported_twice, timeout=20, what="the probed route reported healthy, again and again")
        assert all(r.healthy and r.producer.id == f"{uid}-a" for r in await reports(f"{uid}-probed"))
        assert (await ledger.session(sid))[0].owner == f"{uid}-a"
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.communicate, timeout=30)
    assert proc.returncode == 0
    assert await reports(f"{uid}-unprobed") == []  # no probe: nothing to report


def test_report_health_without_self_claim_is_a_one_line_error():
    proc = spawn("-m", "ledgerctl", "agent", "--agent-id", "a1", "--pool", "p", "--report-health", "--no-self-claim",
                 "--nats-url", "nats://127.0.0.1:1")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert "--report-health" in err and "only a self-claiming agent" in err, err


def test_a_report_address_naming_other_fields_is_a_one_line_error():
    proc = spawn("-m", "ledgerctl", "agent", "--agent-id", "a1", "--pool", "p", "--report-address", "{host}:80",
                 "--nats-url", "nats://127.0.0.1:1")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert "--report-address" in err and "only {agent} and {session} may be filled in" in err, err
