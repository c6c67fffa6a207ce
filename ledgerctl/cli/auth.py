"""`ledger auth`: the credentials of a secured deployment (nkeys per role and per agent, TLS certificates).

What it writes into --out DIR (public files 0644, secrets 0600, never printed):

* auth.json         what was generated (users and their PUBLIC keys, replicas, TLS hosts, agents' accounts); no secret
* auth.conf         the nats-server `accounts` block (public keys, permissions, what each account imports from
                    the streams' account LEDGER): `include` it
* <user>.nk         the user's nkey seed (secret)
* <user>.env        LEDGER_NKEY_SEED_FILE, LEDGER_INBOX_PREFIX (and LEDGER_TLS_*): `env_file` for compose
* with --tls: ca.pem, ca-key.pem (secret), server-cert.pem, server-key.pem (secret), tls.conf (the server's
  `tls` block); route-ca.pem, route-cert.pem, route-key.pem (secret), cluster-tls.conf (the cluster's `tls`
  block: routes use a CA of their own, so no client certificate can join the cluster); <user>-cert.pem and
  <user>-key.pem (secret) per user.

Users: admin, operator, service, reader and agent-<id> (ledger/permissions.py says what each may do).

Each consumer of the credentials also gets a directory of its own, to mount instead of DIR (whoever sees DIR holds
every role, and the CA key mints certificates for anyone):

* server/           what a nats-server needs: auth.conf, and with --tls tls.conf, cluster-tls.conf, ca.pem,
                    server-cert.pem, server-key.pem, route-ca.pem, route-cert.pem, route-key.pem
* users/<user>/     that user's <user>.nk and <user>.env, and with --tls ca.pem, <user>-cert.pem, <user>-key.pem

They are copies of DIR's files, rewritten with them. Their paths (in users/<user>/<user>.env, server/tls.conf) are
where a process sees them when its directory is mounted at the same place under --env-dir as it has under DIR.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import click
import nkeys

from ledger.errors import ConfigError, InvalidInput
from ledger.ids import check_token
from ledgerctl import certs, permissions

MANIFEST = "auth.json"
AUTH_CONF = "auth.conf"
TLS_CONF = "tls.conf"
CLUSTER_TLS_CONF = "cluster-tls.conf"
CA, CA_KEY = "ca.pem", "ca-key.pem"
SERVER_DIR = "server"
USERS_DIR = "users"
SERVER_TLS_FILES = (CA, "server-cert.pem", "server-key.pem", "route-ca.pem", "route-cert.pem", "route-key.pem")
DEFAULT_REPLICAS = ("b",)
"""Consumer replica names the service user may write as (docker-compose.yml runs replica `b`)."""


def new_seed() -> tuple[bytes, str]:
    """A fresh user nkey: (seed, public key)."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    return seed, nkeys.from_seed(bytearray(seed)).public_key.decode()


def _write(path: Path, data: bytes, *, secret: bool) -> None:
    """Write atomically, a secret never readable by others even for a moment. A file that already holds `data`
    with the right mode is left alone: the per-consumer copies are rewritten on every save."""
    mode = 0o600 if secret else 0o644
    try:
        if stat.S_IMODE(path.stat().st_mode) == mode and path.read_bytes() == data:
            return
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)  # against a umask that took bits off a public file
    finally:
        os.close(fd)
    os.replace(tmp, path)


