"""Tables print text any client wrote (reasons, details, causation ids): escaped, so it cannot forge a row or
reach the terminal as an escape sequence."""

from __future__ import annotations

import asyncio

from click.testing import CliRunner
from conftest import RunningNats

from ledger import events as ev
from ledger.settings import Settings
from ledger.store import EventStore
from ledgerctl.cli import cli
from ledgerctl.cli.tables import Grid, Painter

HOSTILE = "done\n9999  2000-01-01 00:00:00.000  session.claimed  root\x1b[2J\u202eevil"


def test_a_grid_escapes_every_cell_plain_or_styled():
    grid = Grid(("A", "B"), "rows")
    grid.add("x\ny", (("\x1b[31mred", "red"),))
    lines = list(grid.lines(Painter(None)))
    assert len(lines) == 2
    assert "\x1b" not in "".join(lines) and "\\n" in lines[1] and "\\x1b[31mred" in lines[1]


async def test_history_table_of_a_forged_reason_is_one_row_without_escapes(nats_server: RunningNats):
    me = ev.Producer(id="mallory", instance="i\nforged")
    async with EventStore.connect(Settings(nats_url=nats_server.url), ensure=True) as store:
        await store.append(ev.SessionCreated(producer=me, session_id="s-text", pool="gpu", causation_id=HOSTILE))
        await store.append(ev.SessionTerminated(producer=me, session_id="s-text", reason=HOSTILE))
    result = await asyncio.to_thread(CliRunner().invoke, cli, ["history", "session", "s-text", "--nats-url",
                                                               nats_server.url], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\u202e" not in result.output
    rows = [line for line in result.output.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert len(rows) == 2, result.output  # the created and the terminated: no forged row
