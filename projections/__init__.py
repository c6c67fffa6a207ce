"""Read models: the ledger folded into agents, sessions, routes, pools and anomalies.

* `LedgerState` (`projections.state`) - the pure, in-memory fold of both streams;
  long-running consumers keep one and react to each `Change`.
* `Projector` - keeps a SQLite file in step with the streams, exactly once.
* `Query` - answers now or as of the past; `rebuild` - from zero.
"""

from .errors import (
    DatabaseBusy,
    DatabaseMissing,
    InvalidQuery,
    NeedsEventStore,
    NotCaughtUp,
    ProjectionError,
    StreamChanged,
    UnknownEntity,
)
from .health import HealthPolicy, agent_health, route_health
from .projector import Projector
from .query import Query
from .rebuild import rebuild
from .settings import ProjectionSettings
from .state import AnomalyRecord, Change, LedgerState

__all__ = [
    "AnomalyRecord",
    "Change",
    "DatabaseBusy",
    "DatabaseMissing",
    "HealthPolicy",
    "InvalidQuery",
    "LedgerState",
    "NeedsEventStore",
    "NotCaughtUp",
    "ProjectionError",
    "ProjectionSettings",
    "Projector",
    "Query",
    "StreamChanged",
    "UnknownEntity",
    "agent_health",
    "rebuild",
    "route_health",
]
