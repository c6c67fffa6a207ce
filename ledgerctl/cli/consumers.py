"""`ledger consumers` (liveness monitor, reclaimer, route watchdog) and `ledger pool reset-breaker`."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import click

from consumers.partition import Partition, parse_partition
from ledger import events as ev
from ledger import lifecycle as lc
from ledger.codec import Recorded
from ledger.errors import InvalidInput
from ledger.ids import check_token
from ledger.settings import redact_url
from ledger.store import EventStore
from ledger.writer import Writer
from projections.health import HealthPolicy

from .common import async_command, echo, nats_url_option, producer_id_option, settings_from, stop_signals, warn
from .liveness import policy_options

if TYPE_CHECKING:
    from consumers.group import ConsumerGroup


@click.command("consumers")
@click.option("--monitor/--no-monitor", default=True, show_default=True, help="The liveness monitor.")
@click.option("--reclaimer/--no-reclaimer", default=True, show_default=True, help="The orphan reclaimer.")
@click.option("--watchdog/--no-watchdog", default=True, show_default=True, help="The route watchdog.")
@click.option("--name", default="", help="Replica name (producer ids become monitor-NAME ...).")
@click.option("--grace", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Seconds after a reconnect or stream leader change during which nobody is declared dead.")
@click.option("--breaker-share", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.5,
              show_default=True, help="Share of a pool dying within --breaker-window that trips its breaker.")
@click.option("--breaker-window", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True)
@click.option("--pools", metavar="P1,P2", default=None,
              help="Act only on these pools' agents, sessions and routes (other replicas take the rest).")
@click.option("--partition", metavar="I/N", default=None,
              help="Act only on the pools that hash to slot I of N replicas (0 <= I < N; e.g. 0/3, 1/3, 2/3).")
@nats_url_option
@policy_options
@async_command
async def consumers_command(monitor: bool, reclaimer: bool, watchdog: bool, name: str, policy: HealthPolicy,
                            grace: float, breaker_share: float, breaker_window: float, pools: str | None,
                            partition: str | None, nats_url: str) -> None:
    """Run the liveness monitor, orphan reclaimer and route watchdog until Ctrl-C.

    Any number of replicas may run against the same ledger: deaths are
    declared once, and claims and transitions are compare-and-set. The monitor
    and the reclaimer judge agents by the same --suspect-after/--dead-after.

    A fleet larger than one process can serve is split by pool: run N replicas
    with --partition 0/N ... N-1/N (or name each replica's --pools). Every
    replica still reads the whole log; each acts on its own pools only.
    """
    from consumers.group import ConsumerGroup
    from consumers.liveness_rules import LivenessSettings  # the CLI is where the packages meet

    if not (monitor or reclaimer or watchdog):
        raise click.UsageError("nothing to run: every consumer is switched off")
    part = _partition(pools, partition)
    liveness = LivenessSettings(policy=policy, grace=grace, breaker_share=breaker_share,
                                breaker_window=breaker_window)
    stop = stop_signals()
    client_name = f"ledger-consumers{'-' + name if name else ''}"
    async with EventStore.connect(settings_from(nats_url), name=client_name) as store:
        running = ConsumerGroup(store, name=name, monitor=monitor, reclaimer=reclaimer, watchdog=watchdog,
                                liveness=liveness, partition=part)
        task = asyncio.create_task(running.run())
        scope = "" if part.everything else f" for {part.describe()}"
        echo(f"running {', '.join(running.parts)}{scope} on {redact_url(store.settings.nats_url)} - Ctrl-C to stop")
        warning = asyncio.create_task(_warn_unknown_pools(running, part)) if part.pools is not None else None
        done, _ = await asyncio.wait({task, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
        if warning is not None:
            warning.cancel()
        if task in done:
            task.result()  # a consumer failed: let its error surface
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    echo("stopped")


async def _warn_unknown_pools(running: ConsumerGroup, part: Partition) -> None:
    """Once caught up, say which --pools nothing in the ledger is in: a typo serves nothing, silently otherwise."""
    await running.ready()
    ledger = running.follower.state.ledger
    in_use = {a.pool for a in ledger.agents.values()} | {s.pool for s in ledger.sessions.values()} | set(ledger.pools)
    unknown = part.unknown(in_use)
    if unknown:
        warn(f"--pools {','.join(unknown)}: no agent, session or breaker of the ledger is in "
             f"{'it' if len(unknown) == 1 else 'them'} yet (a typo?); this replica acts on "
             f"{'it' if len(unknown) == 1 else 'them'} once one appears")


def _partition(pools: str | None, partition: str | None) -> Partition:
    """--pools and --partition as one Partition (both: the named pools that also fall on the slot)."""
    named = None
    if pools is not None:
        named = frozenset(p.strip() for p in pools.split(",") if p.strip())
        if not named:
            raise click.BadParameter("name at least one pool, e.g. --pools gpu,cpu", param_hint="--pools")
        for pool in sorted(named):
            try:
                check_token(pool, "pool")
            except InvalidInput as e:
                raise click.BadParameter(str(e), param_hint="--pools") from None
    replica, replicas = 0, 1
    if partition is not None:
        try:
            replica, replicas = parse_partition(partition)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--partition") from None
    part = Partition(pools=named, replica=replica, replicas=replicas)
    off = part.off_slot()
    if off:  # --pools and --partition both: only the named pools on this slot are served
        elsewhere = ", ".join(f"{p} falls on slot {slot}" for p, slot in off.items())
        if named is not None and len(off) == len(named):
            raise click.BadParameter(f"none of these pools falls on slot {replica} of {replicas} ({elsewhere}): "
                                     "this replica would act on nothing", param_hint="--pools/--partition")
        warn(f"--partition {replica}/{replicas} leaves out some of --pools: {elsewhere}")
    return part


@click.group("pool")
def pool_group() -> None:
    """Pool-level operations."""


@pool_group.command("reset-breaker")
@click.argument("pool")
@click.option("--reason", default="operator", show_default=True)
@nats_url_option
@producer_id_option
@async_command
async def reset_breaker(pool: str, reason: str, nats_url: str, producer_id: str) -> None:
    """Close POOL's mass-failure breaker: orphaning of its dead agents' sessions resumes."""
    async with Writer.connect(settings_from(nats_url), producer_id=producer_id) as ledger:

        async def read(min_seq: int | None) -> tuple[lc.PoolState | None, int]:
            items = await ledger.store.history("pool", pool, min_last_seq=min_seq)
            state, _ = lc.fold(lc.evolve_pool, [i for i in items if isinstance(i, Recorded)])
            return state, items[-1].seq if items else 0

        def decide(state: lc.PoolState | None) -> ev.Event:
            if state is None or not state.breaker_open:
                raise InvalidInput(f"pool {pool}'s breaker is not open")
            return ev.PoolBreakerReset(producer=ledger.producer, pool=pool, reason=reason)

        seq, _ = await ledger.cas(read, decide)
    echo(f"pool {pool}: breaker closed (#{seq}); orphaning resumes")
