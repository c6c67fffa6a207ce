"""The liveness monitor's rules: pure, from an agent's state, its newest beat, reports and `now` to a verdict.

* suspect  - `suspect_after_missed` heartbeat intervals without a beat, or
             `report_threshold` usage-time failure reports inside `report_window`, from as many
             reporters (one client reporting again and again is one report: its newest);
* dead     - no beat for `dead_after` seconds (default: the agent's own ttl).

Time is judged by `projections.health.assess` under the settings' `policy`, the one liveness assessment the
views, the reclaimer and self-claiming agents call too: what the monitor declares is what they show and act on.
`judgement` also says when the verdict may next be another (`health.turns`, a report leaving its window), so
the monitor judges an agent when it changes or turns, not on every tick.

Beats, registrations and suspicions are timed by the server's clock (when they
were stored), so an agent's clock skew - or a forged `time` - does not matter;
only the beat of the agent's registered incarnation counts. A verdict carries its evidence and an event id
derived from that evidence: replicas of the monitor that reach the same verdict
write the same event id, which JetStream de-duplicates - a death is declared once.

The pool breaker: before a death would make more than `breaker_share` of a
pool's agents die inside `breaker_window`, the breaker trips (orphaning stops);
it resets when the pool has recovered and no agent died for a window.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

import msgspec
from msgspec.structs import replace

from ledger import events as ev
from ledger import lifecycle as lc
from projections.health import DEAD as HEALTH_DEAD
from projections.health import HealthPolicy, Liveness, assess, turns
from projections.timespec import aware

SUSPECT, DEAD = "suspect", "dead"
MISSED_HEARTBEATS, UNREACHABLE_REPORTS = "missed_heartbeats", "unreachable_reports"


class LivenessSettings(msgspec.Struct, frozen=True, kw_only=True):
    policy: HealthPolicy = HealthPolicy()
    """When silence makes an agent suspect and dead: the one policy, which the reclaimer is given too."""
    report_threshold: int = 3
    report_window: float = 60.0
    grace: float = 10.0
    """Seconds after the monitor's (re)connect or a stream leader change during which it declares nothing."""
    breaker_share: float = 0.5
    breaker_window: float = 60.0
    breaker_min_agents: int = 3

    def __post_init__(self) -> None:
        if self.report_threshold < 1 or self.breaker_min_agents < 1:
            raise ValueError("report_threshold and breaker_min_agents must be at least 1")
        if not 0 < self.breaker_share < 1:
            raise ValueError(f"breaker_share must be between 0 and 1, got {self.breaker_share}")
        for name in ("report_window", "grace", "breaker_window"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")


class LastBeat(msgspec.Struct, frozen=True):
    """The newest heartbeat of the agent's current incarnation, as stored."""

    seq: int
    stored_at: datetime


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    kind: str
    reason: str
    evidence: ev.Evidence
    event_id: str


def judge(agent: lc.AgentState, beat: LastBeat | None, reports: Sequence[tuple[int, datetime]], now: datetime,
          settings: LivenessSettings, decided_by: str = "") -> Verdict | None:
    """Suspect or dead, with evidence - or None while the agent is fine (or already judged)."""
    return judgement(agent, beat, reports, now, settings, decided_by)[0]


def judgement(agent: lc.AgentState, beat: LastBeat | None, reports: Sequence[tuple[int, datetime]], now: datetime,
              settings: LivenessSettings, decided_by: str = "") -> tuple[Verdict | None, datetime | None]:
    """`judge`'s verdict at `now`, and the next moment at which it may be another for this same state.

    None for the moment: time alone will not change it - only a change to the agent, its beat or its reports
    can. Until that moment the verdict's event id stays what it is at `now`, so judging an agent then and
    whenever it changes writes what judging it on every tick would (the monitor keeps one deadline per agent).
    The moments are `health.turns` (overdue, dead) and a report leaving `report_window`.
    """
    if agent.status not in (lc.A_ALIVE, lc.A_DRAINING):
        return None, None
    stored = beat.stored_at if beat else None
    live = assess(agent, stored, now, settings.policy)
    if live.health == HEALTH_DEAD:
        return _verdict(DEAD, agent, beat, live, now, settings, decided_by), None  # dead stays dead
    overdue_at, dead_at = turns(agent, stored, settings.policy)
    soonest = now + _MICROSECOND  # a turn not reached yet, though `turns` may answer a little early
    moments = [max(dead_at, soonest)] if dead_at is not None else []
    if live.suspected:
        return None, min(moments, default=None)  # suspected: nothing more until dead (or a beat, a change)
    if live.overdue:
        return _verdict(SUSPECT, agent, beat, live, now, settings), min(moments, default=None)
    if overdue_at is not None:
        moments.append(max(overdue_at, soonest))
    recent = _recent(reports, now, settings)
    if len(recent) < settings.report_threshold:
        return None, min(moments, default=None)  # fewer reports only, as time passes
    # the oldest leaving the window makes the verdict name the next one (or no verdict)
    moments.append(min(_leaves_window(at, settings) for _, at in recent))
    verdict = Verdict(kind=SUSPECT, reason=UNREACHABLE_REPORTS,
                      event_id=f"suspect-{agent.agent_id}-{agent.incarnation}-r{recent[0][0]}",
                      evidence=replace(_evidence(agent, beat, live, now, settings), reports=len(recent),
                                       report_window=settings.report_window,
                                       detail=f"{len(recent)} failure reports in {settings.report_window:g}s"))
    return verdict, min(moments)


_MICROSECOND = timedelta(microseconds=1)


def _recent(reports: Sequence[tuple[int, datetime]], now: datetime,
            settings: LivenessSettings) -> list[tuple[int, datetime]]:
    window_start = now - timedelta(seconds=settings.report_window)
    return [(seq, at) for seq, at in reports if aware(at) >= window_start]


def _leaves_window(at: datetime, settings: LivenessSettings) -> datetime:
    """The first moment a report stored `at` is no longer inside `report_window` (as `_recent` reckons)."""
    return _past(at, settings.report_window)


def _past(at: datetime, window: float) -> datetime:
    """The first moment `at` is before `now - window` (where `now - window <= at` stops holding)."""
    return aware(at) + timedelta(seconds=window) + _MICROSECOND


def _evidence(agent: lc.AgentState, beat: LastBeat | None, live: Liveness, now: datetime,
              settings: LivenessSettings) -> ev.Evidence:
    return ev.Evidence(last_heartbeat_at=beat.stored_at if beat else None,
                       last_heartbeat_seq=beat.seq if beat else None, heartbeat_interval=agent.heartbeat_interval,
                       suspect_after_missed=settings.policy.suspect_after_missed, dead_after=live.dead_after,
                       observed_at=now)


def _verdict(kind: str, agent: lc.AgentState, beat: LastBeat | None, live: Liveness, now: datetime,
             settings: LivenessSettings, decided_by: str = "") -> Verdict:
    """The verdict of missed heartbeats: dead, or suspect (overdue)."""
    evidence, age = _evidence(agent, beat, live, now, settings), live.age
    if kind == DEAD:
        since = "a beat" if beat else "registering"
        return Verdict(kind=DEAD, reason=MISSED_HEARTBEATS, event_id=f"dead-{agent.agent_id}-{agent.incarnation}",
                       evidence=replace(evidence, detail=f"{age:.1f}s since {since}; dead after {live.dead_after:g}s"
                                        + (f" (by {decided_by})" if decided_by else "")))
    return Verdict(kind=SUSPECT, reason=MISSED_HEARTBEATS,
                   event_id=f"suspect-{agent.agent_id}-{agent.incarnation}-b{beat.seq if beat else 0}",
                   evidence=replace(evidence, detail=f"{live.missed} heartbeat intervals missed ({age:.1f}s)"))


def overdue(agent: lc.AgentState, beat: LastBeat | None, now: datetime, settings: LivenessSettings) -> bool:
    """Has a live agent missed `suspect_after_missed` heartbeats (whether or not it was suspected yet)?"""
    if agent.status not in (lc.A_ALIVE, lc.A_DRAINING):
        return False
    return assess(agent, beat.stored_at if beat else None, now, settings.policy).overdue


class BreakerCall(msgspec.Struct, frozen=True, kw_only=True):
    trip: bool
    dead: tuple[str, ...] = ()
    agents: int = 0
    reason: str = ""


def breaker_before_death(pool_agents: Iterable[lc.AgentState], deaths: Sequence[tuple[str, datetime]],
                         dying: Iterable[str], now: datetime, settings: LivenessSettings) -> BreakerCall:
    """Would these deaths make too much of the pool die at once? (Asked while the breaker is closed.)

    `deaths` are the pool's recent death declarations (agent id, time);
    `dying` the agents about to be declared dead now, and those overdue with
    them (missed heartbeats) - a pool failing together is caught at its first
    death, before any of its sessions move.
    """
    start = now - timedelta(seconds=settings.breaker_window)
    recent = {agent for agent, at in deaths if aware(at) >= start} | set(dying)
    alive = {a.agent_id for a in pool_agents if a.status in (lc.A_ALIVE, lc.A_DRAINING)}
    population = len(alive | recent)
    share = len(recent) / population if population else 0.0
    if population >= settings.breaker_min_agents and share > settings.breaker_share:
        return BreakerCall(trip=True, dead=tuple(sorted(recent)), agents=population,
                           reason=f"{len(recent)} of {population} agents died within {settings.breaker_window:g}s "
                                  f"(more than {settings.breaker_share:.0%})")
    return BreakerCall(trip=False)


def verdict_events(agent: lc.AgentState, verdict: Verdict, pool: lc.PoolState | None,
                   pool_agents: Iterable[lc.AgentState], deaths: Sequence[tuple[str, datetime]], overdue: set[str],
                   now: datetime, settings: LivenessSettings, producer: ev.Producer) -> list[ev.Event]:
    """What the monitor writes for one verdict, in order: a suspicion; or a death, after the pool's breaker trip
    when this death (with the pool's `overdue` agents and its recent `deaths`) trips it. The monitor writes them
    and `ledger whatif` folds them: one decision for both."""
    if verdict.kind != DEAD:
        return [ev.AgentSuspected(producer=producer, agent_id=agent.agent_id, incarnation=agent.incarnation,
                                  reason=verdict.reason, evidence=verdict.evidence, event_id=verdict.event_id,
                                  causation_id=agent.cause_id)]
    out: list[ev.Event] = []
    if pool is None or not pool.breaker_open:
        call = breaker_before_death(pool_agents, deaths, overdue | {agent.agent_id}, now, settings)
        if call.trip:
            trips = pool.trips if pool else 0
            out.append(ev.PoolBreakerTripped(producer=producer, pool=agent.pool, reason=call.reason, dead=call.dead,
                                             agents=call.agents, window=settings.breaker_window,
                                             threshold=settings.breaker_share,
                                             event_id=f"breaker-{agent.pool}-{trips + 1}"))
    out.append(ev.AgentDeclaredDead(producer=producer, agent_id=agent.agent_id, incarnation=agent.incarnation,
                                    reason=verdict.reason, evidence=verdict.evidence, event_id=verdict.event_id,
                                    causation_id=agent.cause_id))
    return out


def breaker_recovered(pool: lc.PoolState, pool_agents: Iterable[lc.AgentState],
                      deaths: Sequence[tuple[str, datetime]], now: datetime,
                      settings: LivenessSettings) -> str | None:
    """Why an open breaker may close now, or None: enough agents alive again and no death for a window."""
    start = now - timedelta(seconds=settings.breaker_window)
    if any(aware(at) >= start for _, at in deaths):
        return None
    alive = sum(1 for a in pool_agents if a.status == lc.A_ALIVE and a.suspected_at is None)
    needed = max(1, math.ceil(pool.agents_at_trip * (1 - settings.breaker_share)))
    if alive >= needed:
        return f"recovered: {alive} agents alive (needed {needed}), no death for {settings.breaker_window:g}s"
    return None


def breaker_quiet_from(deaths: Iterable[tuple[str, datetime]], settings: LivenessSettings) -> datetime | None:
    """The first moment no death of `deaths` is inside `breaker_window` any more (None: there are none).

    Until then `breaker_recovered` says None whatever the agents do; after it, only its agents' states count.
    """
    return max((_past(at, settings.breaker_window) for _, at in deaths), default=None)
