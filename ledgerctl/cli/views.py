"""`ledger agents | sessions | routes | pools | anomalies | history`: the projection's views, now or as of the past."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import msgspec

from ledger.errors import StreamMissing, Unavailable
from ledger.lifecycle import ROUTE_STATES, SESSION_STATES
from ledger.store import EventStore
from ledgerctl.query_client import RemoteQuery
from projections.errors import InvalidQuery, ProjectionError
from projections.health import AGENT_HEALTH, DEFAULT_POLICY, HealthPolicy
from projections.history import KINDS
from projections.query import MAX_LIMIT, ROUTE_STATUSES, AsOf, Query
from projections.settings import DB_ENV, DEFAULT_DB
from projections.timespec import EXAMPLES
from projections.views import Page

from . import tables
from .common import TimeParam, async_command, echo, nats_url_option, settings_from, stop_signals
from .liveness import policy_options
from .tables import FROM_START, Paging
from .watch import shower, watch


def db_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--db", envvar=DB_ENV, default=DEFAULT_DB, show_default=True, show_envvar=True,
                        type=click.Path(dir_okay=False, path_type=Path), help="The projection's SQLite file.")(f)


def view_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed([
        db_option,
        nats_url_option,
        click.option("--as-of", "as_of", type=TimeParam(), help=f"View the past at TIME: {EXAMPLES}. Needs NATS."),
        click.option("--at-seq", type=click.IntRange(min=0), metavar="N",
                     help="View the past just after LEDGER stream sequence N. Needs NATS."),
        click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts) instead of a table."),
    ]):
        f = option(f)
    return f


def as_of_from(as_of: datetime | None, at_seq: int | None) -> AsOf:
    if as_of is not None and at_seq is not None:
        raise InvalidQuery("use --as-of or --at-seq, not both")
    return at_seq if at_seq is not None else as_of


class NoSource(ProjectionError):
    """Neither a projection file nor a query service to answer a view."""


Views = Query | RemoteQuery
"""What answers a view: the projection file here, or the query service over NATS (same methods, same types)."""


@contextlib.asynccontextmanager
async def open_query(db: Path, nats_url: str, as_of: AsOf, *, policy: HealthPolicy = DEFAULT_POLICY,
                     needs_db: bool = True) -> AsyncIterator[Views]:
    """The projection file if there is one here; else the query service, found on NATS by `$SRV.PING`.

    The file answers "now" alone and the past with a NATS connection; a history needs only the stream. Without
    a file, a query service answers (a view from any machine that reaches NATS); without either, the past is
    still replayed from the start of the stream, and "now" is a one-line error naming both.
    """
    if db.exists() and needs_db:
        if as_of is None:
            async with Query.open(db, policy=policy) as q:
                yield q
            return
        async with EventStore.connect(settings_from(nats_url), name="ledger-query") as store, \
                Query.open(db, store, policy=policy) as q:
            yield q
        return
    async with contextlib.AsyncExitStack() as stack:
        try:
            store = await stack.enter_async_context(EventStore.connect(settings_from(nats_url), name="ledger-query"))
        except (Unavailable, StreamMissing) as e:
            if not needs_db:
                raise
            raise NoSource(f"no projection file at {db} and no query service answered on NATS at {nats_url} "
                           f"({e}): run `ledger up`, or pass --db") from None
        remote = await RemoteQuery.find(store) if needs_db else None
        if remote is None and as_of is None and needs_db:
            raise NoSource(f"no projection file at {db} and no query service answered on NATS at {nats_url}: "
                           "run `ledger up` (or `ledger query-service`), or pass --db")
        yield remote if remote is not None else Query(None, store, policy=policy)


PAGE = 100
"""Rows a table shows unless told (--limit N, --all): a screenful or two, and fast at any size."""
JSON_CHUNK = 1000
"""Items per write of a JSON answer."""


@dataclass(frozen=True)
class Pages:
    """--limit / --offset / --after / --all, resolved: what to ask for, and how the footer tells of it."""

    limit: int | None
    offset: int = 0
    after: str | None = None
    keyset: bool = True

    @classmethod
    def of(cls, limit: int | None, offset: int, after: str | None, everything: bool, as_json: bool, *,
           table: int | None = PAGE, json: int | None = None, keyset: bool = True) -> Pages:
        """Unless told, a table shows `table` rows and JSON `json` (None: all, as it always did; with a total)."""
        if everything and limit is not None:
            raise InvalidQuery("use --limit N or --all, not both")
        if everything:
            return cls(None, offset, after, keyset)
        return cls(limit if limit is not None else json if as_json else table, offset, after, keyset)

    @property
    def paging(self) -> Paging:
        return Paging(self.offset, self.after, self.keyset)


def page_options(*, after: bool = True, limit: int | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--limit, --offset, --after (where items are sorted by id) and --all."""
    def add(f: Callable[..., Any]) -> Callable[..., Any]:
        shown = f"default {limit}" if limit else f"default for a table {PAGE}, for --json all"
        options = [
            click.option("--limit", type=click.IntRange(min=1, max=MAX_LIMIT), metavar="N",
                         help=f"Show at most N rows ({shown}); the footer (JSON: `total`) counts every match."),
            click.option("--offset", type=click.IntRange(min=0, max=MAX_LIMIT), default=0, metavar="N",
                         help="Skip the first N matches."),
            click.option("--all", "everything", is_flag=True, help="Show every match (streamed out)."),
        ]
        if after:
            options.insert(2, click.option("--after", metavar="ID", help="Only rows whose id sorts after ID (the "
                                                                          "next page: the last id shown)."))
        for option in reversed(options):
            f = option(f)
        return f
    return add


