"""`ledger auth`: what it writes (secrets 0600, public keys only in the server's configuration), what it refuses,
and an agent added later that the server takes after a reload."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

import nats
import nkeys
import pytest
from click.testing import CliRunner
from conftest import start_binary_server
from cryptography import x509
from helpers import eventually
from test_permissions import Conn, Secured, connect, recorded, refused_publish, start_secured

from ledger import codec
from ledger import events as ev
from ledger.settings import Settings
from ledger.store import EventStore
from ledgerctl import permissions
from ledgerctl.cli import cli

SECRETS = ("admin.nk", "operator.nk", "service.nk", "reader.nk", "agent-a1.nk", "ca-key.pem", "server-key.pem",
           "route-key.pem", "agent-a1-key.pem")


def auth(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["auth", *args])
    return result.exit_code, result.output


def test_init_writes_seeds_0600_and_only_public_keys_into_the_server_config(tmp_path: Path):
    out = tmp_path / "creds"
    code, output = auth("init", "--out", str(out), "--agent", "a1", "--tls", "--host", "127.0.0.1")
    assert code == 0, output
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for name in SECRETS:
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name
    conf = (out / "auth.conf").read_text()
    manifest = json.loads((out / "auth.json").read_text())
    for user in (*permissions.ROLE_USERS, "agent-a1"):
        seed = (out / f"{user}.nk").read_bytes().strip()
        public = nkeys.from_seed(bytearray(seed)).public_key.decode()
        assert manifest["users"][user] == public and f'"nkey": "{public}"' in conf
        assert seed.decode() not in conf and seed.decode() not in output
        assert seed.decode() not in json.dumps(manifest)
        env = dict(line.split("=", 1) for line in (out / f"{user}.env").read_text().splitlines())
        assert env["LEDGER_NKEY_SEED_FILE"] == str((out / f"{user}.nk").resolve())
        assert env["LEDGER_INBOX_PREFIX"] == permissions.inbox_prefix(user)
        assert Path(env["LEDGER_TLS_CERT_FILE"]).is_file() and Path(env["LEDGER_TLS_KEY_FILE"]).is_file()
    assert "PRIVATE KEY" not in output and "SU" not in output
    # An agent added later gets a client certificate from the same CA.
    code, output = auth("add-agent", "a2", "--out", str(out))
    assert code == 0 and stat.S_IMODE((out / "agent-a2-key.pem").stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    x509.load_pem_x509_certificate((out / "agent-a2-cert.pem").read_bytes()).verify_directly_issued_by(ca)
    assert "agent-a2" in (out / "auth.conf").read_text()


def test_init_refuses_to_replace_secrets_and_if_missing_keeps_them(tmp_path: Path):
    out = tmp_path / "creds"
    assert auth("init", "--out", str(out))[0] == 0
    seed = (out / "admin.nk").read_bytes()
    code, output = auth("init", "--out", str(out))
    assert code == 1 and "already holds credentials" in output and "--if-missing" in output
    assert len(output.strip().splitlines()) == 1 and "Traceback" not in output
    code, output = auth("init", "--out", str(out), "--if-missing", "--agent", "a7")
    assert code == 0 and "kept" in output and "agent-a7" in output
    assert (out / "admin.nk").read_bytes() == seed and (out / "agent-a7.nk").exists()
    code, _ = auth("init", "--out", str(out), "--force")
    assert code == 0 and (out / "admin.nk").read_bytes() != seed


@pytest.mark.parametrize(("args", "message"), [
    (("--agent", "monitor-2"), "names the monitor role"),
    (("--agent", "a.b"), "agent id"),
    (("--tls",), "--tls needs at least one --host"),
    (("--host", "x"), "add --tls"),
    (("--if-missing", "--force"), "contradict"),
])
def test_init_mistakes_are_one_line_errors(tmp_path: Path, args: tuple[str, ...], message: str):
    code, output = auth("init", "--out", str(tmp_path / "creds"), *args)
    assert code != 0 and message in output and "Traceback" not in output
    assert len(output.strip().splitlines()) == 1, output


def test_add_agent_needs_an_initialised_directory_and_a_new_id(tmp_path: Path):
    code, output = auth("add-agent", "a1", "--out", str(tmp_path / "none"))
    assert code == 1 and "ledger auth init" in output
    assert auth("init", "--out", str(tmp_path / "creds"), "--agent", "a1")[0] == 0
    code, output = auth("add-agent", "a1", "--out", str(tmp_path / "creds"))
    assert code == 1 and "already has credentials" in output


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Secured]:
    s = start_secured(tmp_path)
    try:
        yield s
    finally:
        s.server.stop()


async def test_an_agent_added_later_is_taken_by_the_server_after_a_reload(secured: Secured):
    code, output = auth("add-agent", "a9", "--out", str(secured.creds))
    assert code == 0 and "reload" in output
    assert secured.server.pid is not None
    os.kill(secured.server.pid, signal.SIGHUP)  # what `nats-server --signal reload` sends
    await eventually(lambda: "Reloaded server configuration" in secured.server.log_path.read_text(),
                     timeout=10, what="the reload")
    conn: Conn = await connect(secured, "agent-a9")
    try:
        event = ev.AgentRegistered(producer=ev.Producer(id="a9", instance="i"), agent_id="a9", instance_id="i",
                                   pool="p")
        ack = await conn.nc.jetstream().publish("ledger.agent.a9.registered.a9", codec.encode(event).payload,
                                                timeout=5)
        assert ack.seq > 0
        # ... and it is bound like every agent: not a word for a1.
        await refused_publish(conn, "ledger.agent.a1.goodbye.a9", codec.encode(event).payload)
    finally:
        await conn.nc.close()
    admin = await nats.connect(secured.url, nkeys_seed=str(secured.creds / "admin.nk"))
    try:
        store = EventStore(admin, Settings(nats_url=secured.url))
        assert [type(e) for e in await recorded(store, "agent", "a9")] == [ev.AgentRegistered]
        assert await recorded(store, "agent", "a1") == []
    finally:
        await admin.close()


async def test_agents_added_one_after_the_other_each_work_after_one_reload(secured: Secured):
    """Each agent is alone in an account, and nats-server 2.14 wires an account's imports only from the reload after
    the one that created it: each add-agent fills the spare account the server already has and makes the next."""
    for reloads, agent_id in enumerate(("a8", "a9"), start=1):
        assert auth("add-agent", agent_id, "--out", str(secured.creds))[0] == 0
        assert secured.server.pid is not None
        os.kill(secured.server.pid, signal.SIGHUP)
        await eventually(
            lambda n=reloads: secured.server.log_path.read_text().count("Reloaded server configuration") >= n,
            timeout=10, what=f"reload {reloads}")
        conn: Conn = await connect(secured, permissions.agent_user(agent_id))
        try:
            ack = await conn.nc.jetstream().publish(f"ledger.hb.{agent_id}.heartbeat.{agent_id}", b"{}", timeout=5)
            assert ack.stream == "LEDGER_HB"
            info = await conn.nc.jsm(timeout=5).stream_info("LEDGER")
            assert info.config.name == "LEDGER" and conn.violations() == []
        finally:
            await conn.nc.close()
    accounts = json.loads((secured.creds / "auth.json").read_text())["agent_accounts"]
    assert len(set(accounts.values())) == len(accounts) == 5  # a1, a2, a3, a8, a9: an account each


def env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


def test_each_user_and_the_server_get_a_directory_with_their_own_files_only(tmp_path: Path):
    """What a container mounts holds no other role's secret: users/<user>/ that user's seed, certificate and key
    (its env file naming them there), server/ no seed and no CA key. add-agent adds a directory and updates the
    server's auth.conf in place (a directory mount sees the new file; a file mount would keep the old inode)."""
    out = tmp_path / "creds"
    assert auth("init", "--out", str(out), "--agent", "a1", "--tls", "--host", "127.0.0.1")[0] == 0
    for name in ("tls.conf", "cluster-tls.conf"):  # as an operator moving the certificates would
        (out / "server" / name).write_text((out / "server" / name).read_text() + "# edited\n")
    assert auth("add-agent", "a2", "--out", str(out))[0] == 0
    # add-agent leaves the running server's TLS blocks alone, like DIR's own.
    assert all((out / "server" / name).read_text().endswith("# edited\n") for name in ("tls.conf", "cluster-tls.conf"))
    for name in ("tls.conf", "cluster-tls.conf"):
        (out / "server" / name).write_text((out / "server" / name).read_text().removesuffix("# edited\n"))
    users = [*permissions.ROLE_USERS, "agent-a1", "agent-a2"]
    assert sorted(p.name for p in (out / "users").iterdir()) == sorted(users)
    for user in users:
        mine = out / "users" / user
        assert stat.S_IMODE(mine.stat().st_mode) == 0o700
        assert sorted(p.name for p in mine.iterdir()) == sorted(
            [f"{user}.nk", f"{user}.env", "ca.pem", f"{user}-cert.pem", f"{user}-key.pem"])
        for name in (f"{user}.nk", f"{user}-key.pem"):
            assert stat.S_IMODE((mine / name).stat().st_mode) == 0o600, name
            assert (mine / name).read_bytes() == (out / name).read_bytes()
        env = env_file(mine / f"{user}.env")
        assert env["LEDGER_INBOX_PREFIX"] == permissions.inbox_prefix(user)
        for key in ("LEDGER_NKEY_SEED_FILE", "LEDGER_TLS_CA_FILE", "LEDGER_TLS_CERT_FILE", "LEDGER_TLS_KEY_FILE"):
            assert Path(env[key]).parent == mine.resolve() and Path(env[key]).is_file(), key
    server = out / "server"
    assert stat.S_IMODE(server.stat().st_mode) == 0o700
    assert sorted(p.name for p in server.iterdir()) == sorted(
        ["auth.conf", "tls.conf", "cluster-tls.conf", "ca.pem", "server-cert.pem", "server-key.pem", "route-ca.pem",
         "route-cert.pem", "route-key.pem"])
    assert (server / "auth.conf").read_text() == (out / "auth.conf").read_text()
    assert "agent-a2" in (server / "auth.conf").read_text()
    for conf in ("tls.conf", "cluster-tls.conf"):
        named = [Path(p) for p in re.findall(r'_file: "([^"]+)"', (server / conf).read_text())]
        assert len(named) == 3 and all(p.parent == server.resolve() and p.is_file() for p in named), named


