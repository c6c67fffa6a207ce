"""The `ledger session | route | unreachable | replay` commands against a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ledger.settings import Settings


def ledger_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LEDGER_NATS_URL": settings.nats_url}
    return subprocess.run([sys.executable, "-m", "ledgerctl", *args], capture_output=True, text=True, timeout=60,
                          env=env, check=False)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.startswith("Error")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_session_and_route_lifecycle_from_the_cli(settings: Settings, uid: str):
    sid, rid = f"{uid}-s", f"{uid}-r"
    assert f"created session {sid}" in ok(ledger_cli(settings, "session", "create", "--pool", "gpu",
                                                     "--session-id", sid, "--label", "team=ml"))
    one_line_error(ledger_cli(settings, "session", "create", "--pool", "gpu", "--session-id", sid), "already exists")
    shown = json.loads(ok(ledger_cli(settings, "session", "show", sid, "--json")))
    assert shown["state"]["status"] == "pending" and shown["state"]["labels"] == {"team": "ml"}

    ok(ledger_cli(settings, "route", "create", rid, "--session", sid, "--endpoint", "chat"))
    one_line_error(ledger_cli(settings, "route", "transition", rid, "RUNNING"),
                   "PENDING -> RUNNING", "allowed from PENDING: STARTING, TERMINATING")
    assert "PENDING -> STARTING" in ok(ledger_cli(settings, "route", "transition", rid, "starting"))
    ok(ledger_cli(settings, "route", "health", rid, "--healthy", "--detail", "200 OK"))
    route = json.loads(ok(ledger_cli(settings, "route", "show", rid, "--json")))["state"]
    assert (route["state"], route["healthy"]) == ("STARTING", True)

    assert f"terminated session {sid}" in ok(ledger_cli(settings, "session", "terminate", sid, "--reason", "done"))
    one_line_error(ledger_cli(settings, "session", "terminate", sid), "already terminated")
    one_line_error(ledger_cli(settings, "session", "show", f"{uid}-nope"), "does not exist")

    lines = [json.loads(ln) for ln in ok(ledger_cli(settings, "replay", "--session", sid, "--json")).splitlines()]
    assert [ln["event"]["type"] for ln in lines] == ["session.created", "session.terminated"]
    human = ok(ledger_cli(settings, "replay", "--route", rid))
    assert "route.transitioned" in human and "to_state=STARTING" in human


def test_unreachable_report_from_the_cli(settings: Settings, uid: str):
    out = ok(ledger_cli(settings, "unreachable", f"{uid}-a", "--error", "timeout", "--as", "proxy-1"))
    assert f"reported {uid}-a unreachable" in out
    replayed = json.loads(ok(ledger_cli(settings, "replay", "--agent", f"{uid}-a", "--json")).splitlines()[0])
    assert replayed["subject"] == f"ledger.agent.{uid}-a.unreachable_reported.proxy-1"


@pytest.mark.parametrize("args, needles", [
    (["session", "create", "--pool", "bad pool"], ["invalid pool"]),
    (["session", "create", "--pool", "p", "--label", "novalue"], ["KEY=VALUE"]),
    (["route", "transition", "r", "FLYING"], ["FLYING"]),
    (["replay", "--type", "session.teleported"], ["unknown event type"]),
    (["replay", "--since", "yesterday-ish"], ["is not a time"]),
    (["agent", "--agent-id", "a", "--pool", "p", "--heartbeat", "5", "--ttl", "1"], ["--ttl"]),
])
def test_user_mistakes_are_one_line_errors(settings: Settings, args: list[str], needles: list[str]):
    result = ledger_cli(settings, *args)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr


@pytest.mark.parametrize("command", [["agent"], ["session", "create"], ["session", "terminate"], ["route", "create"],
                                     ["route", "transition"], ["replay"], ["server"], ["init"], ["unreachable"]])
def test_every_command_explains_itself(settings: Settings, command: list[str]):
    out = ok(ledger_cli(settings, *command, "--help"))
    assert "Usage: ledger" in out and "--help" in out
