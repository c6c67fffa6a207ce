"""The pure folds of the projection: deterministic, order-independent across streams, never applying a flag."""

from __future__ import annotations

from itertools import pairwise

from histories import histories
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.codec import Recorded
from ledger.subjects import HEARTBEAT_STREAM, LEDGER_STREAM
from projections import snapshots
from projections.beats import KEEP, of_incarnation
from projections.state import (
    AGENT,
    HEARTBEAT,
    HeartbeatState,
    LedgerState,
    LifecycleState,
    decode,
    encode,
)

FOLD_EXAMPLES = settings(max_examples=100, deadline=None)


def fold(items: list) -> LedgerState:  # type: ignore[type-arg]
    state = LedgerState()
    state.apply_all(items)
    return state


def splits(data: st.DataObject, n: int) -> list[tuple[int, int]]:
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=6)))
    bounds = [0, *cuts, n]
    return list(pairwise(bounds))


@FOLD_EXAMPLES
@given(items=histories(), data=st.data())
def test_rebuild_equals_incremental_with_the_state_serialised_between_batches(items: list, data: st.DataObject):
    state = LedgerState()
    for start, end in splits(data, len(items)):
        state.apply_all(items[start:end])
        state = decode(encode(state))  # what a restart from a snapshot or a hand-over does
    assert state == fold(items)


@FOLD_EXAMPLES
@given(items=histories(), data=st.data())
def test_snapshot_plus_remainder_equals_rebuild(items: list, data: st.DataObject):
    k = data.draw(st.integers(0, len(items)))
    state = fold(items[:k])
    ledger = snapshots.unpack(snapshots.pack(state.ledger), LifecycleState)
    beats = snapshots.unpack(snapshots.pack(state.heartbeats), HeartbeatState)
    resumed = LedgerState(ledger=ledger, heartbeats=beats)
    resumed.apply_all(items[k:])
    assert resumed == fold(items)


@FOLD_EXAMPLES
@given(items=histories())
def test_the_two_streams_fold_independently(items: list):
    ledger_first = [i for i in items if i.stream == LEDGER_STREAM] + [i for i in items if i.stream == HEARTBEAT_STREAM]
    beats_first = [i for i in items if i.stream == HEARTBEAT_STREAM] + [i for i in items if i.stream == LEDGER_STREAM]
    assert fold(ledger_first) == fold(items) == fold(beats_first)


@FOLD_EXAMPLES
@given(items=histories(), data=st.data())
def test_redelivered_items_change_nothing(items: list, data: st.DataObject):
    k = data.draw(st.integers(0, len(items)))
    state = fold(items)
    before = encode(state)
    assert state.apply_all(items[:k]) == []  # an ordered consumer restarted from an older position
    assert encode(state) == before


@FOLD_EXAMPLES
@given(items=histories())
def test_a_flagged_event_is_never_applied(items: list):
    state = LedgerState()
    tables = {AGENT: state.ledger.agents, "session": state.ledger.sessions, "route": state.ledger.routes,
              "pool": state.ledger.pools, HEARTBEAT: state.heartbeats.beats}
    flagged = 0
    for item in items:
        change = state.apply(item)
        if change is None or change.anomaly is None:
            continue
        flagged += 1
        assert tables[change.kind].get(change.id) is change.before
        assert (change.anomaly.stream, change.anomaly.seq) == (item.stream, item.seq)
    assert state.ledger.anomalies + state.heartbeats.anomalies == flagged


@FOLD_EXAMPLES
@given(items=histories())
def test_the_newest_beat_of_each_of_the_most_recently_beating_incarnations_is_kept_and_an_older_flagged(items: list):
    state = HeartbeatState()  # the stream's own fold (LedgerState also lets go of the past: test_retirement)
    kept: dict[str, dict[int, int]] = {}  # agent -> incarnation -> newest seq: a plain model of the fold
    for item in items:
        if item.stream != HEARTBEAT_STREAM:
            continue
        change = state.apply(item)
        if not isinstance(item, Recorded):
            continue
        beat = item.event
        if beat.producer.id != beat.agent_id:  # only the agent itself beats for it: flagged, never kept
            assert change is not None and change.anomaly is not None
            assert change.anomaly.kind == "unauthorized_producer"
            continue
        mine = kept.setdefault(beat.agent_id, {})
        if len(mine) >= KEEP and beat.incarnation not in mine and item.seq < min(mine.values()):
            assert change is not None and change.anomaly is not None
            assert change.anomaly.kind == "superseded_incarnation"
            continue
        mine[beat.incarnation] = max(mine.get(beat.incarnation, 0), item.seq)
        for stalest in sorted(mine, key=mine.__getitem__)[:-KEEP]:  # the KEEP most recently beating stay
            del mine[stalest]
    folded = {a: {s.incarnation: s.seq for s in b.slots()} for a, b in state.beats.items()}
    assert folded == {a: m for a, m in kept.items() if m}
    for a, b in state.beats.items():
        assert b.incarnation == max(kept[a])  # the top slot is the highest incarnation seen
        for incarnation, seq in kept[a].items():
            assert of_incarnation(b, incarnation).seq == seq


@settings(max_examples=60, deadline=None)
@given(items=histories())
def test_dead_letters_are_counted_and_advance_the_position(items: list):
    state = fold(items)
    unreadable = [i for i in items if not isinstance(i, Recorded)]
    assert sum(state.ledger.dead_letters.values()) == len(unreadable)
    ledger_items = [i for i in items if i.stream == LEDGER_STREAM]
    assert state.ledger.seq == (ledger_items[-1].seq if ledger_items else 0)
