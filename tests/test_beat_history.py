"""The file's heartbeat history is bounded by `ProjectionSettings.beat_history`, not by the heartbeat stream's
retention: older beat versions are pruned at heartbeat snapshots, and a view of an older moment replays the
heartbeats from the nearest heartbeat snapshot instead - with the same answer as a replay of the log."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from projection_contract import fold_and_commit
from test_time_travel_views import CLI, INDEXED, everything, me, of_the_moment, store, views

from ledger import events as ev
from ledger.errors import ConfigError
from ledger.store import EventStore
from ledger.subjects import HEARTBEAT_STREAM, LEDGER_STREAM
from projections.db import ProjectionDB
from projections.projector import Projector
from projections.query import AsOf, Query
from projections.settings import ProjectionSettings
from projections.state import LedgerState
from projections.timetravel import past_as_of, state_as_of
from projections.uncommitted import Uncommitted

__all__ = ["store"]  # the fixture, shared

AGENTS = ("a1", "a2", "a3")
SNAPSHOT_EVERY = 3


async def beating_fleet(store: EventStore, rounds: int = 8) -> None:
    """Three agents beating every round; a session claimed and orphaned; a goodbye and a new incarnation; a beat
    flagged (a2 beating for a1)."""
    inc = {a: await store.append(ev.AgentRegistered(producer=me(a), agent_id=a, instance_id="i", pool="p"))
           for a in AGENTS}
    for n in range(rounds):
        for a in AGENTS:
            await store.append(ev.AgentHeartbeat(producer=me(a), agent_id=a, instance_id="i", incarnation=inc[a],
                                                 beat=n, load=n % 3))
        if n == 2:
            await store.append(ev.SessionCreated(producer=CLI, session_id="s1", pool="p"))
            await store.append(ev.SessionClaimed(producer=me("a1"), session_id="s1", agent_id="a1",
                                                 instance_id="i", incarnation=inc["a1"]))
        if n == 4:
            await store.append(ev.AgentGoodbye(producer=me("a2"), agent_id="a2", instance_id="i",
                                               incarnation=inc["a2"]))
            inc["a2"] = await store.append(ev.AgentRegistered(producer=me("a2"), agent_id="a2", instance_id="i",
                                                              pool="p"))
            await store.append(ev.AgentHeartbeat(producer=me("a2"), agent_id="a1", instance_id="i",
                                                 incarnation=inc["a1"], beat=99))


async def project(store: EventStore, db: Path, beat_history: float) -> None:
    settings = ProjectionSettings(db=str(db), snapshot_every=SNAPSHOT_EVERY, snapshot_recent=2,
                                  beat_history=beat_history)
    async with Projector(store, settings) as projector:
        await projector.ready(timeout=20)
        await beating_fleet(store)  # live: many small commits, heartbeat snapshots (and prunes) along the way
        await projector.wait_for(await store.last_seq(LEDGER_STREAM), timeout=20)
        await projector.wait_for(await store.last_seq(HEARTBEAT_STREAM), HEARTBEAT_STREAM, timeout=20)


async def test_the_files_beat_versions_stay_within_the_beat_history(store: EventStore, tmp_path: Path) -> None:
    await project(store, tmp_path / "p.sqlite3", beat_history=0)  # keep only the newest moment's beats
    last = await store.last_seq(HEARTBEAT_STREAM)
    async with await ProjectionDB.open(tmp_path / "p.sqlite3", readonly=True) as db:
        floor = await db.beats_from()
        rows = list(await db.conn.execute_fetchall("SELECT seq FROM beat_versions ORDER BY seq"))
    assert last - SNAPSHOT_EVERY < floor <= last  # pruned at the last heartbeat snapshot, at most `every` ago
    below = [seq for seq, in rows if seq <= floor]
    assert len(below) <= len(AGENTS)  # one per agent at the boundary
    assert len(rows) <= len(AGENTS) + (last - floor) < last  # bounded by the agents and the window, not the stream


async def test_views_inside_and_outside_the_beat_history_equal_the_replay(store: EventStore, tmp_path: Path) -> None:
    await project(store, tmp_path / "p.sqlite3", beat_history=0)
    items = await everything(store)
    end = await store.last_seq(LEDGER_STREAM)
    moments: list[AsOf] = [*range(1, end + 1), items[0].stored_at - timedelta(seconds=1)]
    for item in items:  # when items of either stream were stored, and just before: most outside the window
        moments += [item.stored_at, item.stored_at - timedelta(microseconds=1)]
    replayed = Query(None, store)
    async with Query.open(tmp_path / "p.sqlite3", store) as indexed:
        assert indexed.db is not None
        for moment in moments:
            from_index, from_replay = await views(indexed, moment), await views(replayed, moment)
            assert from_index.pop("source").startswith(INDEXED), moment
            from_replay.pop("source")
            assert from_index == from_replay, moment
        floor, cuts = await indexed.db.beats_from(), set()
        for seq, time in [*((n, None) for n in range(1, end + 1)), *((None, i.stored_at) for i in items)]:
            past = await past_as_of(store, indexed.db, seq=seq, time=time)  # the same file's snapshots: the same
            rebuilt = await state_as_of(store, indexed.db, seq=seq, time=time)  # notes, positions and beats
            assert past is not None
            agents, beats = await of_the_moment(indexed.db, past)
            assert beats == {k: b for k, b in rebuilt.state.heartbeats.beats.items() if k in agents}, (seq, time)
            assert (past.hb_seq, past.beats_known, past.notes) == (rebuilt.state.heartbeats.seq,
                                                                    rebuilt.beats_known, rebuilt.notes), (seq, time)
            cuts.add(past.hb_seq >= floor)
        assert cuts == {False, True}  # moments outside the kept beat history (replayed) and inside it (indexed)


async def test_the_beat_history_floor_only_rises(tmp_path: Path) -> None:
    async with await ProjectionDB.open(tmp_path / "p.sqlite3") as db:
        state = await fold_and_commit(db, [], LedgerState())
        assert await db.beats_from() == 0  # never pruned: every sequence answers
        for below, expected in ((5, 5), (3, 5), (9, 9)):  # a smaller beat_history later cannot un-prune
            await db.commit(Uncommitted().batch(state)._replace(prune_beats_below=below))
            assert await db.beats_from() == expected


def test_beat_history_is_a_setting_of_zero_or_more_seconds() -> None:
    assert ProjectionSettings().beat_history == 3600
    assert ProjectionSettings.from_env({"LEDGER_PROJECTION_BEAT_HISTORY": "1.5"}).beat_history == 1.5
    for bad in (-1, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="beat_history"):
            ProjectionSettings(beat_history=bad)
