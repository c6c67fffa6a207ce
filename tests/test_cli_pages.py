"""Views in pages: a table shows one page and a footer saying which rows of how many; --limit/--offset/--after/--all.

The projection file is written by the projection's own writer (a real SQLite file, one committed batch), so these
need no NATS server: "now" is read from the file alone.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
from datetime import timedelta
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner, Result
from rich.color import ColorSystem
from rich.console import Console

from ledger.events import utcnow
from ledger.lifecycle import AgentState, RouteState, SessionState
from ledger.subjects import HEARTBEAT_STREAM, LEDGER_STREAM
from ledgerctl.cli import cli, tables
from ledgerctl.cli import views as cli_views
from ledgerctl.cli.tables import Grid, Paging, Painter, footer
from ledgerctl.cli.watch import shower
from projections.beats import Beat
from projections.db import ProjectionDB
from projections.query import Query
from projections.views import Page, paged
from projections.writer import Batch

N = 105
"""More than a table's default page (100)."""
POOLS = 10


async def build(path: Path, n: int) -> None:
    now = utcnow()
    agents, sessions, routes, beats = {}, {}, {}, {}
    for i in range(n):
        agent, pool, session, route = f"a-{i:03d}", f"pool-{i % POOLS}", f"s-{i:03d}", f"r-{i:03d}"
        agents[agent] = AgentState(agent_id=agent, incarnation=i + 1, instance_id="i", pool=pool, platform="default",
                                   region="default", labels={}, capacity=2, heartbeat_interval=5.0, ttl=3600.0,
                                   registered_at=now - timedelta(minutes=1), status="alive", reason="registered",
                                   status_since=now - timedelta(minutes=1), status_seq=i + 1)
        beats[agent] = Beat(agent_id=agent, incarnation=i + 1, instance_id="i", seq=i + 1, beat=1, sent_at=now,
                            stored_ns=int(now.timestamp() * 1e9), load=0, capacity=2, sessions=0)
        sessions[session] = SessionState(session_id=session, pool=pool, platform="default", region="default",
                                         labels={}, idle_ttl=None, created_at=now,
                                         status="assigned" if i % 2 else "pending",
                                         owner=agent if i % 2 else None, owner_incarnation=i + 1 if i % 2 else None)
        routes[route] = RouteState(route_id=route, session_id=session, endpoint="chat", deployment="", probe=None,
                                   start_timeout=300.0, stop_timeout=300.0, state="RUNNING" if i % 3 else "STARTING",
                                   state_since=now, state_seq=1, created_at=now)
    db = await ProjectionDB.open(path)
    try:
        stamp = int(now.timestamp() * 1e9)
        checkpoints = [(LEDGER_STREAM, 3 * n, stamp, 0, stamp), (HEARTBEAT_STREAM, n, stamp, 0, stamp)]
        await db.commit(Batch(agents, sessions, routes, {}, beats, [], [], checkpoints, [], []))
    finally:
        await db.close()


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("pages") / "p.sqlite3"
    asyncio.run(build(path, N))
    return str(path)


