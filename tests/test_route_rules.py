"""The route watchdog's rules (pure): every path through the route lifecycle."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from consumers.route_rules import next_step
from ledger import lifecycle as lc
from ledger.events import Probe

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


PROBE = Probe(initial_delay=60, stale_after=30)


def route(state: str, *, probe: Probe | None = PROBE, since: float = 0,
          **more: object) -> lc.RouteState:
    return lc.RouteState(route_id="r1", session_id="s1", endpoint="e", deployment="", probe=probe,
                         start_timeout=300, stop_timeout=120, state=state, state_since=at(since), state_seq=1,
                         created_at=T0, **more)  # type: ignore[arg-type]


def session(status: str = lc.S_ASSIGNED, **more: object) -> lc.SessionState:
    base = dict(session_id="s1", pool="p", platform="default", region="default", labels={}, idle_ttl=None,
                status=status, created_at=T0, owner="a1" if status == lc.S_ASSIGNED else None, token=5)
    return lc.SessionState(**{**base, **more})  # type: ignore[arg-type]


def test_pending_starts_once_the_session_has_an_owner():
    assert next_step(route(lc.PENDING), session(lc.S_PENDING), at(1)) is None
    step = next_step(route(lc.PENDING), session(), at(1))
    assert step.to_state == lc.STARTING and "claimed by a1" in step.reason


def test_starting_warms_up_with_the_session_address():
    assert next_step(route(lc.STARTING), session(), at(5)) is None  # running, but no address yet
    step = next_step(route(lc.STARTING), session(address="10.0.0.1:80"), at(5))
    assert (step.to_state, step.address) == (lc.WARMING_UP, "10.0.0.1:80")


@pytest.mark.parametrize("sess, now, why", [
    (session(lc.S_TERMINATED, reason="user"), 5, "terminated (user)"),
    (None, 5, "does not exist"),
    (session(), 301, "start_timeout 300s"),
])
def test_starting_fails_to_start(sess: lc.SessionState | None, now: float, why: str):
    step = next_step(route(lc.STARTING), sess, at(now))
    assert step.to_state == lc.FAILED_TO_START and why in step.reason


def test_warming_up_runs_when_a_probe_passes_or_none_is_configured():
    assert next_step(route(lc.WARMING_UP, since=10), session(), at(20)) is None
    old_pass = route(lc.WARMING_UP, since=10, healthy=True, health_checked_at=at(5))
    assert next_step(old_pass, session(), at(20)) is None  # a probe from before warming up does not count
    fresh = route(lc.WARMING_UP, since=10, healthy=True, health_checked_at=at(15), health_detail="200")
    step = next_step(fresh, session(), at(20))
    assert (step.to_state, step.traffic) == (lc.RUNNING, lc.TRAFFIC_ACTIVE) and "200" in step.reason
    step = next_step(route(lc.WARMING_UP, probe=None), session(), at(1))
    assert step.to_state == lc.RUNNING and step.reason == "no health probe configured"


def test_warming_up_without_a_passing_probe_terminates_after_the_initial_delay():
    failing = route(lc.WARMING_UP, since=0, healthy=False, health_checked_at=at(30))
    assert next_step(failing, session(), at(59)) is None
    step = next_step(failing, session(), at(61))
    assert step.to_state == lc.TERMINATING and "initial_delay 60s" in step.reason


def running(**more: object) -> lc.RouteState:
    return route(lc.RUNNING, **{"traffic": lc.TRAFFIC_ACTIVE, "healthy": True, "health_checked_at": at(0), **more})


def test_running_with_stale_health_follows_the_policy():
    assert next_step(running(), session(), at(29)) is None
    step = next_step(running(), session(), at(45))
    assert (step.to_state, step.traffic) == (lc.RUNNING, lc.TRAFFIC_INACTIVE) and "health stale" in step.reason
    terminate = running(probe=Probe(stale_after=30, on_stale="terminate"))
    assert next_step(terminate, session(), at(45)).to_state == lc.TERMINATING
    ignore = running(probe=Probe(stale_after=30, on_stale="ignore"))
    assert next_step(ignore, session(), at(45)) is None
    # Deactivated, then a fresh passing probe: traffic comes back.
    inactive = msgspec.structs.replace(running(), traffic=lc.TRAFFIC_INACTIVE, health_checked_at=at(50))
    step = next_step(inactive, session(), at(55))
    assert (step.to_state, step.traffic) == (lc.RUNNING, lc.TRAFFIC_ACTIVE)


def test_running_with_a_failed_probe_is_deactivated():
    failed = running(healthy=False, health_checked_at=at(10), health_detail="503")
    step = next_step(failed, session(), at(12))
    assert step.traffic == lc.TRAFFIC_INACTIVE and "503" in step.reason


def test_running_and_terminating_end_with_their_session():
    assert next_step(running(), session(lc.S_TERMINATED), at(1)).to_state == lc.TERMINATING
    assert next_step(route(lc.TERMINATING), session(lc.S_TERMINATED), at(1)).to_state == lc.TERMINATED
    assert next_step(route(lc.TERMINATING), session(), at(60)) is None
    step = next_step(route(lc.TERMINATING), session(), at(121))
    assert step.to_state == lc.TERMINATED and "stop_timeout 120s" in step.reason


def test_final_states_are_left_alone():
    for state in (lc.FAILED_TO_START, lc.TERMINATED):
        assert next_step(route(state), session(lc.S_TERMINATED), at(999)) is None
