"""`ledger --log-format json` (or LEDGER_LOG_FORMAT=json): every log record is one JSON object a line on stderr."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from ledger.settings import Settings
from ledgerctl.cli.common import JsonLogFormatter

KEYS = {"time", "level", "logger", "message"}


def ledger_cli(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ledgerctl", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "LEDGER_NATS_URL": settings.nats_url, **env}, check=False)


def log_lines(stderr: str) -> list[str]:
    """stderr without the command's own `Error:` line (click's, not a log record)."""
    return [ln for ln in stderr.splitlines() if ln and not ln.startswith("Error:")]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_a_commands_log_lines_parse_as_json(settings: Settings, uid: str, how: str):
    args, env = (["--log-format", "json"], {}) if how == "flag" else ([], {"LEDGER_LOG_FORMAT": "json"})
    result = ledger_cli(settings, *args, "-vv", "drain", f"{uid}-nobody", **env)
    assert result.returncode == 1 and f"agent {uid}-nobody is not registered" in result.stderr
    lines = log_lines(result.stderr)
    assert lines, result.stderr  # -vv: at least the debug records of the connection
    records = [json.loads(line) for line in lines]
    assert all(isinstance(r, dict) and r.keys() >= KEYS for r in records), records
    assert {r["level"] for r in records} <= {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
    # -v shows the failure's traceback: a record of its own too, not raw text among the JSON lines.
    assert [r["exception"].splitlines()[-1] for r in records if "exception" in r] == [
        f"ledger.errors.NotFound: agent {uid}-nobody is not registered"]


def test_the_default_stays_the_human_format(settings: Settings, uid: str):
    result = ledger_cli(settings, "-vv", "drain", f"{uid}-nobody")
    lines = log_lines(result.stderr)
    assert lines and not any(line.startswith("{") for line in lines), result.stderr


def test_an_exception_is_part_of_its_one_line_record():
    try:
        raise ValueError("broken\nacross lines")
    except ValueError:
        record = logging.LogRecord("ledger.x", logging.ERROR, __file__, 1, "failed: %s", ("it",), sys.exc_info())
    line = JsonLogFormatter().format(record)
    assert "\n" not in line
    doc = json.loads(line)
    assert (doc["level"], doc["logger"], doc["message"]) == ("ERROR", "ledger.x", "failed: it")
    assert doc["exception"].startswith("Traceback") and "ValueError: broken\nacross lines" in doc["exception"]
    assert doc["time"].endswith("+00:00")


def test_an_unknown_format_is_a_usage_error(settings: Settings):
    result = ledger_cli(settings, "--log-format", "yaml", "drain", "x")
    assert result.returncode == 2 and "Traceback" not in result.stderr and "'yaml' is not one of" in result.stderr
