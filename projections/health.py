"""Health, derived at query time from stored state, the newest beat and an explicit `now`.

Nothing here is stored: the same state gives a different health a minute
later, and a view "as of" a past moment simply passes that moment as `now`.
The rules, in order (the first that applies wins):

1. the lifecycle status written to the log: gone, dead, drained, draining;
2. time: no beat (nor registration) within the agent's `ttl` (or the policy's `dead_after`) -> dead;
3. a suspicion (agent.suspected) with no beat after it: suspect;
4. time: `suspect_after_missed` heartbeat intervals without a beat -> suspect;
   otherwise alive.

Rules 2-4 are `assess`, the one liveness assessment: the views, the liveness
monitor (what to declare), the reclaimer and self-claiming agents (who may
take sessions) all call it, with the one `HealthPolicy` the operator chose
(`--suspect-after`, `--dead-after`, or LEDGER_SUSPECT_AFTER_MISSED and
LEDGER_DEAD_AFTER). Each answer of `agent_health` comes with the rule that made it so, in words.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta

import msgspec

from ledger.codec import from_ns
from ledger.events import MAX_COUNT, Probe
from ledger.lifecycle import A_DEAD, A_DRAINED, A_DRAINING, A_FENCED, A_GONE, AgentState, RouteState
from ledger.settings import settings_from_env

from .beats import Beat, of_incarnation
from .timespec import aware

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
    """How time turns into health (brief section 4); the agent's own interval and ttl apply.

    The one liveness policy: every component that judges an agent by time takes it.
    """

    suspect_after_missed: int = 3
    dead_after: float | None = None
    """Overrides every agent's registered `ttl` when set (counterfactual "what if" views)."""

    def __post_init__(self) -> None:
        if self.suspect_after_missed < 1:
            raise ValueError(f"suspect_after_missed must be at least 1, got {self.suspect_after_missed}")
        if self.dead_after is not None and self.dead_after <= 0:
            raise ValueError(f"dead_after must be positive, got {self.dead_after}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> HealthPolicy:
        """Defaults, then LEDGER_SUSPECT_AFTER_MISSED and LEDGER_DEAD_AFTER, then `overrides` (None ignored)."""
        return settings_from_env(cls, "LEDGER_", env, overrides, what="liveness policy")


DEFAULT_POLICY = HealthPolicy()


class Liveness(msgspec.Struct, frozen=True, kw_only=True):
    """What time says about an agent the log calls alive (or draining) at one moment: `assess`'s answer."""

    health: str
    """DEAD (silent past `dead_after`), SUSPECT (a standing suspicion, or `overdue`) or ALIVE."""
    age: float
    """Seconds since its newest beat (of its registered incarnation), or since it registered."""
    since_beat: bool
    """Whether `age` runs from a beat (False: from the registration)."""
    missed: int
    """Whole heartbeat intervals in `age`."""
    overdue: bool
    """`missed` reached the policy's `suspect_after_missed` (whether or not it was suspected yet)."""
    suspected: bool
    """A suspicion was written and no beat came after it."""
    dead_after: float
    """The bound that applied: the policy's `dead_after`, else the agent's own ttl."""


def assess(agent: AgentState, last_beat: datetime | None, now: datetime, policy: HealthPolicy = DEFAULT_POLICY
           ) -> Liveness:
    """The one liveness assessment of `agent` at `now`, from the stored time of its newest beat.

    `last_beat` must be a beat of the agent's registered incarnation (`beats.of_incarnation`); None when it
    never beat. Times are the server's (stored times), so an agent's clock skew does not matter.
    """
    since = last_beat if last_beat is not None else agent.registered_at
    age = seconds_between(since, now)
    dead_after = _dead_after(agent, policy)
    interval = agent.heartbeat_interval
    missed = _missed(age, interval)
    suspected = agent.suspected_at is not None and (last_beat is None or aware(last_beat) <= aware(agent.suspected_at))
    overdue = interval > 0 and missed >= policy.suspect_after_missed
    health = DEAD if age > dead_after else SUSPECT if suspected or overdue else ALIVE
    return Liveness(health=health, age=age, since_beat=last_beat is not None, missed=missed, overdue=overdue,
                    suspected=suspected, dead_after=dead_after)


def turns(agent: AgentState, last_beat: datetime | None, policy: HealthPolicy = DEFAULT_POLICY
          ) -> tuple[datetime | None, datetime | None]:
    """When time alone turns `assess`'s answer for this state: (overdue from, DEAD from); None: never.

    Reckoned as `assess` reckons (from the newest beat, else the registration). Never later than the turn, and
    a few microseconds earlier at most (the clock counts microseconds, the bounds are floats): a caller that
    looks at one of these moments and finds the answer not turned yet looks again just after. So a consumer can
    wake when an agent turns instead of assessing every agent on every tick, and still agree with every view.
    """
    since = aware(last_beat if last_beat is not None else agent.registered_at)
    interval = agent.heartbeat_interval
    return (_after(since, interval * policy.suspect_after_missed) if interval > 0 else None,
            _after(since, _dead_after(agent, policy)))


def _missed(age: float, interval: float) -> int:
    """Whole intervals in `age`. The codec lets an interval be as small as a float can be: `age // 5e-324` is
    infinite, and counts as the most a count can be (int(inf) would stop every consumer that judges it)."""
    if not interval > 0:
        return 0
    n = age // interval
    return int(n) if n < MAX_COUNT else MAX_COUNT


TURN_SLACK = timedelta(microseconds=2)
"""How early `turns` answers: more than rounding a float of seconds to microseconds can move a moment."""


def _after(since: datetime, seconds: float) -> datetime | None:
    try:
        return since + timedelta(seconds=seconds) - TURN_SLACK
    except OverflowError:  # beyond the calendar: never
        return None


def _dead_after(agent: AgentState, policy: HealthPolicy) -> float:
    return policy.dead_after if policy.dead_after is not None else agent.ttl


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
    live = assess(agent, beat_time(beat) if beat is not None else None, now, policy)
    if not beats_known:  # time says nothing without the beats; a written suspicion still stands
        if live.suspected:
            return SUSPECT, _suspected(agent)
        return UNKNOWN, "no heartbeat history is kept for this moment"
    age, dead_after, interval = live.age, live.dead_after, agent.heartbeat_interval
    if live.health == DEAD:
        if not live.since_beat:
            return DEAD, f"no heartbeat since registering {human(age)} ago (dead after {human(dead_after)})"
        return DEAD, f"no heartbeat for {human(age)} (dead after {human(dead_after)})"
    if live.suspected:
        return SUSPECT, _suspected(agent)
    if live.overdue:
        return SUSPECT, (f"{live.missed} missed heartbeats (last {'beat' if live.since_beat else 'registration'} "
                         f"{human(age)} ago, every {human(interval)}; suspect after {policy.suspect_after_missed})")
    if not live.since_beat:
        return ALIVE, f"registered {human(age)} ago, no heartbeat yet"
    return ALIVE, f"heartbeat {human(age)} ago"


def _suspected(agent: AgentState) -> str:
    return f"suspected: {agent.suspect_reason}" if agent.suspect_reason else "suspected"


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
