"""The error boundary: every `ledger` command turns every failure a user can cause into one line, never a traceback.

`CASES` holds the error paths of every command (`ledgerctl.cli.cli`, groups included): a command added without
an entry fails `test_every_command_has_its_error_paths_listed`. Each case runs `python -m ledgerctl` as a user
does, in a fresh directory and without the caller's LEDGER_* variables, and must exit non-zero with exactly one
`Error:` line that names the problem (the regex next to it) - a bad or refused URL, a port out of range, a path
that cannot be used, a file that is not what it should be, a number out of range.
"""

from __future__ import annotations

import os
import re
import shlex
import sqlite3
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from ledger.errors import PortInUse
from ledgerctl.cli import cli
from ledgerctl.server import free_port

LEDGER = [sys.executable, "-m", "ledgerctl"]
NO_DIR = "/proc/ledger-nope"
"""A directory nobody can create, root included."""
RANGE = "99999"
BAD_URL = f"nats://127.0.0.1:{RANGE}"


def commands(group: click.Group = cli, prefix: str = "") -> list[str]:
    found = []
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found += commands(command, f"{prefix}{name} ")
        else:
            found.append(prefix + name)
    return sorted(found)


@dataclass(frozen=True)
class Case:
    """`ledger <args>` must fail with one line matching `names`.

    Placeholders in args: {url} a live server with the ledger's streams, {refused} a loopback port nobody
    listens on, {busy} the live server's port, {port} a free port, {file} a regular file, {garbage} a file of
    junk, {projection} a real projection file, {corrupt} one with its pages overwritten, {fake_server} an
    executable that is not nats-server, {tmp} this case's directory. `cwd`: where it runs; `env`: NAME=VALUE
    for its environment.
    """

    args: str
    names: str
    cwd: str = "{tmp}"
    env: str = ""
    xfail: str = ""


def time_case(args: str) -> Case:
    return Case(args, r"--as-of|--since|-999999999d|2300-01-01")  # the option or the value


def connecting(command: str) -> list[Case]:
    """What every command that connects must say about the server's address."""
    return [Case(f"{command} --nats-url {{refused}}", r"cannot reach NATS at nats://127\.0\.0\.1:\d+"),
            Case(f"{command} --nats-url {BAD_URL}", RANGE),
            Case(f"{command} --nats-url {{refused}} --creds {{tmp}}/missing.creds", r"missing\.creds"),
            Case(f"{command} --nats-url {{refused}} --tls-ca {{garbage}}", r"TLS CA file .*garbage"),
            Case(f"{command} --nats-url {{refused}} --nkey-seed {{garbage}}", r"nkey seed file .*garbage"),
            Case(f"{command} --nats-url {{refused}}", "connect_timeout", env="LEDGER_CONNECT_TIMEOUT=soon")]