def test_env_dir_names_each_directory_where_its_consumer_sees_it(tmp_path: Path):
    out = tmp_path / "creds"
    assert auth("init", "--out", str(out), "--tls", "--host", "nats-1", "--env-dir", "/etc/s")[0] == 0
    env = env_file(out / "users" / "admin" / "admin.env")
    assert env["LEDGER_NKEY_SEED_FILE"] == "/etc/s/users/admin/admin.nk"
    assert env["LEDGER_TLS_KEY_FILE"] == "/etc/s/users/admin/admin-key.pem"
    assert 'cert_file: "/etc/s/server/server-cert.pem"' in (out / "server" / "tls.conf").read_text()
    assert 'ca_file: "/etc/s/server/route-ca.pem"' in (out / "server" / "cluster-tls.conf").read_text()
    # The flat files keep naming DIR's own (backwards compatible).
    assert env_file(out / "admin.env")["LEDGER_NKEY_SEED_FILE"] == "/etc/s/admin.nk"


def test_if_missing_lays_out_a_directory_written_before_the_per_consumer_directories(tmp_path: Path):
    out = tmp_path / "creds"
    assert auth("init", "--out", str(out), "--agent", "a1")[0] == 0
    shutil.rmtree(out / "server")
    shutil.rmtree(out / "users")
    seed = (out / "admin.nk").read_bytes()
    code, output = auth("init", "--out", str(out), "--if-missing")
    assert code == 0 and "kept" in output, output
    assert (out / "users" / "admin" / "admin.nk").read_bytes() == seed == (out / "admin.nk").read_bytes()
    assert (out / "server" / "auth.conf").read_text() == (out / "auth.conf").read_text()
    assert (out / "users" / "agent-a1" / "agent-a1.nk").is_file()
    assert not (out / "server" / "tls.conf").exists()  # no --tls, no TLS files