def json_chunks(page: Page[Any]) -> Iterator[str]:
    """msgspec.json.encode(page), byte for byte, in pieces of JSON_CHUNK items (never one string of them all)."""
    encode = msgspec.json.encode
    yield '{"position":' + encode(page.position).decode() + ',"items":['
    for start in range(0, len(page.items), JSON_CHUNK):
        yield ("," if start else "") + encode(page.items[start:start + JSON_CHUNK]).decode()[1:-1]
    yield '],"total":' + encode(page.total).decode() + "}"


def emit(result: Any, as_json: bool, render: Callable[[Any], Any], paging: Paging = FROM_START) -> None:
    if as_json:
        for piece in json_chunks(result):
            click.echo(piece, nl=False)
        click.echo()
    else:
        tables.show(result, render(result), paging)


def watch_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--watch", "-w", "watching", is_flag=True,
                        help="Show the view again each time the ledger changes, until Ctrl-C (as kubectl get -w)."
                        )(f)


async def present(db: Path, nats_url: str, when: AsOf, ask: Callable[[Views], Awaitable[Page[Any]]], as_json: bool,
                  render: Callable[[Any], Any], watching: bool, *, policy: HealthPolicy = DEFAULT_POLICY,
                  paging: Paging = FROM_START) -> None:
    """Answer a view once, or - with --watch - now and after each change of the ledger."""
    if watching and when is not None:
        raise InvalidQuery("--watch follows the ledger as it changes: not with --as-of or --at-seq")
    async with open_query(db, nats_url, when, policy=policy) as q:
        if watching:
            stop = stop_signals()
            async with EventStore.connect(settings_from(nats_url), name="ledger-watch") as store:
                with shower(as_json, render, paging) as show:
                    await watch(store, lambda: ask(q), show, stop)
            return
        page = await ask(q)
    emit(page, as_json, render, paging)


@click.command("agents")
@view_options
@watch_option
@click.option("--pool", help="Only this pool.")
@click.option("--health", type=click.Choice(AGENT_HEALTH), help="Only agents of this health.")
@click.option("--platform", help="Only this platform.")
@click.option("--region", help="Only this region.")
@page_options()
@policy_options
@async_command
async def agents_command(db: Path, nats_url: str, as_of: datetime | None, at_seq: int | None, as_json: bool,
                         watching: bool, pool: str | None, health: str | None, platform: str | None, region: str | None,
                         limit: int | None, offset: int, after: str | None, everything: bool,
                         policy: HealthPolicy) -> None:
    """Agents with their health and the rule that made it so, by id."""
    when, p = as_of_from(as_of, at_seq), Pages.of(limit, offset, after, everything, as_json)
    await present(db, nats_url, when, lambda q: q.agents(pool=pool, health=health, platform=platform, region=region,
                                                         as_of=when, limit=p.limit, offset=p.offset, after=p.after),
                  as_json, tables.agents, watching, policy=policy, paging=p.paging)


