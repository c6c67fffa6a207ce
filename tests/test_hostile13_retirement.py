"""Hostile cases for retirement (issue 13): forged events naming retired entities, a server clock stepping back,
retain=0, a retired agent registering again, an entity retired and re-created in one projector batch. The file a
projector commits, in whatever batches, must hold what a rebuild holds, and load back to the fold."""

from __future__ import annotations

from pathlib import Path

import pytest
from projection_helpers import commit_batches, dump, load
from test_retirement import OPERATOR, WATCHDOG, Log, Rows, churn, fold, fresh
from test_time_travel_index import by_id

from ledger import events as ev
from ledger.codec import Recorded
from projections.db import ProjectionDB
from projections.state import AGENT, ROUTE, SESSION, LedgerState

AGENT_ME = ev.Producer(id="a0", instance="i")


def stepping_back(items: list[Recorded], at: int, back_ns: int) -> list[Recorded]:
    """The same items, stored times after `at` shifted back by `back_ns` (a server clock stepped back)."""
    return [i if n < at else Recorded(i.stream, i.seq, i.subject, i.timestamp_ns - back_ns, i.event)
            for n, i in enumerate(items)]


def hostile_tail(log: Log) -> list[Recorded]:
    """After churn(1) retired s0, r0 and a0: forged writes naming them, then re-creations in the same batch."""
    return [
        log(ev.SessionClaimed(producer=AGENT_ME, session_id="s0", agent_id="a0", instance_id="i", incarnation=1,
                              reason="initial")),
        log(ev.RouteTransitioned(producer=WATCHDOG, route_id="r0", from_state="TERMINATED", to_state="RUNNING")),
        log(ev.AgentGoodbye(producer=AGENT_ME, agent_id="a0", instance_id="i", incarnation=1)),
        log(ev.SessionCreated(producer=OPERATOR, session_id="s0", pool="p")),
        log(ev.RouteCreated(producer=OPERATOR, route_id="r0", session_id="s0", endpoint="e")),
        log(ev.AgentRegistered(producer=AGENT_ME, agent_id="a0", instance_id="i", pool="p", ttl=60)),
        log(ev.SessionTerminated(producer=OPERATOR, session_id="s0", token=None)),
        log(ev.SessionCreated(producer=OPERATOR, session_id="s0", pool="q")),
    ]


def hostile_log() -> list[Recorded]:
    items = churn(1)  # a0 serves s0 (routed r0); both end
    log = Log()
    log.seq = items[-1].seq
    items.append(log(ev.AgentGoodbye(producer=AGENT_ME, agent_id="a0", instance_id="i", incarnation=1)))
    return items + hostile_tail(log)


LOGS = {
    "forged-and-recreated": hostile_log(),
    "clock-steps-back": stepping_back(hostile_log(), 4, 30 * 10**9),
}


@pytest.mark.parametrize("retain", [0.0, 0.05, 1e9])
@pytest.mark.parametrize("name", sorted(LOGS))
async def test_one_batch_equals_item_by_item_equals_the_fold(tmp_path: Path, name: str, retain: float):
    items = LOGS[name]
    whole = fold(items, retain)
    one = await commit_batches(tmp_path / "one.sqlite3", [items], state=fresh(retain))
    each = await commit_batches(tmp_path / "each.sqlite3", [[i] for i in items], state=fresh(retain))
    assert one == each == whole
    assert dump(tmp_path / "one.sqlite3") == dump(tmp_path / "each.sqlite3")
    for path in ("one.sqlite3", "each.sqlite3"):
        loaded = await load(tmp_path / path)
        loaded.settle(retain)
        assert loaded == whole, path


def test_retain_zero_retires_at_once_and_forged_writes_on_the_retired_are_unknown():
    items = hostile_log()
    state = fresh(0.0)
    changes = [state.apply(i) for i in items[:len(churn(1)) + 1]]
    retired = {(g.kind, g.id) for c in changes if c is not None for g in c.retired}
    assert retired == {(SESSION, "s0"), (ROUTE, "r0"), (AGENT, "a0")}
    tail = [state.apply(i) for i in items[len(churn(1)) + 1:]]
    kinds = [c.anomaly.kind if c is not None and c.anomaly else None for c in tail]
    assert kinds[:3] == ["unknown_entity"] * 3  # claim, transition, goodbye of retired entities
    assert state.sessions["s0"].pool == "q" and state.sessions["s0"].status == "pending"
    assert state.agents["a0"].status != "gone"


def test_a_clock_stepping_back_never_un_retires_nor_retires_early():
    items = churn(1)
    state = fresh(5.0)
    state.apply_all(items)
    high = state.ledger.stored_ns
    log = Log()
    log.seq = items[-1].seq
    back = Recorded(items[0].stream, log.seq + 1, "ledger.session.sx.created.cli", high - 60 * 10**9,
                    ev.SessionCreated(producer=OPERATOR, session_id="sx", pool="p"))
    change = state.apply(back)
    assert change is not None and change.retired == ()  # 60 s earlier says nothing about the 5 s retention
    assert state.ledger.stored_ns == high and "s0" in state.sessions
    later = Recorded(items[0].stream, log.seq + 2, "ledger.session.sy.created.cli", high + 5 * 10**9,
                     ev.SessionCreated(producer=OPERATOR, session_id="sy", pool="p"))
    change = state.apply(later)
    assert change is not None and {g.id for g in change.retired} >= {"s0", "r0"}
    assert isinstance(state, LedgerState)


@pytest.mark.parametrize("name", sorted(LOGS))
async def test_the_past_between_a_retirement_and_a_re_creation_in_one_batch_is_the_terminal_state(
        tmp_path: Path, name: str):
    """As of any sequence, the version rows give each entity's last state up to it, retired or not (the rows a
    projector that committed item by item holds then); before the fix the terminal version of an entity retired
    and re-created within one batch was lost, so the past showed it still assigned."""
    items = LOGS[name]
    path = tmp_path / "p.sqlite3"
    await commit_batches(path, [items], state=fresh(0.0))
    async with await ProjectionDB.open(path, readonly=True) as db, db.reading():
        for k in range(len(items) + 1):
            state, rows = fresh(0.0), Rows()
            for item in items[:k]:
                rows.note(state, state.apply(item))
            seq = items[k - 1].seq if k else 0
            assert await db.session_states(as_of=seq) == by_id(rows.rows[SESSION]), seq
            assert await db.route_states(as_of=seq) == by_id(rows.rows[ROUTE]), seq
            assert await db.agent_states(as_of=seq) == by_id(rows.rows[AGENT]), seq
