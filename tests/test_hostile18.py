"""Hostile tests of the session read that asks about the next claimers together (`EventStore.ever_registered`,
one multi_last Direct Get) and of views of the past paged in SQL, on a real nats-server and a real SQLite file."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from test_past_pages import Replayed, key, plain, project
from test_reads_attack import _claim, _registered, counting
from test_time_travel_views import everything

from ledger import events as ev
from ledger import lifecycle as lc
from ledger import transfer
from ledger.codec import Recorded
from ledger.errors import InvalidInput
from ledger.settings import Settings
from ledger.store import CLAIMERS_AT_ONCE, EventStore
from ledger.subjects import LEDGER_STREAM, event_subject
from ledger.writer import Writer
from ledgerctl.server import EmbeddedServer
from projections.errors import InvalidQuery
from projections.query import Query
from projections.views import paged


async def _alone(store: EventStore, records: list[Recorded]) -> lc.SessionFold:
    """The reference: every claimer's registrations read one by one."""
    alone = lc.SessionFold(records)
    while (need := alone.advance()) is not None:
        what, agent_id = need
        if what == lc.REGISTRATIONS:
            alone.learn(what, agent_id, await store.registered(agent_id))
        else:
            alone.learn(what, agent_id, [i for i in await store.history("agent", agent_id)
                                         if isinstance(i, Recorded)])
    return alone


async def _records(store: EventStore, sid: str) -> list[Recorded]:
    return [i for i in await store.history("session", sid) if isinstance(i, Recorded)]


async def test_ever_registered_over_more_than_1024_ids_in_several_requests(ledger: Writer, uid: str):
    """1,500 ids (long ones, ids that are prefixes of others): the registered ones among them are found wherever
    they sit, past the first 1,024 too; a registration after up_to_seq is not; garbage on a registration subject
    counts as something there (the fold reads it and skips it)."""
    ids = [f"{uid}-{i}" for i in range(1500)] + [f"{uid}-{'x' * 100}", f"{uid}-1", f"{uid}-1:@=+~"]
    real = {ids[0], ids[1], ids[1023], ids[1024], ids[1499], f"{uid}-1:@=+~"}
    for a in sorted(real):
        await ledger.store.append(_registered(a))
    garbage = ids[1200]
    await ledger.store.nc.jetstream().publish(event_subject("agent", garbage, "registered", garbage), b"\x00 junk")
    end = await ledger.store.last_seq(LEDGER_STREAM)
    await ledger.store.append(_registered(ids[7]))  # after the moment asked about
    with counting(ledger.store) as counts:
        found = await ledger.store.ever_registered(ids, up_to_seq=end)
    assert found == real | {garbage}
    assert counts["read"] == 1  # the counting wrapper counts the call; the requests are checked below
    assert await ledger.store.ever_registered(ids[5:8], up_to_seq=end + 1) == {ids[7]}
    assert await ledger.store.ever_registered([f"{uid}-none-{i}" for i in range(3)], up_to_seq=end) == set()


async def test_ever_registered_refuses_an_id_that_would_be_a_wildcard_subject(ledger: Writer, uid: str):
    """`registered` checks the id; ever_registered must too: `*` or `>` would match every agent's registration
    subject in a multi_last request (and an id with a dot another agent's)."""
    await ledger.store.append(_registered(f"{uid}-a"))
    end = await ledger.store.last_seq(LEDGER_STREAM)
    for bad in ("*", ">", f"{uid}.a", ""):
        with pytest.raises(InvalidInput):
            await ledger.store.ever_registered([f"{uid}-a", bad], up_to_seq=end)


async def test_two_hundred_ghosts_then_a_real_claim_fold_as_alone_in_a_few_requests(ledger: Writer, uid: str):
    """More than CLAIMERS_AT_ONCE made-up claimers (several asks), a ghost named twice, and the real claim last."""
    sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
    for i in range(200):
        await ledger.store.append(_claim(f"{uid}-g{i % 190}", sid, 1 + i))
    b = f"{uid}-b"
    inc = await ledger.store.append(_registered(b))
    token = await ledger.store.append(_claim(b, sid, inc))
    records = await _records(ledger.store, sid)
    with counting(ledger.store) as counts:
        together = await ledger.store.session_fold(records)
    alone = await _alone(ledger.store, records)
    assert together.state == alone.state and together.anomalies == alone.anomalies
    assert together.state is not None and together.state.owner == b and together.state.token == token
    assert counts["read"] <= 200 // CLAIMERS_AT_ONCE + 3, counts


async def test_claims_by_many_registered_agents_cost_no_more_than_one_read_each(ledger: Writer, uid: str):
    """Claims naming agents that did register (a wrong incarnation, each flagged): each needs its registrations
    read, but asking again about the same still unread claimers before each read doubles the requests and sends
    up to 64 subjects each time."""
    sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
    agents = [f"{uid}-r{i}" for i in range(20)]
    for a in agents:
        await ledger.store.append(_registered(a))
    for a in agents:
        await ledger.store.append(_claim(a, sid, 1))  # incarnation 1: none of theirs
    records = await _records(ledger.store, sid)
    with counting(ledger.store) as counts:
        together = await ledger.store.session_fold(records)
    alone = await _alone(ledger.store, records)
    assert together.state == alone.state and together.anomalies == alone.anomalies
    assert counts["read"] <= len(agents) + 1, counts


