"""The SQLite materialization: rows and checkpoint together, exactly once, whatever the batches and crashes."""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
from itertools import pairwise
from pathlib import Path

import pytest
from histories import histories
from hypothesis import given, settings
from hypothesis import strategies as st
from projection_helpers import commit_batches, dump, load

from projections.db import ProjectionDB
from projections.errors import DatabaseMissing, ProjectionError
from projections.schema import PROJECTION_SCHEMA_VERSION


def cut(data: st.DataObject, items: list) -> list[list]:  # type: ignore[type-arg]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(items)), max_size=5)))
    bounds = [0, *cuts, len(items)]
    return [items[a:b] for a, b in pairwise(bounds)]


@settings(max_examples=25, deadline=None)
@given(items=histories(), data=st.data())
def test_a_projection_crashed_anywhere_and_restarted_equals_the_rebuild(items: list, data: st.DataObject):
    async def scenario(tmp: Path) -> None:
        rebuilt = tmp / "rebuilt.sqlite3"
        expected = await commit_batches(rebuilt, [items])

        path = tmp / "incremental.sqlite3"
        position = 0  # everything before it is committed
        while position < len(items):
            # One process lifetime: load what committed, resume (the consumer may re-deliver older
            # items), commit a few batches, then get killed - whatever it folded after its last
            # commit is lost with it.
            state = await load(path)
            resume = data.draw(st.integers(0, position), label="redelivered from")
            committed = data.draw(st.integers(position + 1, len(items)), label="last commit before the kill")
            await commit_batches(path, cut(data, items[resume:committed]), state=state)
            position = committed
        assert await load(path) == expected
        assert dump(path) == dump(rebuilt)

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(Path(tmp)))


@settings(max_examples=20, deadline=None)
@given(items=histories(), data=st.data())
def test_the_loaded_state_is_the_folded_state(items: list, data: st.DataObject):
    async def scenario(tmp: Path) -> None:
        state = await commit_batches(tmp / "p.sqlite3", cut(data, items), snapshot_every=7)
        assert await load(tmp / "p.sqlite3") == state

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(Path(tmp)))


async def test_another_schema_version_is_dropped_and_rebuilt(tmp_path: Path):
    path = tmp_path / "p.sqlite3"
    async with await ProjectionDB.open(path) as db:
        assert not db.reset
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '0' WHERE key = 'schema_version'")
        conn.execute("INSERT INTO agents VALUES ('stale', 'p', 'alive', 1, '{}')")
    with pytest.raises(ProjectionError, match="start the projector"):
        await ProjectionDB.open(path, readonly=True)
    async with await ProjectionDB.open(path) as db:
        assert db.reset
        assert await db.meta("schema_version") == str(PROJECTION_SCHEMA_VERSION)
        assert await db.agent_states() == []


async def test_readers_are_told_when_there_is_no_projection(tmp_path: Path):
    with pytest.raises(DatabaseMissing, match="ledger project"):
        await ProjectionDB.open(tmp_path / "none.sqlite3", readonly=True)
    (tmp_path / "junk.sqlite3").write_bytes(b"not a database at all" * 100)
    with pytest.raises(ProjectionError, match="not a projection database"):
        await ProjectionDB.open(tmp_path / "junk.sqlite3", readonly=True)
