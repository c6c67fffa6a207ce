"""Health, derived at query time from stored state, the newest beat and an explicit `now`.

Nothing here is stored: the same state gives a different health a minute
later, and a view "as of" a past moment simply passes that moment as `now`.
The rules, in order (the first that applies wins):

1. the lifecycle status written to the log: gone, dead, drained, draining;
2. a suspicion (agent.suspected) with no beat after it: suspect;
3. time: no beat (nor registration) within the agent's `ttl` -> dead;
   `suspect_after_missed` heartbeat intervals without one -> suspect;
   otherwise alive.

Each answer comes with the rule that made it so, in words.
"""

from __future__ import annotations

from datetime import datetime, timezone

import msgspec

from ledger.codec import from_ns
from ledger.events import Probe
from ledger.lifecycle import A_DEAD, A_DRAINED, A_DRAINING, A_FENCED, A_GONE, AgentState, RouteState

from .beats import Beat, of_incarnation

ALIVE, SUSPECT, DEAD, DRAINING, DRAINED, GONE = "alive", "suspect", "dead", "draining", "drained", "gone"
FENCED = "fenced"
UNKNOWN = "unknown"
"""No heartbeat history exists for the moment asked about (older than the heartbeat stream keeps)."""
AGENT_HEALTH = (ALIVE, SUSPECT, DEAD, DRAINING, DRAINED, GONE, FENCED, UNKNOWN)

HEALTHY, UNHEALTHY = "healthy", "unhealthy"
ROUTE_HEALTH = (HEALTHY, UNHEALTHY, UNKNOWN)

_EXPLICIT = {A_GONE: GONE, A_DEAD: DEAD, A_DRAINED: DRAINED, A_DRAINING: DRAINING, A_FENCED: FENCED}
_DEFAULT_PROBE = Probe()


class HealthPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """How time turns into health (brief section 4); the agent's own interval and ttl apply."""

    suspect_after_missed: int = 3
    dead_after: float | None = None
    """Overrides every agent's registered `ttl` when set (counterfactual "what if" views)."""

    def __post_init__(self) -> None:
        if self.suspect_after_missed < 1:
            raise ValueError(f"suspect_after_missed must be at least 1, got {self.suspect_after_missed}")
        if self.dead_after is not None and self.dead_after <= 0:
            raise ValueError(f"dead_after must be positive, got {self.dead_after}")


DEFAULT_POLICY = HealthPolicy()


def aware(when: datetime) -> datetime:
    """Treat a naive time (a producer that left out the offset) as UTC, so arithmetic never fails."""
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def seconds_between(earlier: datetime, later: datetime) -> float:
    return max(0.0, (aware(later) - aware(earlier)).total_seconds())


def human(seconds: float) -> str:
    """41s, 5m03s, 2h05m, 3d04h."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def beat_time(beat: Beat) -> datetime:
    return from_ns(beat.stored_ns)


def agent_health(agent: AgentState, beat: Beat | None, now: datetime, policy: HealthPolicy = DEFAULT_POLICY,
                 *, beats_known: bool = True) -> tuple[str, str]:
    """(health, the rule that made it so) for one agent at `now`.

    Only the beat of the agent's registered incarnation counts (a beat naming
    any other, stale or forged, says nothing about this one). Pass
    `beats_known=False` when no heartbeat history exists for `now`.
    """
    explicit = _EXPLICIT.get(agent.status)
    if explicit is not None:
        return explicit, agent.reason
    beat = of_incarnation(beat, agent.incarnation)
    last_beat = beat_time(beat) if beat is not None else None
    if agent.suspected_at is not None and (last_beat is None or last_beat <= aware(agent.suspected_at)):
        return SUSPECT, f"suspected: {agent.suspect_reason}" if agent.suspect_reason else "suspected"
    if not beats_known:
        return UNKNOWN, "no heartbeat history is kept for this moment"
    age = seconds_between(last_beat or agent.registered_at, now)
    dead_after = policy.dead_after if policy.dead_after is not None else agent.ttl
    if age > dead_after:
        if last_beat is None:
            return DEAD, f"no heartbeat since registering {human(age)} ago (dead after {human(dead_after)})"
        return DEAD, f"no heartbeat for {human(age)} (dead after {human(dead_after)})"
    interval = agent.heartbeat_interval
    missed = int(age // interval) if interval > 0 else 0
    if missed >= policy.suspect_after_missed:
        return SUSPECT, (f"{missed} missed heartbeats (last {'beat' if last_beat else 'registration'} "
                         f"{human(age)} ago, every {human(interval)}; suspect after {policy.suspect_after_missed})")
    if last_beat is None:
        return ALIVE, f"registered {human(age)} ago, no heartbeat yet"
    return ALIVE, f"heartbeat {human(age)} ago"


class RouteHealth(msgspec.Struct, frozen=True):
    health: str
    """healthy, unhealthy, or unknown (never probed)."""
    stale: bool
    """The last probe is older than the route's `probe.stale_after`."""
    age: float | None


def route_health(route: RouteState, now: datetime) -> RouteHealth:
    if route.healthy is None or route.health_checked_at is None:
        return RouteHealth(UNKNOWN, False, None)
    age = seconds_between(route.health_checked_at, now)
    stale_after = (route.probe or _DEFAULT_PROBE).stale_after
    return RouteHealth(HEALTHY if route.healthy else UNHEALTHY, age > stale_after, age)
