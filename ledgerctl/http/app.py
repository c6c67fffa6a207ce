"""The HTTP app: the JSON API over `projections.query.Query`, live events, metrics, health, and the dashboard.

    app = create_app(Parts.of(stack, query))     # or Parts(query=..., store=..., follower=..., ...)

Every JSON reply is a Query Struct, encoded by msgspec (Litestar writes the
OpenAPI document, at /schema, from the same Structs). Every error is
`{"code": ..., "message": ...}` with one line: 400 for a bad filter, time or
sequence, 404 for an unknown entity, 503 when the projection cannot answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Protocol

import msgspec
from litestar import Litestar, MediaType, Request, Response, get
from litestar.di import NamedDependency, Provide
from litestar.exceptions import HTTPException, NotFoundException, ValidationException
from litestar.openapi.config import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.params import FromPath, FromQuery, QueryParameter
from litestar.response import ServerSentEvent, ServerSentEventMessage
from litestar.static_files import create_static_files_router
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ledger.errors import InvalidInput, LedgerError
from ledger.store import EventStore
from projections.errors import InvalidQuery, NeedsEventStore, UnknownEntity
from projections.follow import Follower
from projections.history import EntityHistory
from projections.query import AsOf, Query
from projections.state import AnomalyRecord
from projections.timespec import parse_time
from projections.views import AgentView, Page, PoolView, RouteView, SessionView
from projections.why import Chain, why

from .metrics import STREAMS, FailoverClock, LedgerCollector
from .sse import EventFeed, StoredEvent

STATIC = Path(__file__).parent / "static"

log = logging.getLogger(__name__)


class _Ready(Protocol):
    def is_set(self) -> bool: ...


class ProjectorLike(Protocol):
    @property
    def caught_up(self) -> _Ready: ...
    @property
    def committed(self) -> dict[str, int]: ...
    @property
    def path(self) -> Path: ...


class StackLike(Protocol):
    @property
    def store(self) -> EventStore: ...
    @property
    def follower(self) -> Follower: ...
    @property
    def projector(self) -> ProjectorLike: ...
    @property
    def consumers(self) -> Any: ...


@dataclass
class Parts:
    """What the app answers from: the process's query, store, follower and projector, and its consumers."""

    query: Query
    store: EventStore
    follower: Follower
    projector: ProjectorLike
    consumers: Mapping[str, object] = field(default_factory=dict)
    """role -> consumer; a consumer's `writes` counter is exported."""

    @classmethod
    def of(cls, stack: StackLike, query: Query) -> Parts:
        parts = getattr(stack.consumers, "parts", {})
        return cls(query=query, store=stack.store, follower=stack.follower, projector=stack.projector,
                   consumers=parts)


class ApiError(msgspec.Struct, frozen=True):
    code: str
    message: str


class AppState:
    """The app's state: the parts, the live feed and the metrics, wired to the follower once."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts
        self.feed = EventFeed()
        self.registry = CollectorRegistry()
        self.clock = FailoverClock(self.registry)
        self.collector = LedgerCollector(parts.follower, lambda: parts.projector.committed, parts.consumers,
                                         parts.query.policy)
        self.registry.register(self.collector)
        # recall=False: a recalled item is not news, and counting it again would count it twice.
        parts.follower.listen(self.feed.heard, recall=False)
        parts.follower.listen(self.clock.heard, recall=False)

        self.lock = asyncio.Lock()
        """One question at a time: a Query reads through one SQLite connection, whose read transactions do not
        nest (a page asks five things at once)."""

    @contextlib.asynccontextmanager
    async def asking(self) -> AsyncIterator[Query]:
        async with self.lock:
            yield self.parts.query

    async def metrics(self) -> bytes:
        facts = self.collector.facts
        for stream in STREAMS:
            with contextlib.suppress(LedgerError):  # the server unreachable: the gauge is left out, not made up
                facts.stream_last[stream] = await self.parts.store.last_seq(stream)
        async with self.asking() as query:
            if query.db is not None:
                facts.anomalies = await query.db.anomaly_counts()
        return generate_latest(self.registry)


AsOfParam = Annotated[str | None, QueryParameter(
    name="as_of", description="A LEDGER sequence number, or a time (ISO-8601 or relative: -5m); absent: now")]


Deps = NamedDependency[AppState]
Text = FromQuery[str | None]
StateParam = Annotated[str | None, QueryParameter(name="state")]
"""`state` is a name Litestar keeps for the app's state."""
LimitParam = Annotated[int | None, QueryParameter(description="At most this many items (absent: all); `total` "
                                                              "counts every match")]
