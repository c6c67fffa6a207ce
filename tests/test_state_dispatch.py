"""LifecycleState.apply sends each event to its entity's fold and table; a heartbeat (an AgentEvent of its own family)
recorded on the LEDGER stream is flagged, never folded as an agent event."""

from __future__ import annotations

import pytest
from samples import sample

from ledger import events as ev
from ledger.codec import Recorded
from ledger.lifecycle import ILLEGAL_TRANSITION
from ledger.subjects import LEDGER_STREAM
from projections.state import AGENT, POOL, ROUTE, SESSION, LifecycleState

KIND = {"agent": AGENT, "session": SESSION, "route": ROUTE, "pool": POOL}
LIFECYCLE_TYPES = [cls for cls in ev.EVENT_TYPES if cls is not ev.AgentHeartbeat]


def recorded(event: ev.Event, seq: int = 1) -> Recorded:
    subject = f"ledger.{event.family}.{event.entity_id}.{event.verb()}.{event.producer.id}"
    return Recorded(LEDGER_STREAM, seq, subject, 1_800_000_000_000_000_000 + seq, event)


def tables(state: LifecycleState) -> dict[str, dict[str, object]]:
    return {AGENT: dict(state.agents), SESSION: dict(state.sessions), ROUTE: dict(state.routes),
            POOL: dict(state.pools)}


@pytest.mark.parametrize("cls", LIFECYCLE_TYPES, ids=lambda cls: cls.type_tag())
def test_each_event_reaches_its_entitys_table_only(cls: type[ev.Event]):
    state = LifecycleState()
    event = sample(cls)
    change = state.apply(recorded(event))
    assert change is not None and (change.kind, change.id) == (KIND[cls.family], event.entity_id)
    others = {kind: rows for kind, rows in tables(state).items() if kind != change.kind}
    assert all(not rows for rows in others.values()), others
    if change.applied:
        assert event.entity_id in tables(state)[change.kind] and state.anomalies == 0
    else:
        assert event.entity_id not in tables(state)[change.kind] and state.anomalies == 1


def test_a_registration_is_kept_and_the_next_event_folds_on_it():
    state = LifecycleState()
    registered = sample(ev.AgentRegistered)
    assert state.apply(recorded(registered, 1)).applied
    draining = sample(ev.AgentDraining, incarnation=1)
    change = state.apply(recorded(draining, 2))
    assert change is not None and change.applied and change.before is not None
    assert state.agents["agent-1"].status != change.before.status


def test_a_heartbeat_on_the_ledger_stream_is_flagged_and_not_folded():
    state = LifecycleState()
    state.apply(recorded(sample(ev.AgentRegistered), 1))
    before = state.agents["agent-1"]
    change = state.apply(recorded(sample(ev.AgentHeartbeat, incarnation=1), 2))
    assert change is not None and change.anomaly is not None and not change.applied
    assert (change.kind, change.id, change.anomaly.kind) == (AGENT, "agent-1", ILLEGAL_TRANSITION)
    assert "does not belong in the LEDGER stream" in change.anomaly.detail
    assert state.agents["agent-1"] is before and state.anomalies == 1 and state.seq == 2
