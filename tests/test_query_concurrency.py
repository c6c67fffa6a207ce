"""One `Query` on one projection file answers overlapping calls (the HTTP API and the query service share one)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from histories import Builder
from projection_helpers import commit_batches
from samples import sample

from ledger import events as ev
from projections.query import Query


async def test_overlapping_reads_on_one_query_each_get_a_consistent_answer(tmp_path: Path) -> None:
    b = Builder()
    items = [b.add(sample(ev.SessionCreated, session_id=f"s{i}", event_id=f"e-{i}")) for i in range(20)]
    db = tmp_path / "p.sqlite3"
    await commit_batches(db, [items])
    async with Query.open(db) as q:
        pages = await asyncio.gather(*(q.sessions() for _ in range(15)), *(q.pools() for _ in range(5)))
    assert all(len(page.items) == 20 for page in pages[:15])
    assert {page.position.ledger_seq for page in pages} == {items[-1].seq}
