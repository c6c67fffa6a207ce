"""Hostile paging of the views (issue 13): `--after` ids that do not exist, sort between rows, are empty, huge,
unicode or SQL-looking; offsets past the end; values no number can be - each a page or a one-line error, on a
real projection file."""

from __future__ import annotations

import asyncio

import pytest
from click.testing import CliRunner, Result
from test_cli_pages import N, build, last_line, rows

from ledgerctl.cli import cli


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("hostile-pages") / "p.sqlite3"
    asyncio.run(build(path, N))
    return str(path)


def ledger(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


IDS = sorted(f"s-{i:03d}" for i in range(N))


@pytest.mark.parametrize("after", ["s-0995", "s-", "", "zzz", "s-103\u00e9", "%", "' OR 1=1 --", "s-1" * 3000,
                                   "\U0001f680", "s-100\x00"])
def test_after_an_id_that_does_not_exist_is_the_rows_that_sort_after_it(db: str, after: str):
    out = ledger("sessions", "--db", db, "--after", after, "--all")
    assert out.exit_code == 0, out.output
    assert rows(out.output, "s-") == [i for i in IDS if i > after]


@pytest.mark.parametrize("args", [["--limit", "-1"], ["--limit", "1e3"], ["--limit", "0x10"], ["--limit", ""],
                                  ["--offset", "9" * 400], ["--offset", "-0"], ["--limit", "NaN"],
                                  ["--limit", "5", "--all"], ["--at-seq", "-1"], ["--at-seq", "one"]])
def test_values_no_page_can_have_are_one_line(db: str, args: list[str]):
    out = ledger("sessions", "--db", db, "--nats-url", "nats://127.0.0.1:1", *args)
    if args == ["--offset", "-0"]:  # -0 is 0: a page
        assert out.exit_code == 0 and rows(out.output, "s-") == IDS[:100], out.output
        return
    assert out.exit_code in (1, 2), out.output  # a usage error, or the command's own one-line refusal
    assert "Traceback" not in out.output and isinstance(out.exception, SystemExit)
    assert len([line for line in out.output.splitlines() if line.startswith("Error")]) == 1
    assert args[0] in out.output or "not both" in out.output


def test_after_with_an_offset_skips_from_the_id(db: str):
    out = ledger("sessions", "--db", db, "--after", "s-100", "--offset", "2", "--limit", "2")
    assert out.exit_code == 0, out.output
    assert rows(out.output, "s-") == ["s-103", "s-104"]
    assert "Traceback" not in last_line(out.output)
