"""The NATS query service: the `Query` API as a NATS micro service, for any machine that reaches the bus.

    async with QueryService.start(store, query) as service:   # query: a Query on the projection file
        await stop.wait()

One endpoint per view on `ledger-query.<view>` (query_protocol.py), all in one queue group, so any number of
replicas share the load and `$SRV.PING.ledger-query` finds them all. Each request is decoded into its frozen
Struct, answered by the `Query` (now from the projection file, the past and histories from the event store),
and the answer is the Struct `Query` returned, JSON-encoded. Whatever the request holds, the answer is a reply
or a micro-service error (code + one line): a request never stops the service.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.micro import add_service
from nats.micro.request import Request, ServiceError
from nats.micro.service import Service

from ledger.connection import GONE
from ledger.errors import InvalidInput, LedgerError, StoreError
from ledger.store import EventStore
from projections.errors import DatabaseMissing, NeedsEventStore, NotCaughtUp, UnknownEntity
from projections.query import Query

from . import query_protocol as qp

log = logging.getLogger(__name__)

MAX_MESSAGE = 300
"""Longest error message sent back (a header line)."""

Answer = Callable[[Query, Any], Awaitable[msgspec.Struct]]


def one_line(text: str) -> str:
    """A header value: no CR/LF (they would end the header block), bounded."""
    line = " ".join(str(text).split())
    return line if len(line) <= MAX_MESSAGE else line[:MAX_MESSAGE - 3] + "..."


def _agents(q: Query, r: qp.AgentsRequest) -> Awaitable[msgspec.Struct]:
    return q.agents(pool=r.pool, health=r.health, platform=r.platform, region=r.region, as_of=r.when(), now=r.now,
                    limit=r.limit, offset=r.offset, after=r.after)


def _sessions(q: Query, r: qp.SessionsRequest) -> Awaitable[msgspec.Struct]:
    return q.sessions(pool=r.pool, state=r.state, owner=r.owner, as_of=r.when(), now=r.now, limit=r.limit,
                      offset=r.offset, after=r.after)


def _routes(q: Query, r: qp.RoutesRequest) -> Awaitable[msgspec.Struct]:
    return q.routes(session=r.session, status=r.status, state=r.state, as_of=r.when(), now=r.now, limit=r.limit,
                    offset=r.offset, after=r.after)


def _pools(q: Query, r: qp.PoolsRequest) -> Awaitable[msgspec.Struct]:
    return q.pools(as_of=r.when(), now=r.now)


def _anomalies(q: Query, r: qp.AnomaliesRequest) -> Awaitable[msgspec.Struct]:
    return q.anomalies(kind=r.kind, entity_kind=r.entity_kind, entity_id=r.entity_id, limit=r.limit, offset=r.offset,
                       as_of=r.when())


def _history(q: Query, r: qp.HistoryRequest) -> Awaitable[msgspec.Struct]:
    return q.history(r.kind, r.entity_id, as_of=r.when())


ANSWERS: dict[str, Answer] = {"agents": _agents, "sessions": _sessions, "routes": _routes, "pools": _pools,
                              "anomalies": _anomalies, "history": _history}
DECODERS = {view: msgspec.json.Decoder(cls) for view, cls in qp.REQUESTS.items()}
"""One decoder per request type, made once."""


def error_of(e: BaseException) -> ServiceError:
    """The micro-service error a failed request is answered with: the one place codes are chosen."""
    if isinstance(e, (msgspec.DecodeError, msgspec.ValidationError)):
        return ServiceError(qp.BAD_REQUEST, one_line(f"bad request: {e}"))
    if isinstance(e, RecursionError):
        return ServiceError(qp.BAD_REQUEST, "bad request: JSON nested too deeply")
    if isinstance(e, UnknownEntity):
        return ServiceError(qp.UNKNOWN_ENTITY, one_line(str(e)))
    if isinstance(e, InvalidInput):  # InvalidQuery: a bad filter, time or sequence
        return ServiceError(qp.BAD_REQUEST, one_line(str(e)))
    if isinstance(e, (DatabaseMissing, NeedsEventStore, NotCaughtUp, StoreError, NatsError, TimeoutError)):
        return ServiceError(qp.NOT_READY, one_line(f"not ready: {str(e) or type(e).__name__}"))
    if isinstance(e, LedgerError):
        return ServiceError(qp.NOT_READY, one_line(str(e)))
    return ServiceError(qp.BUG, one_line(f"internal error (a bug): {type(e).__name__}: {e}"))


class QueryService:
    """The endpoints of one replica. `query` may be replaced while serving (a projection file that appears)."""

    def __init__(self, nc: NATS, query: Query | None, *, not_ready: str = "no projection file yet") -> None:
        self.nc = nc
        self.query = query
        self.not_ready = not_ready
        self.service: Service | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls, store: EventStore | NATS, query: Query | None, *, not_ready: str = "no projection file yet",
                    ) -> AsyncIterator[QueryService]:
        """Serve `query` (None: answer 503 `not_ready` until `.query` is set) on the store's connection."""
        nc = store.nc if isinstance(store, EventStore) else store
        self = cls(nc, query, not_ready=not_ready)
        self.service = await add_service(nc, name=qp.SERVICE_NAME, version=qp.SERVICE_VERSION,
                                         description="The session ledger's views: now, as of the past, histories.",
                                         queue_group=qp.QUEUE_GROUP)
        try:
            for view in qp.VIEWS:
                await self.service.add_endpoint(name=view, subject=qp.query_subject(view), handler=self._handler(view),
                                                metadata={"request": qp.REQUESTS[view].__name__})
            await nc.flush()
            yield self
        finally:
            with contextlib.suppress(*GONE):  # a closed connection has nothing left to unsubscribe
                await self.service.stop()

    @property
    def id(self) -> str:
        assert self.service is not None
        return self.service.id

    def _handler(self, view: str) -> Callable[[Request], Awaitable[None]]:
        async def handle(req: Request) -> None:
            if not req._msg.reply:  # a publish, not a request: nobody to answer
                return
            try:
                payload = await self.answer(view, req.data)
            except Exception as e:  # every failure is an answer (RecursionError is an Exception too)
                error = error_of(e)
                if error.code == qp.BUG:
                    log.exception("query %s failed", view)
                raise error from None  # nats.micro answers it and counts it in STATS
            if len(payload) > self.nc.max_payload:
                raise ServiceError(qp.TOO_LARGE, f"answer of {len(payload)} bytes exceeds the server's max_payload "
                                                 f"({self.nc.max_payload}): narrow the filters or lower the limit")
            await req.respond(payload, headers={qp.SERVED_BY: self.id})
        return handle

    async def answer(self, view: str, body: bytes) -> bytes:
        """The encoded answer to one request body, or the error it fails with."""
        request = DECODERS[view].decode(body or b"{}")
        query = self.query
        if query is None:
            raise DatabaseMissing(self.not_ready)
        return msgspec.json.encode(await ANSWERS[view](query, request))
