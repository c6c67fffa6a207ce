"""Hostile cases for time travel on version rows (issue 13): #0, a sequence in the middle of a commit, pages with
`after` (an id that exists and one that does not) and offsets on past views, and a projection whose retention
is 0 - every answer from the index must equal the replay's, on a real nats-server and a real SQLite file."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from test_time_travel_views import CLI, INDEXED, fleet, me, project

from ledger import events as ev
from ledger.settings import Settings
from ledger.store import EventStore
from ledger.subjects import LEDGER_STREAM
from ledgerctl.server import EmbeddedServer
from projections.errors import InvalidQuery
from projections.projector import Projector
from projections.query import Query
from projections.settings import ProjectionSettings
from projections.timetravel import state_as_of


@pytest.fixture
async def store(fresh_server: EmbeddedServer) -> AsyncIterator[EventStore]:
    async with EventStore.connect(Settings(nats_url=fresh_server.url), ensure=True) as s:
        yield s


def plain(page: Any) -> Any:
    out = msgspec.to_builtins(page)
    out["position"].pop("source")
    return out


async def test_pages_of_the_past_equal_the_replay_s_pages(store: EventStore, tmp_path: Path):
    await project(store, tmp_path / "p.sqlite3")
    end = await store.last_seq(LEDGER_STREAM)
    replayed = Query(None, store)
    async with Query.open(tmp_path / "p.sqlite3", store) as indexed:
        for moment in (1, end // 2, end):
            for paging in ({"limit": 1}, {"limit": 2, "offset": 1}, {"after": "s0"}, {"after": "s0", "limit": 1},
                           {"after": "zzz-no-such-id"}, {"after": ""}, {"after": "s"}, {"offset": 10_000}):
                for view in ("sessions", "routes", "agents"):
                    kw = dict(paging)
                    if view != "sessions" and "after" in kw:
                        kw["after"] = str(kw["after"]).replace("s", {"routes": "r", "agents": "a"}[view])
                    page = await getattr(indexed, view)(as_of=moment, **kw)
                    assert page.position.source.startswith(INDEXED)
                    assert plain(page) == plain(await getattr(replayed, view)(as_of=moment, **kw)), (view, moment, kw)


async def test_seq_zero_and_a_seq_inside_one_commit_equal_the_replay(store: EventStore, tmp_path: Path):
    db = tmp_path / "p.sqlite3"
    await fleet(store)  # all written before the projector starts: its catch-up commits them in one batch
    async with Projector(store, ProjectionSettings(db=str(db))) as projector:
        await projector.wait_for(await store.last_seq(LEDGER_STREAM), timeout=20)
    end = await store.last_seq(LEDGER_STREAM)
    replayed = Query(None, store)
    async with Query.open(db, store) as indexed:
        zero = await indexed.sessions(as_of=0)
        assert zero.items == [] and zero.total == 0
        for seq in range(1, end + 1):
            for view in ("sessions", "routes"):
                got = await getattr(indexed, view)(as_of=seq)
                assert got.position.source.startswith(INDEXED), seq
                assert plain(got) == plain(await getattr(replayed, view)(as_of=seq)), (view, seq)
        with pytest.raises(InvalidQuery):
            await indexed.sessions(as_of=end + 1)
        with pytest.raises(InvalidQuery):
            await indexed.sessions(as_of=2**70)  # past what SQLite can bind: the stream's end says no first


async def test_a_past_view_with_retirement_equals_the_replay(store: EventStore, tmp_path: Path):
    """retain=0: each final entity retires at the next item. The index lists it as it ended; so must the replay,
    whether it was retired before the snapshot the replay starts from (read back from the file) or during it."""
    db = tmp_path / "p.sqlite3"
    settings = ProjectionSettings(db=str(db), retain=0, snapshot_every=3, snapshot_recent=2)
    async with Projector(store, settings) as projector:
        await projector.ready(timeout=20)
        inc = await store.append(ev.AgentRegistered(producer=me("a1"), agent_id="a1", instance_id="i", pool="p"))
        await store.append(ev.SessionCreated(producer=CLI, session_id="s1", pool="p"))
        await store.append(ev.SessionTerminated(producer=CLI, session_id="s1", token=None))
        await store.append(ev.SessionCreated(producer=CLI, session_id="s2", pool="p"))
        await store.append(ev.AgentGoodbye(producer=me("a1"), agent_id="a1", instance_id="i", incarnation=inc))
        await store.append(ev.SessionCreated(producer=CLI, session_id="s3", pool="p"))
        await store.append(ev.SessionTerminated(producer=CLI, session_id="s2", token=None))
        await store.append(ev.SessionCreated(producer=CLI, session_id="s1", pool="q"))  # a retired id, re-created
        last = await store.append(ev.SessionCreated(producer=CLI, session_id="s4", pool="p"))
        await projector.wait_for(last, timeout=20)
    async with Query.open(db, store) as indexed:
        assert indexed.db is not None
        from_index = {s.session_id: s.state for s in (await indexed.sessions(as_of=last)).items}
        rebuilt = await state_as_of(store, indexed.db, seq=last)  # the replay past the file: from its snapshots
        assert from_index == {"s1": "pending", "s2": "terminated", "s3": "pending", "s4": "pending"}
        assert {k: s.status for k, s in rebuilt.state.ledger.sessions.items()} == from_index
        assert rebuilt.state.ledger.sessions["s1"].pool == "q"
        started = set()
        for seq in range(1, last + 1):  # every moment, from whichever snapshot is nearest
            rebuilt = await state_as_of(store, indexed.db, seq=seq)
            started.add(rebuilt.snapshots[LEDGER_STREAM])
            async with indexed.db.reading():
                sessions = {s.session_id: s for s in await indexed.db.session_states(as_of=seq)}
                agents = {a.agent_id: a for a in await indexed.db.agent_states(as_of=seq)}
            assert rebuilt.state.ledger.sessions == sessions, seq
            assert rebuilt.state.ledger.agents == agents, seq
        assert 0 in started and len(started) > 1  # from zero, and from snapshots taken after retirements


async def test_a_replay_never_starts_from_a_heartbeat_snapshot_taken_after_the_moment_s_retirements(
        store: EventStore, tmp_path: Path):
    """The heartbeat fold lets go of a retired agent's beats, so a heartbeat snapshot taken while the lifecycle
    fold stood past a retirement lacks them. A moment before the retirement - when the agent was alive and beating
    - must not start from it. Here the file folds the lifecycle stream first (as a projector whose LEDGER reader
    ran ahead would): the heartbeat snapshot has no beat of a1, and a replay of the moment still finds it."""
    from projection_helpers import commit_batches
    from test_timetravel import everything

    from ledger.subjects import HEARTBEAT_STREAM
    from projections.db import ProjectionDB
    from projections.state import LedgerState, LifecycleState

    inc = await store.append(ev.AgentRegistered(producer=me("a1"), agent_id="a1", instance_id="i", pool="p"))
    for n in range(3):
        await store.append(ev.AgentHeartbeat(producer=me("a1"), agent_id="a1", instance_id="i", incarnation=inc,
                                             beat=n))
    moment = await store.append(ev.SessionCreated(producer=CLI, session_id="s1", pool="p"))
    await store.append(ev.AgentGoodbye(producer=me("a1"), agent_id="a1", instance_id="i", incarnation=inc))
    await store.append(ev.SessionCreated(producer=CLI, session_id="s2", pool="p"))  # retires a1 (retain 0)
    items = await everything(store)
    ledger_first = [[i for i in items if i.stream == LEDGER_STREAM], [i for i in items if i.stream != LEDGER_STREAM]]
    path = tmp_path / "p.sqlite3"
    folded = await commit_batches(path, ledger_first, snapshot_every=1,
                                  state=LedgerState(ledger=LifecycleState(retain=0)))
    assert "a1" not in folded.heartbeats.beats  # retired: its beats left the fold, and the snapshot
    async with await ProjectionDB.open(path, readonly=True) as db:
        snap = await db.nearest_snapshot(HEARTBEAT_STREAM)
        assert snap is not None and snap.seq == 3
        rebuilt = await state_as_of(store, db, seq=moment)
        assert (await db.beats())["a1"].seq == 3  # the row keeps it
    assert rebuilt.snapshots[HEARTBEAT_STREAM] == 0  # not the snapshot taken past the goodbye
    beat = rebuilt.state.current_beat("a1")
    assert beat is not None and beat.seq == 3 and rebuilt.state.ledger.agents["a1"].status == "alive"
