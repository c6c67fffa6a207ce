"""`RemoteQuery`: the `Query` API answered by the NATS query service (query_service.py) - same methods, same types.

    remote = await RemoteQuery.find(nc)          # None when no replica answers $SRV.PING.ledger-query
    page = await remote.sessions(owner="a-17")   # a Page[SessionView], as Query.sessions returns

The position's `source` says which replica answered, so a view printed from it tells where it came from.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER

from ledger.errors import LedgerError
from ledger.store import EventStore
from projections.errors import InvalidQuery, UnknownEntity
from projections.history import EntityHistory
from projections.query import AsOf
from projections.state import AnomalyRecord
from projections.views import AgentView, Page, PoolView, RouteView, SessionView

from . import query_protocol as qp

FIND_TIMEOUT = 2.0
"""How long `find` waits for a replica's PING answer (no responders at all is known at once)."""
TIMEOUT = 30.0
"""How long a query may take: the past is rebuilt from a snapshot plus a replay."""


class QueryServiceError(LedgerError):
    """The query service did not answer, or answered with an error that is not the caller's mistake."""


_DECODERS = {view: msgspec.json.Decoder(t) for view, t in qp.REPLIES.items()}
_PING = msgspec.json.Decoder(dict[str, Any])


class RemoteQuery:
    """Asks the query service; raises what `Query` raises for the caller's mistakes (InvalidQuery, UnknownEntity)."""

    def __init__(self, nc: NATS, *, timeout: float = TIMEOUT, where: str = "") -> None:
        self.nc = nc
        self.timeout = timeout
        self.where = where or (nc.connected_url.netloc if nc.connected_url else "NATS")

    @classmethod
    async def find(cls, on: EventStore | NATS, *, timeout: float = FIND_TIMEOUT, query_timeout: float = TIMEOUT
                   ) -> RemoteQuery | None:
        """A RemoteQuery (on the store's connection, or `on` itself) if a replica answers
        `$SRV.PING.ledger-query`, else None."""
        nc = on.nc if isinstance(on, EventStore) else on
        try:
            reply = await nc.request(f"$SRV.PING.{qp.SERVICE_NAME}", b"", timeout=timeout)
            ping = _PING.decode(reply.data)
        except (NoRespondersError, NatsTimeout, msgspec.DecodeError):
            return None
        return cls(nc, timeout=query_timeout) if ping.get("name") == qp.SERVICE_NAME else None

    async def _ask(self, view: str, **fields: Any) -> Any:
        # None is a field's default, but for a limit it says "all" (the anomalies' default is 100)
        request = qp.REQUESTS[view](**{k: v for k, v in fields.items() if v is not None or k == "limit"})
        try:
            reply = await self.nc.request(qp.query_subject(view), msgspec.json.encode(request), timeout=self.timeout)
        except NoRespondersError:
            raise QueryServiceError(f"no query service answers on NATS at {self.where}: run `ledger up` "
                                    "(or `ledger query-service`)") from None
        except NatsTimeout:
            raise QueryServiceError(f"the query service did not answer {view} within {self.timeout:g} s") from None
        except NatsError as e:
            raise QueryServiceError(f"asking the query service failed: {e}") from None
        headers = reply.headers or {}
        if ERROR_CODE_HEADER in headers:
            code, message = headers[ERROR_CODE_HEADER], headers.get(ERROR_HEADER, "")
            if code == qp.BAD_REQUEST:
                raise InvalidQuery(message)
            if code == qp.UNKNOWN_ENTITY:
                raise UnknownEntity(message)
            raise QueryServiceError(f"the query service answered {code}: {message}")
        try:
            found = _DECODERS[view].decode(reply.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise QueryServiceError(f"the query service's answer to {view} is not a {view} reply: {e}") from None
        if isinstance(found, Page):  # say who answered, as a local view says "projection"
            by = headers.get(qp.SERVED_BY, "?")
            source = f"query service {qp.SERVICE_NAME} {by} via {self.where} ({found.position.source})"
            found = Page(msgspec.structs.replace(found.position, source=source), found.items, found.total)
        return found

    async def agents(self, *, pool: str | None = None, health: str | None = None, platform: str | None = None,
                     region: str | None = None, as_of: AsOf = None, now: datetime | None = None,
                     limit: int | None = None, offset: int = 0, after: str | None = None) -> Page[AgentView]:
        found: Page[AgentView] = await self._ask("agents", pool=pool, health=health, platform=platform,
                                                 region=region, now=now, limit=limit, offset=offset, after=after,
                                                 **qp.as_of_fields(as_of))
        return found

    async def sessions(self, *, pool: str | None = None, state: str | None = None, owner: str | None = None,
                       as_of: AsOf = None, now: datetime | None = None, limit: int | None = None, offset: int = 0,
                       after: str | None = None) -> Page[SessionView]:
        found: Page[SessionView] = await self._ask("sessions", pool=pool, state=state, owner=owner, now=now,
                                                   limit=limit, offset=offset, after=after, **qp.as_of_fields(as_of))
        return found

    async def routes(self, *, session: str | None = None, status: str | None = None, state: str | None = None,
                     as_of: AsOf = None, now: datetime | None = None, limit: int | None = None, offset: int = 0,
                     after: str | None = None) -> Page[RouteView]:
        found: Page[RouteView] = await self._ask("routes", session=session, status=status, state=state, now=now,
                                                 limit=limit, offset=offset, after=after, **qp.as_of_fields(as_of))
        return found

    async def pools(self, *, as_of: AsOf = None, now: datetime | None = None) -> Page[PoolView]:
        found: Page[PoolView] = await self._ask("pools", now=now, **qp.as_of_fields(as_of))
        return found

    async def anomalies(self, *, kind: str | None = None, entity_kind: str | None = None,
                        entity_id: str | None = None, limit: int | None = 100, offset: int = 0,
                        as_of: AsOf = None) -> Page[AnomalyRecord]:
        found: Page[AnomalyRecord] = await self._ask("anomalies", kind=kind, entity_kind=entity_kind,
                                                     entity_id=entity_id, limit=limit, offset=offset,
                                                     **qp.as_of_fields(as_of))
        return found

    async def history(self, kind: str, entity_id: str, *, as_of: AsOf = None) -> EntityHistory:
        found: EntityHistory = await self._ask("history", kind=kind, entity_id=entity_id, **qp.as_of_fields(as_of))
        return found
