"""Connection security settings, without a server: validation, redaction, and reading the server's refusals."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.errors import AuthorizationError, NoServersError

from ledger.connection import (
    check_server_version,
    classify_connect_failure,
    connect_options,
    parse_permission_violation,
)
from ledger.errors import AuthFailed, ConfigError, ConnectedServerTooOld, ServerTooOld, TlsFailed, Unavailable
from ledger.settings import Settings, redact_url

# What a URL's userinfo may hold unencoded (no '/', '@' or ',': they end the userinfo or the URL).
secret = st.text(st.sampled_from("abcXYZ019-_.~!$&'()*+;=%:"), min_size=1, max_size=20)
user = st.text(st.sampled_from("abcXYZ019-_.~"), min_size=1, max_size=12)
host = st.sampled_from(["127.0.0.1:4222", "nats.example.com:4443", "[::1]:4222", "h"])
scheme = st.sampled_from(["nats://", "tls://", ""])


@given(scheme, user, secret, host)
def test_a_password_in_a_url_is_never_shown(sch: str, u: str, pw: str, h: str):
    assert redact_url(f"{sch}{u}:{pw}@{h}") == f"{sch}{u}:***@{h}"


@given(scheme, secret, host)
def test_a_token_in_a_url_is_never_shown(sch: str, token: str, h: str):
    shown = redact_url(f"{sch}{token}@{h}")
    assert shown == (f"{sch}{token.partition(':')[0]}:***@{h}" if ":" in token else f"{sch}***@{h}")


@given(st.lists(st.tuples(scheme, user, secret, host), min_size=1, max_size=4))
def test_every_url_of_a_cluster_list_is_redacted(parts: list[tuple[str, str, str, str]]):
    urls = ",".join(f"{sch}{u}:{pw}@{h}" for sch, u, pw, h in parts)
    assert redact_url(urls) == ",".join(f"{sch}{u}:***@{h}" for sch, u, _, h in parts)
    assert redact_url(redact_url(urls)) == redact_url(urls)


@given(st.lists(st.tuples(scheme, host), min_size=1, max_size=4))
def test_a_url_without_credentials_is_unchanged(parts: list[tuple[str, str]]):
    urls = ", ".join(sch + h for sch, h in parts)
    assert redact_url(urls) == urls


def test_credentials_come_from_the_environment():
    s = Settings.from_env({"LEDGER_USER": "a1", "LEDGER_PASSWORD": "pw", "LEDGER_TLS_CA_FILE": "/ca.pem",
                           "LEDGER_TLS_CERT_FILE": "/c.pem", "LEDGER_TLS_KEY_FILE": "/k.pem",
                           "LEDGER_INBOX_PREFIX": "_INBOX_a1"})
    assert (s.user, s.password, s.tls_ca_file, s.tls_cert_file, s.tls_key_file, s.inbox_prefix) == (
        "a1", "pw", "/ca.pem", "/c.pem", "/k.pem", "_INBOX_a1")
    for name in ("creds_file", "nkey_seed_file", "token"):
        assert getattr(Settings.from_env({f"LEDGER_{name.upper()}": "x"}), name) == "x"


@pytest.mark.parametrize("fields, message", [
    ({"tls_cert_file": "c.pem"}, "certificate needs its key"),
    ({"tls_key_file": "k.pem"}, "certificate needs its key"),
    ({"user": "u", "password": "p", "token": "t"}, "one kind of NATS credentials, not a user and password and a token"),
    ({"creds_file": "a.creds", "nkey_seed_file": "s.nk"}, "not a creds file and an nkey seed"),
    ({"password": "p"}, "a password needs a user"),
    ({"inbox_prefix": "_INBOX.>"}, "inbox_prefix"),
])
def test_contradictory_credentials_are_one_line_config_errors(fields: dict[str, str], message: str):
    with pytest.raises(ConfigError, match=message) as e:
        Settings(**fields)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=message):
        Settings.from_env({f"LEDGER_{k.upper()}": v for k, v in fields.items()})


def test_the_repr_of_settings_shows_no_secret():
    s = Settings(nats_url="nats://u:hunter2@h:4222,nats://tok3n@g:4222", user="u", password="s3cret")
    shown = repr(s) + str(s)
    assert "s3cret" not in shown and "hunter2" not in shown and "tok3n" not in shown
    assert "password='***'" in shown and "user='u'" in shown
    assert "s3cr3t-token" not in repr(Settings(token="s3cr3t-token"))
    rich = dict(s.__rich_repr__())  # what rich's pretty printer shows
    assert (rich["password"], rich["nats_url"]) == ("***", "nats://u:***@h:4222,nats://***@g:4222")


@pytest.mark.parametrize("field, flag", [("creds_file", "credentials file"), ("nkey_seed_file", "nkey seed file"),
                                         ("tls_ca_file", "TLS CA file")])
def test_a_missing_credential_file_is_a_config_error_before_connecting(tmp_path: Path, field: str, flag: str):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=f"{flag} {missing}: No such file"):
        connect_options(Settings(**{field: str(missing)}))


def test_a_missing_client_certificate_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="TLS certificate file .*: No such file"):
        connect_options(Settings(tls_cert_file=str(tmp_path / "c.pem"), tls_key_file=str(tmp_path / "k.pem")))


def test_the_connection_gets_the_credentials(tmp_path: Path):
    seed = tmp_path / "user.nk"
    seed.write_text("SUAxxx")
    assert connect_options(Settings(nkey_seed_file=str(seed)))["nkeys_seed"] == str(seed)
    options = connect_options(Settings(user="u", password="p", inbox_prefix="_INBOX_a1"))
    assert (options["user"], options["password"], options["inbox_prefix"]) == ("u", "p", "_INBOX_a1")
    assert connect_options(Settings(token="t"))["token"] == "t"
    assert "tls" not in connect_options(Settings())
    assert isinstance(connect_options(Settings(nats_url="tls://127.0.0.1:4222"))["tls"], ssl.SSLContext)


@pytest.mark.parametrize("text, found", [
    ('nats: permissions violation for publish to "ledger.agent.a2.goodbye.a1"',
     ("publish", "ledger.agent.a2.goodbye.a1")),
    ('nats: Permissions Violation for Subscription to "_INBOX.AbC.*"', ("subscription", "_inbox.abc.*")),
    ('nats: permissions violation for subscription to "x.y" using queue "q"', ("subscription", "x.y")),
    ("nats: authorization violation", None),
])
def test_permission_violations_are_read_from_nats_py_text(text: str, found: tuple[str, str] | None):
    assert parse_permission_violation(text) == found


def test_connect_failures_are_named():
    url = "nats://u:pw@127.0.0.1:4222"
    auth = classify_connect_failure([AuthorizationError()], NoServersError(), url)
    assert isinstance(auth, AuthFailed) and "authorization violation" in str(auth) and "pw" not in str(auth)
    err = ssl.SSLCertVerificationError(1, "certificate verify failed")
    err.verify_message = "unable to get local issuer certificate"
    tls = classify_connect_failure([OSError("refused"), err], NoServersError(), url)
    assert isinstance(tls, TlsFailed) and "not trusted" in str(tls) and "--tls-ca" in str(tls)
    gone = classify_connect_failure([ConnectionRefusedError("Connect call failed")], NoServersError(), url)
    assert type(gone) is Unavailable and str(gone).startswith("cannot reach NATS at nats://u:***@127.0.0.1:4222")


def test_a_server_below_the_floor_is_refused():
    check_server_version((2, 11, 0), "nats://h:1")
    check_server_version((2, 14, 0), "nats://h:1")
    with pytest.raises(ConnectedServerTooOld, match=r"nats-server 2\.9\.10 at nats://u:\*\*\*@h:1 is too old: the "
                                                    r"ledger needs 2\.11\.0") as e:
        check_server_version((2, 9, 10), "nats://u:pw@h:1")
    assert isinstance(e.value, ServerTooOld) and "Nats-Expected-Last-Subject-Sequence-Subject" in str(e.value)


def _self_signed(path: Path, *, days_ago_start: int, days_ago_end: int) -> str:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agent")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=days_ago_start))
            .not_valid_after(now - dt.timedelta(days=days_ago_end)).sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def test_a_broken_pipe_with_an_expired_client_certificate_is_said_to_be_the_certificate(tmp_path: Path) -> None:
    # TLS 1.3: the server judges our certificate after our side of the handshake; its alert can lose the race
    # with the close, and nats-py reports only a broken pipe. The certificate's own dates say why.
    url = "tls://127.0.0.1:4222"
    expired = _self_signed(tmp_path / "expired.pem", days_ago_start=30, days_ago_end=1)
    valid = _self_signed(tmp_path / "valid.pem", days_ago_start=1, days_ago_end=-30)
    pipe = [BrokenPipeError(32, "Broken pipe")]
    failure = classify_connect_failure(pipe, NoServersError(), url, expired)
    assert isinstance(failure, TlsFailed) and "expired or not yet valid" in str(failure)
    assert isinstance(classify_connect_failure(pipe, NoServersError(), url, valid), Unavailable)
    assert isinstance(classify_connect_failure(pipe, NoServersError(), url, str(tmp_path / "missing.pem")),
                      Unavailable)
