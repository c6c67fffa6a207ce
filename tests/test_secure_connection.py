"""Connection security against real nats-servers: credentials, mutual TLS, refused credentials and permissions."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nkeys
import pytest
from conftest import create_streams, start_binary_server
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ledger import events as ev
from ledger.errors import AuthFailed, ConfigError, PermissionDenied, TlsFailed
from ledger.ids import new_id
from ledger.settings import Settings
from ledger.store import EventStore
from ledgerctl.server import EmbeddedServer

LEDGER = [sys.executable, "-m", "ledgerctl"]
ADMIN_PASSWORD = "adm1n-s3cret"
TOKEN = "t0ken-s3cret"


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    return subprocess.run([*LEDGER, *args], capture_output=True, text=True, timeout=timeout,
                          env={**clean, **(env or {})}, check=False)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str, hidden: str = "") -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    if hidden:
        assert hidden not in result.stderr + result.stdout
    return lines[0]


def agent_registered(agent_id: str, producer: str) -> ev.AgentRegistered:
    return ev.AgentRegistered(agent_id=agent_id, producer=ev.Producer(producer, "test"),
                              instance_id=f"{agent_id}-{new_id()[:8]}",
                              pool="gpu")


# --- servers with users -------------------------------------------------------------------------------------------


@dataclass
class UsersServer:
    server: EmbeddedServer
    nkey_seed: Path

    @property
    def url(self) -> str:
        return self.server.url

    def admin(self, **more: object) -> Settings:
        return Settings(nats_url=self.url, user="admin", password=ADMIN_PASSWORD).replace(**more)


@pytest.fixture(scope="module")
def users_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UsersServer]:
    base = tmp_path_factory.mktemp("users")
    kp = nkeys.from_seed(bytearray(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)))
    seed = base / "agent.nk"
    seed.write_bytes(kp.seed)
    extra = f"""authorization {{
  users = [
    {{user: admin, password: "{ADMIN_PASSWORD}"}}
    {{nkey: {kp.public_key.decode()}}}
    {{user: a1, password: a1pw, permissions: {{
        publish: ["ledger.*.*.*.a1", "$JS.API.>", "_INBOX.>"], subscribe: ["_INBOX.>"]}}}}
    {{user: noapi, password: noapipw, permissions: {{publish: ["ledger.>"], subscribe: ["_INBOX.>"]}}}}
    {{user: boxed, password: boxedpw, permissions: {{publish: [">"], subscribe: ["_INBOX_boxed.>"]}}}}
  ]
}}
"""
    server = start_binary_server(base / "nats", extra=extra)
    try:
        asyncio.run(_create(server.url))
        yield UsersServer(server, seed)
    finally:
        server.stop()


async def _create(url: str) -> None:
    async with EventStore.connect(Settings(nats_url=url, user="admin", password=ADMIN_PASSWORD), ensure=True):
        pass


async def append_and_read_back(settings: Settings) -> None:
    event = agent_registered(f"ag-{new_id()[:8]}", "cli")
    async with EventStore.connect(settings) as store:
        seq = await store.append(event)
        [recorded] = await store.history("agent", event.agent_id)
        assert (recorded.seq, recorded.event) == (seq, event)


@pytest.mark.timeout(60)
async def test_a_user_and_password_connect_and_append(users_server: UsersServer):
    await append_and_read_back(users_server.admin())


@pytest.mark.timeout(60)
async def test_a_password_in_the_url_works_too(users_server: UsersServer):
    await append_and_read_back(Settings(nats_url=users_server.url.replace("://", f"://admin:{ADMIN_PASSWORD}@")))


@pytest.mark.timeout(60)
async def test_an_nkey_seed_connects_and_appends(users_server: UsersServer):
    await append_and_read_back(Settings(nats_url=users_server.url, nkey_seed_file=str(users_server.nkey_seed)))


@pytest.mark.timeout(60)
async def test_a_wrong_password_is_an_authorization_violation(users_server: UsersServer):
    with pytest.raises(AuthFailed, match="authorization violation") as e:
        async with EventStore.connect(users_server.admin().replace(password="wr0ng-pass")):
            pass
    assert "wr0ng-pass" not in str(e.value) and "cannot reach" not in str(e.value)


@pytest.mark.timeout(60)
async def test_no_credentials_at_all_is_an_authorization_violation(users_server: UsersServer):
    with pytest.raises(AuthFailed, match="authorization violation"):
        async with EventStore.connect(Settings(nats_url=users_server.url)):
            pass


@pytest.mark.timeout(90)
def test_the_cli_says_authorization_violation_in_one_line_without_the_password(users_server: UsersServer):
    result = run_cli("init", "--nats-url", users_server.url, "--user", "admin",
                     env={"LEDGER_PASSWORD": "wr0ng-pass"})
    assert_one_line_error(result, "authorization violation", hidden="wr0ng-pass")
    in_url = users_server.url.replace("://", "://admin:wr0ng-pass@")
    result = run_cli("session", "create", "--pool", "gpu", "--nats-url", in_url)
    assert_one_line_error(result, "authorization violation", "admin:***@", hidden="wr0ng-pass")


@pytest.mark.timeout(90)
def test_the_cli_connects_with_options_and_with_the_environment(users_server: UsersServer):
    ok = run_cli("init", "--nats-url", users_server.url, "--user", "admin", "--password", ADMIN_PASSWORD)
    assert ok.returncode == 0, ok.stderr
    ok = run_cli("session", "create", "--pool", "gpu", "--nats-url", users_server.url,
                 env={"LEDGER_NKEY_SEED_FILE": str(users_server.nkey_seed)})
    assert ok.returncode == 0, ok.stderr


@pytest.mark.timeout(60)
def test_a_missing_creds_file_is_one_line(users_server: UsersServer, tmp_path: Path):
    missing = tmp_path / "nope.creds"
    result = run_cli("init", "--nats-url", users_server.url, "--creds", str(missing))
    assert_one_line_error(result, f"credentials file {missing}: No such file")


@pytest.mark.timeout(60)
async def test_a_file_that_holds_no_seed_is_a_config_error(users_server: UsersServer, tmp_path: Path):
    (tmp_path / "agent.nk").write_text("not a seed\n")
    with pytest.raises(ConfigError, match=f"nkey seed file {tmp_path / 'agent.nk'}: invalid seed"):
        async with EventStore.connect(Settings(nats_url=users_server.url, nkey_seed_file=str(tmp_path / "agent.nk"))):
            pass


@pytest.mark.timeout(30)
async def test_an_append_on_a_subject_the_user_may_not_publish_is_denied_at_once(users_server: UsersServer):
    # A deadline far beyond the test's timeout: only the server's refusal, routed to the append, can end it in time.
    a1 = Settings(nats_url=users_server.url, user="a1", password="a1pw", append_deadline=600.0)
    own, forged = agent_registered("a1", "a1"), agent_registered("a2", "a2")
    async with EventStore.connect(a1) as store:
        assert await store.append(own) > 0  # its own subject: allowed
        with pytest.raises(PermissionDenied) as e:
            await store.append(forged)
        assert e.value.subject == "ledger.agent.a2.registered.a2"
        assert "ledger.agent.a2.registered.a2" in str(e.value) and "may have landed" not in str(e.value)
        assert await store.append(agent_registered("a1", "a1")) > 0  # the connection is still good
    async with EventStore.connect(users_server.admin()) as admin:
        assert [r.event.event_id for r in await admin.history("agent", "a2")
                if r.event.event_id == forged.event_id] == []


@pytest.mark.timeout(30)
async def test_a_jetstream_request_the_user_may_not_make_is_denied_at_once(users_server: UsersServer):
    noapi = Settings(nats_url=users_server.url, user="noapi", password="noapipw", request_timeout=600.0)
    with pytest.raises(PermissionDenied, match=r"\$JS\.API\.STREAM\.INFO\.LEDGER"):
        async with EventStore.connect(noapi):  # checks the streams: a JetStream API request
            pass


@pytest.mark.timeout(30)
async def test_replies_come_to_the_inbox_prefix_the_server_allows(users_server: UsersServer):
    boxed = Settings(nats_url=users_server.url, user="boxed", password="boxedpw", append_deadline=600.0,
                     request_timeout=600.0)
    # Everyone's replies under _INBOX.> are not this user's to read: its appends could never be acknowledged.
    with pytest.raises(PermissionDenied, match=r"subscribe to _INBOX\..*LEDGER_INBOX_PREFIX"):
        async with EventStore.connect(boxed, check=False) as store:
            await store.append(agent_registered("a1", "a1"))
    await append_and_read_back(boxed.replace(inbox_prefix="_INBOX_boxed"))


@pytest.mark.timeout(90)
def test_doctor_never_prints_the_password_of_its_url(users_server: UsersServer):
    url = users_server.url.replace("://", f"://admin:{ADMIN_PASSWORD}@")
    result = run_cli("doctor", "--nats-url", url, "--no-check", "--db", "/nonexistent/projection.sqlite3")
    assert "admin:***@" in result.stdout, (result.stdout, result.stderr)
    assert ADMIN_PASSWORD not in result.stdout + result.stderr


@pytest.mark.timeout(90)
def test_the_cli_reports_a_denied_append_in_one_line(users_server: UsersServer):
    # An operator's producer token (the SDK lets it create sessions) on a user allowed only subjects ending `a1`.
    result = run_cli("session", "create", "--pool", "gpu", "--as", "operator-x", "--nats-url", users_server.url,
                     "--user", "a1", env={"LEDGER_PASSWORD": "a1pw"})
    line = assert_one_line_error(result, "permission denied", "ledger.session.", ".operator-x", hidden="a1pw")
    assert "may have landed" not in line


# --- a token ------------------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_a_token_connects_and_appends(tmp_path: Path):
    server = start_binary_server(tmp_path / "nats", extra=f'authorization {{ token: "{TOKEN}" }}')
    try:
        settings = Settings(nats_url=server.url, token=TOKEN)
        await create_streams(server.url, token=TOKEN)
        await append_and_read_back(settings)
        with pytest.raises(AuthFailed, match="authorization violation") as e:
            async with EventStore.connect(settings.replace(token="not-" + TOKEN)):
                pass
        assert TOKEN not in str(e.value)
    finally:
        server.stop()


# --- TLS ----------------------------------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def make_ca(directory: Path, cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .sign(key, hashes.SHA256()))
    path = directory / f"{cn}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, path


def make_leaf(directory: Path, cn: str, ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path], *,
              server: bool) -> tuple[Path, Path]:
    ca_key, ca_cert, _ = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                     else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    cert_path, key_path = directory / f"{cn}.pem", directory / f"{cn}-key.pem"
    cert_path.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, key)
    return cert_path, key_path


@dataclass
class TlsServer:
    server: EmbeddedServer
    ca: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path

    @property
    def url(self) -> str:
        return self.server.url.replace("nats://", "tls://")

    def client(self, **more: object) -> Settings:
        return Settings(nats_url=self.url, tls_ca_file=str(self.ca), tls_cert_file=str(self.client_cert),
                        tls_key_file=str(self.client_key)).replace(**more)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    base = tmp_path_factory.mktemp("tls")
    ca = make_ca(base, "ledger-test-ca")
    server_cert, server_key = make_leaf(base, "nats-server", ca, server=True)
    client_cert, client_key = make_leaf(base, "agent-a1", ca, server=False)
    _, _, rogue = make_ca(base, "someone-elses-ca")
    extra = f"""tls {{
  cert_file: "{server_cert}"
  key_file: "{server_key}"
  ca_file: "{ca[2]}"
  verify: true
  timeout: 5
}}
"""
    server = start_binary_server(base / "nats", extra=extra)
    tls = TlsServer(server, ca[2], client_cert, client_key, rogue)
    try:
        asyncio.run(_create_tls(tls))
        yield tls
    finally:
        server.stop()


async def _create_tls(tls: TlsServer) -> None:
    async with EventStore.connect(tls.client(), ensure=True):
        pass


@pytest.mark.timeout(60)
async def test_mutual_tls_with_a_ca_and_a_client_certificate_appends(tls_server: TlsServer):
    await append_and_read_back(tls_server.client())
    await append_and_read_back(tls_server.client(nats_url=tls_server.server.url))  # nats:// upgrades when asked


@pytest.mark.timeout(60)
async def test_no_client_certificate_is_a_one_line_tls_error(tls_server: TlsServer):
    with pytest.raises(TlsFailed, match="client certificate") as e:
        async with EventStore.connect(Settings(nats_url=tls_server.url, tls_ca_file=str(tls_server.ca))):
            pass
    assert "\n" not in str(e.value)


@pytest.mark.timeout(30)
async def test_a_server_certificate_from_an_unknown_ca_is_a_tls_error_at_once(tls_server: TlsServer):
    with pytest.raises(TlsFailed, match="not trusted") as e:
        async with EventStore.connect(tls_server.client(tls_ca_file=str(tls_server.rogue_ca))):
            pass
    assert "\n" not in str(e.value)


@pytest.mark.timeout(90)
def test_the_cli_speaks_mutual_tls_and_names_an_unknown_ca(tls_server: TlsServer):
    flags = ["--nats-url", tls_server.url, "--tls-cert", str(tls_server.client_cert),
             "--tls-key", str(tls_server.client_key)]
    ok = run_cli("init", *flags, "--tls-ca", str(tls_server.ca))
    assert ok.returncode == 0, ok.stderr
    bad = run_cli("init", *flags, "--tls-ca", str(tls_server.rogue_ca))
    assert_one_line_error(bad, "TLS handshake", "not trusted")


@pytest.mark.timeout(60)
async def test_a_tls_url_never_falls_back_to_plain_text(users_server: UsersServer):
    with pytest.raises(TlsFailed, match="does not offer TLS"):
        async with EventStore.connect(users_server.admin(nats_url=users_server.url.replace("nats://", "tls://"))):
            pass
