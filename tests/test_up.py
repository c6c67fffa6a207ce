"""`ledger up` (server, streams, projector, consumers in one process) and `ledger demo`, as a newcomer runs them."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from helpers import eventually

from ledger.agent import Agent
from ledger.settings import Settings
from ledger.writer import Writer
from ledgerctl.server import free_port

LEDGER = [sys.executable, "-m", "ledgerctl"]
"""Each test starts it with Popen, which returns at once (the `noqa: ASYNC220`s): the child runs beside the loop."""


def read_until(proc: subprocess.Popen[str], prefix: str, timeout: float = 30) -> str:
    """Lines of the child's stdout up to and including the first that starts with `prefix`."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise AssertionError("".join(lines) + proc.stderr.read())  # type: ignore[union-attr]
        lines.append(line)
        if line.startswith(prefix):
            return "".join(lines)
    raise AssertionError(f"no line starting with {prefix!r} within {timeout} s: {''.join(lines)}")


def views(db: Path, url: str, *args: str) -> object:
    result = subprocess.run([*LEDGER, *args, "--json"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "LEDGER_DB": str(db), "LEDGER_NATS_URL": url}, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def test_up_runs_server_projector_and_consumers_and_stops_on_ctrl_c(tmp_path: Path):
    port, data = free_port(), tmp_path / "data"
    proc = subprocess.Popen(  # noqa: ASYNC220
        [*LEDGER, "up", "--port", str(port), "--data-dir", str(data), "--grace", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"nats://127.0.0.1:{port}"
    try:
        out = read_until(proc, "ready")
        assert url in out and "LEDGER: created" in out, out
        assert f"projector           {(data / 'projection.sqlite3').resolve()}" in out
        assert "consumers           monitor, reclaimer, watchdog" in out
        assert f"export LEDGER_NATS_URL={url}" in out  # not the default port: say how to reach it

        # The consumers work: the reclaimer gives a new session to an agent and, once that agent says
        # goodbye, to another one, at once.
        async with Writer.connect(Settings(nats_url=url), producer_id="operator-test") as ledger:
            async with Agent(ledger, agent_id="a", pool="gpu", heartbeat=0.2, ttl=5) as a:
                sid, _ = await ledger.create_session("gpu", session_id="s1")
                await eventually(lambda: sid in a.owned, what="the reclaimer giving s1 to a")
                async with Agent(ledger, agent_id="b", pool="gpu", heartbeat=0.2, ttl=5) as b:
                    await a.goodbye()
                    await eventually(lambda: sid in b.owned, what="the reclaimer moving s1 to b after a's goodbye")
                    # The projector works: the views read what happened from the file.
                    db = data / "projection.sqlite3"

                    async def owned_by_b() -> bool:  # in a thread: the agents on this loop keep beating meanwhile
                        rows = (await asyncio.to_thread(views, db, url, "sessions"))["items"]  # type: ignore[index]
                        return [(r["session_id"], r["owner"], r["claims"]) for r in rows] == [("s1", "b", 2)]

                    await eventually(owned_by_b, timeout=20, what="the projection showing s1 owned by b")

        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "stopped" in rest and "Traceback" not in err
        with socket.socket() as s:  # the embedded nats-server is gone too
            s.bind(("127.0.0.1", port))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


async def test_up_on_an_existing_server_starts_none_of_its_own(settings: Settings, tmp_path: Path):
    db = tmp_path / "p.sqlite3"
    proc = subprocess.Popen([*LEDGER, "up", "--nats-url", settings.nats_url, "--db", str(db)],  # noqa: ASYNC220
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out = read_until(proc, "ready")
        assert "nats-server" not in out and "LEDGER: ok" in out, out
        assert f"LEDGER_DB={db.resolve()}" in out
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert db.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, command name) of the live children of `pid`, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            name, fields = stat.read_text().rsplit(")", 1)
        except OSError:
            continue
        state, ppid = fields.split()[:2]
        if int(ppid) == pid and state != "Z":
            found.append((int(stat.parent.name), name.split("(", 1)[1]))
    return found


def exited(pid: int) -> bool:
    """Gone, or a zombie (it has let go of its files and ports; whoever adopted it has not reaped it yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


async def test_kill_9_of_up_takes_its_nats_server_along_and_up_starts_again(tmp_path: Path):
    port, data = free_port(), tmp_path / "data"
    command = [*LEDGER, "up", "--port", str(port), "--data-dir", str(data), "--grace", "0"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # noqa: ASYNC220
    try:
        read_until(first, "ready")
        [(server, name)] = [c for c in children(first.pid) if "nats" in c[1]]
        first.kill()
        first.communicate(timeout=30)
        await eventually(lambda: exited(server), timeout=30, what=f"{name} (pid {server}) exiting with its parent")
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    again = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # noqa: ASYNC220
    try:
        out = read_until(again, "ready")
        assert "LEDGER: ok" in out, out
        again.send_signal(signal.SIGINT)
        _, err = again.communicate(timeout=30)
        assert again.returncode == 0, err
    finally:
        if again.poll() is None:
            again.kill()
            again.communicate()


LEAVE_A_SERVER_BEHIND = """
import fcntl, os, subprocess, sys
from pathlib import Path
from ledgerctl.server import ServerConfig, find_binary
data, port = Path(sys.argv[1]), int(sys.argv[2])
data.mkdir(parents=True)
conf = data / "nats-server.conf"
conf.write_text(ServerConfig(data_dir=data, port=port, sync_always=False).render())
lock = os.open(data / "nats-server.lock", os.O_RDWR | os.O_CREAT)
fcntl.flock(lock, fcntl.LOCK_EX)
# As `ledger up` did before its server died with it: the child keeps the lock, nothing ties it to us.
child = subprocess.Popen([find_binary()[0], "-c", str(conf)], pass_fds=(lock,), start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(child.pid)
"""


def test_up_that_finds_a_server_left_behind_names_it_in_one_line(tmp_path: Path):
    port, data = free_port(), tmp_path / "data"
    made = subprocess.run([sys.executable, "-c", LEAVE_A_SERVER_BEHIND, str(data), str(port)], capture_output=True,
                          text=True, timeout=60, check=True)
    orphan = int(made.stdout)
    try:
        result = subprocess.run([*LEDGER, "up", "--port", str(port), "--data-dir", str(data)],
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        assert (f"is in use by nats-server (pid {orphan}, left running by a process that is gone): "
                f"stop it with `kill {orphan}`") in result.stderr
    finally:
        os.kill(orphan, signal.SIGKILL)


def test_up_on_a_taken_port_is_one_clear_line(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = subprocess.run([*LEDGER, "up", "--port", str(taken.getsockname()[1]), "--data-dir", str(tmp_path)],
                                capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert [ln for ln in result.stderr.splitlines() if ln.startswith("Error")] == [
        ln for ln in result.stderr.splitlines() if ln.strip()], result.stderr
    assert "already in use" in result.stderr


def test_demo_tells_a_failover_story_and_cleans_up():
    result = subprocess.run([*LEDGER, "demo", "--exit", "--agents", "4", "--sessions", "9"],
                            capture_output=True, text=True, timeout=120, check=False)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "Traceback" not in result.stderr
    # Two pools, two agents each; the SIGKILLed agent (gpu) is declared dead, the SIGTERMed one (cpu) says
    # goodbye, and both lose all their sessions to the survivor of their own pool.
    assert re.search(r"^   gpu: a1 a2$", out, re.M) and re.search(r"^   cpu: a3 a4$", out, re.M), out
    victim = re.search(r"^3\. kill -9 (a\d) \(pool gpu\):", out, re.M).group(1)  # type: ignore[union-attr]
    leaver = re.search(r"^4\. SIGTERM (a\d) \(pool cpu\):", out, re.M).group(1)  # type: ignore[union-attr]
    assert re.search(rf"#\d+ +{victim} declared dead by monitor", out), out
    assert re.search(rf"#\d+ +{leaver} said goodbye \(signal SIGTERM\)", out), out
    assert re.search(r"-> declared dead [\d.]+ s after the kill; \d+ sessions? owned again", out), out
    assert re.search(r"-> exit code 0; \d+ sessions? owned again", out), out
    assert "no anomalies" in out and "9 sessions" in out
    # At the end every session of a pool belongs to the one agent of that pool left, which reported where it runs.
    survivors = {"gpu": ({"a1", "a2"} - {victim}).pop(), "cpu": ({"a3", "a4"} - {leaver}).pop()}
    rows = re.findall(r"^ (s\d\d) +(gpu|cpu) +assigned +(a\d) .* (a\d)/(s\d\d) *$", out, re.M)
    assert len(rows) == 9 and {pool for _, pool, *_ in rows} == {"gpu", "cpu"}, out
    assert all(owner == survivors[pool] == resource_agent and sid == resource_sid
               for sid, pool, owner, resource_agent, resource_sid in rows), out
    # The first five sessions have routes, which went through their lifecycle to RUNNING (their owners report
    # them healthy) and, after the failures, run with traffic, reported healthy by the new owners.
    for r in ("r01", "r02", "r03", "r04", "r05"):
        for before, after in (("PENDING", "STARTING"), ("STARTING", "WARMING_UP"), ("WARMING_UP", "RUNNING ACTIVE")):
            assert re.search(rf"#\d+ +route {r} {before} -> {after}: ", out), (r, before, out)
    routes = re.findall(r"^ (r\d\d) +(s\d\d) +RUNNING +- +ACTIVE +healthy ", out, re.M)
    assert routes == [(f"r{i:02d}", f"s{i:02d}") for i in range(1, 6)], out
    data_dir = re.search(r"data in (\S+)", out).group(1)  # type: ignore[union-attr]
    assert not Path(data_dir).exists()  # the temporary ledger is removed


def test_demo_refuses_a_ttl_shorter_than_the_heartbeat():
    result = subprocess.run([*LEDGER, "demo", "--heartbeat", "2", "--ttl", "1"], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--ttl (1) must be longer than --heartbeat (2)" in result.stderr


def test_catch_up_progress_is_told_until_the_projector_has_caught_up():
    from ledgerctl.stack import catch_up_reporter
    from projections.projector import Progress

    lines: list[str] = []
    caught_up = False
    report = catch_up_reporter(lines.append, lambda: caught_up, every=0)
    report(Progress({"LEDGER": 5000, "LEDGER_HB": 0}, {"LEDGER": 10000, "LEDGER_HB": 0}, 5000, 2.0))
    caught_up = True
    report(Progress({"LEDGER": 10000, "LEDGER_HB": 0}, {"LEDGER": 10000, "LEDGER_HB": 0}, 10000, 4.0))
    assert lines == ["projector catching up: LEDGER #5,000 of #10,000, LEDGER_HB #0 of #0 (2,500 events/s)"]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                found.append(int(entry.name))
    return found


def test_demo_ends_with_the_error_of_a_piece_that_fails_mid_story():
    # While the story runs, the stack is supervised too: the embedded server dying is said as such, at once,
    # not as a step that "did not happen within 30 s" long after.
    proc = subprocess.Popen([*LEDGER, "demo", "--exit", "--agents", "4", "--sessions", "6"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        read_until(proc, "1. A fleet")
        [server] = [c for c in _children(proc.pid) if b"nats-server" in Path(f"/proc/{c}/cmdline").read_bytes()]
        os.kill(server, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1
    assert err.strip().splitlines()[-1].startswith("Error: nats-server exited unexpectedly; see "), err
    assert "did not happen" not in err


async def test_up_serves_the_dashboard_the_metrics_and_the_query_service(tmp_path: Path):
    """`ledger up` says where the dashboard is; it answers, /metrics parses, `$SRV.PING` finds the query
    service, and `ledger sessions` run where there is no projection file answers from it."""
    import urllib.request

    import nats
    from prometheus_client.parser import text_string_to_metric_families

    port, data = free_port(), tmp_path / "data"
    proc = subprocess.Popen(  # noqa: ASYNC220
        [*LEDGER, "up", "--port", str(port), "--data-dir", str(data), "--http-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"nats://127.0.0.1:{port}"
    try:
        out = read_until(proc, "ready")
        [http] = re.findall(r"^dashboard +(http://127\.0\.0\.1:\d+)/ ", out, re.M)
        assert f"open {http}/" in out and "query service       ledger-query" in out, out

        def get(path: str) -> tuple[int, str]:
            try:
                with urllib.request.urlopen(http + path, timeout=10) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()

        async def ready() -> bool:
            return (await asyncio.to_thread(get, "/readyz"))[0] == 200

        await eventually(ready, timeout=20, what="/readyz answering 200")
        status, page = await asyncio.to_thread(get, "/")
        assert status == 200 and "<html" in page.lower()
        async with Writer.connect(Settings(nats_url=url), producer_id="operator-test") as ledger:
            await ledger.create_session("gpu", session_id="s-net")
        status, text = await asyncio.to_thread(get, "/metrics")
        assert status == 200 and "ledger_sessions" in {f.name for f in text_string_to_metric_families(text)}

        nc = await nats.connect(url)
        try:
            ping = await nc.request("$SRV.PING.ledger-query", b"", timeout=5)
            assert json.loads(ping.data)["name"] == "ledger-query"
        finally:
            await nc.close()

        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()

        async def answered_from_the_service() -> bool:
            result = await asyncio.to_thread(
                subprocess.run, [*LEDGER, "sessions", "--json", "--nats-url", url], capture_output=True, text=True,
                timeout=60, cwd=elsewhere, check=False)
            return result.returncode == 0 and "s-net" in result.stdout and "query service" in result.stdout

        await eventually(answered_from_the_service, timeout=20, what="ledger sessions answered by the service")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