class AuthDir:
    """A directory of generated credentials, and its manifest."""

    def __init__(self, out: Path, env_dir: str | None = None) -> None:
        self.out = out
        self.manifest: dict[str, Any] = {"users": {}, "replicas": list(DEFAULT_REPLICAS), "tls_hosts": [],
                               "env_dir": env_dir or str(out.resolve())}
        self._server_tls_confs_due = False

    @property
    def exists(self) -> bool:
        return (self.out / MANIFEST).exists()

    def load(self) -> AuthDir:
        try:
            self.manifest = json.loads((self.out / MANIFEST).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{self.out} holds no credentials ({MANIFEST} missing): run `ledger auth init --out "
                              f"{self.out}` first") from None
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read {self.out / MANIFEST}: {e}") from None
        wrong = _manifest_problem(self.manifest)
        if wrong:
            raise ConfigError(f"{self.out / MANIFEST} is not a manifest `ledger auth init` wrote: {wrong}")
        return self

    @property
    def tls(self) -> bool:
        return bool(self.manifest["tls_hosts"])

    def path_for_clients(self, name: str) -> str:
        """Where the clients (and the server) see file `name`: the directory as mounted for them."""
        return f"{self.manifest['env_dir'].rstrip('/')}/{name}"

    def add_user(self, user: str) -> None:
        permissions.permissions_for(user, replicas=self.manifest["replicas"])  # InvalidInput for a bad name
        seed, public = new_seed()
        _write(self.out / f"{user}.nk", seed + b"\n", secret=True)
        if self.tls:
            issued = certs.issue(self._ca(), user, client=True)
            _write(self.out / f"{user}-cert.pem", issued.cert_pem, secret=False)
            _write(self.out / f"{user}-key.pem", issued.key_pem, secret=True)
        _write(self.out / f"{user}.env", self._env(user, ""), secret=False)
        self.manifest["users"][user] = public

    def user_files(self, user: str) -> list[str]:
        """The files a process of `user` needs (the names in DIR and in users/<user>/)."""
        return [f"{user}.nk", *((CA, f"{user}-cert.pem", f"{user}-key.pem") if self.tls else ())]

    def _env(self, user: str, where: str) -> bytes:
        """The env file of `user` whose files are in `where` (a directory under DIR, "" for DIR itself)."""
        p = self.path_for_clients
        env = {"LEDGER_NKEY_SEED_FILE": p(f"{where}{user}.nk"), "LEDGER_INBOX_PREFIX": permissions.inbox_prefix(user)}
        if self.tls:
            env |= {"LEDGER_TLS_CA_FILE": p(f"{where}{CA}"), "LEDGER_TLS_CERT_FILE": p(f"{where}{user}-cert.pem"),
                    "LEDGER_TLS_KEY_FILE": p(f"{where}{user}-key.pem")}
        return "".join(f"{k}={v}\n" for k, v in env.items()).encode()

    def _ca(self) -> certs.Issued:
        try:
            return certs.Issued((self.out / CA).read_bytes(), (self.out / CA_KEY).read_bytes())
        except OSError as e:
            raise ConfigError(f"cannot read the CA in {self.out}: {e.strerror or e}") from None

    def make_tls(self, hosts: list[str]) -> None:
        self.manifest["tls_hosts"] = hosts
        ca = certs.make_ca()
        _write(self.out / CA, ca.cert_pem, secret=False)
        _write(self.out / CA_KEY, ca.key_pem, secret=True)
        server = certs.issue(ca, "nats-server", hosts=tuple(hosts), server=True)
        _write(self.out / "server-cert.pem", server.cert_pem, secret=False)
        _write(self.out / "server-key.pem", server.key_pem, secret=True)
        # Routes trust a CA of their own, whose key is thrown away: a client certificate cannot open a route.
        route_ca = certs.make_ca("session ledger route CA")
        route = certs.issue(route_ca, "nats-route", hosts=tuple(hosts), server=True, client=True)
        _write(self.out / "route-ca.pem", route_ca.cert_pem, secret=False)
        _write(self.out / "route-cert.pem", route.cert_pem, secret=False)
        _write(self.out / "route-key.pem", route.key_pem, secret=True)
        self._write_tls_confs(self.out, "")
        self._server_tls_confs_due = True

    def _write_tls_confs(self, to: Path, where: str) -> None:
        """tls.conf and cluster-tls.conf into `to`, naming the certificates in `where` (see _env)."""
        def p(name: str) -> str:
            return self.path_for_clients(f"{where}{name}")

        _write(to / TLS_CONF, (
            "# Generated by `ledger auth init --tls`: clients must present a certificate from ca.pem.\n"
            f'tls {{\n  cert_file: "{p("server-cert.pem")}"\n  key_file: "{p("server-key.pem")}"\n'
            f'  ca_file: "{p(CA)}"\n  verify: true\n  timeout: 5\n}}\n').encode(), secret=False)
        _write(to / CLUSTER_TLS_CONF, (
            "# Generated by `ledger auth init --tls`: include inside the `cluster` block.\n"
            f'tls {{\n  cert_file: "{p("route-cert.pem")}"\n  key_file: "{p("route-key.pem")}"\n'
            f'  ca_file: "{p("route-ca.pem")}"\n  verify: true\n  timeout: 5\n}}\n').encode(), secret=False)

    def _copy(self, name: str, to: Path) -> None:
        _write(to / name, (self.out / name).read_bytes(), secret=name.endswith((".nk", "-key.pem")))

    def lay_out(self) -> None:
        """Copy into DIR/server/ and DIR/users/<user>/ what each needs, and nothing else (module docstring)."""
        server = self.out / SERVER_DIR
        _mkdir(server)
        self._copy(AUTH_CONF, server)
        if self.tls:
            for name in SERVER_TLS_FILES:
                self._copy(name, server)
            # Like DIR's, written by init only (and for a DIR from before server/): add-agent leaves a running
            # server's TLS blocks alone.
            if self._server_tls_confs_due or not all((server / n).exists() for n in (TLS_CONF, CLUSTER_TLS_CONF)):
                self._write_tls_confs(server, f"{SERVER_DIR}/")
        _mkdir(self.out / USERS_DIR)
        for user in self.manifest["users"]:
            to = self.out / USERS_DIR / user
            _mkdir(to)
            for name in self.user_files(user):
                self._copy(name, to)
            _write(to / f"{user}.env", self._env(user, f"{USERS_DIR}/{user}/"), secret=False)

    def save(self) -> None:
        users = self.manifest["users"]
        # Each agent keeps its account; a new one takes the spare the server already has (permissions.py says why).
        self.manifest["agent_accounts"] = permissions.assign_agent_accounts(
            [u for u in users if u not in permissions.ROLE_USERS], self.manifest.get("agent_accounts"))
        _write(self.out / AUTH_CONF, permissions.render_authorization(
            users, replicas=self.manifest["replicas"], agent_accounts=self.manifest["agent_accounts"]).encode(),
            secret=False)
        self.lay_out()
        _write(self.out / MANIFEST, (json.dumps(self.manifest, indent=2, sort_keys=True) + "\n").encode(), secret=False)


_MANIFEST_FIELDS = {"users": dict, "replicas": list, "tls_hosts": list, "env_dir": str}
_JSON_NAMES: dict[type, str] = {dict: "object", list: "array", str: "string"}


def _manifest_problem(manifest: object) -> str | None:
    """What is wrong with a loaded auth.json, if anything: it is read back field by field."""
    if not isinstance(manifest, dict):
        return f"a JSON {_JSON_NAMES.get(type(manifest), type(manifest).__name__)}, not an object"
    for name, kind in _MANIFEST_FIELDS.items():
        if not isinstance(manifest.get(name), kind):
            return f"{name!r} is missing or not a JSON {_JSON_NAMES[kind]}"
    return None


def _agent_users(agent_ids: tuple[str, ...]) -> list[str]:
    users = []
    for agent_id in agent_ids:
        permissions.check_agent_id(agent_id)
        users.append(permissions.agent_user(agent_id))
    return users


def _mkdir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        out.chmod(0o700)
    except OSError as e:
        raise ConfigError(f"cannot use {out}: {e.strerror or e}") from None


@click.group("auth")
def auth_group() -> None:
    """Generate the credentials of a secured deployment: an nkey per role (admin, operator, service,
    reader) and per agent, the nats-server `accounts` block that binds each to its subjects, and
    optionally TLS certificates. The server configuration holds public keys only; each user gets a seed
    file (mode 0600) and an env file for its processes. Nothing secret is printed.

    \b
    Users (ledger/permissions.py derives what each may publish from ledger/authority.py):
      admin       everything: `ledger init` creates and upgrades the streams as admin
      operator    sessions, routes, breaker reset (as `operator` or `cli`)
      service     `ledger up` / `ledger consumers`: monitor, reclaimer, watchdog (+ replicas), dead letters
      reader      reads only: views, dashboards, `ledger doctor`
      agent-ID    one agent: subjects ending in its id; its own lifecycle only on its own entity
    The streams live in account LEDGER with admin; every other user is alone in an account that imports from
    LEDGER only what it may publish, so the server's answers to a reply subject it names stay in its account.
    Each connection must use its user's inbox prefix, `_INBOX_<user>` (LEDGER_INBOX_PREFIX in its .env).
    """


@auth_group.command("init")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write the credentials to (created, mode 0700).")
@click.option("--agent", "agents", multiple=True, metavar="ID", help="An agent to give credentials (repeatable).")
@click.option("--replica", "replicas", multiple=True, metavar="NAME",
              help="A consumer replica name the service user may write as (repeatable; default: b).")
@click.option("--tls", is_flag=True, help="Also make a CA, a server certificate and client certificates.")
@click.option("--host", "hosts", multiple=True, metavar="NAME",
              help="A server host name or IP address for the server certificate (repeatable; with --tls).")
@click.option("--env-dir", metavar="PATH",
              help="Where the processes will see DIR (e.g. a container mount), each of server/ and users/<user>/ "
                   "at its place under it: the paths in the .env and TLS files. Default: DIR itself.")
@click.option("--if-missing", is_flag=True,
              help="When DIR already holds credentials, keep them (add only agents not there yet) and exit 0: "
                   "an idempotent init step.")
@click.option("--force", is_flag=True, help="Replace existing credentials (every user needs its new files).")
def auth_init(out: Path, agents: tuple[str, ...], replicas: tuple[str, ...], tls: bool, hosts: tuple[str, ...],
              env_dir: str | None, if_missing: bool, force: bool) -> None:
    """Write DIR/auth.conf (include it in the server configuration), a seed and an env file per user, and with
    --tls the certificates and DIR/tls.conf, DIR/cluster-tls.conf. Refuses to replace existing credentials
    unless --force; --if-missing keeps them.
    """
    if if_missing and force:
        raise InvalidInput("--if-missing and --force contradict each other")
    if tls and not hosts:
        raise InvalidInput("--tls needs at least one --host (the names clients use to reach the server)")
    if hosts and not tls:
        raise InvalidInput("--host is for the server certificate: add --tls")
    agent_users = _agent_users(agents)
    d = AuthDir(out, env_dir)
    if d.exists and not force:
        if not if_missing:
            raise ConfigError(f"{out} already holds credentials: --if-missing keeps them, --force replaces "
                              "them (every user then needs its new files)")
        d.load()
        added = [u for u in agent_users if u not in d.manifest["users"]]
        for user in added:
            d.add_user(user)
        d.save()  # also lays out the per-consumer directories of a DIR written before them
        click.echo(f"kept the credentials in {out}" + (f"; added {', '.join(added)}" if added else ""))
        return
    _mkdir(out)
    if replicas:
        d.manifest["replicas"] = [check_token(r, "replica name") for r in replicas]
    if tls:
        d.make_tls(list(hosts))
    users = [*permissions.ROLE_USERS, *agent_users]
    for user in users:
        d.add_user(user)
    d.save()
    click.echo(f"wrote credentials for {', '.join(users)} to {out} (seeds mode 0600)")
    # nats-server resolves an include relative to the including file's directory - even one written as an
    # absolute path - so say it that way (deploy/nats-secure.conf: `include "secrets/server/auth.conf"`).
    server = out / SERVER_DIR
    click.echo(f"server: give it {server} only; include {server / AUTH_CONF}"
               + (f" and {server / TLS_CONF}" if tls else "")
               + ", by a path relative to the server's configuration file")
    click.echo(f"clients: give each user's processes {out / USERS_DIR}/<user> only, and load its <user>.env "
               "(LEDGER_NKEY_SEED_FILE, LEDGER_INBOX_PREFIX" + (", LEDGER_TLS_*)" if tls else ")"))


@auth_group.command("add-agent")
@click.argument("agent_id")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The directory `ledger auth init` wrote.")
def auth_add_agent(agent_id: str, out: Path) -> None:
    """Give agent AGENT_ID its credentials (seed, env file, and a client certificate when the directory has
    TLS) and rewrite DIR/auth.conf; then reload the server so it takes the new user.
    """
    (user,) = _agent_users((agent_id,))
    d = AuthDir(out).load()
    if user in d.manifest["users"]:
        raise ConfigError(f"agent {agent_id} already has credentials in {out} ({user}.nk)")
    d.add_user(user)
    d.save()
    click.echo(f"wrote {out / USERS_DIR / user} (its seed and env file: give the agent's processes that directory "
               f"only); rewrote {out / AUTH_CONF} and {out / SERVER_DIR / AUTH_CONF}")
    click.echo("reload the server for it to take effect: `nats-server --signal reload` (or kill -HUP <pid>; "
               "in compose: docker compose kill -s HUP nats-1 nats-2 nats-3)")
