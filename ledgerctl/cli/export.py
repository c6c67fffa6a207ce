"""`ledger export` and `ledger import`: an incident's log, portable to another machine."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import click

from ledger.settings import redact_url
from ledger.store import EventStore
from ledger.transfer import export_log, load_file, read_file
from ledgerctl.server import EmbeddedServer, ServerConfig, free_port
from projections.timespec import EXAMPLES

from .common import TimeParam, async_command, connection_options, embedded_settings, settings_from, to_json

_into_server: Callable[[Callable[..., Any]], Callable[..., Any]] = connection_options(
    url_default=None, url_help="Load into this (fresh) NATS server instead of an embedded one (given on the command "
                               "line only: LEDGER_NATS_URL names the live ledger, never the place for a copy).")


def _say(line: str) -> None:
    click.echo(line, err=True)


@click.command("export")
@click.option("--since", type=TimeParam(), default=None, help=f"Only messages stored from this time: {EXAMPLES}.")
@click.option("--until", type=TimeParam(), default=None, help=f"Only messages stored up to this time: {EXAMPLES}.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write to this file [default: standard output].")
@click.option("--json", "as_json", is_flag=True, help="The summary on stderr as one JSON object.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
@connection_options
@async_command
async def export_command(since: datetime | None, until: datetime | None, output: Path | None, as_json: bool,
                         quiet: bool, nats_url: str) -> None:
    """Write the ledger's stored messages to an incident file, for another machine to replay.

    Every stream (LEDGER, LEDGER_HB, and LEDGER_DLQ when it exists) with
    each message's subject, headers, bytes, stream sequence and stored time.
    `ledger import` (or `ledger up --from`) loads it into a server of its
    own, at the very same sequences and times: replay, the views with
    --as-of / --at-seq, `ledger check` give there what they gave here.
    --since / --until keep a window (by stored time, per stream).

    \b
    ledger export > incident.ledger
    ledger export --since -2h -o incident.ledger
    """
    settings = settings_from(nats_url)
    target: contextlib.AbstractContextManager[IO[bytes]] = (
        output.open("wb") if output is not None else contextlib.nullcontext(click.get_binary_stream("stdout")))
    with target as out:
        async with EventStore.connect(settings, name="ledger-export") as store:
            ranges: list[dict[str, object]] = []
            end = await export_log(store, out.write, since=since, until=until, source=redact_url(settings.nats_url),
                                   say=None if quiet else _say, on_header=lambda h: ranges.extend(
                                       {"stream": r.name, "first_seq": r.first_seq, "last_seq": r.last_seq}
                                       for r in h.streams))
    for r in ranges:
        r["messages"] = end.messages.get(str(r["stream"]), 0)
    if as_json:
        _say(to_json({"output": str(output) if output else "-", "streams": ranges}))
    else:
        parts = ", ".join(f"{r['stream']} #{r['first_seq']}..#{r['last_seq']} ({r['messages']:,} messages)"
                          for r in ranges)
        _say(f"exported {parts} to {output or 'standard output'}")


@click.command("import")
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the embedded server keeps the imported copy (a fresh directory). [default: FILE-data]")
@_into_server
@click.option("--json", "as_json", is_flag=True, help="The summary as one JSON object.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
@async_command
async def import_command(file: Path, data_dir: Path | None, nats_url: str | None, as_json: bool,
                         quiet: bool) -> None:
    """Load an incident file (from `ledger export`) into a server of its own.

    The streams get the original's sequences, stored times and gaps; they
    are sealed (the server refuses any write) and marked as imported, so
    views, time travel, replay and `ledger check` answer as on the original.
    Then run `ledger up --data-dir DIR` (read-only on an imported log), or
    simply `ledger up --from FILE`, which does both.

    \b
    ledger import incident.ledger --data-dir incident-data
    ledger up --data-dir incident-data --port 4333
    """
    read_file(file)  # a file that is not one is told before any server starts
    say = None if quiet else _say
    if click.get_current_context().get_parameter_source("nats_url") != click.core.ParameterSource.COMMANDLINE:
        nats_url = None
    if nats_url is not None:
        async with EventStore.connect(settings_from(nats_url), name="ledger-import", check=False) as store:
            loaded = await load_file(store, file, say=say)
        where = redact_url(nats_url)
    else:
        data_dir = data_dir or default_data_dir(file)
        async with EmbeddedServer(ServerConfig(data_dir=data_dir, port=free_port(), sync_always=False)) as server:
            async with EventStore.connect(embedded_settings(server.url), name="ledger-import", check=False) as store:
                loaded = await load_file(store, file, say=say)
        where = str(data_dir)
    if as_json:
        click.echo(to_json({"file": str(file), "into": where, "messages": loaded, "reused": loaded is None}))
        return
    if loaded is None:
        click.echo(f"{where} already holds this export: nothing to do")
    else:
        click.echo(f"imported {', '.join(f'{s} {n:,}' for s, n in loaded.items())} messages into {where}")
    if nats_url is None:
        click.echo(f"next: ledger up --data-dir {where} --port 4333   (read-only: an imported log is sealed)")


def default_data_dir(file: Path) -> Path:
    """Where an incident file is imported unless told: beside it, `incident.ledger` -> `incident.ledger-data`."""
    return file.with_name(file.name + "-data")
