"""`ledger query-service`: the NATS query service on its own (`ledger up` runs one beside the projector)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import click

from ledger.store import EventStore
from ledgerctl.query_protocol import SERVICE_NAME, VIEWS, query_subject
from ledgerctl.query_service import QueryService
from projections.health import HealthPolicy
from projections.query import Query

from .common import async_command, echo, nats_url_option, settings_from, stop_signals
from .liveness import policy_options
from .views import db_option

WAIT_FOR_FILE = 1.0
"""Seconds between looks for a projection file that is not there yet (until then: 503 not ready)."""


@click.command("query-service")
@db_option
@nats_url_option
@policy_options
@async_command
async def query_service_command(db: Path, nats_url: str, policy: HealthPolicy) -> None:
    """Answer the views over NATS (`ledger-query.<view>`; `$SRV.PING.ledger-query` finds it) until Ctrl-C.

    Any number may run: they share the requests (one queue group). It answers "now" from the projection file
    --db (written by `ledger up` or `ledger project`) and the past and histories from JetStream.
    """
    stop = stop_signals()
    async with EventStore.connect(settings_from(nats_url), name="ledger-query-service") as store, \
            contextlib.AsyncExitStack() as files, \
            QueryService.start(store, None, not_ready=f"no projection file at {db} yet") as service:
        echo(f"query service {SERVICE_NAME} {service.id} on NATS at {nats_url}: "
             f"{', '.join(query_subject(v) for v in VIEWS)}")
        while service.query is None and not stop.is_set():
            if db.exists():
                service.query = await files.enter_async_context(Query.open(db, store, policy=policy))
                echo(f"answering from {db}")
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), WAIT_FOR_FILE)
        await stop.wait()
