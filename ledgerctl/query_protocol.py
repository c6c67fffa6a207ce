"""The query service's wire contract: subjects, request and reply types, error codes. Pure, no I/O.

The service (query_service.py), its client (query_client.py) and the server permissions (permissions.py)
all read this one module, so they cannot disagree about a subject or a field.

Subjects are `ledger-query.<view>`: outside `ledger.>` altogether, so no stream's subject filter
(`ledger.<family>.*.*.*`, `ledger.dlq.>`) can capture a query or its reply, nothing parses one as an event,
and the rule that nobody subscribes to `ledger.>` holds for the service too.

Requests are JSON objects decoded into the frozen Structs below (unknown fields refused); an empty body is
`{}`. Replies are the Python `Query` API's own Structs, JSON-encoded. Errors are micro-service errors: the
`Nats-Service-Error-Code` header holds one of the codes below, `Nats-Service-Error` a one-line message.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec

from projections.errors import InvalidQuery
from projections.history import EntityHistory
from projections.query import MAX_LIMIT, AsOf
from projections.state import AnomalyRecord
from projections.views import AgentView, Page, PoolView, RouteView, SessionView

SERVICE_NAME = "ledger-query"
"""The micro service's name: `$SRV.PING.ledger-query` finds every replica."""
SERVICE_VERSION = "1.0.0"
QUEUE_GROUP = "ledger-query"
"""Every replica joins it, so each request is answered once, by any of them."""
QUERY_PREFIX = "ledger-query"
QUERY_SUBJECTS = f"{QUERY_PREFIX}.>"
DISCOVERY_SUBJECTS = "$SRV.>"
"""nats.micro's PING / INFO / STATS subjects."""
SERVED_BY = "Ledger-Query-Served-By"
"""Reply header: the id of the replica that answered."""

BAD_REQUEST = "400"
UNKNOWN_ENTITY = "404"
TOO_LARGE = "413"
BUG = "500"
NOT_READY = "503"

MAX_FILTER = 256
"""Longest filter value accepted: longer is no id or pool name the ledger holds (ledger/ids.py)."""
MAX_SEQ = 2**63 - 1
"""JetStream sequences and SQLite integers are 64-bit."""

Filter = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_FILTER)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ)]
Limit = Annotated[int, msgspec.Meta(ge=1, le=MAX_LIMIT)]  # Query's own bound
Offset = Annotated[int, msgspec.Meta(ge=0, le=MAX_LIMIT)]


def query_subject(view: str) -> str:
    return f"{QUERY_PREFIX}.{view}"


class _Request(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    at_seq: Seq | None = None
    """Just after this LEDGER sequence (the CLI's --at-seq)."""
    as_of: datetime | None = None
    """At this moment (the CLI's --as-of); at most one of at_seq and as_of."""

    def when(self) -> AsOf:
        if self.at_seq is not None and self.as_of is not None:
            raise InvalidQuery("use as_of or at_seq, not both")
        return self.at_seq if self.at_seq is not None else self.as_of


class _ViewRequest(_Request, frozen=True, kw_only=True, forbid_unknown_fields=True):
    now: datetime | None = None
    """Judge health at this moment (default: the service's clock now, or the as-of moment)."""


class _ListRequest(_ViewRequest, frozen=True, kw_only=True, forbid_unknown_fields=True):
    limit: Limit | None = None
    """At most this many items (absent: all); the reply's `total` counts every match."""
    offset: Offset = 0
    after: Filter | None = None
    """Only items whose id sorts after this one (the next page after the last id seen)."""


class AgentsRequest(_ListRequest, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pool: Filter | None = None
    health: Filter | None = None
    platform: Filter | None = None
    region: Filter | None = None


class SessionsRequest(_ListRequest, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pool: Filter | None = None
    state: Filter | None = None
    owner: Filter | None = None


class RoutesRequest(_ListRequest, frozen=True, kw_only=True, forbid_unknown_fields=True):
    session: Filter | None = None
    status: Filter | None = None
    state: Filter | None = None


class PoolsRequest(_ViewRequest, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class AnomaliesRequest(_Request, frozen=True, kw_only=True, forbid_unknown_fields=True):
    kind: Filter | None = None
    entity_kind: Filter | None = None
    entity_id: Filter | None = None
    limit: Limit | None = 100
    """At most this many, newest first (null: all)."""
    offset: Offset = 0


class HistoryRequest(_Request, frozen=True, kw_only=True, forbid_unknown_fields=True):
    kind: Filter
    entity_id: Filter


REQUESTS: dict[str, type[_Request]] = {
    "agents": AgentsRequest, "sessions": SessionsRequest, "routes": RoutesRequest, "pools": PoolsRequest,
    "anomalies": AnomaliesRequest, "history": HistoryRequest}
"""View -> its request Struct; the endpoints, in the order INFO lists them."""
REPLIES: dict[str, Any] = {
    "agents": Page[AgentView], "sessions": Page[SessionView], "routes": Page[RouteView], "pools": Page[PoolView],
    "anomalies": Page[AnomalyRecord], "history": EntityHistory}
"""View -> the type its reply decodes to (what `Query`'s method of that name returns)."""
VIEWS = tuple(REQUESTS)


def as_of_fields(as_of: AsOf) -> dict[str, Any]:
    """The request fields saying `as_of` (a Query argument: None, a sequence or a moment)."""
    if as_of is None:
        return {}
    if isinstance(as_of, datetime):
        return {"as_of": as_of}
    return {"at_seq": as_of}
