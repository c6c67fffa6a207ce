"""One rule in one place: the owner-write and orphan rules, the file lock, the consumers' own "moved" error."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumers.errors import Moved, moved_on_conflict
from ledger import codec, decide
from ledger import events as ev
from ledger import lifecycle as lc
from ledger.errors import Conflict, DataDirInUse, IllegalTransition, StaleToken
from ledgerctl.server import lock_data_dir
from projections.errors import DatabaseBusy
from projections.filelock import FileLock, try_lock

T0 = datetime(2026, 11, 1, tzinfo=UTC)
RECLAIMER = ev.Producer(id="reclaimer", instance="r1")


def session(status: str, owner: str | None = "a1", incarnation: int | None = 7, token: int | None = 5
            ) -> lc.SessionState:
    assigned = status == lc.S_ASSIGNED
    return lc.SessionState(session_id="s1", pool="p", platform="default", region="default", labels={},
                           idle_ttl=None, status=status, created_at=T0, owner=owner if assigned else None,
                           owner_incarnation=incarnation if assigned else None, token=token if assigned else None,
                           last_seq=9)


@given(status=st.sampled_from([lc.S_PENDING, lc.S_ASSIGNED, lc.S_ORPHANED, lc.S_RELEASED]),
       token=st.integers(1, 8), previous=st.integers(1, 8))
def test_the_reclaimer_orphans_exactly_what_the_fold_applies(status: str, token: int, previous: int):
    state = session(status, token=token)
    try:
        event = decide.decide_orphan(state, "s1", producer=RECLAIMER, reason="owner_dead", previous_token=previous,
                                     previous_owner="a1")
    except (StaleToken, IllegalTransition):
        event = ev.SessionOrphaned(producer=RECLAIMER, session_id="s1", reason="owner_dead", previous_token=previous)
        _, flagged = lc.evolve_session(state, codec.Recorded("LEDGER", 10, codec.subject_of(event), 10, event))
        assert flagged is not None
        return
    after, flagged = lc.evolve_session(state, codec.Recorded("LEDGER", 10, codec.subject_of(event), 10, event))
    assert flagged is None and after is not None and after.status == lc.S_ORPHANED


@given(status=st.sampled_from([lc.S_PENDING, lc.S_ASSIGNED, lc.S_RELEASED]), owner=st.sampled_from(["a1", "a2"]),
       incarnation=st.integers(6, 8), asking=st.sampled_from(["a1", "a2"]), asking_incarnation=st.integers(6, 8))
def test_owning_a_session_is_being_allowed_to_write_as_its_owner(status: str, owner: str, incarnation: int,
                                                                  asking: str, asking_incarnation: int):
    state = session(status, owner=owner, incarnation=incarnation)
    may_write = lc.owner_write_problem(state, asking, asking_incarnation, state.token) is None
    assert lc.owns(state, asking, asking_incarnation) == may_write
    assert may_write == (status == lc.S_ASSIGNED and (owner, incarnation) == (asking, asking_incarnation))


def test_the_projector_and_the_embedded_server_lock_alike(tmp_path: Path):
    """One flock: held, it refuses the next holder (even in this process: the lock is per open file)."""
    held = try_lock(tmp_path / "x.lock")
    assert held is not None
    assert try_lock(tmp_path / "x.lock") is None
    os.close(held)
    freed = try_lock(tmp_path / "x.lock")
    assert freed is not None
    os.close(freed)
    server_lock = try_lock(tmp_path / "nats-server.lock")
    assert server_lock is not None
    try:
        with pytest.raises(DataDirInUse, match="in use"):
            lock_data_dir(tmp_path)
    finally:
        os.close(server_lock)
    projection = FileLock(tmp_path / "p.sqlite3")
    projection.acquire()
    try:
        with pytest.raises(DatabaseBusy):
            FileLock(tmp_path / "p.sqlite3").acquire()
    finally:
        projection.release()
    again = FileLock(tmp_path / "p.sqlite3")
    again.acquire()  # released: the next one gets it
    again.release()


def test_a_lost_compare_and_set_reaches_the_consumers_callers_as_moved():
    with pytest.raises(Moved, match="session s1 moved on") as raised:
        with moved_on_conflict("session", "s1"):
            raise Conflict("ledger.session.s1.>", 4, 6)
    assert not isinstance(raised.value, Conflict) and isinstance(raised.value.__cause__, Conflict)
