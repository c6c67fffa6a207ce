"""Time travel as an index: the version rows the projector writes give, at every past sequence, exactly the state
the fold had there - whatever the batches, restarts and re-deliveries, and whatever the fold keeps later."""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from histories import CLI, Builder, histories
from hypothesis import given, settings
from hypothesis import strategies as st
from projection_contract import cut, fold_and_commit

from ledger import events as ev
from ledger.codec import Recorded, Unreadable
from ledger.subjects import HEARTBEAT_STREAM, LEDGER_STREAM
from ledgerctl.cli import cli
from projections.db import ProjectionDB
from projections.errors import ProjectionError
from projections.schema import DDL
from projections.state import HeartbeatState, LedgerState, LifecycleState
from projections.uncommitted import Uncommitted
from projections.views import owned_counts

Item = Recorded | Unreadable


def fold_ledger(items: list[Item], upto: int) -> LifecycleState:
    part = LifecycleState()
    for item in items:
        if item.stream == LEDGER_STREAM and item.seq <= upto:
            part.apply(item)
    return part


def fold_beats(items: list[Item], upto: int) -> HeartbeatState:
    part = HeartbeatState()
    for item in items:
        if item.stream == HEARTBEAT_STREAM and item.seq <= upto:
            part.apply(item)
    return part


def by_id(states: dict[str, Any]) -> list[Any]:
    return [states[k] for k in sorted(states)]


def session_counts(part: LifecycleState) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for s in part.sessions.values():
        out.setdefault(s.pool, {})[s.status] = out.setdefault(s.pool, {}).get(s.status, 0) + 1
    return out


def last(items: list[Item], stream: str) -> int:
    return max((i.seq for i in items if i.stream == stream), default=0)


async def commit_in_lives(path: Path, items: list[Item], data: st.DataObject) -> None:
    """Commit `items` over several writer lifetimes, each resuming from the file with some re-delivered."""
    position = 0
    while position < len(items):
        async with await ProjectionDB.open(path) as db:
            state = await db.load_state()
            resume = data.draw(st.integers(0, position), label="re-delivered from")
            committed = data.draw(st.integers(position + 1, len(items)), label="last commit of this life")
            await fold_and_commit(db, cut(data, items[resume:committed]), state)
        position = committed


@settings(max_examples=30, deadline=None)
@given(items=histories(), data=st.data())
def test_the_state_as_of_any_sequence_read_from_the_versions_is_the_fold_up_to_it(items: list[Item],
                                                                                  data: st.DataObject):
    async def scenario(path: Path) -> None:
        await commit_in_lives(path, items, data)
        end, hb_end = last(items, LEDGER_STREAM), last(items, HEARTBEAT_STREAM)
        seqs = data.draw(st.lists(st.integers(0, end), min_size=1, max_size=6), label="as of LEDGER")
        hb_seqs = data.draw(st.lists(st.integers(0, hb_end), min_size=1, max_size=4), label="as of LEDGER_HB")
        agents_ever = {i.event.entity_id for i in items if isinstance(i, Recorded)}
        async with await ProjectionDB.open(path, readonly=True) as db, db.reading():
            for seq in seqs:
                expected = fold_ledger(items, seq)
                assert await db.agent_states(as_of=seq) == by_id(expected.agents), seq
                assert await db.session_states(as_of=seq) == by_id(expected.sessions), seq
                assert await db.route_states(as_of=seq) == by_id(expected.routes), seq
                assert await db.pool_states(as_of=seq) == expected.pools, seq
                assert await db.owned_counts(as_of=seq) == owned_counts(expected.sessions.values()), seq
                assert await db.session_counts(as_of=seq) == session_counts(expected), seq
                # the filters the views pass read the derived columns of the versions
                pool = data.draw(st.sampled_from(["p", "q"]), label="pool")
                assert await db.session_states(pool=pool, state="assigned", as_of=seq) == [
                    s for s in by_id(expected.sessions) if s.pool == pool and s.status == "assigned"]
                some = sorted(expected.agents)[:2]
                assert await db.agent_states(ids=some, as_of=seq) == [expected.agents[k] for k in some]
            for hb_seq in hb_seqs:
                beats = fold_beats(items, hb_seq).beats
                assert await db.beats_as_of(hb_seq, agents_ever) == beats, hb_seq

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(Path(tmp) / "p.sqlite3"))


