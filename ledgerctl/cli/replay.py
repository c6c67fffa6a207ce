"""`ledger replay`: the debugging tool - read the log (or follow it) with filters."""

from __future__ import annotations

from datetime import datetime

import click
import msgspec

from ledger import subjects
from ledger.codec import Recorded, Unreadable
from ledger.events import BY_TAG
from ledger.ids import check_token
from ledger.store import EventStore
from projections.timespec import EXAMPLES

from .common import TimeParam, async_command, echo, nats_url_option, settings_from, to_json

ENVELOPE = {"event_id", "time", "producer", "causation_id", "correlation_id", "v", "type"}
ID_FIELD = {"agent": "agent_id", "hb": "agent_id", "session": "session_id", "route": "route_id", "pool": "pool"}


def describe(item: Recorded | Unreadable) -> str:
    """One human line per stored message."""
    stamp = item.stored_at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    if isinstance(item, Unreadable):
        return f"#{item.seq:<7} {stamp}  UNREADABLE  {item.subject}: {item.reason}"
    e = item.event
    id_field = ID_FIELD[type(e).family]
    fields = {k: v for k, v in msgspec.structs.asdict(e).items() if k not in ENVELOPE and k != id_field}
    detail = " ".join(f"{k}={_short(v)}" for k, v in fields.items() if v not in (None, "", {}, ()))
    cause = f"  cause={e.causation_id}" if e.causation_id else ""
    return f"#{item.seq:<7} {stamp}  {e.type_tag():<26} {e.entity_id:<16} by {e.producer.id:<12} {detail}{cause}"


def _short(value: object) -> str:
    if isinstance(value, datetime):
        return value.strftime("%H:%M:%S")
    if isinstance(value, msgspec.Struct):
        return to_json({k: v for k, v in msgspec.structs.asdict(value).items() if v is not None})
    return str(value)


def _record_json(item: Recorded | Unreadable) -> str:
    if isinstance(item, Unreadable):
        return to_json({"seq": item.seq, "subject": item.subject, "stored_at": item.stored_at,
                        "unreadable": item.reason, "data": item.data.decode(errors="replace")})
    return to_json({"seq": item.seq, "subject": item.subject, "stored_at": item.stored_at, "event": item.event})


@click.command("replay")
@click.option("--subject", "subject_filters", multiple=True, metavar="FILTER",
              help="NATS subject filter, repeatable (default: every lifecycle event).")
@click.option("--type", "types", multiple=True, metavar="TYPE",
              help="Event type such as session.claimed or agent.declared_dead; repeatable.")
@click.option("--agent", "agents", multiple=True, metavar="ID", help="One agent's history (repeatable).")
@click.option("--session", "sessions", multiple=True, metavar="ID", help="One session's history (repeatable).")
@click.option("--route", "routes", multiple=True, metavar="ID", help="One route's history (repeatable).")
@click.option("--heartbeats", is_flag=True, help="Read the heartbeat stream instead (kept for a bounded time).")
@click.option("--since", type=TimeParam(), default=None, help=f"From this time: {EXAMPLES}.")
@click.option("--until", type=TimeParam(), default=None, help=f"Up to this time: {EXAMPLES}.")
@click.option("--from-seq", type=click.IntRange(1), default=None, help="First stream sequence.")
@click.option("--to-seq", type=click.IntRange(1), default=None, help="Last stream sequence.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events until Ctrl-C.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@nats_url_option
@async_command
async def replay_command(subject_filters: tuple[str, ...], types: tuple[str, ...], agents: tuple[str, ...],
                         sessions: tuple[str, ...], routes: tuple[str, ...], heartbeats: bool,
                         since: datetime | None, until: datetime | None, from_seq: int | None, to_seq: int | None,
                         follow: bool, as_json: bool, nats_url: str) -> None:
    """Print the ledger's events, oldest first, with filters: why did S move, who decided A was dead?

    \b
    ledger replay --session s-42                  # one session's whole story
    ledger replay --type agent.declared_dead --since -1h
    ledger replay --heartbeats --agent a-1 -f     # live heartbeats of one agent
    """
    filters = list(subject_filters)
    for tag in types:
        cls = BY_TAG.get(tag)
        if cls is None:
            raise click.BadParameter(f"unknown event type {tag!r}; known: {', '.join(BY_TAG)}", param_hint="--type")
        filters.append(subjects.type_filter(cls.family, cls.verb()))
    family_of = {"agent": "hb" if heartbeats else "agent", "session": "session", "route": "route"}
    for kind, ids in (("agent", agents), ("session", sessions), ("route", routes)):
        for entity_id in ids:
            filters.append(subjects.entity_filter(family_of[kind], check_token(entity_id, f"{kind} id")))
    if not filters:
        filters = [subjects.family_filter(subjects.HEARTBEAT_FAMILY if heartbeats else "*")]
    stream = subjects.HEARTBEAT_STREAM if heartbeats else None
    if follow and (until or to_seq):
        raise click.UsageError("--follow cannot be combined with --until or --to-seq")
    count = 0
    async with EventStore.connect(settings_from(nats_url), name="ledger-replay") as store:
        replay = store.replay(filters, stream=stream, start_seq=from_seq, start_time=since, end_seq=to_seq,
                              end_time=until, follow=follow)
        async for batch in replay:
            for item in batch:
                echo(_record_json(item) if as_json else describe(item))
            count += len(batch)
    if not as_json and not follow:
        click.echo(f"({count} message{'s' if count != 1 else ''})", err=True)

