"""`ledger why KIND ID`: the chain of causes behind an entity's state, read from the log (`projections.why`)."""

from __future__ import annotations

from datetime import datetime

import click
import msgspec

from ledger.store import EventStore
from projections.errors import InvalidQuery
from projections.timespec import EXAMPLES
from projections.why import KINDS, render, why

from .common import TimeParam, async_command, connection_options, echo, settings_from


@click.command("why")
@click.argument("kind", type=click.Choice(KINDS))
@click.argument("entity_id", metavar="ID")
@connection_options
@click.option("--at", "at", type=TimeParam(), help=f"Explain the state at TIME: {EXAMPLES}.")
@click.option("--at-seq", type=click.IntRange(min=0), metavar="N",
              help="Explain the state just after LEDGER stream sequence N.")
@click.option("--json", "as_json", is_flag=True, help="Print the chain as JSON (a list of links) instead of sentences.")
@async_command
async def why_command(kind: str, entity_id: str, nats_url: str, at: datetime | None, at_seq: int | None,
                      as_json: bool) -> None:
    """Why an agent, session or route is as it is: the chain of causes, newest first.

    Starts at the event that set its state (now, --at TIME or --at-seq N) and
    follows each event's causation id (or the evidence it names) back through
    the log: a claim to the orphaning or death that freed the session, a death
    to the monitor's evidence and the agent's last heartbeat. Every link names
    its stream and sequence and who wrote it, as recorded.

    \b
    Example:
      ledger why session s1
      ledger why session s1 --at-seq 40 --json
      ledger why agent a2 --at -5m
    """
    if at is not None and at_seq is not None:
        raise InvalidQuery("use --at or --at-seq, not both")
    async with EventStore.connect(settings_from(nats_url), name="ledger-why") as store:
        chain = await why(store, kind, entity_id, seq=at_seq, time=at)
    if as_json:
        echo(msgspec.json.encode(chain).decode())
    else:
        for line in render(chain):
            echo(line)
