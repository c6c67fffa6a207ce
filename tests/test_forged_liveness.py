"""Forged or self-timed liveness facts, folded and judged (pure: no server).

A beat that names an incarnation with no registration, a suspicion or a
registration whose own `time` lies in the future: none of them may make a live
agent dead, a dead one undying, or an agent suspect for as long as it likes.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from consumers import liveness_rules as lr
from ledger import codec
from ledger import events as ev
from ledger.subjects import HEARTBEAT_STREAM, LEDGER_STREAM
from projections.health import agent_health
from projections.state import LedgerState
from projections.views import agent_view

T0 = datetime(2026, 11, 1, 12, tzinfo=UTC)
A1 = ev.Producer(id="a1", instance="i1")
FORGER = ev.Producer(id="a1", instance="forger")
FORGED_INCARNATION = 10**12


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def stored(stream: str, seq: int, seconds: float, event: ev.Event) -> codec.Recorded:
    return codec.Recorded(stream, seq, codec.subject_of(event), codec.to_ns(at(seconds)), event)


def registration(seconds: float = 0, *, time: datetime | None = None) -> codec.Recorded:
    e = ev.AgentRegistered(producer=A1, agent_id="a1", instance_id="i1", pool="p", heartbeat_interval=5.0,
                           ttl=30.0, time=time or at(seconds))
    return stored(LEDGER_STREAM, 1, seconds, e)


def beat(seq: int, seconds: float, incarnation: int = 1, producer: ev.Producer = A1) -> codec.Recorded:
    e = ev.AgentHeartbeat(producer=producer, agent_id="a1", instance_id=producer.instance, incarnation=incarnation,
                          beat=seq, time=at(seconds))
    return stored(HEARTBEAT_STREAM, seq, seconds, e)


def folded(items: list[codec.Recorded]) -> LedgerState:
    state = LedgerState()
    state.apply_all(items)
    return state


def both_orders(items: list[codec.Recorded]) -> list[LedgerState]:
    lifecycle = [i for i in items if i.stream == LEDGER_STREAM]
    beats = [i for i in items if i.stream == HEARTBEAT_STREAM]
    return [folded(lifecycle + beats), folded(beats + lifecycle)]


def test_a_forged_beat_of_an_unregistered_incarnation_never_hides_the_registered_ones():
    items = [registration(0), beat(1, 99), beat(2, 100, FORGED_INCARNATION, FORGER), beat(3, 101)]
    for state in both_orders(items):
        a1 = state.agents["a1"]
        assert state.current_beat("a1").seq == 3  # the real beat after the forged one counts
        assert agent_health(a1, state.beats["a1"], at(102)) == ("alive", "heartbeat 1s ago")
        assert agent_view(a1, state.beats["a1"], at(102)).last_heartbeat_seq == 3
        assert state.heartbeats.anomalies == 0  # the real beats were not refused as "older"
        # ... and when the agent really stops beating, it dies ttl after its last real beat.
        assert agent_health(a1, state.beats["a1"], at(132))[0] == "dead"
        current = state.current_beat("a1")
        verdict = lr.judge(a1, lr.LastBeat(current.seq, codec.from_ns(current.stored_ns)), [], at(132),
                           lr.LivenessSettings())
        assert verdict is not None and verdict.kind == lr.DEAD


def test_a_beat_naming_no_registration_is_flagged_once_the_lifecycle_was_read_past_it():
    session = stored(LEDGER_STREAM, 2, 150, ev.SessionCreated(producer=A1, session_id="s1", pool="p"))
    forged = [registration(0), beat(1, 99), beat(2, 100, FORGED_INCARNATION, FORGER)]
    for state in both_orders(forged):
        assert state.unregistered_beat("a1") is None  # nothing stored after the beat was read yet: undecided
    for state in both_orders([*forged, session]):
        assert state.unregistered_beat("a1").incarnation == FORGED_INCARNATION
    for state in both_orders([registration(0), beat(1, 99), session]):
        assert state.unregistered_beat("a1") is None


def test_a_suspicion_counts_from_when_it_was_stored_not_from_its_own_time():
    future = ev.AgentSuspected(producer=ev.Producer(id="monitor-forger", instance="f"), agent_id="a1", incarnation=1,
                               reason="unreachable_reports", time=at(3600))
    items = [registration(0), stored(LEDGER_STREAM, 2, 11, future), beat(1, 10), beat(2, 12)]
    for state in both_orders(items):
        a1 = state.agents["a1"]
        assert a1.suspected_at == at(11)
        # A beat after the suspicion clears it at once, not an hour later.
        assert agent_health(a1, state.beats["a1"], at(13)) == ("alive", "heartbeat 1s ago")
        current = state.current_beat("a1")
        last = lr.LastBeat(current.seq, codec.from_ns(current.stored_ns))
        assert lr.judge(a1, last, [], at(13), lr.LivenessSettings()) is None


@pytest.mark.parametrize("declared", [at(86_400), at(-86_400)])
def test_an_agent_that_never_beat_dies_ttl_after_its_registration_was_stored(declared: datetime):
    state = folded([registration(0, time=declared)])
    a1 = state.agents["a1"]
    assert a1.registered_at == T0
    assert agent_health(a1, None, at(29))[0] != "dead"
    assert agent_health(a1, None, at(31)) == ("dead", "no heartbeat since registering 31s ago (dead after 30s)")
    verdict = lr.judge(a1, None, [], at(31), lr.LivenessSettings())
    assert verdict is not None and verdict.kind == lr.DEAD and "since registering" in verdict.evidence.detail
