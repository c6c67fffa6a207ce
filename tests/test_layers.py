"""The packages' layering: `ledger` <- `projections` <- `consumers` <- `ledgerctl`, and the SDK without the CLI.

Every import counts, including those inside functions and relative ones, so a cycle cannot hide "where the
packages meet".
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["ledger", "projections", "consumers", "ledgerctl"]
CLI_ONLY = ("click", "rich", "cryptography")
"""The `cli` extra: only the composition package may import them."""


def modules(package: str, root: Path = ROOT) -> list[Path]:
    return sorted((root / package).rglob("*.py"))


def imported(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file."""
    dotted = ".".join(path.relative_to(root).with_suffix("").parts)
    here = dotted.split(".")
    if path.name != "__init__.py":
        here = here[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                if node.module:
                    found.append((node.lineno, ".".join([*base, node.module])))
                else:  # from .. import name: each name is a module (or a name) of the package
                    found += [(node.lineno, ".".join([*base, alias.name])) for alias in node.names]
            elif node.module:
                found.append((node.lineno, node.module))
    return found


def violations(root: Path = ROOT) -> list[str]:
    bad = []
    for rank, package in enumerate(LAYERS):
        for path in modules(package, root):
            for line, name in imported(path, root):
                top = name.split(".")[0]
                where = f"{path.relative_to(root)}:{line} imports {name}"
                if top in LAYERS and LAYERS.index(top) > rank:
                    bad.append(where + f" (above {package})")
                if top in CLI_ONLY and package != "ledgerctl":
                    bad.append(where + " (a dependency of the cli extra)")
    return bad


def test_no_module_imports_a_package_above_its_own() -> None:
    assert violations() == []


def test_the_check_sees_imports_inside_functions_and_relative_ones(tmp_path: Path) -> None:
    (tmp_path / "ledger" / "sub").mkdir(parents=True)
    (tmp_path / "ledger" / "sub" / "probe.py").write_text(
        "def f():\n    from consumers import follow\n    from ... import ledgerctl\n    import click\n"
        "from .. import events\nfrom . import sibling\n")
    found = violations(tmp_path)
    assert [v.split(" imports ")[1] for v in found] == [
        "consumers (above ledger)", "ledgerctl (above ledger)", "click (a dependency of the cli extra)"]


BLOCK_CLI = """
import importlib, importlib.abc, pkgutil, sys
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name.split(".")[0])
        return None
sys.meta_path.insert(0, Block())
for package in ("ledger", "projections", "consumers"):
    root = importlib.import_module(package)
    for info in pkgutil.walk_packages(root.__path__, package + "."):
        importlib.import_module(info.name)
print("imported")
from ledgerctl.entry import main
main()
"""


def test_the_sdk_projections_and_consumers_import_without_the_cli_extra() -> None:
    result = subprocess.run([sys.executable, "-c", BLOCK_CLI.format(blocked=set(CLI_ONLY))], capture_output=True,
                            text=True, timeout=60, cwd=ROOT, check=False)
    assert result.stdout.strip() == "imported", result.stderr
    # ... and the `ledger` script says what to install, in one line, instead of a traceback.
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "ledger: the command line needs 'click': pip install 'session-ledger[cli]'"]


@pytest.mark.parametrize("package", LAYERS)
def test_every_package_has_modules(package: str) -> None:
    assert modules(package), f"{package} is empty: the layer check would pass vacuously"


def test_the_service_image_holds_every_package_and_the_command_line() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for package in LAYERS:
        assert f"COPY {package} {package}" in dockerfile
    assert "pip install --no-cache-dir '.[cli]'" in dockerfile
