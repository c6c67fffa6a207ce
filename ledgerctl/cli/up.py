"""`ledger up`: everything on one machine - nats-server (unless --nats-url), streams, projector, consumers, the
query service and the HTTP API with the dashboard."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import click

from consumers.liveness_rules import LivenessSettings
from ledger import cancellation
from ledger.settings import DEFAULT_NATS_URL, redact_url
from ledger.transfer import read_file
from ledgerctl.server import DEFAULT_DATA_DIR, free_port
from ledgerctl.stack import DEFAULT_HTTP_PORT, Stack, UpSettings, running_stack
from projections.gc_tuning import tune_gc
from projections.health import DEFAULT_POLICY, HealthPolicy
from projections.settings import DB_ENV, ProjectionSettings

from .common import async_command, connection_options, echo, settings_from, stop_signals
from .export import default_data_dir
from .liveness import policy_options

log = logging.getLogger(__name__)

PROGRESS_EVERY = 2.0
"""Seconds between the "catching up: ..." lines on stderr until `ledger up` is ready."""
SHUTDOWN_PATIENCE = 3.5
"""Seconds an ordered shutdown may take before what is left is cancelled: Ctrl-C is honoured within 5 s."""
FORCED_EXIT_AFTER = 4.5
"""Seconds after a stop at which the process exits whatever is still running (the last resort of the 5 s)."""


def up_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed([
        connection_options(url_default=None, url_help="Use this NATS server (cluster: comma-separated) instead of "
                                                      "starting an embedded one."),
        click.option("--data-dir", default=DEFAULT_DATA_DIR, show_default=True, envvar="LEDGER_DATA_DIR",
                     show_envvar=True, type=click.Path(file_okay=False, path_type=Path),
                     help="Where the embedded server keeps its streams, and the projection file."),
        click.option("--port", default=4222, show_default=True, type=click.IntRange(1, 65535),
                     help="The embedded server's client port."),
        click.option("--db", envvar=DB_ENV, default=None, show_envvar=True,
                     type=click.Path(dir_okay=False, path_type=Path),
                     help="The projection's SQLite file. [default: DATA_DIR/projection.sqlite3]"),
        click.option("--replicas", type=click.Choice(["1", "3", "5"]), default=None, envvar="LEDGER_REPLICAS",
                     show_envvar=True, help="Stream replicas (3 on a cluster). "
                                            "[default: 1 for a new stream; an existing one keeps its own]"),
        click.option("--http-host", default="127.0.0.1", show_default=True, envvar="LEDGER_HTTP_HOST",
                     show_envvar=True, help="Where the HTTP API and dashboard listen (0.0.0.0: every interface)."),
        click.option("--http-port", type=click.IntRange(0, 65535), default=None, envvar="LEDGER_HTTP_PORT",
                     show_envvar=True, help=f"The HTTP API and dashboard's port; 0: any free one. [default: "
                                            f"{DEFAULT_HTTP_PORT}, or a free port when that one is taken]"),
        click.option("--http/--no-http", "http", default=True, show_default=True,
                     help="Serve the HTTP API, the dashboard and /metrics."),
        click.option("--query-service/--no-query-service", default=True, show_default=True,
                     help="Serve the views on NATS as the micro service ledger-query (for `ledger sessions` and "
                          "friends on any machine)."),
    ]):
        f = option(f)
    return f


def env_line(s: UpSettings, url: str) -> str | None:
    """The `export ...` other commands need to reach this stack, when the defaults would not."""
    env = []
    if url != DEFAULT_NATS_URL:
        env.append(f"LEDGER_NATS_URL={redact_url(url)}")  # never a password on the screen
    if s.db_path.resolve() != Path(ProjectionSettings().db).resolve():
        env.append(f"{DB_ENV}={s.db_path.resolve()}")
    policy = s.liveness.policy  # so agents and views judge liveness as this stack's consumers do
    if policy.suspect_after_missed != DEFAULT_POLICY.suspect_after_missed:
        env.append(f"LEDGER_SUSPECT_AFTER_MISSED={policy.suspect_after_missed}")
    if policy.dead_after is not None:
        env.append(f"LEDGER_DEAD_AFTER={policy.dead_after:g}")
    return f"  export {' '.join(env)}" if env else None


def web_settings(http: bool, http_host: str, http_port: int | None, query_service: bool) -> dict[str, Any]:
    """UpSettings fields from the HTTP and query-service options: the default port gives way when it is taken."""
    return {"http_host": http_host, "http_port": (DEFAULT_HTTP_PORT if http_port is None else http_port) if http
            else None, "http_port_fallback": http_port is None, "query_service": query_service}


def hints(s: UpSettings, url: str, http_url: str | None = None) -> list[str]:
    """What to run next, in another terminal, to use this stack."""
    export = env_line(s, url)
    lines = [export] if export else []
    if http_url:
        lines.append(f"  {'open ' + http_url + '/':<40}# the dashboard, live (as of any past moment too)")
    writes = [] if s.from_file is not None else [  # an imported log is sealed: nothing can be added to it
        ("ledger agent --agent-id a1 --pool gpu", "a reference agent"),
        ("ledger session create --pool gpu", "a session for it to claim")]
    for command, what in [*writes, ("ledger agents | sessions | pools", "the projection, now (or --as-of TIME)"),
                          ("ledger replay --follow", "the log itself")]:
        lines.append(f"  {command:<40}# {what}")
    return lines


@click.command("up")
@up_options
@click.option("--from", "from_file", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Load this incident file (`ledger export`) into a fresh embedded server first, and run read-only: "
                   "the projector, views and dashboard, but no monitor, reclaimer or watchdog, whose verdicts on an "
                   "incident that is over would be new history the original never had (the imported streams are "
                   "sealed: the server refuses any write). [data: FILE-data unless --data-dir; port: a free one "
                   "unless --port]")
@click.option("--grace", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Seconds after a reconnect or leader change during which the monitor declares nobody dead.")
@policy_options
@async_command
async def up_command(nats_url: str | None, data_dir: Path, port: int, db: Path | None, replicas: str | None,
                     http_host: str, http_port: int | None, http: bool, query_service: bool, from_file: Path | None,
                     grace: float, policy: HealthPolicy) -> None:
    """Run everything on one machine until Ctrl-C.

    Without --nats-url (or LEDGER_NATS_URL) it starts an embedded JetStream
    server on loopback with its data in --data-dir; then it creates or
    checks the streams, and runs the projector (into the SQLite file the
    `ledger agents | sessions | ...` views read) and the consumers (liveness
    monitor, orphan reclaimer, route watchdog), the query service (the views
    on NATS, for any machine) and the HTTP API with the dashboard and
    /metrics. Ctrl-C or SIGTERM stops them cleanly, in reverse order.

    With --from FILE it debugs an incident on any machine: a fresh embedded
    server loaded from the file (same sequences, same stored times), read-only.

    \b
    ledger up
    ledger up --from incident.ledger      # then: ledger sessions --as-of ..., ledger check, ledger replay
    """
    sync_always = True
    if from_file is not None:
        read_file(from_file)  # a file that is not one is told before any server starts
        ctx = click.get_current_context()
        given = {name: ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
                 for name in ("nats_url", "data_dir", "port")}
        if given["nats_url"]:
            raise click.UsageError("--from loads the file into an embedded server of its own: drop --nats-url")
        nats_url = None  # LEDGER_NATS_URL names the live ledger, never the place for a copy
        data_dir = data_dir if given["data_dir"] else default_data_dir(from_file)
        port = port if given["port"] else free_port()
        sync_always = False  # a copy: the file is the durable original
    s = UpSettings(nats_url=nats_url, data_dir=data_dir, port=port, db=db, sync_always=sync_always,
                   liveness=LivenessSettings(policy=policy, grace=grace), replicas=int(replicas) if replicas else None,
                   connection=settings_from(nats_url), from_file=from_file,
                   **web_settings(http, http_host, http_port, query_service))
    tune_gc()
    stop = stop_signals()
    started = asyncio.Event()
    last_resort = asyncio.ensure_future(stop.wait())
    last_resort.add_done_callback(lambda f: None if f.cancelled() else exit_after(FORCED_EXIT_AFTER))
    try:
        await until_stopped(serve(s, stop, lambda stack: started.set()), stop, started)
    finally:
        last_resort.cancel()


async def serve(s: UpSettings, stop: asyncio.Event, started: Callable[[Stack], None] = lambda stack: None) -> None:
    """Start the stack, say "ready" once it has caught up (and how far it is until then), run until `stop`.

    `started(stack)` is called once every piece runs, just before it watches `stop` itself (from then on a stop
    is an ordered shutdown)."""
    async with running_stack(s, echo) as stack:
        started(stack)
        projector = stack.projector

        def report_caught_up(f: asyncio.Future[Any]) -> None:
            if not f.cancelled():
                echo("projector caught up at " + ", ".join(f"{k} #{v:,}" for k, v in projector.committed.items()))

        caught_up = asyncio.ensure_future(projector.caught_up.wait())
        caught_up.add_done_callback(report_caught_up)
        echo("next, in another terminal:")
        for line in hints(s, stack.url, stack.http_url):
            echo(line)
        try:
            # "ready" means acting on the log as it is: the projection and every consumer caught up with it.
            if await stack.until_caught_up(stop, lambda line: click.echo(line, err=True), every=PROGRESS_EVERY):
                echo("ready - press Ctrl-C to stop")
                await stack.run_until(stop)
        finally:
            caught_up.cancel()
        echo("stopping ...")
    echo("stopped")


async def until_stopped(body: Coroutine[Any, Any, None], stop: asyncio.Event, started: asyncio.Event,
                        patience: float = SHUTDOWN_PATIENCE) -> None:
    """Run `body` until it returns; Ctrl-C or SIGTERM (`stop`) is honoured at any moment.

    While it is still starting (the server, the streams, opening the projection: it does not look at `stop`
    yet) a stop cancels the start, which unwinds what it had started. Once started, it stops itself in order;
    what takes longer than `patience` is cancelled (the projection resumes from its last commit, as after a
    crash, and nothing written is lost: appends are idempotent and either acknowledged or not)."""
    task = asyncio.ensure_future(body)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([task, stopping], return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and started.is_set():
            await asyncio.wait([task], timeout=patience)
    finally:
        stopping.cancel()
    if task.done():
        task.result()
        return
    # Cancelled again until it is done: a cancel can be swallowed (asyncio.wait_for in nats-py on Python 3.11, a
    # connect to a server that accepts and never answers), and one cancel would then leave it running.
    await cancellation.stop([task])
    if not task.cancelled() and task.exception() is not None:
        log.debug("stopped while starting: %s", task.exception())  # what a start interrupted by a stop raised
    echo("stopped")


def exit_after(seconds: float) -> None:
    """Exit the process in `seconds` if it has not exited by then, whatever holds it: a thread that does not
    return (a file commit, a child that does not stop), a task that swallows every cancel, a blocked loop.

    Nothing is lost by it: the projection resumes from its last commit (as after kill -9), an unacknowledged
    append is retried under the same event id by whoever wrote it, and the embedded nats-server stops with us.
    """
    def force() -> None:
        sys.stdout.flush()
        sys.stderr.write(f"stopped (forced: the shutdown took more than {seconds:g} s)\n")
        sys.stderr.flush()
        os._exit(1)

    timer = threading.Timer(seconds, force)
    timer.daemon = True  # an exit that comes in time is not held by the timer
    timer.start()