Offset = FromQuery[int]


def as_of(text: str | None) -> AsOf:
    """A LEDGER sequence (digits) or a time in the one time grammar (ISO-8601 or relative)."""
    if text is None or not text.strip():
        return None
    value = text.strip()
    if value.isdigit():
        return int(value)
    return parse_time(value)


def _error(status: int, code: str, message: str) -> Response[ApiError]:
    first = message.strip().splitlines()[0] if message.strip() else code
    return Response(ApiError(code, first), status_code=status)


def _ledger_error(_: Request[Any, Any, Any], exc: Exception) -> Response[ApiError]:
    if isinstance(exc, UnknownEntity):
        return _error(404, "unknown_entity", str(exc))
    if isinstance(exc, (InvalidQuery, InvalidInput)):
        return _error(400, "invalid_query", str(exc))
    if isinstance(exc, NeedsEventStore):
        return _error(503, "needs_event_store", str(exc))
    return _error(503, "unavailable", f"{type(exc).__name__}: {exc}")


def _internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[ApiError]:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return _error(500, "internal", f"{type(exc).__name__}: {exc}")


def _http_error(_: Request[Any, Any, Any], exc: Exception) -> Response[ApiError]:
    if isinstance(exc, ValidationException):
        extra = exc.extra if isinstance(exc.extra, list) else []
        found = [f"{e.get('key')}: {e.get('message')}" for e in extra if isinstance(e, dict)]
        return _error(400, "invalid_query", "; ".join(found) or str(exc.detail))
    if isinstance(exc, NotFoundException):
        return _error(404, "not_found", str(exc.detail))
    assert isinstance(exc, HTTPException)
    return _error(exc.status_code, "http_error", str(exc.detail))


# --- the JSON API ---------------------------------------------------------------------


@get("/api/agents")
async def agents(ledger: Deps, pool: Text = None, health: Text = None, platform: Text = None,
                 region: Text = None, as_of_: AsOfParam = None, limit: LimitParam = None, offset: Offset = 0,
                 after: Text = None) -> Page[AgentView]:
    async with ledger.asking() as q:
        return await q.agents(pool=pool, health=health, platform=platform, region=region, as_of=as_of(as_of_),
                              limit=limit, offset=offset, after=after)


@get("/api/sessions")
async def sessions(ledger: Deps, pool: Text = None, state_: StateParam = None, owner: Text = None,
                   as_of_: AsOfParam = None, limit: LimitParam = None, offset: Offset = 0,
                   after: Text = None) -> Page[SessionView]:
    async with ledger.asking() as q:
        return await q.sessions(pool=pool, state=state_, owner=owner, as_of=as_of(as_of_), limit=limit,
                                offset=offset, after=after)


@get("/api/routes")
async def routes(ledger: Deps, session: Text = None, status: Text = None, state_: StateParam = None,
                 as_of_: AsOfParam = None, limit: LimitParam = None, offset: Offset = 0,
                 after: Text = None) -> Page[RouteView]:
    async with ledger.asking() as q:
        return await q.routes(session=session, status=status, state=state_, as_of=as_of(as_of_), limit=limit,
                              offset=offset, after=after)


@get("/api/pools")
async def pools(ledger: Deps, as_of_: AsOfParam = None) -> Page[PoolView]:
    async with ledger.asking() as q:
        return await q.pools(as_of=as_of(as_of_))


@get("/api/anomalies")
async def anomalies(ledger: Deps, kind: Text = None, entity_kind: Text = None,
                    entity_id: Text = None, limit: FromQuery[int] = 100, offset: Offset = 0,
                    as_of_: AsOfParam = None) -> Page[AnomalyRecord]:
    async with ledger.asking() as q:
        return await q.anomalies(kind=kind, entity_kind=entity_kind, entity_id=entity_id, limit=limit,
                                        offset=offset, as_of=as_of(as_of_))


