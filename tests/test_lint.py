"""CI checks lint and types on everything the project ships, with rules it states: what `.ci/run` and pyproject say."""

from __future__ import annotations

import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def shipped_packages() -> set[str]:
    """The top-level packages the wheel ships: directories with an __init__.py that setuptools' include matches."""
    include = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    return {p.parent.name for p in ROOT.glob("*/__init__.py") if any(fnmatch(p.parent.name, i) for i in include)}


def ci_lines() -> list[str]:
    return [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]


def test_ci_runs_ruff_on_every_package_the_tests_and_the_benchmarks():
    ruff = [line for line in ci_lines() if line.startswith("ruff check")]
    assert len(ruff) == 1, ruff
    assert set(ruff[0].split()[2:]) == shipped_packages() | {"tests", "bench"}


def test_ci_runs_mypy_on_every_package():
    assert "mypy" in ci_lines()  # no arguments: what it checks is [tool.mypy] packages
    mypy = pyproject()["tool"]["mypy"]
    assert set(mypy["packages"]) == shipped_packages()
    assert mypy["strict"] is True


def test_ci_installs_the_pinned_linters_before_it_runs_them():
    lint = pyproject()["project"]["optional-dependencies"]["lint"]
    assert {re.split("==", r)[0] for r in lint if "==" in r} >= {"ruff", "mypy"}
    lines = ci_lines()
    install = lines.index("python -m pip install -q -e '.[lint]'")
    assert install < min(i for i, line in enumerate(lines) if line.startswith("ruff check")) < lines.index("mypy")


def test_ruff_rules_are_chosen_and_every_ignored_rule_says_why():
    lint = pyproject()["tool"]["ruff"]["lint"]
    assert lint["select"] and "ALL" not in lint["select"]
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^\[tool\.ruff\.lint\]\n(.*?)^\[", text, re.S | re.M)
    assert block
    ignores = re.search(r"^ignore = \[\n(.*?)^\]", block.group(1), re.S | re.M)
    assert ignores
    for line in ignores.group(1).splitlines():
        code, _, reason = line.partition("#")
        assert code.strip().strip('",') in lint["ignore"] and len(reason.strip()) > 20, line