def ledger(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def rows(output: str, prefix: str) -> list[str]:
    """The first column of each table row whose id starts with `prefix`."""
    return [line.split()[0] for line in output.splitlines() if line.startswith(f" {prefix}")]


def last_line(output: str) -> str:
    return output.rstrip("\n").splitlines()[-1]


def test_a_table_shows_the_first_page_and_says_which_rows_of_how_many(db: str):
    out = ledger("sessions", "--db", db)
    assert out.exit_code == 0, out.output
    assert rows(out.output, "s-") == [f"s-{i:03d}" for i in range(100)]
    assert last_line(out.output) == (f"showing 1-100 of {N:,} sessions "
                                     "(next: --offset 100 or --after s-099; --limit N, --all)")


def test_limit_offset_after_and_all_pick_the_rows(db: str):
    out = ledger("sessions", "--db", db, "--limit", "3", "--offset", "3").output
    assert rows(out, "s-") == ["s-003", "s-004", "s-005"]
    assert last_line(out).startswith(f"showing 4-6 of {N:,} sessions (next: --offset 6 or --after s-005;")
    out = ledger("sessions", "--db", db, "--after", "s-100").output
    assert rows(out, "s-") == ["s-101", "s-102", "s-103", "s-104"]
    assert last_line(out).startswith(f"showing 4 after s-100 of {N:,} sessions")
    out = ledger("sessions", "--db", db, "--all").output
    assert rows(out, "s-") == [f"s-{i:03d}" for i in range(N)] and last_line(out) == f"{N:,} sessions"
    out = ledger("sessions", "--db", db, "--offset", str(N)).output
    assert rows(out, "s-") == [] and last_line(out).startswith(f"showing none of {N:,} sessions")


def test_the_total_counts_every_match_of_the_filters(db: str):
    out = ledger("sessions", "--db", db, "--pool", "pool-1", "--limit", "2").output
    assert rows(out, "s-") == ["s-001", "s-011"] and f"of {len(range(1, N, POOLS))} sessions" in last_line(out)
    out = ledger("sessions", "--db", db, "--state", "assigned", "--limit", "1", "--offset", "1").output
    assert rows(out, "s-") == ["s-003"] and f"showing 2-2 of {N // 2} sessions" in last_line(out)
    out = ledger("routes", "--db", db, "--status", "PROVISIONING", "--limit", "2").output  # STARTING is one
    assert rows(out, "r-") == ["r-000", "r-003"] and f"of {len(range(0, N, 3))} routes" in last_line(out)
    out = ledger("agents", "--db", db, "--health", "alive", "--after", "a-100").output  # judged, not in SQL
    assert rows(out, "a-") == ["a-101", "a-102", "a-103", "a-104"] and f"of {N} agents" in last_line(out)
    out = ledger("agents", "--db", db, "--pool", "pool-0", "--limit", "1").output
    assert rows(out, "a-") == ["a-000"] and f"of {len(range(0, N, POOLS))} agents" in last_line(out)


def test_json_keeps_its_shape_gives_everything_unless_limited_and_adds_the_total(db: str):
    whole = json.loads(ledger("sessions", "--db", db, "--json").output)
    assert list(whole) == ["position", "items", "total"]
    assert [s["session_id"] for s in whole["items"]] == [f"s-{i:03d}" for i in range(N)] and whole["total"] == N
    assert json.loads(ledger("sessions", "--db", db, "--json", "--all").output)["items"] == whole["items"]
    page = json.loads(ledger("routes", "--db", db, "--json", "--limit", "2", "--offset", "1").output)
    assert ([r["route_id"] for r in page["items"]], page["total"]) == (["r-001", "r-002"], N)


async def test_streamed_json_is_byte_for_byte_the_encoded_page(db: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(cli_views, "JSON_CHUNK", 7)  # several pieces, the last one short
    async with Query.open(db) as q:
        for page in (await q.sessions(), await q.agents(limit=7), await q.routes(offset=N), await q.pools()):
            assert "".join(cli_views.json_chunks(page)) == msgspec.json.encode(page).decode()


@pytest.mark.parametrize("limit, offset, after", [
    (None, 0, None), (1, 0, None), (10, 95, None), (None, 50, None), (5, 2, "s-050"), (None, 0, "s-104"),
    (3, 0, ""), (None, 200, None)])
async def test_the_sql_page_is_the_in_memory_page(db: str, limit: int | None, offset: int, after: str | None):
    """`paged` (the past, in memory) and the SQL twin (now) give the same rows and the same total."""
    opened = await ProjectionDB.open(db, readonly=True)
    try:
        every = await opened.session_states(state="assigned")
        got = await opened.session_states(state="assigned", limit=limit, offset=offset, after=after)
        key = lambda s: s.session_id  # noqa: E731
        assert [s.session_id for s in got] == [s.session_id for s in paged(every, key, limit=limit, offset=offset,
                                                                           after=after)]
        assert await opened.count_sessions(state="assigned") == len(every) == N // 2
    finally:
        await opened.close()


@pytest.mark.parametrize("args, message, code", [
    (["sessions", "--limit", "3", "--all"], "use --limit N or --all, not both", 1),
    (["agents", "--limit", "0"], "--limit", 2),
    (["routes", "--offset", "-1"], "--offset", 2),
    (["anomalies", "--all", "--limit", "5"], "use --limit N or --all, not both", 1),
])
def test_bad_page_options_are_one_line_errors(db: str, args: list[str], message: str, code: int):
    result = ledger(*args, "--db", db)
    assert result.exit_code == code
    lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]  # a usage error has usage
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output, result.output


def test_coloured_cells_line_up_as_plain_ones():
    """Padding is measured on the text, not on its colour codes; wide characters count double."""
    grid = Grid(("ID", "HEALTH", "NOTE"), "things")
    grid.add("a-1", (("alive", "green"),), "ok")
    grid.add("agent-two", (("dead", "red"), (" (stale)", "yellow")), "日本")
    lines = list(grid.lines(Painter(None)))
    painted = list(grid.lines(Painter(ColorSystem.STANDARD)))
    assert lines == [" ID         HEALTH        NOTE", " a-1        alive         ok", " agent-two  dead (stale)  日本"]
    assert painted != lines and [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in painted] == lines
    page: Page[object] = Page(position=None, items=[], total=5)  # type: ignore[arg-type]
    more = "(next: --offset 2 or --after agent-two; --limit N, --all)"
    assert footer(page, grid, Paging()) == f"showing 1-2 of 5 things {more}"


async def test_watch_shows_each_change_as_the_same_page_with_its_footer(db: str, capsys: pytest.CaptureFixture[str]):
    async with Query.open(db) as q:
        page = await q.sessions(limit=2)
    with shower(False, tables.sessions, Paging()) as show:  # not a terminal: one rendering per change
        show(page)
        show(page)
    out = capsys.readouterr().out
    assert rows(out, "s-") == ["s-000", "s-001"] * 2 and out.count(f"showing 1-2 of {N:,} sessions") == 2
    redrawn = Console(file=io.StringIO(), force_terminal=True, width=200)  # what rich.live redraws on a terminal
    redrawn.print(tables.view(page, tables.sessions(page)))
    assert f"showing 1-2 of {N:,} sessions" in redrawn.file.getvalue()  # type: ignore[attr-defined]
