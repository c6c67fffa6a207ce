"""The secured deployment as a user runs it: the real `ledger` commands, each user's generated .env file, a real
nats-server started with the configuration `ledger auth init` wrote.

`ledger init` as admin makes the streams; `ledger up --nats-url` as the service user, two `ledger agent`s as
agent-a1 and agent-a2, `ledger session create` as the operator, the views and `ledger session show` as the
reader; kill -9 of the owner moves the session to the other agent, in the log and in the projection, without
any process logging a permissions violation. Impersonation through the CLI (a1 running as a2, an agent creating
sessions, the reader resetting a breaker or ending a session) and credential mistakes end in one line, exit 1.
No seed, key or password ever appears in anything a command printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import start_binary_server
from helpers import eventually

from ledger import events as ev
from ledger import subjects
from ledger.codec import Recorded
from ledger.errors import StreamMismatch, StreamMissing
from ledger.ids import new_id
from ledger.settings import Settings
from ledger.streams import needs_admin
from ledger.writer import Writer
from ledgerctl.server import EmbeddedServer

LEDGER = [sys.executable, "-m", "ledgerctl"]
WRONG_PASSWORD = "n0t-the-p4ssword-" + new_id()[:8]
HEARTBEAT, TTL = "1", "8"
"""The agents' lease: generous, so a loaded machine does not make a live agent look dead."""
UP_GRACE = "1"
"""Seconds after `ledger up` connects during which its monitor declares nobody dead."""
pytestmark = pytest.mark.timeout(240)


# --- the deployment: credentials, a server, the users' environments ---------------------------------------------


@dataclass
class Creds:
    """A directory `ledger auth init` wrote, and everything printed while using it (to look for secrets in)."""

    dir: Path
    tls: bool
    printed: list[str] = field(default_factory=list)

    def secrets(self) -> list[str]:
        """Every seed and private key in the directory, and the wrong password the tests try."""
        found = [WRONG_PASSWORD]
        for path in self.dir.iterdir():
            if path.suffix == ".nk":
                found.append(path.read_text().strip())
            elif path.name.endswith("-key.pem"):  # the PEM body: any line of it would be a leak
                found += [line for line in path.read_text().splitlines() if line and not line.startswith("-----")]
        assert len(found) > 6
        return found

    def check_printed(self, text: str) -> str:
        """Remember `text` and fail at once if it holds a secret."""
        self.printed.append(text)
        leaked = [s[:6] + "..." for s in self.secrets() if s in text]
        assert not leaked, f"secrets printed: {leaked}"
        return text

    def env(self, user: str, url: str, **extra: str) -> dict[str, str]:
        """The environment of a process run as `user`: its .env file (as docker compose's env_file reads it)."""
        clean = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
        lines = (self.dir / f"{user}.env").read_text().splitlines()
        from_file = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
        assert "LEDGER_NKEY_SEED_FILE" in from_file and "LEDGER_INBOX_PREFIX" in from_file
        return {**clean, **from_file, "LEDGER_NATS_URL": url, **extra}


def make_creds(base: Path, *, tls: bool) -> Creds:
    out = base / "creds"
    tls_args = ["--tls", "--host", "127.0.0.1", "--host", "localhost"] if tls else []
    done = subprocess.run([*LEDGER, "auth", "init", "--out", str(out), "--agent", "a1", "--agent", "a2",
                           *tls_args], check=False, capture_output=True, text=True, timeout=60, cwd=base)
    assert done.returncode == 0, done.stderr
    creds = Creds(out, tls)
    creds.check_printed(done.stdout + done.stderr)
    return creds


