"""`ledger up`: everything on one machine - nats-server (unless --nats-url), streams, projector, consumers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from consumers.liveness_rules import LivenessSettings
from consumers.service import Consumers
from projections.process import tune_gc
from projections.projector import Progress, Projector
from projections.settings import DB_ENV, ProjectionSettings

from .. import tasks
from ..server import EmbeddedServer, ServerConfig
from ..settings import DEFAULT_NATS_URL, redact_url
from ..store import EventStore
from .common import async_command, connection_options, echo, embedded_settings, settings_from, stop_signals
from .server import DEFAULT_DATA_DIR

Say = Callable[[str], None]


@dataclass(frozen=True)
class UpSettings:
    """What `ledger up` (and `ledger demo`) run, from flags and environment."""

    nats_url: str | None
    """An existing NATS server; None starts an embedded one."""
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    port: int = 4222
    sync_always: bool = True
    db: Path | None = None
    """The projection file; None: projection.sqlite3 in the data directory."""
    liveness: LivenessSettings = field(default_factory=LivenessSettings)
    replicas: int | None = None

    @property
    def db_path(self) -> Path:
        return self.db if self.db is not None else self.data_dir / "projection.sqlite3"


@dataclass
class Stack:
    """The running pieces; `run_until(stop)` supervises them."""

    url: str
    store: EventStore
    projector: Projector
    consumers: Consumers
    server: EmbeddedServer | None
    running: list[asyncio.Task[Any]]

    async def run_until(self, stop: asyncio.Event) -> None:
        """Return when `stop` is set; raise when a piece fails or the embedded server exits."""
        stopped = asyncio.ensure_future(stop.wait())
        watched = [stopped, *self.running]
        if self.server is not None:
            watched.append(asyncio.ensure_future(self._server_exit()))
        try:
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            for extra in watched[1 + len(self.running):]:
                extra.cancel()
        for task in done:
            if task is not stopped:
                task.result()  # a failed piece: let its error surface
                raise click.ClickException(f"{task.get_name()} stopped unexpectedly")

    async def _server_exit(self) -> None:
        assert self.server is not None
        while self.server.running:
            await asyncio.sleep(0.5)
        raise click.ClickException(f"nats-server exited unexpectedly; see {self.server.log_path}")


@contextlib.asynccontextmanager
async def running_stack(s: UpSettings, say: Say, *, name: str = "ledger-up") -> AsyncIterator[Stack]:
    """Start each piece in order, say where it is, and stop them in reverse order."""
    async with contextlib.AsyncExitStack() as stack:
        server = None
        url = s.nats_url
        if url is None:
            config = ServerConfig(data_dir=s.data_dir, port=s.port, sync_always=s.sync_always)
            server = await stack.enter_async_context(EmbeddedServer(config))
            url = server.url
            version = ".".join(map(str, server.version or ()))
            say(f"{'nats-server ' + version:<20}{url}  data in {s.data_dir.resolve()}"
                f"  (fsync {'always' if s.sync_always else 'by interval'})")
        settings = (settings_from if server is None else embedded_settings)(url, replicas=s.replicas)
        store = await stack.enter_async_context(EventStore.connect(settings, name=name, check=False))
        reports = await store.ensure_streams()
        say("streams             " + "; ".join(str(r) for r in reports))

        reader = await stack.enter_async_context(EventStore.connect(settings, name=f"{name}-projector"))
        projector = Projector(reader, ProjectionSettings.from_env(db=str(s.db_path)),
                              on_progress=catch_up_reporter(say, lambda: projector.caught_up.is_set()))
        await stack.enter_async_context(projector)
        say(f"projector           {s.db_path.resolve()}")

        consumers = Consumers(store, liveness=s.liveness)
        consumers_task = asyncio.create_task(consumers.run(), name="consumers")
        stack.push_async_callback(tasks.stop, [consumers_task])
        say(f"consumers           {', '.join(consumers.parts)}")
        assert projector.task is not None
        projector.task.set_name("projector")
        yield Stack(url=url, store=store, projector=projector, consumers=consumers, server=server,
                    running=[projector.task, consumers_task])


def catch_up_reporter(say: Say, caught_up: Callable[[], bool], every: float = 2.0) -> Callable[[Progress], None]:
    """Says how the projector's catch-up goes, at most every `every` seconds, until it has caught up."""
    last = [time.monotonic()]

    def report(p: Progress) -> None:
        now = time.monotonic()
        if caught_up() or now - last[0] < every:
            return
        last[0] = now
        done = ", ".join(f"{st} #{p.committed[st]:,} of #{p.targets[st]:,}" for st in p.committed)
        say(f"projector catching up: {done} ({p.events / p.elapsed if p.elapsed else 0:,.0f} events/s)")

    return report


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
                     show_envvar=True, help="Stream replicas (3 on a cluster). [default: 1 for a new stream; an existing one keeps its own]"),
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
    return f"  export {' '.join(env)}" if env else None


def hints(s: UpSettings, url: str) -> list[str]:
    """What to run next, in another terminal, to use this stack."""
    export = env_line(s, url)
    lines = [export] if export else []
    for command, what in [("ledger agent --agent-id a1 --pool gpu", "a reference agent"),
                          ("ledger session create --pool gpu", "a session for it to claim"),
                          ("ledger agents | sessions | pools", "the projection, now (or --as-of TIME)"),
                          ("ledger replay --follow", "the log itself")]:
        lines.append(f"  {command:<40}# {what}")
    return lines


@click.command("up")
@up_options
@click.option("--grace", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Seconds after a reconnect or leader change during which the monitor declares nobody dead.")
@async_command
async def up_command(nats_url: str | None, data_dir: Path, port: int, db: Path | None, replicas: str | None,
                     grace: float) -> None:
    """Run everything on one machine until Ctrl-C.

    Without --nats-url (or LEDGER_NATS_URL) it starts an embedded JetStream
    server on loopback with its data in --data-dir; then it creates or
    checks the streams, and runs the projector (into the SQLite file the
    `ledger agents | sessions | ...` views read) and the consumers (liveness
    monitor, orphan reclaimer, route watchdog). Ctrl-C or SIGTERM stops them
    cleanly, in reverse order.
    """
    s = UpSettings(nats_url=nats_url, data_dir=data_dir, port=port, db=db,
                   liveness=LivenessSettings(grace=grace), replicas=int(replicas) if replicas else None)
    tune_gc()
    stop = stop_signals()
    async with running_stack(s, echo) as stack:
        projector = stack.projector

        def report_caught_up(f: asyncio.Future[Any]) -> None:
            if not f.cancelled():
                echo("projector caught up at " + ", ".join(f"{k} #{v:,}" for k, v in projector.committed.items()))

        caught_up = asyncio.ensure_future(projector.caught_up.wait())
        caught_up.add_done_callback(report_caught_up)
        echo("next, in another terminal:")
        for line in hints(s, stack.url):
            echo(line)
        echo("ready - press Ctrl-C to stop")
        try:
            await stack.run_until(stop)
        finally:
            caught_up.cancel()
        echo("stopping ...")
    echo("stopped")