VIEW = "--nats-url {refused} --db"
CASES: dict[str, list[Case]] = {
    "agent": [*connecting("agent --agent-id a1 --pool p"),
              Case("agent --agent-id a1 --pool p --capacity 0", "--capacity"),
              Case("agent --agent-id a1 --pool p --heartbeat 5 --ttl 2", "--ttl"),
              Case("agent --agent-id 'bad id' --pool p --nats-url {url}", "bad id"),
              Case("agent --agent-id a1 --pool p --suspect-after 0", "--suspect-after"),
              Case("agent --agent-id a1 --pool p --dead-after -1", "--dead-after")],
    "agents": [Case(f"agents {VIEW} {{garbage}}", r"garbage is not a projection"),
               Case(f"agents {VIEW} {{corrupt}}", r"corrupt\.sqlite3 is not a projection"),
               Case(f"agents {VIEW} {NO_DIR}/p.sqlite3", f"no projection file at {NO_DIR}"),
               Case("agents --nats-url {url} --db {projection} --at-seq 99999999999999999999", "99999999999999999999"),
               time_case(f"agents {VIEW} {{projection}} --as-of -999999999d"),
               time_case("agents --nats-url {url} --db {projection} --as-of 2300-01-01"),
               Case(f"agents {VIEW} {{projection}} --limit 0", "--limit"),
               Case(f"agents {VIEW} {{projection}} --offset -1", "--offset")],
    "anomalies": [Case(f"anomalies {VIEW} {{garbage}}", r"garbage is not a projection"),
                  Case(f"anomalies {VIEW} {{projection}} --limit 99999999999999999999", "--limit"),
                  time_case(f"anomalies {VIEW} {{projection}} --as-of -999999999d"),
                  Case(f"anomalies {VIEW} {{projection}} --offset many", "--offset"),
                  Case(f"anomalies {VIEW} {{projection}} --all --limit 5", "--limit N or --all, not both")],
    "auth add-agent": [Case(f"auth add-agent a1 --out {NO_DIR}", "holds no credentials"),
                       Case("auth add-agent a1 --out {file}", r"'--out'.* is a file"),
                       Case("auth add-agent a1 --out {tmp}/list-manifest", r"auth\.json"),
                       Case("auth add-agent a1 --out {tmp}/manifest-without-replicas", r"auth\.json"),
                       Case("auth add-agent a1 --out {tmp}/junk-manifest", r"auth\.json"),
                       Case("auth add-agent a1 --out {tmp}/junk-ca", "CA"),
                       Case("auth add-agent 'bad id' --out {tmp}/junk-ca", "bad id")],
    "auth init": [Case(f"auth init --out {NO_DIR}", f"cannot use {NO_DIR}"),
                  Case("auth init --out {file}/x", r"cannot use .*file/x: Not a directory"),
                  Case("auth init --out {tmp}/a --tls", "--host"),
                  Case("auth init --out {tmp}/a --agent 'bad id'", "bad id")],
    "check": [*connecting("check"),
              Case("check --nats-url {url} --grace -1", "--grace"),
              time_case("check --nats-url {url} --since -999999999d")],
    "consumers": [*connecting("consumers"),
                  Case("consumers --nats-url {url} --breaker-share 2", "--breaker-share"),
                  Case("consumers --nats-url {url} --partition 3/3", r"--partition.*0 <= I < N"),
                  Case("consumers --nats-url {url} --partition half", r"--partition.*expected I/N"),
                  Case("consumers --nats-url {url} --pools ,", r"--pools.*at least one pool"),
                  Case("consumers --nats-url {url} --pools 'gpu x'", r"--pools.*invalid pool 'gpu x'"),
                  # cpu and b hash to slot 2 of 3 (consumers.partition.pool_slot): slot 0 would serve nothing
                  Case("consumers --nats-url {url} --pools cpu,b --partition 0/3",
                       r"none of these pools falls on slot 0 of 3 \(b falls on slot 2, cpu falls on slot 2\)")],
    "demo": [Case(f"demo --exit --port {{port}} --data-dir {NO_DIR}", NO_DIR),
             Case("demo --exit --port {port} --data-dir {file}/x", r"file/x"),
             Case("demo --exit --port {busy} --data-dir {tmp}/d", r"port 127\.0\.0\.1:\d+ is already in use"),
             Case(f"demo --exit --port {RANGE}", "--port"),
             Case("demo --exit --agents 99", "--agents"),
             Case("demo --exit --port {port} --data-dir /proc", "/proc is not empty")],
    "drain": [*connecting("drain a1"),
              Case("drain no-such-agent --nats-url {url}", "agent no-such-agent is not registered"),
              Case("drain 'bad id' --nats-url {url}", "bad id"),
              Case("drain a1 --deadline soon --nats-url {url}", "is not a duration"),
              Case("drain a1 --deadline 0 --nats-url {url}", "more than 0 s")],
    "doctor": [*connecting("doctor"),
               Case("doctor --nats-url {url} --db {garbage}", r"garbage is not a projection"),
               Case("doctor --nats-url {url} --db {corrupt}", r"corrupt\.sqlite3 is not a projection"),
               Case("doctor --nats-url {url} --stale-after -1", "--stale-after")],
    "export": [*connecting("export"),
               Case(f"export --nats-url {{url}} -o {NO_DIR}/x.ledger", NO_DIR),
               time_case("export --nats-url {url} --since -999999999d")],
    "import": [Case("import {garbage} --data-dir {tmp}/d", r"garbage, line 1: not an incident file"),
               Case("import {tmp}/missing.ledger", "missing.ledger"),
               Case("import {garbage} --nats-url {refused}", "not an incident file")],
    "history": [*connecting("history session s1"),
                Case("history session no-such-session --nats-url {url}", "no-such-session"),
                Case("history planet p1 --nats-url {url}", "planet"),
                time_case("history session s1 --nats-url {url} --as-of -999999999d")],
    "init": [*connecting("init"),
             Case("init --nats-url {url} --replicas 2", "--replicas"),
             Case("init --nats-url {url} --replicas 3", "3 replicas need a cluster"),
             Case("init --nats-url {refused} --tls-cert {garbage} --tls-key {garbage}", "garbage")],
    "pool reset-breaker": [*connecting("pool reset-breaker gpu"),
                           Case("pool reset-breaker 'bad pool' --nats-url {url}", "bad pool")],
    "pools": [Case(f"pools {VIEW} {{garbage}}", r"garbage is not a projection"),
              Case(f"pools {VIEW} {NO_DIR}/p.sqlite3", f"no projection file at {NO_DIR}"),
              time_case(f"pools {VIEW} {{projection}} --as-of -999999999d")],
    "query-service": [*connecting("query-service --db {tmp}/p.sqlite3"),
                      Case("query-service --nats-url {url} --db {garbage}", r"garbage is not a projection")],
    "project": [*connecting("project --db {tmp}/p.sqlite3"),
                Case(f"project --nats-url {{url}} --db {NO_DIR}/p.sqlite3", NO_DIR),
                Case("project --nats-url {url} --db {file}/p.sqlite3", r"file"),
                Case("project --nats-url {url}", "ledger-data", cwd="/proc"),  # an unwritable working directory
                Case("project --nats-url {url} --db {garbage}", r"garbage is not a projection"),
                Case("project --nats-url {url} --db {corrupt}", r"corrupt\.sqlite3 is not a projection"),
                Case("project --nats-url {url} --db {tmp}/p.sqlite3 --snapshot-every -1", "--snapshot-every")],
    "rebuild": [*connecting("rebuild --db {tmp}/p.sqlite3"),
                Case(f"rebuild --nats-url {{url}} --db {NO_DIR}/p.sqlite3", NO_DIR),
                Case("rebuild --nats-url {url} --db {file}/p.sqlite3", r"file")],
    "replay": [*connecting("replay"),
               Case("replay --nats-url {url} --since garbage", "--since"),
               Case("replay --nats-url {url} --from-seq 0", "--from-seq"),
               time_case("replay --nats-url {url} --since -999999999d")],
    "route create": [*connecting("route create r1 --session s1 --endpoint http://x"),
                     Case("route create 'bad id' --session s1 --endpoint http://x --nats-url {url}", "bad id"),
                     Case("route create r1 --session s1 --endpoint http://x --stale-after -1 --nats-url {url}",
                          "stale_after")],
    "route health": [*connecting("route health r1 --healthy"),
                     Case("route health no-such-route --healthy --nats-url {url}", "no-such-route")],
    "route show": [*connecting("route show r1"),
                   Case("route show no-such-route --nats-url {url}", "no-such-route")],
    "route transition": [*connecting("route transition r1 RUNNING"),
                         Case("route transition r1 flying", "flying"),
                         Case("route transition no-such-route RUNNING --nats-url {url}", "no-such-route")],
    "routes": [Case(f"routes {VIEW} {{garbage}}", r"garbage is not a projection"),
               Case(f"routes {VIEW} {NO_DIR}/p.sqlite3", f"no projection file at {NO_DIR}"),
               time_case(f"routes {VIEW} {{projection}} --as-of -999999999d"),
               Case(f"routes {VIEW} {{projection}} --limit 99999999999999999999", "--limit"),
               Case(f"routes {VIEW} {{projection}} --offset 99999999999999999999", "--offset")],
    "schema": [Case("schema --out {file}/x", r"cannot write .*file/x")],
    "server": [Case(f"server --port {{port}} --data-dir {NO_DIR}", NO_DIR),
               Case("server --port {port} --data-dir {file}/x", r"file/x"),
               Case("server --port {port} --data-dir {file}", r"'--data-dir'.* is a file"),
               Case("server --port {busy} --data-dir {tmp}/d", r"port 127\.0\.0\.1:\d+ is already in use"),
               Case("server --port {port} --monitor-port {busy} --data-dir {tmp}/d", r"monitor port .* in use"),
               Case(f"server --port {RANGE}", "--port"),
               Case("server --port {port} --host 256.1.1.1 --data-dir {tmp}/d", r"256\.1\.1\.1(?!.*in use)"),
               Case("server --port {port} --data-dir {tmp}/d --nats-server-bin {file}", r"--nats-server-bin"),
               Case("server --port {port} --data-dir {tmp}/d --nats-server-bin {fake_server}",
                    "does not look like nats-server"),
               Case("server --port {port}", NO_DIR, env=f"LEDGER_DATA_DIR={NO_DIR}")],
    "session create": [*connecting("session create --pool gpu"),
                       Case("session create --pool gpu --session-id 'bad id' --nats-url {url}", "bad id"),
                       Case("session create --pool gpu --idle-ttl 1e400 --nats-url {url}", "idle_ttl")],
    "session show": [*connecting("session show s1"),
                     Case("session show no-such-session --nats-url {url}", "no-such-session")],
    "session terminate": [*connecting("session terminate s1"),
                          Case("session terminate no-such-session --nats-url {url}", "no-such-session")],
    "sessions": [Case(f"sessions {VIEW} {{garbage}}", r"garbage is not a projection"),
                 Case(f"sessions {VIEW} {NO_DIR}/p.sqlite3", f"no projection file at {NO_DIR}"),
                 Case(f"sessions {VIEW} {{corrupt}}", r"corrupt\.sqlite3 is not a projection"),
                 Case(f"sessions {VIEW} {{projection}} --state flying", "--state"),
                 time_case(f"sessions {VIEW} {{projection}} --as-of -999999999d"),
                 time_case("sessions --nats-url {url} --db {projection} --as-of 2300-01-01"),
                 Case(f"sessions {VIEW} {{projection}} --limit -3", "--limit"),
                 Case(f"sessions {VIEW} {{projection}} --limit 3 --all", "--limit N or --all, not both")],
    "unreachable": [*connecting("unreachable a1"),
                    Case("unreachable 'bad id' --nats-url {url}", "bad id")],
    "up": [Case(f"up --port {{port}} --data-dir {NO_DIR}", NO_DIR),
           Case("up --from {garbage}", r"garbage, line 1: not an incident file"),
           Case("up --port {port} --data-dir {file}/x", r"file/x"),
           Case("up --port {busy} --data-dir {tmp}/d", r"port 127\.0\.0\.1:\d+ is already in use"),
           Case("up --port {port} --http-port {busy} --data-dir {tmp}/d",
                r"HTTP port 127\.0\.0\.1:\d+ is already in use"),
           Case(f"up --port {RANGE}", "--port"),
           Case("up --port {port} --data-dir {tmp}/d --db {garbage}", r"garbage is not a projection"),
           Case("up --nats-url {refused}", r"cannot reach NATS at nats://127\.0\.0\.1:\d+"),
           Case(f"up --nats-url {BAD_URL}", RANGE),
           Case("up --nats-url {url} --db {garbage}", r"garbage is not a projection"),
           Case("up --nats-url {url} --db {corrupt}", r"corrupt\.sqlite3 is not a projection"),
           Case("up --port {port}", NO_DIR, env=f"LEDGER_DATA_DIR={NO_DIR}"),
           Case(f"up --nats-url {{url}} --db {NO_DIR}/p.sqlite3", NO_DIR),
           Case("up --nats-url {url} --db {file}/p.sqlite3", r"file"),
           Case("up --nats-url {url} --data-dir {file}/x", r"file/x")],
    "why": [*connecting("why session s1"),
            Case("why session no-such-session --nats-url {url}", "no-such-session"),
            Case("why planet p1 --nats-url {url}", "planet"),
            Case("why session s1 --nats-url {url} --at now --at-seq 1", "--at or --at-seq, not both"),
            time_case("why session s1 --nats-url {url} --at -999999999d")],
    "whatif": [*connecting("whatif"),
               Case("whatif --nats-url {url} --dead-after -60s", "--dead-after"),
               Case("whatif --nats-url {url} --dead-after soon", "not a duration"),
               Case("whatif --nats-url {url} --suspect-after 0", "--suspect-after"),
               Case("whatif --nats-url {url} --breaker-share 1.5", "--breaker-share"),
               Case("whatif --nats-url {url} --since -1m --until -1h", "--until is before --since"),
               time_case("whatif --nats-url {url} --since -999999999d")],
}


