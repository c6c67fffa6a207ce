"""`ledger whatif`: the liveness rules re-run over the recorded log with other settings (counterfactual replay)."""

from __future__ import annotations

from datetime import datetime, timedelta

import click

from consumers import whatif as wi
from ledger import events as ev
from ledger import subjects
from ledger.codec import Item, from_ns
from ledger.store import EventStore
from projections.health import human
from projections.timespec import EXAMPLES, LATEST

from .common import TimeParam, async_command, echo, nats_url_option, settings_from, to_json
from .liveness import dead_after_option, suspect_after_option
from .tables import Grid, Painter, console, write

KIND_STYLE = {wi.AVOIDED: "green", wi.ADDED: "red", wi.EARLIER: "yellow", wi.LATER: "cyan"}


@click.command("whatif")
@dead_after_option("as recorded")
@suspect_after_option("as recorded")
@click.option("--breaker-share", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Share of a pool dying within the breaker window that trips its breaker [default: as recorded].")
@click.option("--since", type=TimeParam(), default=None,
              help=f"Re-judge from this time (the log before it is taken as recorded): {EXAMPLES} "
                   "[default: the oldest heartbeat kept].")
@click.option("--until", type=TimeParam(), default=None, help=f"Up to this time [default: the log's end]: {EXAMPLES}.")
@click.option("--pool", default=None, help="Report only this pool's agents and breaker.")
@click.option("--tolerance", type=click.FloatRange(min=0, max=ev.MAX_SECONDS), default=wi.TOLERANCE,
              show_default=True,
              help="Seconds within which a recorded and a replayed verdict count as the same (the monitor ticks).")
@click.option("--json", "as_json", is_flag=True, help="The report as one JSON object.")
@nats_url_option
@async_command
async def whatif_command(dead_after: float | None, suspect_after: int | None, breaker_share: float | None,
                         since: datetime | None, until: datetime | None, pool: str | None, tolerance: float,
                         as_json: bool, nats_url: str) -> None:
    """Would other liveness settings have changed what happened? Re-run the monitor's rules over the
    recorded heartbeats and lifecycle events, and list the deaths, suspicions, failovers and breaker
    trips that would have been avoided, added, earlier or later, with each agent's evidence.

    Settings not given are the recorded ones (read from the recorded verdicts' evidence). Heartbeats are
    kept 24 h by default (LEDGER_HB): once older ones expired, the replay starts at the oldest beat kept
    (or --since if later); the log before it is taken as recorded.

    \b
    ledger whatif --dead-after 60s                    # would a longer ttl have saved them?
    ledger whatif --suspect-after 5 --since -2h --until -1h
    ledger whatif --breaker-share 0.3 --pool gpu --json
    """
    if since is not None and until is not None and until < since:
        raise click.UsageError("--until is before --since")
    async with EventStore.connect(settings_from(nats_url), name="ledger-whatif") as store:
        beats_facts = await store.stream_facts(subjects.HEARTBEAT_STREAM)
        # (see wi.whatif; never past the ledger's last time, which a stored time cannot be either)
        read_until = min(until + timedelta(seconds=tolerance), LATEST) if until is not None else None
        lifecycle = await _read(store, subjects.family_filter("*"), subjects.LEDGER_STREAM, read_until)
        beats = await _read(store, subjects.family_filter(subjects.HEARTBEAT_FAMILY), subjects.HEARTBEAT_STREAM,
                            read_until)
    notes = []
    oldest = from_ns(beats_facts.first_ns) if beats_facts.messages and beats_facts.first_seq > 1 else None
    if oldest is not None and (since is None or since < oldest):  # beats before it expired: silence is no evidence
        if since is not None:
            notes.append(f"heartbeats before {oldest:%Y-%m-%d %H:%M:%S} are no longer kept (LEDGER_HB keeps them "
                         f"24 h by default): replayed from then, the log before it taken as recorded")
        since = oldest
    if not beats_facts.messages:
        notes.append("no heartbeat is kept (LEDGER_HB keeps them 24 h by default): every live agent looks silent")
    recorded = wi.recorded_settings(lifecycle)
    try:
        settings = recorded.liveness(dead_after=dead_after, suspect_after_missed=suspect_after,
                                     breaker_share=breaker_share)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    report = wi.whatif(wi.merged(lifecycle, beats), settings, recorded=recorded, since=since, until=until, pool=pool,
                       tolerance=tolerance, notes=notes)
    if as_json:
        echo(to_json(report))
        return
    show(report)


async def _read(store: EventStore, subject_filter: str, stream: str, until: datetime | None) -> list[Item]:
    items: list[Item] = []
    async for batch in store.replay(subject_filter, stream=stream, end_time=until):
        items.extend(batch)
    return items


def _recorded(r: wi.RecordedSettings) -> str:
    dead = f"{r.dead_after:g}s" if r.dead_after is not None else "each agent's ttl"
    source = f"from {r.verdicts} verdict{'s' if r.verdicts != 1 else ''}" if r.verdicts else "defaults: no verdict"
    trips = f"from {r.trips} trip{'s' if r.trips != 1 else ''}" if r.trips else "default"
    return (f"recorded settings: dead after {dead}, suspect after {r.suspect_after_missed} missed ({source}); "
            f"breaker share {r.breaker_share:g} in {r.breaker_window:g}s ({trips})")


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _when(t: datetime | None) -> str:
    return t.strftime("%H:%M:%S.%f")[:-3] if t is not None else "-"


def _evidence(o: wi.Outcome | None) -> str:
    if o is None:
        return ""
    beat = f"last beat #{o.last_beat_seq} at {_when(o.last_beat_at)}" if o.last_beat_seq is not None \
        else "no beat since registering"
    gap = f", gap {o.gap:.1f}s" if o.gap is not None else ""
    return beat + gap


def show(report: wi.Report) -> None:
    out = console()
    echo(_recorded(report.recorded_settings))
    start = _when(report.since) if report.since else "the start"
    window = f"{start} to {_when(report.until) if report.until else 'the end'}"
    r = report.recorded
    echo(f"replayed from {window}: recorded {_n(r.deaths, 'death')}, {_n(r.suspicions, 'suspicion')}, "
         f"{_n(r.trips, 'breaker trip')}, {_n(r.failovers, 'failover')}")
    for note in report.notes:
        echo(f"note: {note}")
    if report.differences:
        grid = Grid(("what", "kind", "agent/pool", "recorded", "whatif", "shift", "failovers", "evidence"),
                    "differences")
        for d in report.differences:
            rec, cf = d.recorded, d.whatif
            recorded = f"{_when(rec.at)} #{rec.seq}" if rec is not None else "-"
            evidence = _evidence(cf if cf is not None else rec)
            if d.longest_gap is not None:
                evidence += f"; longest gap {human(d.longest_gap) if d.longest_gap >= 60 else f'{d.longest_gap:.1f}s'}"
            if d.note:
                evidence += f"; {d.note}"
            shown = cf if cf is not None else rec
            sessions = shown.sessions if shown is not None else 0
            grid.add(d.what, ((d.kind, KIND_STYLE.get(d.kind, "")),), f"{d.subject}" +
                     (f" ({d.incarnation})" if d.incarnation is not None else ""), recorded,
                     _when(cf.at) if cf is not None else "-", f"{d.shift:+.1f}s" if d.shift is not None else "",
                     str(sessions) if d.what == wi.DEATH else "", evidence or "-")
        write(grid.lines(Painter.of(out)))
    echo(report.summary)

