"""The route watchdog's rules: pure, from a route, its session and `now` to the next transition.

    PENDING     -> STARTING          the session has an owner
    STARTING    -> WARMING_UP        the session runs and has its address
                -> FAILED_TO_START   the session ended, or start_timeout passed
    WARMING_UP  -> RUNNING (ACTIVE)  a probe passed since warming up began, or no probe is configured
                -> TERMINATING       initial_delay passed without a passing probe, or the session ended
    RUNNING     -> RUNNING INACTIVE  health stale (policy `deactivate`) or a probe failed
                -> RUNNING ACTIVE    a fresh passing probe after that
                -> TERMINATING       health stale (policy `terminate`), or the session ended
    TERMINATING -> TERMINATED        the session ended, or stop_timeout passed

Every step says why, in words, and names the event that caused it when there is one.

Every time compared here is the server's: `state_since` and `health_checked_at` are when the server stored
the transition and the health report (`lifecycle.evolve_route`), and `now` is the server's clock as the
follower sees it - so neither a writer's declared time nor this machine's clock moves a deadline.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import msgspec

from ledger import lifecycle as lc
from ledger.events import Probe
from projections.timespec import aware

ON_STALE = ("ignore", "deactivate", "terminate")


class Step(msgspec.Struct, frozen=True, kw_only=True):
    to_state: str
    reason: str
    traffic: str | None = None
    address: str | None = None


def _age(since: datetime | None, now: datetime) -> float:
    if since is None:
        return 0.0
    return (now - aware(since)).total_seconds()


def _session_ended(session: lc.SessionState | None) -> str | None:
    if session is None:
        return "its session does not exist"
    if session.status == lc.S_TERMINATED:
        return f"its session was terminated ({session.reason})" if session.reason else "its session was terminated"
    return None


def next_step(route: lc.RouteState, session: lc.SessionState | None, now: datetime) -> Step | None:
    """The transition the watchdog should write now, or None."""
    state = route.state
    ended = _session_ended(session)
    in_state = _age(route.state_since, now)
    if state == lc.PENDING:
        if ended:
            return Step(to_state=lc.TERMINATING, reason=ended)
        if session is not None and session.status == lc.S_ASSIGNED:
            return Step(to_state=lc.STARTING, reason=f"session {session.session_id} is claimed by {session.owner}")
        return None
    if state == lc.STARTING:
        if ended:
            return Step(to_state=lc.FAILED_TO_START, reason=ended)
        if session is not None and session.status == lc.S_ASSIGNED and session.address:
            return Step(to_state=lc.WARMING_UP, address=session.address,
                        reason=f"session runs on {session.owner} at {session.address}")
        if in_state > route.start_timeout:
            return Step(to_state=lc.FAILED_TO_START,
                        reason=f"not started within start_timeout {route.start_timeout:g}s ({in_state:.0f}s)")
        return None
    if state == lc.WARMING_UP:
        if ended:
            return Step(to_state=lc.TERMINATING, reason=ended)
        if route.probe is None:
            return Step(to_state=lc.RUNNING, traffic=lc.TRAFFIC_ACTIVE, reason="no health probe configured")
        if route.healthy and _checked_since(route, route.state_since):
            return Step(to_state=lc.RUNNING, traffic=lc.TRAFFIC_ACTIVE,
                        reason=f"health probe passed ({route.health_detail or 'healthy'})")
        if in_state > route.probe.initial_delay:
            return Step(to_state=lc.TERMINATING,
                        reason=f"no passing health probe within initial_delay {route.probe.initial_delay:g}s")
        return None
    if state == lc.RUNNING:
        if ended:
            return Step(to_state=lc.TERMINATING, reason=ended)
        return _running_step(route, now)
    if state == lc.TERMINATING:
        if ended:
            return Step(to_state=lc.TERMINATED, reason=ended)
        if in_state > route.stop_timeout:
            return Step(to_state=lc.TERMINATED,
                        reason=f"not terminated within stop_timeout {route.stop_timeout:g}s ({in_state:.0f}s)")
    return None


def _checked_since(route: lc.RouteState, since: datetime) -> bool:
    return route.health_checked_at is not None and _age(since, route.health_checked_at) >= 0


def _running_step(route: lc.RouteState, now: datetime) -> Step | None:
    probe = route.probe or Probe()
    policy = probe.on_stale if probe.on_stale in ON_STALE else "deactivate"
    active = route.traffic == lc.TRAFFIC_ACTIVE
    if route.probe is None:
        return None if active else Step(to_state=lc.RUNNING, traffic=lc.TRAFFIC_ACTIVE,
                                        reason="no health probe configured")
    age = _age(route.health_checked_at or route.state_since, now)
    stale = age > probe.stale_after
    if stale and policy != "ignore":
        why = f"health stale: last probe {age:.0f}s ago (stale after {probe.stale_after:g}s)"
        if policy == "terminate":
            return Step(to_state=lc.TERMINATING, reason=why)
        return Step(to_state=lc.RUNNING, traffic=lc.TRAFFIC_INACTIVE, reason=why) if active else None
    if route.healthy is False and active:
        return Step(to_state=lc.RUNNING, traffic=lc.TRAFFIC_INACTIVE,
                    reason=f"health probe failed ({route.health_detail or 'unhealthy'})")
    if route.healthy and not stale and not active:
        return Step(to_state=lc.RUNNING, traffic=lc.TRAFFIC_ACTIVE, reason="health probe passed again")
    return None


def next_check(route: lc.RouteState) -> datetime | None:
    """The moment after which `next_step` may answer differently with no new event (a timeout or a staleness
    passing), or None when only an event can change its answer: the watchdog's deadline for the route.

    Each is the bound `next_step` compares an age against (strictly: the step is due just after it).
    """
    state = route.state
    since = route.state_since
    if state in (lc.PENDING, lc.FAILED_TO_START, lc.TERMINATED):
        return None
    if state == lc.STARTING:
        return aware(since) + timedelta(seconds=route.start_timeout)
    if state == lc.WARMING_UP:
        return None if route.probe is None else aware(since) + timedelta(seconds=route.probe.initial_delay)
    if state == lc.RUNNING:
        probe = route.probe
        if probe is None or (probe.on_stale if probe.on_stale in ON_STALE else "deactivate") == "ignore":
            return None
        return aware(route.health_checked_at or since) + timedelta(seconds=probe.stale_after)
    if state == lc.TERMINATING:
        return aware(since) + timedelta(seconds=route.stop_timeout)
    return None