def test_every_command_has_its_error_paths_listed():
    assert sorted(CASES) == commands()


def _params() -> list[object]:
    params = []
    for command, cases in CASES.items():
        for i, case in enumerate(cases):
            marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
            params.append(pytest.param(case, id=f"{command}-{i}: {case.args}", marks=marks))
    return params


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The inputs the cases name: a plain file, junk, credential directories gone wrong."""
    base = tmp_path_factory.mktemp("inputs")
    (base / "file").write_text("a plain file\n")
    (base / "garbage").write_bytes(b"\x00junk, not SQLite, not PEM, not JSON\n" * 8)
    (base / "fake-server").write_text("#!/bin/sh\necho hello\n")
    (base / "fake-server").chmod(0o755)
    return base


def _auth_dirs(tmp: Path) -> None:
    for name, manifest in [("list-manifest", "[]"), ("manifest-without-replicas", '{"users": {}, "tls_hosts": []}'),
                           ("junk-manifest", "{not json")]:
        (tmp / name).mkdir()
        (tmp / name / "auth.json").write_text(manifest)
    made = subprocess.run([*LEDGER, "auth", "init", "--out", str(tmp / "junk-ca"), "--tls", "--host", "localhost"],
                          capture_output=True, text=True, timeout=60, env=_env(), check=False)
    assert made.returncode == 0, made.stderr
    (tmp / "junk-ca" / "ca.pem").write_text("not a certificate\n")


@pytest.fixture(scope="module")
def projection(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real projection file of the live server."""
    url = request.getfixturevalue("nats_server").url
    db = tmp_path_factory.mktemp("projection") / "p.sqlite3"
    made = subprocess.run([*LEDGER, "rebuild", "--nats-url", url, "--db", str(db)], capture_output=True, text=True,
                          timeout=120, env=_env(), check=False)
    assert made.returncode == 0, made.stderr
    return db