@dataclass
class Deployment:
    creds: Creds
    server: EmbeddedServer
    base: Path

    @property
    def url(self) -> str:
        return f"{'tls' if self.creds.tls else 'nats'}://127.0.0.1:{self.server.config.port}"

    def env(self, user: str, **extra: str) -> dict[str, str]:
        return self.creds.env(user, self.url, **extra)

    async def run(self, user: str | None, *args: str, env: dict[str, str] | None = None,
                  timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """One `ledger` command run as `user` (None: `env` alone), to its end; its output holds no secret."""
        environment = self.env(user) if user else env
        done = await asyncio.to_thread(subprocess.run, [*LEDGER, *args], capture_output=True, text=True,
                                       timeout=timeout, env=environment, cwd=self.base)
        self.creds.check_printed(done.stdout + done.stderr)
        return done

    async def ok(self, user: str, *args: str) -> str:
        done = await self.run(user, *args)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr
        return done.stdout

    async def json(self, user: str, *args: str) -> dict:
        return json.loads(await self.ok(user, *args, "--json"))


def start_server(base: Path, creds: Creds) -> EmbeddedServer:
    # nats-server resolves an include relative to the including file (its configuration, in the data directory).
    data = base / "nats"
    includes = ["auth.conf", "tls.conf"] if creds.tls else ["auth.conf"]
    extra = "".join(f'include "{os.path.relpath(creds.dir / name, data)}"\n' for name in includes)
    return start_binary_server(data, extra=extra)


@contextlib.contextmanager
def deployment_at(base: Path, *, tls: bool) -> Iterator[Deployment]:
    creds = make_creds(base, tls=tls)
    server = start_server(base, creds)
    try:
        yield Deployment(creds, server, base)
    finally:
        server.stop()


def one_line_error(done: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 1 and one line on stderr, `Error: ...`, holding each of `needles`; no traceback."""
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --- long-running commands ------------------------------------------------------------------------------------


@dataclass
class Proc:
    """A `ledger` process running in the background, its output going to files (a pipe could fill and block it)."""

    name: str
    popen: subprocess.Popen[bytes]
    out: Path
    err: Path

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def violations(self) -> list[str]:
        """Permissions violations it logged (`-v` logs each at INFO), but the reader's consumer deletes.

        ledger/replay.py asks the server to delete an ephemeral consumer it no longer reads, without waiting for
        the answer; only admin may delete consumers, so the server refuses and the consumer goes by itself after
        its inactive threshold. The reader stops asking once a refusal has come back on a connection, so a process
        logs a few (the replays it closes at once, before the first refusal arrives), never one per replay.
        Everything else in the normal flow must be allowed.
        """
        lines = [line for line in self.stderr().splitlines() if "permissions violation" in line.lower()]
        deletes = [line for line in lines if '"$js.api.consumer.delete.' in line.lower()]
        return [line for line in lines if line not in deletes] + (deletes if len(deletes) > 8 else [])


class Fleet:
    """The background processes of one test: always killed at the end, whatever happened."""

    def __init__(self, deployment: Deployment) -> None:
        self.d = deployment
        self.procs: list[Proc] = []

    def start(self, name: str, user: str, *args: str) -> Proc:
        out, err = self.d.base / f"{name}.out", self.d.base / f"{name}.err"
        with open(out, "wb") as o, open(err, "wb") as e:  # the child keeps its own copies
            popen = subprocess.Popen([*LEDGER, "-v", *args], stdout=o, stderr=e, env=self.d.env(user),
                                     cwd=self.d.base)
        proc = Proc(name, popen, out, err)
        self.procs.append(proc)
        return proc

    async def wait_for_line(self, proc: Proc, *texts: str, timeout: float = 60) -> None:
        """Until `proc` has printed one of `texts`; fail at once if it exits without."""
        def seen() -> bool:
            said = any(text in proc.stdout() for text in texts)
            if proc.popen.poll() is not None and not said:
                raise AssertionError(f"{proc.name} exited {proc.popen.returncode}: {proc.stderr()[-2000:]}")
            return said

        await eventually(seen, timeout=timeout, interval=0.1, what=f"{proc.name} saying one of {texts!r}")

    async def stop(self, proc: Proc) -> int:
        """SIGTERM, as Ctrl-C or `docker stop` would: the process must end cleanly, exit 0."""
        proc.popen.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(proc.popen.wait, 30)

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.popen.poll() is None:
                proc.popen.kill()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(10)

    def check_printed(self) -> None:
        for proc in self.procs:
            self.d.creds.check_printed(proc.stdout() + proc.stderr())


@contextlib.asynccontextmanager
async def fleet_of(deployment: Deployment) -> AsyncIterator[Fleet]:
    fleet = Fleet(deployment)
    try:
        yield fleet
    finally:
        fleet.kill_all()
        fleet.check_printed()


# --- fixtures -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """A plain-text deployment whose streams admin made with `ledger init`."""
    with deployment_at(tmp_path_factory.mktemp("secured-flow"), tls=False) as d:
        done = subprocess.run([*LEDGER, "init"], check=False, capture_output=True, text=True, timeout=60,
                              env=d.env("admin"))
        assert done.returncode == 0, done.stderr
        d.creds.check_printed(done.stdout + done.stderr)
        yield d


# --- 1. the streams: made by admin only; `ledger up` as the service user uses them as they are -----------------


async def test_only_admin_makes_the_streams_and_ledger_up_as_service_needs_them(tmp_path: Path):
    with deployment_at(tmp_path, tls=False) as d:
        for user in ("agent-a1", "operator", "service", "reader"):
            one_line_error(await d.run(user, "init"), "stream LEDGER", "does not exist",
                           "run `ledger init` with admin credentials")
        line = one_line_error(await d.run("service", "up", "--data-dir", str(tmp_path / "up")),
                              "stream LEDGER", "does not exist", "run `ledger init` with admin credentials")
        assert "permission denied" not in line  # what to do, not how the server said no

        created = await d.ok("admin", "init")
        assert created.splitlines() == [f"stream {name}: created" for name in
                                        (subjects.LEDGER_STREAM, subjects.HEARTBEAT_STREAM, subjects.DLQ_STREAM)]
        # Streams as admin made them: another user's `ledger init` only checks them.
        assert "LEDGER: ok" in await d.ok("operator", "init")

        # Admin changed a setting the service's `ledger up` would want otherwise: it says so, changes nothing.
        done = await d.run(None, "init", env=d.env("admin", LEDGER_DUPLICATE_WINDOW="60"))
        assert done.returncode == 0 and "LEDGER: updated (duplicate_window" in done.stdout, done.stderr
        line = one_line_error(await d.run("service", "up", "--data-dir", str(tmp_path / "up")),
                              "stream LEDGER", "duplicate_window", "run `ledger init` with admin credentials")
        assert "permission denied" not in line
        again = await d.run(None, "init", env=d.env("admin", LEDGER_DUPLICATE_WINDOW="60"))
        assert again.returncode == 0 and again.stdout.count(": ok") == 3, again.stdout  # as admin left them


# --- 2. the normal flow ----------------------------------------------------------------------------------------


async def session_show(d: Deployment, sid: str) -> dict:
    """The session as the ledger says (folded from its history), read by the reader."""
    return (await d.json("reader", "session", "show", sid))["state"]


async def normal_flow(d: Deployment, pool: str) -> None:
    db = d.base / f"up-{pool}" / "projection.sqlite3"
    async with fleet_of(d) as fleet:
        up = fleet.start("up", "service", "up", "--data-dir", str(db.parent), "--grace", UP_GRACE)
        await fleet.wait_for_line(up, "ready - press Ctrl-C to stop")
        agents = {agent_id: fleet.start(agent_id, f"agent-{agent_id}", "agent", "--agent-id", agent_id, "--pool",
                                        pool, "--heartbeat", HEARTBEAT, "--ttl", TTL) for agent_id in ("a1", "a2")}
        for agent_id, proc in agents.items():
            await fleet.wait_for_line(proc, f"registered {agent_id}")

        created = await d.ok("operator", "session", "create", "--pool", pool)
        sid = created.split()[2]
        assert created.startswith(f"created session {sid} in pool {pool}/"), created

        async def owned() -> dict | None:
            state = await session_show(d, sid)
            return state if state.get("owner") in agents and state["status"] == "assigned" else None

        first = await eventually(owned, timeout=60, interval=0.5, what="the session claimed by a1 or a2")
        owner = first["owner"]
        (other,) = set(agents) - {owner}
        # Claimed by the reclaimer of `ledger up` ("now owns") or by the agent itself ("claimed"): whoever was first.
        await fleet.wait_for_line(agents[owner], f"now owns {sid}", f"claimed {sid}")

        agents[owner].popen.kill()  # kill -9: no goodbye, no release
        assert await asyncio.to_thread(agents[owner].popen.wait, 10) == -signal.SIGKILL

        async def moved() -> dict | None:
            state = await session_show(d, sid)
            return state if state.get("owner") == other and state["status"] == "assigned" else None

        after = await eventually(moved, timeout=90, interval=0.5, what=f"the session moving from {owner} to {other}")
        assert after["claims"] == 2 and after["token"] > first["token"] and after["claim_reason"] == "failover"
        await fleet.wait_for_line(agents[other], f"now owns {sid}", f"claimed {sid}", timeout=30)

        # The projection `ledger up` writes agrees, through the views the reader runs on it.
        async def projected() -> dict | None:
            items = (await d.json("reader", "sessions", "--db", str(db)))["items"]
            mine = [s for s in items if s["session_id"] == sid]
            return mine[0] if mine and mine[0]["token"] == after["token"] else None

        row = await eventually(projected, timeout=30, interval=0.5, what="the projection catching up")
        assert (row["owner"], row["state"], row["claims"], row["owner_incarnation"]) == (
            other, "assigned", 2, after["owner_incarnation"])

        async def healths() -> dict[str, str] | None:  # judged at "now": a projection behind on beats says suspect
            items = (await d.json("reader", "agents", "--db", str(db)))["items"]
            health = {a["agent_id"]: a["health"] for a in items}
            return health if health == {owner: "dead", other: "alive"} else None

        await eventually(healths, timeout=30, interval=0.5, what=f"{owner} dead and {other} alive in the projection")

        for proc in (agents[other], up):
            assert await fleet.stop(proc) == 0, proc.stderr()[-2000:]
        assert "goodbye written" in agents[other].stdout()
        for proc in fleet.procs:
            assert "Traceback" not in proc.stderr(), (proc.name, proc.stderr()[-3000:])
            assert proc.violations() == [], (proc.name, proc.violations())
        # The log itself: the monitor (not an agent) declared the owner dead; the reclaimer (or the survivor) claimed.
        async with Writer.connect(Settings.from_env(d.env("reader"))) as reader:
            history = [r.event for r in await reader.store.history("agent", owner) if isinstance(r, Recorded)]
            claims = [r.event for r in await reader.store.history("session", sid)
                      if isinstance(r, Recorded) and isinstance(r.event, ev.SessionClaimed)]
        dead = [e for e in history if isinstance(e, ev.AgentDeclaredDead)]
        assert dead and {e.producer.id for e in dead} == {"monitor"}
        assert [c.agent_id for c in claims] == [owner, other]
        assert claims[-1].producer.id in ("reclaimer", other)


async def test_the_whole_flow_runs_with_credentials_and_fails_over_after_kill_9(deployment: Deployment):
    await normal_flow(deployment, "gpu")


async def test_the_whole_flow_runs_over_mutual_tls(tmp_path: Path):
    with deployment_at(tmp_path, tls=True) as d:
        assert d.url.startswith("tls://") and "LEDGER_TLS_CERT_FILE" in d.env("reader")
        await d.ok("admin", "init")
        await normal_flow(d, "tls-pool")


# --- 3. impersonation and credential mistakes, through the CLI ------------------------------------------------


async def a2_registrations_and_a1s_writes(d: Deployment) -> tuple[list[int], list[ev.Event]]:
    async with Writer.connect(Settings.from_env(d.env("reader"))) as reader:
        history = [r for r in await reader.store.history("agent", "a2") if isinstance(r, Recorded)]
    return ([r.seq for r in history if isinstance(r.event, ev.AgentRegistered)],
            [r.event for r in history if r.event.producer.id == "a1"])


async def test_an_agent_cannot_run_as_another_agent(deployment: Deployment):
    registrations, _ = await a2_registrations_and_a1s_writes(deployment)
    done = await deployment.run("agent-a1", "agent", "--agent-id", "a2", "--pool", "gpu", "--heartbeat", HEARTBEAT,
                                "--ttl", TTL, timeout=30)
    line = one_line_error(done, "permission denied", "ledger.agent.a2.registered.a2")
    assert "may have landed" not in line
    # (the normal flow may have run a2 itself; the monitor may have written about it)
    assert await a2_registrations_and_a1s_writes(deployment) == (registrations, [])


def refused_as_agent(done: subprocess.CompletedProcess[str], subject: str, sdk_says: str) -> None:
    """An agent writing under its own id what only others may write: refused in one line, by the SDK (the authority
    table) before the server (its permissions) has a chance to."""
    line = one_line_error(done)
    assert sdk_says in line or ("permission denied" in line and subject in line), line


async def test_an_agent_cannot_create_sessions_under_any_name(deployment: Deployment):
    for as_ in ("cli", "operator"):  # an operator's producer id: the server refuses the agent's publish
        done = await deployment.run("agent-a1", "session", "create", "--pool", "gpu", "--as", as_)
        one_line_error(done, "permission denied", "ledger.session.", f".created.{as_}")
    # Its own id: the server would refuse it too, but the SDK says first that agents do not create sessions.
    refused_as_agent(await deployment.run("agent-a1", "session", "create", "--pool", "gpu", "--as", "a1"),
                     ".created.a1", "session.created written by agent a1")


async def test_the_reader_cannot_reset_a_breaker_nor_end_a_session(deployment: Deployment):
    pool = "tripped"
    # The monitor's trip, written by admin (who may write anything) to have an open breaker to reset.
    async with Writer.connect(Settings.from_env(deployment.env("admin")), producer_id="monitor") as admin:
        await admin.store.append(ev.PoolBreakerTripped(producer=admin.producer, pool=pool, reason="test", dead=("x",),
                                                       agents=3), expect=0)
        sid, _ = await Writer(admin.store, ev.Producer(id="operator", instance=new_id())).create_session(pool)

    one_line_error(await deployment.run("reader", "pool", "reset-breaker", pool), "permission denied",
                   f"ledger.pool.{pool}.breaker_reset.cli")
    one_line_error(await deployment.run("reader", "session", "terminate", sid), "permission denied",
                   f"ledger.session.{sid}.terminated.cli")
    refused_as_agent(await deployment.run("agent-a1", "pool", "reset-breaker", pool, "--as", "a1"),
                     f"ledger.pool.{pool}.breaker_reset.a1", "pool.breaker_reset written by agent a1")
    # The operator may: the refusals were the user's, not the command's.
    assert f"pool {pool}: breaker closed" in await deployment.ok("operator", "pool", "reset-breaker", pool)
    assert (await session_show(deployment, sid))["status"] != "terminated"


async def test_credential_mistakes_are_one_line(deployment: Deployment, tmp_path: Path):
    d = deployment
    missing = tmp_path / "nowhere" / "agent-a1.nk"
    one_line_error(await d.run(None, "session", "show", "s-x", env=d.env("reader", LEDGER_NKEY_SEED_FILE=str(missing))),
                   f"nkey seed file {missing}: No such file")
    one_line_error(await d.run(None, "agent", "--agent-id", "a1", "--pool", "gpu",
                               env=d.env("agent-a1", LEDGER_NKEY_SEED_FILE=str(missing))),
                   f"nkey seed file {missing}")
    # Another agent's seed under a1's name: the server knows that key as a2, who may not write as a1.
    done = await d.run(None, "agent", "--agent-id", "a1", "--pool", "gpu", timeout=30,
                       env=d.env("agent-a1", LEDGER_NKEY_SEED_FILE=str(d.creds.dir / "agent-a2.nk")))
    one_line_error(done, "permission denied")
    # a1's seed reading replies under a2's inbox prefix: refused, and the CLI says which setting to fix.
    done = await d.run(None, "session", "show", "s-x", timeout=30,
                       env=d.env("agent-a1", LEDGER_INBOX_PREFIX="_INBOX_agent-a2"))
    one_line_error(done, "permission denied", "_inbox_agent-a2", "LEDGER_INBOX_PREFIX")
    # A user and password the server does not have: an authorization violation, the password not echoed.
    env = {k: v for k, v in d.env("reader").items() if k != "LEDGER_NKEY_SEED_FILE"}
    done = await d.run(None, "session", "show", "s-x", env={**env, "LEDGER_USER": "admin",
                                                            "LEDGER_PASSWORD": WRONG_PASSWORD})
    one_line_error(done, "authorization violation")
    in_url = d.url.replace("://", f"://admin:{WRONG_PASSWORD}@")
    done = await d.run(None, "init", env={**env, "LEDGER_NATS_URL": in_url})
    one_line_error(done, "authorization violation", "admin:***@")


# --- 4. secrets --------------------------------------------------------------------------------------------------


def test_the_secrets_looked_for_are_the_ones_in_the_files(tmp_path: Path):
    """The check every command's output goes through would catch a seed or a key line if one were printed."""
    creds = make_creds(tmp_path, tls=True)
    seed = (creds.dir / "agent-a1.nk").read_text().strip()
    assert seed.startswith("SU") and seed in creds.secrets()
    key_line = (creds.dir / "reader-key.pem").read_text().splitlines()[1]
    for leak in (f"connecting with {seed}", f"key: {key_line}", f"password {WRONG_PASSWORD}"):
        with pytest.raises(AssertionError, match="secrets printed"):
            creds.check_printed(leak)


def test_a_user_who_may_not_change_streams_is_told_which_stream_and_to_ask_admin():
    assert needs_admin("LEDGER", {}) is None
    missing = needs_admin("LEDGER", None)
    assert isinstance(missing, StreamMissing) and str(missing).startswith("stream LEDGER does not exist")
    differs = needs_admin("LEDGER_HB", {"max_age": (1, 2), "duplicate_window": (3, 4)})
    assert isinstance(differs, StreamMismatch)
    assert str(differs).startswith("stream LEDGER_HB differs in duplicate_window, max_age")
    assert all("run `ledger init` with admin credentials" in str(e) for e in (missing, differs))
