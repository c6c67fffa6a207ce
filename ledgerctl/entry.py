"""The `ledger` script: the command line, or one line saying how to install it when its extra is missing."""

from __future__ import annotations

import sys

CLI_DEPENDENCIES = ("click", "rich", "cryptography")


def main() -> None:
    try:
        from ledgerctl.cli import main as cli_main
    except ModuleNotFoundError as e:  # the SDK was installed without the `cli` extra
        if e.name not in CLI_DEPENDENCIES:
            raise
        sys.exit(f"ledger: the command line needs {e.name!r}: pip install 'session-ledger[cli]'")
    cli_main()
