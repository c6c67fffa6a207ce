"""Health and the views, judged at an explicit `now` (pure: no server)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from ledger import codec
from ledger import events as ev
from ledger import lifecycle as lc
from projections import snapshots
from projections.beats import Beat
from projections.health import HealthPolicy, agent_health, route_health
from projections.state import LedgerState
from projections.timespec import parse_time
from projections.views import agent_view, pool_views, route_view

T0 = datetime(2026, 11, 1, 12, tzinfo=UTC)
A = ev.Producer(id="a1", instance="i1")


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def agent(**over: object) -> lc.AgentState:
    base = lc.AgentState(agent_id="a1", incarnation=7, instance_id="i1", pool="p", platform="k8s", region="eu",
                         labels={}, capacity=4, heartbeat_interval=5.0, ttl=30.0, registered_at=T0,
                         status=lc.A_ALIVE, reason="registered", status_since=T0, status_seq=7)
    return msgspec.structs.replace(base, **over)


def beat(seconds: float, incarnation: int = 7, load: int = 1) -> Beat:
    return Beat(agent_id="a1", incarnation=incarnation, instance_id="i1", seq=1, beat=1, sent_at=at(seconds),
                stored_ns=codec.to_ns(at(seconds)), load=load, capacity=4, sessions=load)


@pytest.mark.parametrize("state, last_beat, now, health, rule", [
    (agent(), 0, 2, "alive", "heartbeat 2s ago"),
    (agent(), None, 3, "alive", "registered 3s ago, no heartbeat yet"),
    (agent(), 0, 16, "suspect", "3 missed heartbeats (last beat 16s ago, every 5s; suspect after 3)"),
    (agent(), 0, 41, "dead", "no heartbeat for 41s (dead after 30s)"),
    (agent(), None, 31, "dead", "no heartbeat since registering 31s ago (dead after 30s)"),
    (agent(status=lc.A_GONE, reason="goodbye: shutdown"), 0, 1, "gone", "goodbye: shutdown"),
    (agent(status=lc.A_DEAD, reason="declared dead: ttl"), 0, 1, "dead", "declared dead: ttl"),
    (agent(status=lc.A_DRAINING, reason="draining: upgrade"), 0, 100, "draining", "draining: upgrade"),
    (agent(status=lc.A_DRAINED, reason="drained"), 0, 1, "drained", "drained"),
    (agent(suspected_at=at(10), suspect_reason="3 reports in 60s"), 5, 12, "suspect", "suspected: 3 reports in 60s"),
    (agent(suspected_at=at(10), suspect_reason="3 reports in 60s"), 11, 12, "alive", "heartbeat 1s ago"),
])
def test_agent_health_rules(state: lc.AgentState, last_beat: float | None, now: float, health: str, rule: str):
    b = beat(last_beat) if last_beat is not None else None
    assert agent_health(state, b, at(now)) == (health, rule)


def test_a_beat_of_another_incarnation_does_not_count():
    assert agent_health(agent(), beat(0, incarnation=3), at(31))[0] == "dead"
    assert agent_health(agent(), beat(30, incarnation=3), at(31))[0] == "dead"


def test_the_policy_and_the_agents_own_settings_apply():
    assert agent_health(agent(), beat(0), at(11), HealthPolicy(suspect_after_missed=2))[0] == "suspect"
    assert agent_health(agent(ttl=60.0), beat(0), at(41))[0] == "suspect"
    assert agent_health(agent(), beat(0), at(41), HealthPolicy(dead_after=50))[0] == "suspect"
    assert agent_health(agent(), beat(0), at(1), beats_known=False) == (
        "unknown", "no heartbeat history is kept for this moment")


def test_a_naive_event_time_is_taken_as_utc():
    naive = agent(registered_at=T0.replace(tzinfo=None))
    assert agent_health(naive, None, at(2))[0] == "alive"


def test_route_health_goes_stale_after_its_probe_bound():
    r = lc.RouteState(route_id="r1", session_id="s1", endpoint="e", deployment="", probe=ev.Probe(stale_after=30.0),
                      start_timeout=300.0, stop_timeout=60.0, state=lc.RUNNING, state_since=T0, state_seq=1,
                      created_at=T0, traffic=lc.TRAFFIC_ACTIVE, healthy=True, health_checked_at=T0)
    assert route_health(r, at(10)).health == "healthy" and not route_health(r, at(10)).stale
    assert route_health(r, at(31)).stale
    view = route_view(r, at(31))
    assert (view.status, view.sub_status, view.traffic, view.health, view.health_stale) == (
        "RUNNING", None, "ACTIVE", "healthy", True)
    never = msgspec.structs.replace(r, healthy=None, health_checked_at=None, state=lc.WARMING_UP)
    assert (route_view(never, at(1)).health, route_view(never, at(1)).sub_status) == ("unknown", "WARMING_UP")


def test_pools_count_health_states_and_free_capacity_of_alive_agents():
    views = [
        agent_view(agent(agent_id="a1"), beat(0, load=1), at(2)),
        agent_view(agent(agent_id="a2"), beat(0, load=3), at(2)),
        agent_view(agent(agent_id="a3", status=lc.A_DRAINING, reason="draining"), beat(0), at(2)),
        agent_view(agent(agent_id="a4"), beat(0), at(100)),  # dead by time
        agent_view(agent(agent_id="a5", pool="q"), None, at(2)),
    ]
    pools = {p.pool: p for p in pool_views(views, {"p": {"assigned": 4, "orphaned": 1}})}
    p = pools["p"]
    assert p.agents == {"alive": 2, "dead": 1, "draining": 1}
    assert p.sessions == {"assigned": 4, "orphaned": 1}
    assert (p.capacity, p.load, p.free_capacity) == (8, 4, 4)
    assert pools["q"].free_capacity == 4 and pools["q"].sessions == {}


def test_snapshot_thinning_keeps_recent_ones_and_a_logarithmic_tail():
    taken: list[int] = []
    for seq in range(1000, 1_000_001, 1000):
        taken.append(seq)
        for old in snapshots.to_delete(taken, every=1000, recent=8):
            taken.remove(old)
    assert taken[-8:] == list(range(993_000, 1_000_001, 1000))
    assert len(taken) <= 8 + 11  # recent + one per power-of-two bucket of age
    assert taken[0] <= 10_000  # the distant past keeps a foothold


def test_apply_flags_events_of_superseded_incarnations_without_applying_them():
    state = LedgerState()
    seq = iter(range(1, 100))

    def rec(e: ev.Event) -> codec.Recorded:
        s = next(seq)
        return codec.Recorded("LEDGER", s, codec.subject_of(e), s, e)

    state.apply(rec(ev.AgentRegistered(producer=A, agent_id="a1", instance_id="i1", pool="p", time=T0)))
    state.apply(rec(ev.AgentRegistered(producer=A, agent_id="a1", instance_id="i2", pool="p", time=T0)))
    current = state.agents["a1"]
    change = state.apply(rec(ev.AgentGoodbye(producer=A, agent_id="a1", instance_id="i1", incarnation=1)))
    assert change is not None and change.anomaly is not None
    assert (change.anomaly.kind, change.anomaly.entity_id, change.anomaly.seq) == ("superseded_incarnation", "a1", 3)
    assert state.agents["a1"] is current and current.status == lc.A_ALIVE


@pytest.mark.parametrize("text, expected", [
    ("now", T0),
    ("-5m", T0 - timedelta(minutes=5)),
    ("-1h30m", T0 - timedelta(hours=1, minutes=30)),
    ("90s ago", T0 - timedelta(seconds=90)),
    ("2026-11-01T10:00:00Z", datetime(2026, 11, 1, 10, tzinfo=UTC)),
    ("2026-11-01 10:00", datetime(2026, 11, 1, 10, tzinfo=UTC)),
    ("2026-11-01T12:00:00+02:00", datetime(2026, 11, 1, 10, tzinfo=UTC)),
])
def test_times_as_people_type_them(text: str, expected: datetime):
    assert parse_time(text, now=T0) == expected


@pytest.mark.parametrize("text", ["yesterday", "-5x", "5m", "2026-13-01"])
def test_a_bad_time_says_what_is_accepted(text: str):
    with pytest.raises(ValueError, match="ISO-8601"):
        parse_time(text, now=T0)