async def test_a_claim_naming_a_future_registration_folds_as_alone(ledger: Writer, uid: str):
    """A claim whose incarnation is the sequence its claimer's registration gets just after it, with and without a
    later session record bringing that registration inside the history's end; a ghost alongside makes the fold
    ask about claimers together."""
    sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
    f = f"{uid}-future"
    await ledger.store.append(_claim(f"{uid}-ghost", sid, 1))
    claim_seq = await ledger.store.append(_claim(f, sid, await ledger.store.last_seq(LEDGER_STREAM) + 2))
    inc = await ledger.store.append(_registered(f))
    assert inc == claim_seq + 1
    for _ in range(2):
        records = await _records(ledger.store, sid)
        together = await ledger.store.session_fold(records)
        alone = await _alone(ledger.store, records)
        assert together.state == alone.state and together.anomalies == alone.anomalies
        assert together.state is not None and together.state.owner is None  # registered after its claim
        await ledger.store.append(_claim(f"{uid}-ghost2", sid, 1))  # the history now ends after the registration


async def test_a_session_read_with_min_last_seq_asks_together_too(ledger: Writer, uid: str):
    sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
    for i in range(5):
        await ledger.store.append(_claim(f"{uid}-g{i}", sid, 1))
    b = f"{uid}-b"
    inc = await ledger.store.append(_registered(b))
    token = await ledger.store.append(_claim(b, sid, inc))
    state, _ = await ledger.session(sid, min_last_seq=token)
    assert state is not None and state.owner == b


# --- views of the past paged in SQL -------------------------------------------------------------------------------

EDGES = [{"limit": 0}, {"limit": 1, "offset": 0}, {"after": "~"}, {"after": "s-"}, {"after": "s-1"},
         {"after": "s-10", "limit": 1}, {"after": "s-9"}, {"after": "r-", "limit": 2}, {"after": "a"},
         {"after": "zzzz"}, {"offset": 6, "limit": 1}, {"offset": 7}, {"limit": 10_000, "offset": 1}]
WHERE = {"sessions": [{}, {"pool": "nowhere"}, {"owner": "nobody"}, {"state": "terminated", "pool": "p"}],
         "routes": [{}, {"session": "s-nothing"}], "agents": [{}, {"pool": "nowhere"}]}


@pytest.fixture
async def fresh_store(fresh_server: EmbeddedServer) -> AsyncIterator[EventStore]:
    async with EventStore.connect(Settings(nats_url=fresh_server.url), ensure=True) as s:
        yield s


def _plain(page: object) -> dict[str, object]:
    """`plain`, without the position's `now` at a moment before anything (the wall clock there: it differs)."""
    out: dict[str, object] = plain(page)
    position = out["position"]
    assert isinstance(position, dict)
    if position["ledger_time"] is None:
        position.pop("now")
    return out


@pytest.mark.parametrize("retain", [None, 0.0], ids=["default-retain", "retain-0"])
async def test_past_pages_at_edge_values_equal_the_slice_and_the_replay(fresh_store: EventStore, tmp_path: Path,
                                                                       retain: float | None):
    """Limits of 0 and beyond everything, offsets at and past the end, `after` below, between, beyond every id
    and a prefix of ids, filters matching nothing; at the first sequence (before anything existed), the last,
    a time before the first event, a time between two events and one after the last; seq -1 and end + 1
    refused alike."""
    store, db = fresh_store, tmp_path / "p.sqlite3"
    await project(store, db, **({} if retain is None else {"retain": retain}))  # retain 0: s-33 retired, re-created
    items = await everything(store)
    end = await store.last_seq(LEDGER_STREAM)
    ledger_items = [i for i in items if i.stream == LEDGER_STREAM]
    between = ledger_items[5].stored_at + (ledger_items[6].stored_at - ledger_items[5].stored_at) / 2
    moments = [0, 1, end, ledger_items[0].stored_at.replace(year=2000), between,
               ledger_items[-1].stored_at + timedelta(days=1)]
    rows = 0
    async with Query.open(db, store) as indexed, Replayed.open(db, store) as replayed:
        for moment in moments:
            for view, filters in WHERE.items():
                for where in filters:
                    whole = _plain(await getattr(indexed, view)(as_of=moment, **where))
                    assert whole == _plain(await getattr(replayed, view)(as_of=moment, **where)), (view, moment)
                    every = whole["items"]
                    for paging in EDGES:
                        try:
                            page = await getattr(indexed, view)(as_of=moment, **where, **paging)
                        except InvalidInput:
                            with pytest.raises(InvalidInput):
                                await getattr(replayed, view)(as_of=moment, **where, **paging)
                            continue
                        got = _plain(page)
                        assert got == _plain(await getattr(replayed, view)(as_of=moment, **where, **paging)), (
                            view, moment, where, paging)
                        assert got["items"] == paged(every, lambda i, v=view: key(v, i), **paging), (
                            view, moment, where, paging)
                        assert page.total == len(every)
                        rows += len(got["items"])
        for beyond in (-1, end + 1):  # refused alike
            with pytest.raises(InvalidQuery):
                await indexed.sessions(as_of=beyond, limit=1)
            with pytest.raises(InvalidQuery):
                await replayed.sessions(as_of=beyond, limit=1)
    assert rows > 50