@pytest.fixture(scope="module")
def corrupt(projection: Path) -> Path:
    """The projection with SQLite's header kept and every page after it overwritten."""
    data = projection.read_bytes()
    path = projection.with_name("corrupt.sqlite3")
    path.write_bytes(data[:100] + b"\xff" * (len(data) - 100))
    return path


def _env(**extra: str) -> dict[str, str]:
    """The caller's environment without its LEDGER_* settings; a short connect timeout for the refused ports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    return {**env, "LEDGER_CONNECT_TIMEOUT": "1", "COLUMNS": "200", **extra}


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error:")]


@pytest.mark.parametrize("case", _params())
def test_a_failure_is_one_line_naming_the_problem(case: Case, request: pytest.FixtureRequest, files: Path,
                                                  tmp_path: Path):
    values = {"tmp": str(tmp_path), "file": str(files / "file"), "garbage": str(files / "garbage"),
              "fake_server": str(files / "fake-server"), "refused": f"nats://127.0.0.1:{free_port()}",
              "port": str(free_port())}
    if "{url}" in case.args or "{busy}" in case.args:
        url = request.getfixturevalue("nats_server").url
        values |= {"url": url, "busy": url.rsplit(":", 1)[1]}
    if "{projection}" in case.args:
        values["projection"] = str(request.getfixturevalue("projection"))
    if "{corrupt}" in case.args:
        values["corrupt"] = str(request.getfixturevalue("corrupt"))
    if "--out {tmp}/" in case.args:
        _auth_dirs(tmp_path)
    args = [part.format(**values) for part in _split(case.args)]
    env = _env(TMPDIR=str(tmp_path), **dict([case.env.split("=", 1)] if case.env else []))  # a bug's traceback: here
    result = subprocess.run([*LEDGER, *args], capture_output=True, text=True, timeout=60, env=env,
                            cwd=case.cwd.format(**values), check=False)
    shown = f"ledger {' '.join(args)}\nexit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode != 0, shown
    assert "Traceback" not in result.stderr + result.stdout, shown
    lines = _error_lines(result.stderr)
    assert len(lines) == 1, shown
    assert len(lines[0]) <= 300, shown
    assert re.search(case.names, lines[0]), shown
    assert "bug" not in lines[0], shown


def _split(args: str) -> list[str]:
    return shlex.split(args)


# --- the boundary itself: what it does with what nobody expected -----------------------------------------------


def _crashing_cli() -> click.Group:
    from ledgerctl.cli.common import LedgerGroup

    @click.group(cls=LedgerGroup)
    @click.option("-v", "--verbose", count=True)
    def probe(verbose: int) -> None:
        pass

    @probe.command("crash")
    def crash() -> None:
        raise RuntimeError("an invariant broke")

    return probe


def test_an_unexpected_exception_is_one_line_saying_it_is_a_bug_and_where_its_traceback_is(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from ledgerctl.cli.common import BUG_EXIT

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the traceback goes
    result = CliRunner().invoke(_crashing_cli(), ["crash"])
    assert result.exit_code == BUG_EXIT, result.output
    lines = _error_lines(result.output)  # stdout and stderr
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert "bug" in lines[0] and "RuntimeError: an invariant broke" in lines[0], lines
    saved = re.search(r"traceback in (\S+)", lines[0])
    assert saved, lines[0]
    assert "RuntimeError: an invariant broke" in Path(saved[1]).read_text()

    loud = CliRunner().invoke(_crashing_cli(), ["-v", "crash"])
    assert loud.exit_code == BUG_EXIT and "Traceback" in loud.output, loud.output
    assert "traceback above" in _error_lines(loud.output)[0], loud.output


def test_minus_v_shows_the_traceback_of_an_expected_failure_too(tmp_path: Path):
    args = ["session", "show", "s1", "--nats-url", f"nats://127.0.0.1:{free_port()}"]
    quiet = subprocess.run([*LEDGER, *args], capture_output=True, text=True, timeout=60, env=_env(), cwd=tmp_path,
                           check=False)
    loud = subprocess.run([*LEDGER, "-v", *args], capture_output=True, text=True, timeout=60, env=_env(),
                          cwd=tmp_path, check=False)
    assert "Traceback" not in quiet.stderr and len(_error_lines(quiet.stderr)) == 1, quiet.stderr
    assert "Traceback" in loud.stderr, loud.stderr
    assert _error_lines(loud.stderr) == _error_lines(quiet.stderr), loud.stderr
    assert loud.returncode == quiet.returncode == 1


@pytest.mark.parametrize("failure, line", [
    (FileNotFoundError(2, "No such file or directory", "/nope/x"), "/nope/x: No such file or directory"),
    (sqlite3.OperationalError("database is locked"), "SQLite: database is locked"),
    (ExceptionGroup("parts", [ConnectionRefusedError(111, "Connection refused"), PortInUse("port 1 in use")]),
     "Connection refused; port 1 in use"),
    (sqlite3.IntegrityError("datatype mismatch"), None),  # our SQL given a value it should not have been: a bug
    (ExceptionGroup("parts", [PortInUse("port 1 in use"), KeyError("state")]), None),  # one part nobody expected
    (ValueError("invalid literal for int()"), None),
])
def test_what_the_boundary_knows_and_what_it_calls_a_bug(failure: Exception, line: str | None):
    from ledgerctl.cli.common import failure_message

    assert failure_message(failure) == line
