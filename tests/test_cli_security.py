"""The command line's connection options: on every command that connects, routed into Settings, never printed."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from ledgerctl.cli import cli
from ledgerctl.cli.common import connection_options, embedded_settings, settings_from
from ledgerctl.cli.up import hints
from ledgerctl.stack import UpSettings

SECURITY_FLAGS = {"--creds": "LEDGER_CREDS_FILE", "--nkey-seed": "LEDGER_NKEY_SEED_FILE", "--user": "LEDGER_USER",
                  "--password": "LEDGER_PASSWORD", "--token": "LEDGER_TOKEN", "--tls-ca": "LEDGER_TLS_CA_FILE",
                  "--tls-cert": "LEDGER_TLS_CERT_FILE", "--tls-key": "LEDGER_TLS_KEY_FILE"}


def connecting_commands(group: click.Group = cli, prefix: str = "") -> list[tuple[str, click.Command]]:
    found = []
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found += connecting_commands(command, f"{prefix}{name} ")
        elif any("--nats-url" in p.opts for p in command.params):
            found.append((prefix + name, command))
    return found


def test_there_are_connecting_commands_to_check():
    names = {name for name, _ in connecting_commands()}
    assert {"init", "up", "agent", "session create", "doctor", "replay", "consumers"} <= names


@pytest.mark.parametrize("name, command", connecting_commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_connecting_command_takes_credentials_and_tls_options(name: str, command: click.Command):
    options = {opt: p for p in command.params for opt in p.opts}
    for flag, env in SECURITY_FLAGS.items():
        assert flag in options, f"`ledger {name}` has no {flag}"
        assert options[flag].envvar == env and options[flag].help
    assert "environment variable" in (options["--password"].help or "")


def test_the_options_reach_the_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    seen = {}

    @click.command()
    @connection_options
    def probe(nats_url: str) -> None:
        seen["settings"] = settings_from(nats_url)

    monkeypatch.setenv("LEDGER_PASSWORD", "from-env")
    result = CliRunner().invoke(probe, ["--nats-url", "tls://h:4222", "--user", "u", "--tls-ca", "ca.pem",
                                        "--tls-cert", "c.pem", "--tls-key", "k.pem"])
    assert result.exit_code == 0, result.output
    s = seen["settings"]
    assert (s.nats_url, s.user, s.password, s.tls_ca_file, s.tls_cert_file, s.tls_key_file) == (
        "tls://h:4222", "u", "from-env", "ca.pem", "c.pem", "k.pem")


def test_contradictory_options_are_one_line(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("LEDGER_TOKEN", raising=False)
    result = CliRunner().invoke(cli, ["init", "--user", "u", "--password", "p", "--token", "t"])
    assert result.exit_code == 1 and result.output.strip().splitlines() == [
        "Error: invalid setting: give one kind of NATS credentials, not a user and password and a token"]


def test_an_embedded_server_is_reached_without_the_credentials_meant_for_another(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LEDGER_TLS_CA_FILE", "/etc/ledger/ca.pem")
    monkeypatch.setenv("LEDGER_TOKEN", "t")
    s = embedded_settings("nats://127.0.0.1:4222", replicas=1)
    assert (s.tls_ca_file, s.token, s.replicas) == (None, None, 1)


def test_up_hints_never_show_a_password(tmp_path: Path):
    lines = hints(UpSettings(nats_url=None, data_dir=tmp_path), "nats://ops:hunter2@10.0.0.5:4222,nats://tok@h:1")
    assert "hunter2" not in "\n".join(lines) and "tok@" not in "\n".join(lines)
    assert "LEDGER_NATS_URL=nats://ops:***@10.0.0.5:4222,nats://***@h:1" in lines[0]
