"""`ledger check`: read the whole history raw and run the independent rules of `ledger.check` over it.

The messages are read as the server stores them (batched Direct Get, the raw
bytes kept), never through the codec: a decoder that fills defaults or drops
what it cannot read must not hide anything from the checker. Every batch asks
for a replica that holds at least the stream's last sequence as the leader
reported it at the start, so a lagging replica cannot serve a shorter history.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from datetime import datetime

import click
import msgspec

from ledger import subjects
from ledger.check import DEFAULT_GRACE, HEARTBEATS, LEDGER, Checker, RawMessage, Report, to_utc
from ledger.codec import to_ns
from ledger.errors import StoreError, Unavailable
from ledger.store import EventStore

from .common import TimeParam, async_command, echo, nats_url_option, settings_from

BATCH = 1000
PATIENCE = 60.0
"""Seconds a read keeps retrying through a leader election before the command gives up."""


async def read_raw(store: EventStore, stream: str, progress: Callable[[str, int, int], None] | None = None,
                   patience: float = PATIENCE, on_batch: Callable[[list[RawMessage]], None] | None = None,
                   ) -> list[RawMessage]:
    """Every message of `stream` up to its last sequence now, raw and in order.

    With `on_batch`, each batch is handed to it instead of being kept (a long history in bounded memory)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            state = await store.stream_facts(stream)
            break
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
    out: list[RawMessage] = []
    read = 0
    start, last = max(state.first_seq, 1), state.last_seq
    delay = 0.2
    while last and start <= last:
        try:
            batch, pending = await store.read_batch(stream, f"{subjects.PREFIX}.>", start, batch=BATCH,
                                                    min_last_seq=last, make=RawMessage)
        except StoreError as e:  # any refusal of a batch (not only "unavailable"): an election, most likely
            if time.monotonic() > deadline:
                raise Unavailable(f"cannot read {stream}: {e}") from None
            await asyncio.sleep(delay)  # an election: the next replica or leader answers
            delay = min(delay * 2, 2.0)
            continue
        deadline, delay = time.monotonic() + patience, 0.2
        batch = [m for m in batch if m.seq <= last]
        read += len(batch)
        if on_batch is not None:
            on_batch(batch)
        else:
            out.extend(batch)
        if progress:
            progress(stream, read, state.messages)
        if not batch or pending == 0:
            break
        start = batch[-1].seq + 1
    return out


async def run_check(store: EventStore, *, grace: float = DEFAULT_GRACE, since: datetime | None = None,
                    now: datetime | None = None, quiet: bool = True) -> Report:
    """Read LEDGER and the heartbeats raw, then check them (the function `ledger check` and `ledger doctor` run)."""
    shown = [0.0]

    def progress(stream: str, done: int, total: int) -> None:
        if quiet or time.monotonic() - shown[0] < 2.0:
            return
        shown[0] = time.monotonic()
        click.echo(f"reading {stream}: {done:,} of {total:,} messages", err=True)

    checker = Checker(grace=grace, since_ns=to_ns(since) if since else None)

    def feed(batch: list[RawMessage]) -> None:
        for m in batch:
            checker.feed(m)

    # Heartbeats in any order, LEDGER in sequence order (see ledger.check.fold); neither is held in memory.
    await read_raw(store, HEARTBEATS, progress, on_batch=feed)
    await read_raw(store, LEDGER, progress, on_batch=feed)
    return checker.finish(to_ns(now) if now else None)


def table(report: Report) -> list[str]:
    read = ", ".join(f"{n:,} {stream}" for stream, n in sorted(report.messages.items())) or "nothing"
    lines = [(f"read {read} messages ({report.events:,} events, {report.not_events:,} not events); "
              f"judged as of {to_utc(report.now_ns).isoformat() if report.now_ns else '-'}")]
    if report.flagged:
        # The system's own races, which the folds flag and never apply (or the reclaimer repairs): no violation.
        lines.append("flagged, not applied: " + ", ".join(f"{kind} {n}" for kind, n in report.flagged.items()))
    if report.clean:
        return [*lines, "clean: no violation"]
    counts: dict[str, int] = {}
    for v in report.violations:
        counts[v.kind] = counts.get(v.kind, 0) + 1
    lines.append(f"{len(report.violations)} violation(s): "
                 + ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items())))
    lines.append(f"{'kind':<28} {'stream':<9} {'seq':>8}  {'entity':<28} {'related':<16} detail")
    for v in report.violations:
        related = ",".join(f"#{r}" for r in v.related)
        lines.append(f"{v.kind:<28} {v.stream:<9} {v.seq:>8}  {v.entity[:28]:<28} {related[:16]:<16} {v.detail}")
    return lines


@click.command("check")
@nats_url_option
@click.option("--since", type=TimeParam(), default=None,
              help="Report only violations stored at or after this time (the whole history is still read).")
@click.option("--grace", type=click.FloatRange(min=0), default=DEFAULT_GRACE, show_default=True,
              help="Seconds beyond an owner's ttl before a session left with a lost owner counts as stranded.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: the counts and every violation.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
@async_command
async def check_command(nats_url: str, since: datetime | None, grace: float, as_json: bool, quiet: bool) -> None:
    """Check the whole history against the ledger's invariants, apart from the projections' folds.

    Reports overlapping ownership, owner writes under stale tokens, illegal
    transitions, writes of superseded incarnations that were acted on as
    applied, claims for agents that were not alive in the session's pool,
    stranded sessions and events without an id or a time, each with its
    sequences. The system's own races (a write in flight across its agent's
    next registration, a claim a moment after the agent was lost) are counted
    as flagged, not violations. Exits 1 on any violation, 0 when the history
    is clean.
    """
    settings = settings_from(nats_url)
    async with EventStore.connect(settings, name="ledger-check") as store:
        report = await run_check(store, grace=grace, since=since, quiet=quiet or not sys.stderr.isatty())
    if as_json:
        echo(msgspec.json.encode({"clean": report.clean, "messages": report.messages, "events": report.events,
                                  "not_events": report.not_events, "now_ns": report.now_ns,
                                  "flagged": report.flagged,
                                  "violations": report.violations}).decode())
    else:
        for line in table(report):
            echo(line)
    if not report.clean:
        raise SystemExit(1)
