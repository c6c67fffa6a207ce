"""`ledger schema`: the events as a JSON Schema (draft 2020-12), or the subjects and messages as AsyncAPI 3.0."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ledgerctl.schema import asyncapi, json_schema


@click.command("schema")
@click.option("--asyncapi", "as_asyncapi", is_flag=True,
              help="An AsyncAPI 3.0 document (channels, messages, headers) instead of the JSON Schema.")
@click.option("--out", type=click.Path(dir_okay=False, writable=True, path_type=Path),
              help="Write to this file instead of standard output.")
def schema_command(as_asyncapi: bool, out: Path | None) -> None:
    """Print the published event schema: a JSON Schema of every event body, valid for standard validators.

    For writing events from another language, see the README section of that name: the schema says what a body
    looks like; the subject it goes on and the compare-and-set headers are in the AsyncAPI document.
    """
    text = json.dumps(asyncapi() if as_asyncapi else json_schema(), indent=2) + "\n"
    if out is None:
        click.echo(text, nl=False)
        return
    try:
        out.write_text(text)
    except OSError as e:
        raise click.ClickException(f"cannot write {out}: {e.strerror or e}") from None