@click.command("sessions")
@view_options
@watch_option
@click.option("--pool", help="Only this pool.")
@click.option("--state", type=click.Choice(SESSION_STATES), help="Only sessions in this state.")
@click.option("--owner", metavar="AGENT", help="Only sessions this agent owns.")
@page_options()
@async_command
async def sessions_command(db: Path, nats_url: str, as_of: datetime | None, at_seq: int | None, as_json: bool,
                           watching: bool, pool: str | None, state: str | None, owner: str | None, limit: int | None,
                           offset: int, after: str | None, everything: bool) -> None:
    """Sessions: owner, claim token, state, and why they are orphaned or released, by id."""
    when, p = as_of_from(as_of, at_seq), Pages.of(limit, offset, after, everything, as_json)
    await present(db, nats_url, when, lambda q: q.sessions(pool=pool, state=state, owner=owner, as_of=when,
                                                           limit=p.limit, offset=p.offset, after=p.after),
                  as_json, tables.sessions, watching, paging=p.paging)


@click.command("routes")
@view_options
@watch_option
@click.option("--session", metavar="ID", help="Only routes of this session.")
@click.option("--status", type=click.Choice(ROUTE_STATUSES), help="Only routes with this status.")
@click.option("--state", type=click.Choice(ROUTE_STATES), help="Only routes in this state.")
@page_options()
@async_command
async def routes_command(db: Path, nats_url: str, as_of: datetime | None, at_seq: int | None, as_json: bool,
                         watching: bool, session: str | None, status: str | None, state: str | None,
                         limit: int | None, offset: int, after: str | None, everything: bool) -> None:
    """Routes: status, sub-status, traffic, and health with its staleness, by id."""
    when, p = as_of_from(as_of, at_seq), Pages.of(limit, offset, after, everything, as_json)
    await present(db, nats_url, when, lambda q: q.routes(session=session, status=status, state=state, as_of=when,
                                                         limit=p.limit, offset=p.offset, after=p.after),
                  as_json, tables.routes, watching, paging=p.paging)


@click.command("pools")
@view_options
@watch_option
@policy_options
@async_command
async def pools_command(db: Path, nats_url: str, as_of: datetime | None, at_seq: int | None, as_json: bool,
                        watching: bool, policy: HealthPolicy) -> None:
    """Pools: agents by health, sessions by state, free capacity."""
    when = as_of_from(as_of, at_seq)
    await present(db, nats_url, when, lambda q: q.pools(as_of=when), as_json, tables.pools, watching, policy=policy)


ANOMALIES_PAGE = 100
"""The newest this many, table or JSON (as before pages came: --limit defaulted to 100 for both)."""


@click.command("anomalies")
@view_options
@watch_option
@click.option("--kind", help="Only this kind (illegal_transition, superseded_incarnation, stale_token, ...).")
@click.option("--entity", metavar="KIND:ID", help="Only this entity, e.g. session:s-42.")
@page_options(after=False, limit=ANOMALIES_PAGE)
@async_command
async def anomalies_command(db: Path, nats_url: str, as_of: datetime | None, at_seq: int | None, as_json: bool,
                            watching: bool, kind: str | None, entity: str | None, limit: int | None, offset: int,
                            everything: bool) -> None:
    """Events that reached the log but were flagged and not applied, newest first."""
    when = as_of_from(as_of, at_seq)
    p = Pages.of(limit, offset, None, everything, as_json, table=ANOMALIES_PAGE, json=ANOMALIES_PAGE, keyset=False)
    entity_kind, _, entity_id = (entity or "").partition(":")
    if entity and (entity_kind not in KINDS or not entity_id):
        raise InvalidQuery(f"--entity is KIND:ID with KIND one of {', '.join(KINDS)}, e.g. session:s-42")
    await present(db, nats_url, when, lambda q: q.anomalies(kind=kind, entity_kind=entity_kind or None,
                                                            entity_id=entity_id or None, limit=p.limit,
                                                            offset=p.offset, as_of=when),
                  as_json, tables.anomalies, watching, paging=p.paging)


@click.command("history")
@click.argument("kind", type=click.Choice(KINDS))
@click.argument("entity_id", metavar="ID")
@view_options
@async_command
async def history_command(kind: str, entity_id: str, db: Path, nats_url: str, as_of: datetime | None,
                          at_seq: int | None, as_json: bool) -> None:
    """Every event of one agent, session, route or pool: who wrote it, its causation, its effect or its flag."""
    when = as_of_from(as_of, at_seq)
    async with open_query(db, nats_url, when, needs_db=False) as q:
        found = await q.history(kind, entity_id, as_of=when)
    if as_json:
        echo(msgspec.json.encode(found).decode())
    else:
        tables.history(found)


VIEW_COMMANDS = (agents_command, sessions_command, routes_command, pools_command, anomalies_command,
                 history_command)