async def test_a_server_and_an_agent_given_only_their_directories_work_after_add_agent_and_one_reload(
        tmp_path: Path):
    """The compose wiring: the server includes server/'s files, each process uses its users/<user>/ env file."""
    creds = tmp_path / "creds"
    assert auth("init", "--out", str(creds), "--tls", "--host", "127.0.0.1")[0] == 0
    server = start_binary_server(tmp_path / "nats", extra='include "../creds/server/auth.conf"\n'
                                                          'include "../creds/server/tls.conf"\n')
    try:
        url = f"tls://127.0.0.1:{server.config.port}"

        def settings(user: str) -> Settings:
            return Settings.from_env({**env_file(creds / "users" / user / f"{user}.env"), "LEDGER_NATS_URL": url})

        async with EventStore.connect(settings("admin"), ensure=True):
            pass
        assert auth("add-agent", "a9", "--out", str(creds))[0] == 0
        assert server.pid is not None
        os.kill(server.pid, signal.SIGHUP)
        await eventually(lambda: "Reloaded server configuration" in server.log_path.read_text(), timeout=10,
                         what="the reload")
        event = ev.AgentRegistered(producer=ev.Producer(id="a9", instance="i"), agent_id="a9", instance_id="i",
                                   pool="p")
        async with EventStore.connect(settings("agent-a9")) as store:
            ack = await store.nc.jetstream().publish("ledger.agent.a9.registered.a9", codec.encode(event).payload,
                                                     timeout=5)
            assert ack.seq > 0
    finally:
        server.stop()
