"""NATS `.creds` files (a user JWT and its nkey seed) against a real nats-server in operator mode.

nsc is not available here, so the operator, account and user JWTs are signed in the test with the nkeys
package: the same ed25519-nkey JWTs nsc writes, with a memory resolver preloading the account.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nkeys
import pytest
from conftest import start_binary_server
from test_secure_connection import agent_registered, append_and_read_back, assert_one_line_error, run_cli

from ledger.errors import AuthFailed, PermissionDenied
from ledger.settings import Settings
from ledger.store import EventStore
from ledgerctl.server import EmbeddedServer


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _keys(prefix: int) -> tuple[nkeys.KeyPair, bytes]:
    seed = nkeys.encode_seed(os.urandom(32), prefix)
    return nkeys.from_seed(bytearray(seed)), seed


def _jwt(claims: dict[str, object], signer: nkeys.KeyPair) -> str:
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body: dict[str, object] = {**claims, "iat": int(time.time()), "iss": signer.public_key.decode(), "jti": ""}
    body["jti"] = base64.b32encode(hashlib.sha256(json.dumps(body).encode()).digest()).decode().rstrip("=")
    payload = _b64(json.dumps(body).encode())
    return f"{header}.{payload}.{_b64(signer.sign(f'{header}.{payload}'.encode()))}"


UNLIMITED = {"subs": -1, "data": -1, "payload": -1}


@dataclass
class Operator:
    server: EmbeddedServer
    account: nkeys.KeyPair
    directory: Path

    def creds(self, name: str, permissions: dict[str, object] | None = None,
              account: nkeys.KeyPair | None = None) -> Path:
        """A .creds file for a new user of the account (or of another, unknown one)."""
        user, seed = _keys(nkeys.PREFIX_BYTE_USER)
        token = _jwt({"sub": user.public_key.decode(), "name": name,
                      "nats": {"type": "user", "version": 2, **UNLIMITED, **(permissions or {})}},
                     account or self.account)
        path = self.directory / f"{name}.creds"
        path.write_text(f"-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n"
                        f"-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n------END USER NKEY SEED------\n")
        path.chmod(0o600)
        return path

    def settings(self, creds: Path, **more: object) -> Settings:
        return Settings(nats_url=self.server.url, creds_file=str(creds), **more)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def operator_mode(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    base = tmp_path_factory.mktemp("operator")
    op, _ = _keys(nkeys.PREFIX_BYTE_OPERATOR)
    account, _ = _keys(nkeys.PREFIX_BYTE_ACCOUNT)
    system, _ = _keys(nkeys.PREFIX_BYTE_ACCOUNT)
    jetstream = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
    limits = {"conn": -1, "leaf": -1, "imports": -1, "exports": -1, "wildcards": True, **UNLIMITED, **jetstream}
    op_jwt = _jwt({"sub": op.public_key.decode(), "name": "op",
                   "nats": {"type": "operator", "version": 2, "system_account": system.public_key.decode()}}, op)
    account_jwt = _jwt({"sub": account.public_key.decode(), "name": "ledger",
                        "nats": {"type": "account", "version": 2, "limits": limits}}, op)
    system_jwt = _jwt({"sub": system.public_key.decode(), "name": "SYS",
                       "nats": {"type": "account", "version": 2}}, op)
    extra = (f"operator: {op_jwt}\nsystem_account: {system.public_key.decode()}\nresolver: MEMORY\n"
             f"resolver_preload: {{\n  {account.public_key.decode()}: {account_jwt}\n"
             f"  {system.public_key.decode()}: {system_jwt}\n}}\n")
    server = start_binary_server(base / "nats", extra=extra)
    try:
        yield Operator(server, account, base)
    finally:
        server.stop()


@pytest.mark.timeout(60)
async def test_a_creds_file_connects_creates_the_streams_and_appends(operator_mode: Operator):
    admin = operator_mode.creds("admin")
    async with EventStore.connect(operator_mode.settings(admin), ensure=True):
        pass
    await append_and_read_back(operator_mode.settings(admin))
    # and from the command line, through the option and through the environment
    assert run_cli("init", "--nats-url", operator_mode.server.url, "--creds", str(admin)).returncode == 0
    assert run_cli("init", "--nats-url", operator_mode.server.url,
                   env={"LEDGER_CREDS_FILE": str(admin)}).returncode == 0


@pytest.mark.timeout(60)
async def test_a_user_of_an_unknown_account_is_refused_in_one_line(operator_mode: Operator):
    stranger, _ = _keys(nkeys.PREFIX_BYTE_ACCOUNT)
    creds = operator_mode.creds("stranger", account=stranger)
    with pytest.raises(AuthFailed, match="authorization violation"):
        async with EventStore.connect(operator_mode.settings(creds)):
            pass
    seed = creds.read_text().split("SEED-----\n")[1].split("\n")[0]
    assert_one_line_error(run_cli("init", "--nats-url", operator_mode.server.url, "--creds", str(creds)),
                          "authorization violation", hidden=seed)


@pytest.mark.timeout(60)
async def test_the_jwt_permissions_bind_the_producer_token(operator_mode: Operator):
    admin = operator_mode.creds("admin2")
    async with EventStore.connect(operator_mode.settings(admin), ensure=True):
        pass
    a1 = operator_mode.creds("a1", {"pub": {"allow": ["ledger.*.*.*.a1", "$JS.API.>"]},
                                    "sub": {"allow": ["_INBOX.>"]}})
    async with EventStore.connect(operator_mode.settings(a1, append_deadline=600.0)) as store:
        await store.append(agent_registered("a1", "a1"))
        with pytest.raises(PermissionDenied) as denied:
            await store.append(agent_registered("a2", "a2"))
        assert denied.value.subject == "ledger.agent.a2.registered.a2"
        assert await store.history("agent", "a2") == []
