"""`ledger project` (run the projector: catch up, then follow) and `ledger rebuild` (from zero, with progress)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from ledger.store import EventStore
from projections.gc_tuning import tune_gc
from projections.projector import Progress as Committed
from projections.projector import Projector
from projections.rebuild import rebuild
from projections.settings import ProjectionSettings
from projections.state import STREAMS

from .common import async_command, echo, nats_url_option, settings_from, stop_signals
from .views import db_option


def _positions(p: dict[str, int]) -> str:
    return ", ".join(f"{s} #{n}" for s, n in p.items())


@click.command("project")
@db_option
@nats_url_option
@click.option("--snapshot-every", type=click.IntRange(min=0), default=None,
              help="Snapshot each stream's fold every N sequences, for fast views of the past. [default: 25000]")
@click.option("--quiet", "-q", is_flag=True, help="Print only errors.")
@async_command
async def project_command(db: Path, nats_url: str, snapshot_every: int | None, quiet: bool) -> None:
    """Run the projector: fold the ledger into the SQLite file, catch up, then follow until Ctrl-C.

    Restarting resumes from the file's checkpoints; a file of another
    projection schema is rebuilt from zero.
    """
    settings = ProjectionSettings.from_env(db=str(db), snapshot_every=snapshot_every)
    tune_gc()
    stop = stop_signals()
    last_print = [0.0]

    def progress(p: Committed) -> None:
        now = time.monotonic()
        if not quiet and not projector.caught_up.is_set() and now - last_print[0] >= 1.0:
            last_print[0] = now
            rate = p.events / p.elapsed if p.elapsed else 0.0
            echo(f"catching up: {_positions(p.committed)} of {_positions(p.targets)} ({rate:,.0f} events/s)")

    async with EventStore.connect(settings_from(nats_url), name="ledger-projector") as store:
        projector = Projector(store, settings, on_progress=progress)
        async with projector:
            if not quiet:
                echo(f"projecting into {db} from {_positions(projector.committed)}")
            stopped = asyncio.ensure_future(stop.wait())
            ready = asyncio.ensure_future(projector.caught_up.wait())
            running = projector.task
            assert running is not None
            await asyncio.wait({stopped, ready, running}, return_when=asyncio.FIRST_COMPLETED)
            if ready.done() and not quiet:
                echo(f"caught up at {_positions(projector.committed)}; following (Ctrl-C to stop)")
            await asyncio.wait({stopped, running}, return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            stopped.cancel()
        if not quiet:
            echo(f"stopped at {_positions(projector.committed)}")


@click.command("rebuild")
@db_option
@nats_url_option
@async_command
async def rebuild_command(db: Path, nats_url: str) -> None:
    """Rebuild the projection from zero into a new file, then swap it in (stop the projector first)."""
    settings = ProjectionSettings.from_env(db=str(db))
    tune_gc()
    columns = (TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[rate]}"))
    with Progress(*columns, transient=False) as bars:
        tasks: dict[str, TaskID] = {}

        def progress(p: Committed) -> None:
            rate = f"{p.events / p.elapsed:,.0f} events/s" if p.elapsed else ""
            for stream in STREAMS:
                if stream not in tasks:
                    tasks[stream] = bars.add_task(stream, total=max(p.targets[stream], 1), rate="")
                bars.update(tasks[stream], completed=min(p.committed[stream], p.targets[stream]), rate=rate)

        async with EventStore.connect(settings_from(nats_url), name="ledger-rebuild") as store:
            result = await rebuild(store, settings, progress)
    rate = result.events / result.seconds if result.seconds else 0.0
    echo(f"rebuilt {result.path}: {result.events:,} events in {result.seconds:.1f} s ({rate:,.0f}/s), "
         f"at {_positions(result.positions)}")


PROJECTOR_COMMANDS = (project_command, rebuild_command)