@settings(max_examples=20, deadline=None)
@given(items=histories(), data=st.data())
def test_pruned_beat_versions_still_answer_every_moment_from_the_prune_point_on(items: list[Item],
                                                                                data: st.DataObject):
    async def scenario(path: Path) -> None:
        hb_end = last(items, HEARTBEAT_STREAM)
        below = data.draw(st.integers(1, hb_end + 1), label="first kept heartbeat")
        async with await ProjectionDB.open(path) as db:
            state = await fold_and_commit(db, cut(data, items), LedgerState())
            await db.commit(Uncommitted().batch(state)._replace(prune_beats_below=below))
            kept = await db.conn.execute_fetchall("SELECT count(*) FROM beat_versions WHERE seq < ?", (below,))
        older = {i.event.entity_id for i in items if isinstance(i, Recorded) and i.stream == HEARTBEAT_STREAM
                 and i.seq < below}
        assert kept[0][0] <= len(older)  # at most one per agent below the prune point: the one it had there
        agents_ever = {i.event.entity_id for i in items if isinstance(i, Recorded)}
        async with await ProjectionDB.open(path, readonly=True) as db, db.reading():
            for hb_seq in range(below, hb_end + 1):
                assert await db.beats_as_of(hb_seq, agents_ever) == fold_beats(items, hb_seq).beats, hb_seq

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(Path(tmp) / "p.sqlite3"))


def test_versions_do_not_depend_on_what_the_fold_keeps_after_the_commit(tmp_path: Path):
    """Terminated entities may leave the in-memory fold: the versions were written when they changed."""
    b = Builder()
    created = [b.add(ev.SessionCreated(producer=CLI, session_id=f"s{n}", pool="p")) for n in range(3)]
    ended = b.add(ev.SessionTerminated(producer=CLI, session_id="s1", reason="done"))

    async def scenario() -> None:
        async with await ProjectionDB.open(tmp_path / "p.sqlite3") as db:
            state = await fold_and_commit(db, [created, [ended]], LedgerState())
            del state.ledger.sessions["s1"]  # retired from memory
            later = b.add(ev.SessionCreated(producer=CLI, session_id="s9", pool="p"))
            await fold_and_commit(db, [[later]], state)
        async with await ProjectionDB.open(tmp_path / "p.sqlite3", readonly=True) as db, db.reading():
            at_end = {s.session_id: s for s in await db.session_states(as_of=later.seq)}
            assert sorted(at_end) == ["s0", "s1", "s2", "s9"] and at_end["s1"].status == "terminated"
            before = {s.session_id: s for s in await db.session_states(as_of=ended.seq - 1)}
            assert before["s1"].status != "terminated"

    asyncio.run(scenario())


def schema_1_file(path: Path) -> None:
    """A projection file as schema 1 made it: the same tables, none of the version rows."""
    with sqlite3.connect(path) as conn:
        for statement in (s.strip() for s in DDL.split(";") if s.strip()):
            conn.execute(statement)
        conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")


async def test_a_file_without_version_rows_is_refused_to_readers_and_rebuilt_by_the_projector(tmp_path: Path):
    path = tmp_path / "old.sqlite3"
    schema_1_file(path)
    with pytest.raises(ProjectionError, match=r"schema 1.*`ledger project`") as refused:
        await ProjectionDB.open(path, readonly=True)
    assert "\n" not in str(refused.value)
    async with await ProjectionDB.open(path) as db:  # the projector: drops it, and rebuilds from the log
        assert db.reset
        tables = {r[0] for r in await db.conn.execute_fetchall("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"agent_versions", "session_versions", "route_versions", "pool_versions", "beat_versions"} <= tables


def test_the_cli_refuses_a_file_without_version_rows_in_one_line(tmp_path: Path):
    schema_1_file(tmp_path / "old.sqlite3")
    result = CliRunner().invoke(cli, ["sessions", "--db", str(tmp_path / "old.sqlite3"), "--json"])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "schema 1" in result.output and "`ledger project`" in result.output, result.output