async def test_an_imported_copy_folds_a_session_read_together_as_alone(ledger: Writer, uid: str,
                                                                       fresh_server: EmbeddedServer, tmp_path: Path):
    """`ledger import`: the copy's messages carry their original stored times (trusted); the ask about claimers
    together runs on it too and gives the fold of reading each alone."""
    since = datetime.now(UTC) - timedelta(seconds=1)
    sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
    for i in range(70):
        await ledger.store.append(_claim(f"{uid}-g{i}", sid, 1))
    b = f"{uid}-b"
    inc = await ledger.store.append(_registered(b))
    token = await ledger.store.append(_claim(b, sid, inc))
    path = tmp_path / "incident.ndjson"
    with path.open("wb") as f:
        await transfer.export_log(ledger.store, f.write, since=since)
    async with EventStore.connect(Settings(nats_url=fresh_server.url), check=False) as copy:
        assert await transfer.load_file(copy, path) is not None
        assert await copy.is_imported(LEDGER_STREAM)
        records = await _records(copy, sid)
        with counting(copy) as counts:
            together = await copy.session_fold(records)
        alone = await _alone(copy, records)
    assert together.state == alone.state and together.anomalies == alone.anomalies
    assert together.state is not None and together.state.owner == b and together.state.token == token
    assert counts["read"] <= 4, counts



async def test_on_a_cluster_a_session_read_with_min_last_seq_asks_any_replica_together(cluster_store: EventStore,
                                                                                        uid: str):
    """R3 streams: direct gets go to any replica; with min_last_seq at the history's end, each read (asked
    together or alone) equals the fold that reads each claimer alone, however often it is asked. (A single
    nats-server ignores min_last_seq, and a lagging replica cannot be made cheaply here.)"""
    ledger = Writer(cluster_store, ev.Producer(id="operator-test", instance=uid))
    sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
    for i in range(70):
        await cluster_store.append(_claim(f"{uid}-g{i}", sid, 1))
    b = f"{uid}-b"
    inc = await cluster_store.append(_registered(b))
    token = await cluster_store.append(_claim(b, sid, inc))
    records = await _records(cluster_store, sid)
    for _ in range(5):
        state, _ = await ledger.session(sid, min_last_seq=token)
        together = await cluster_store.session_fold(records, min_last_seq=token)
        assert state == together.state and state is not None and state.owner == b and state.token == token
    alone = await _alone(cluster_store, records)
    assert together.anomalies == alone.anomalies and together.state == alone.state


async def test_a_long_mix_of_ghosts_garbage_and_real_claimers_past_one_ask_folds_as_alone(ledger: Writer, uid: str):
    """150 claims cycling through ghosts, agents with garbage on their registration subject, agents registered
    under another incarnation, agents registering only after the history ends, and take-overs of a live owner by
    real agents: several asks of 64, registered claimers beyond the first ask, the state and every anomaly as a
    fold reading each alone."""
    sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
    js = ledger.store.nc.jetstream()
    real: dict[str, int] = {}
    for i in range(10):
        real[f"{uid}-real{i}"] = await ledger.store.append(_registered(f"{uid}-real{i}"))
        junk = f"{uid}-junk{i}"
        await js.publish(event_subject("agent", junk, "registered", junk), b"\xff junk")
    token: int | None = None
    tokens: list[int] = []
    for i in range(150):
        kind = i % 5
        if kind == 0:
            await ledger.store.append(_claim(f"{uid}-g{i}", sid, 1, previous_token=token))
        elif kind == 1:
            await ledger.store.append(_claim(f"{uid}-junk{i % 10}", sid, 1, previous_token=token))
        elif kind == 2:
            await ledger.store.append(_claim(f"{uid}-real{i % 10}", sid, 1, previous_token=token))  # wrong inc
        elif kind == 3:
            await ledger.store.append(_claim(f"{uid}-later{i}", sid, 1, previous_token=token))
        else:
            a = f"{uid}-real{(i * 7) % 10}"
            token = await ledger.store.append(_claim(a, sid, real[a], previous_token=token))
            tokens.append(token)  # a take-over of a live owner: flagged, the first real claim holds
    for i in range(3, 150, 5):
        await ledger.store.append(_registered(f"{uid}-later{i}"))
    records = await _records(ledger.store, sid)
    with counting(ledger.store) as counts:
        together = await ledger.store.session_fold(records)
    alone = await _alone(ledger.store, records)
    assert together.state == alone.state and together.anomalies == alone.anomalies
    assert together.state is not None and together.state.token == tokens[0]
    assert len(together.anomalies) >= 100
    assert counts["read"] <= 150 // CLAIMERS_AT_ONCE + 1 + 2 * 10 + 10, counts  # asks, real and junk reads
