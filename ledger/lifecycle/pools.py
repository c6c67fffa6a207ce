"""Pools: the mass-failure breaker of a pool, and the fold of its events."""

from __future__ import annotations

from datetime import datetime

import msgspec

from ledger import events as ev
from ledger.codec import Recorded

from .anomalies import ILLEGAL_TRANSITION, Anomaly, Evolved, writer_problem

_replace = msgspec.structs.replace


class PoolState(msgspec.Struct, frozen=True, kw_only=True):
    pool: str
    breaker_open: bool = False
    since: datetime | None = None
    reason: str = ""
    trips: int = 0
    agents_at_trip: int = 0
    """Agents the pool had when the breaker last tripped (recovery is measured against it)."""
    last_seq: int = 0


def evolve_pool(state: PoolState | None, rec: Recorded) -> Evolved[PoolState | None]:
    """A pool's mass-failure breaker: open (orphaning stopped) or closed."""
    e, seq, at = rec.event, rec.seq, rec.stored_at
    problem = writer_problem(e)
    if problem is not None:
        return state, problem
    current = state or PoolState(pool=e.entity_id)
    match e:
        case ev.PoolBreakerTripped(reason=reason, agents=agents) if not current.breaker_open:
            return _replace(current, breaker_open=True, since=at, reason=reason, trips=current.trips + 1,
                            agents_at_trip=agents, last_seq=seq), None
        case ev.PoolBreakerReset(reason=reason) if current.breaker_open:
            return _replace(current, breaker_open=False, since=at, reason=reason, last_seq=seq), None
    return state, Anomaly(ILLEGAL_TRANSITION, f"{e.type_tag()} while the breaker is "
                                              f"{'open' if current.breaker_open else 'closed'}")
