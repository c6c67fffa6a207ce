"""The suite does not depend on its caller's environment: LEDGER_* settings it did not set never reach a test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ledger.settings import Settings
from projections.settings import ProjectionSettings

HERE = Path(__file__).parent
CHILD = ("import os; "
         "print(sorted(k for k in os.environ if k.startswith('LEDGER_') and not k.startswith('LEDGER_TEST_')))")


def test_no_ledger_setting_is_left_but_the_suites_own():
    assert [k for k in os.environ if k.startswith("LEDGER_") and not k.startswith("LEDGER_TEST_")] == []
    assert Settings.from_env() == Settings()
    assert ProjectionSettings.from_env() == ProjectionSettings()
    child = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=True)
    assert child.stdout.strip() == "[]"  # nor a command a test runs


def test_settings_the_caller_exported_are_cleared_for_every_test(tmp_path: Path):
    # As the README's `ledger up` hint suggests: LEDGER_DB and LEDGER_NATS_URL exported in the shell.
    env = {**os.environ, "LEDGER_DB": str(tmp_path / "x.sqlite3"), "LEDGER_NATS_URL": "nats://127.0.0.1:1",
           "LEDGER_REPLICAS": "3"}
    inner = f"{HERE / 'test_environment.py'}::test_no_ledger_setting_is_left_but_the_suites_own"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", inner], env=env,
                            capture_output=True, text=True, timeout=120, cwd=HERE.parent, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
