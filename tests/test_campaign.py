"""A bounded fault campaign: kill -9 and restart the stream leader, freeze a node, kill -9 the projector and
the consumers, kill -9 a single fsync'ing server - all under steady load; after each fault the log keeps
every acknowledged append, `ledger check` is clean, the projection equals a rebuild (every table), no agent
stays fenced and no session is stranded."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from projection_helpers import NOT_COMPARED, STATE_TABLES, dump
from projections.schema import TABLES


def test_the_equivalence_helper_compares_every_table_of_the_projection(tmp_path: Path):
    assert set(STATE_TABLES) | set(NOT_COMPARED) == set(TABLES)
    assert not set(STATE_TABLES) & set(NOT_COMPARED)
    # And a difference in any compared table is seen: here, a pool's breaker.
    from projections.schema import statements

    files = [tmp_path / "a.sqlite3", tmp_path / "b.sqlite3"]
    for i, path in enumerate(files):
        with sqlite3.connect(path) as conn:
            for sql in statements():
                conn.execute(sql)
            conn.execute("INSERT INTO pools VALUES ('p', ?, '{}')", (i,))
    assert dump(files[0]) != dump(files[1])