@get("/api/history/{kind:str}/{entity_id:str}")
async def history(ledger: Deps, kind: FromPath[str], entity_id: FromPath[str],
                  as_of_: AsOfParam = None) -> EntityHistory:
    async with ledger.asking() as q:
        return await q.history(kind, entity_id, as_of=as_of(as_of_))


@get("/api/why/{kind:str}/{entity_id:str}")
async def why_chain(ledger: Deps, kind: FromPath[str], entity_id: FromPath[str], at: Text = None,
                    at_seq: FromQuery[int | None] = None) -> Chain:
    """The chain of causes behind the entity's state (`ledger why`): now, at a time, or after a LEDGER sequence."""
    if at is not None and at_seq is not None:
        raise InvalidQuery("use at or at_seq, not both")
    return await why(ledger.parts.store, kind, entity_id, seq=at_seq, time=parse_time(at) if at else None)


@get("/api/events/recent")
async def recent_events(ledger: Deps) -> list[StoredEvent]:
    """The newest lifecycle items this process applied, newest last."""
    return list(ledger.feed.recent)


@get("/api/events")
async def events(ledger: Deps, heartbeats: FromQuery[bool] = False) -> ServerSentEvent:
    """One server-sent event per stored item the follower applies (heartbeats only if asked)."""

    async def stream() -> AsyncIterator[ServerSentEventMessage]:
        yield ServerSentEventMessage(event="hello", data="{}", comment="ledger events")
        async for e in ledger.feed.subscribe(heartbeats=heartbeats):
            yield ServerSentEventMessage(event="stored", id=f"{e.stream}:{e.seq}",
                                         data=msgspec.json.encode(e).decode())

    return ServerSentEvent(stream())


# --- operations -----------------------------------------------------------------------


@get("/metrics", media_type=CONTENT_TYPE_LATEST, include_in_schema=False)
async def metrics(ledger: Deps) -> Response[bytes]:
    return Response(await ledger.metrics(), media_type=CONTENT_TYPE_LATEST)


class Health(msgspec.Struct, frozen=True):
    status: str
    committed: dict[str, int] = {}


@get("/healthz")
async def healthz() -> Health:
    """The process is up."""
    return Health("ok")


@get("/readyz")
async def readyz(ledger: Deps) -> Response[Health]:
    """200 once the projector has caught up with the streams; 503 before."""
    ready = ledger.parts.projector.caught_up.is_set()
    return Response(Health("ready" if ready else "catching up", dict(ledger.parts.projector.committed)),
                    status_code=200 if ready else 503)


# --- the dashboard --------------------------------------------------------------------


@get(["/", "/entity/{kind:str}/{entity_id:str}"], media_type=MediaType.HTML, include_in_schema=False)
async def dashboard() -> Response[bytes]:
    return Response((STATIC / "index.html").read_bytes(), media_type=MediaType.HTML)


def create_app(parts: Parts) -> Litestar:
    ledger = AppState(parts)
    app = Litestar(
        route_handlers=[agents, sessions, routes, pools, anomalies, history, why_chain, recent_events, events, metrics,
                        healthz, readyz, dashboard,
                        create_static_files_router(path="/static", directories=[STATIC], include_in_schema=False)],
        dependencies={"ledger": Provide(lambda: ledger, sync_to_thread=False)},
        signature_namespace={"AppState": AppState, "Deps": Deps, "Text": Text},
        exception_handlers={LedgerError: _ledger_error, HTTPException: _http_error, Exception: _internal_error},
        # The process's logging is the command's (`-v`, `--log-format json`): Litestar's default config would take
        # over the root logger's format and level.
        logging_config=None,
        # The document as JSON only: Litestar's HTML viewers would load their scripts from a CDN.
        openapi_config=OpenAPIConfig(title="session ledger", version="0.1.0", path="/schema",
                                     render_plugins=[JsonRenderPlugin(path=["/", "/openapi.json"])]),
        debug=False,
    )
    app.state.ledger = ledger
    return app
