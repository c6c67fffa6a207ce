"""Hostile tests of the code that READS the log to judge take-overs and duplicates: `lc.SessionFold` /
`agent_at`, `Writer.session()`, the Agent's watch reading an owner's history, the appender's duplicate check and
the monitor's per-reporter reports. A real nats-server WITHOUT auth: forgeries are appended raw, as a hostile
client would (`authorized` gives them a producer that may write them). Waiting is bounded polling on a
condition (helpers.eventually), never a bare sleep. Each case either holds (asserted) or is an xfail(strict)
naming the fix.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from helpers import authorized, eventually
from test_agent_judges import FORGER, agent_of

from consumers import liveness_rules as rules
from consumers.follow import Follower
from consumers.monitor import MAX_REPORTERS, LivenessMonitor
from ledger import codec, decide
from ledger import events as ev
from ledger import lifecycle as lc
from ledger.codec import Recorded
from ledger.errors import EventIdTaken, LedgerError, StoreError
from ledger.ids import new_id
from ledger.store import EventStore
from ledger.subjects import HEARTBEAT_STREAM, LEDGER_STREAM, event_subject
from ledger.writer import Writer

MONITOR = ev.Producer(id="monitor", instance="m")


class Log:
    """Stores events with increasing sequences in their stream, as the server would."""

    def __init__(self) -> None:
        self._seq = {LEDGER_STREAM: itertools.count(1), HEARTBEAT_STREAM: itertools.count(1)}

    def __call__(self, event: ev.Event, at_ns: int | None = None) -> Recorded:
        stream = HEARTBEAT_STREAM if type(event).family == "hb" else LEDGER_STREAM
        seq = next(self._seq[stream])
        return Recorded(stream, seq, codec.subject_of(event), at_ns or seq * 1_000_000_000, event)


def _registered(agent_id: str) -> ev.AgentRegistered:
    return ev.AgentRegistered(producer=ev.Producer(id=agent_id, instance=f"i-{agent_id}"), agent_id=agent_id,
                              instance_id=f"i-{agent_id}", pool="p", platform="default", region="default",
                              labels={}, capacity=4, heartbeat_interval=0.1, ttl=2.0)


def _claim(agent_id: str, sid: str, incarnation: int, previous_token: int | None = None,
           producer: str | None = None) -> ev.SessionClaimed:
    return ev.SessionClaimed(producer=ev.Producer(id=producer or agent_id, instance="x"), session_id=sid,
                             agent_id=agent_id, instance_id=f"i-{agent_id}", incarnation=incarnation,
                             reason="failover" if previous_token else "initial", previous_token=previous_token)


@contextmanager
def counting(store: EventStore) -> Iterator[dict[str, int]]:
    """Counts the store's reads while inside: `history` calls per family, `read` calls, records returned."""
    counts = {"read": 0, "agent": 0, "session": 0, "route": 0, "agent_records": 0}
    real_history, real_read = store.history, store.read

    async def history(family: str, entity_id: str, **kw: object) -> object:
        items = await real_history(family, entity_id, **kw)  # type: ignore[arg-type]
        counts[family] = counts.get(family, 0) + 1
        if family == "agent":
            counts["agent_records"] += len(items)
        return items

    async def read(*args: object, **kw: object) -> object:
        counts["read"] += 1
        return await real_read(*args, **kw)  # type: ignore[arg-type]

    real_ever = store.ever_registered

    async def ever_registered(*args: object, **kw: object) -> object:  # one request per 1,024 ids
        counts["read"] += 1
        return await real_ever(*args, **kw)  # type: ignore[arg-type]

    store.history = history  # type: ignore[method-assign]
    store.read = read  # type: ignore[method-assign]
    store.ever_registered = ever_registered  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        del store.history, store.read, store.ever_registered


# --- (1) lifecycle: SessionFold / agent_at -----------------------------------------------------------------


def test_a_session_fold_reads_nothing_of_made_up_agents_nor_of_one_named_by_another_producer():
    """Take-over claims for 500 made-up agents, and claims for a real agent c written by mallory, must not widen
    what a read of the session fetches: only b's registrations and history, who really claimed."""
    log = Log()
    recs = [log(_registered(a)) for a in ("b", "c")]
    inc = {"b": recs[0].seq, "c": recs[1].seq}
    session = [log(ev.SessionCreated(producer=ev.Producer(id="cli", instance="c"), session_id="s1", pool="p"))]
    session.append(log(_claim("b", "s1", inc["b"])))
    token = session[-1].seq
    session += [log(_claim(f"ghost{i}", "s1", 1, previous_token=token)) for i in range(500)]
    session.append(log(_claim("c", "s1", inc["c"], previous_token=token, producer="mallory")))
    folded = lc.SessionFold(session)
    asked = []
    while (need := folded.advance()) is not None:
        asked.append(need)
        folded.learn(*need, [r for r in recs if r.event.entity_id == need[1]])
    assert asked == [(lc.REGISTRATIONS, "b"), (lc.HISTORY, "b")]  # b's claim, then b's state at the take-overs
    # And the fold keeps b: every take-over above is flagged.
    state = folded.state
    assert state is not None and state.owner == "b" and state.token == token and len(folded.anomalies) == 501


def test_agent_at_ignores_a_forged_death_before_the_registration_and_unknown_agents():
    """agents_lookup over a history starting with a death forged by an agent (flagged unauthorized_producer)
    never crashes and never invents a state before the registration."""
    log = Log()
    forged = log(ev.AgentDeclaredDead(producer=ev.Producer(id="mallory", instance="m"), agent_id="b",
                                      incarnation=1, reason="forged"))
    reg = log(_registered("b"))
    agent_at = lc.agents_lookup({"b": [forged, reg]})
    assert agent_at("b", reg.seq) is None  # before its registration (the forged death applied to nothing)
    assert agent_at("b", reg.seq + 1).status == lc.A_ALIVE
    assert agent_at("nobody", 10**9) is None


# --- (3) Writer.session(): reads per forged take-over -----------------------------------------------------


async def _owned_by_b(ledger: Writer, uid: str) -> tuple[str, str, int, int]:
    """A session owned by a registered (not running) agent b: (session, b, b's incarnation, token)."""
    b = f"{uid}-b"
    inc = await ledger.store.append(_registered(b))
    sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
    token = await ledger.store.append(_claim(b, sid, inc))
    return sid, b, inc, token


async def test_session_read_after_take_overs_for_made_up_agents_reads_only_the_real_owners_history(
        ledger: Writer, uid: str):
    sid, b, _, token = await _owned_by_b(ledger, uid)
    for i in range(60):
        await ledger.store.append(_claim(f"{uid}-ghost{i}", sid, 1, previous_token=token))
    with counting(ledger.store) as counts:
        state, _ = await ledger.session(sid)
    assert state is not None and state.owner == b and state.token == token
    assert counts["agent"] <= 1, counts  # b's history only: no ghost's


async def test_session_read_after_many_forged_claims_costs_a_bounded_number_of_requests(ledger: Writer, uid: str):
    sid, _, _, token = await _owned_by_b(ledger, uid)
    for i in range(60):
        await ledger.store.append(_claim(f"{uid}-ghost{i}", sid, 1, previous_token=token))
    with counting(ledger.store) as counts:
        await ledger.session(sid)
    assert counts["read"] + counts["agent"] + counts["session"] <= 8, counts


async def test_forged_claims_before_the_first_real_claim_cost_a_bounded_number_of_requests(ledger: Writer, uid: str):
    sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
    for i in range(60):
        await ledger.store.append(_claim(f"{uid}-ghost{i}", sid, 1))
    b = f"{uid}-b"
    inc = await ledger.store.append(_registered(b))
    token = await ledger.store.append(_claim(b, sid, inc))
    with counting(ledger.store) as counts:
        state, _ = await ledger.session(sid)
    assert state is not None and state.owner == b and state.token == token
    assert counts["read"] + counts["agent"] + counts["session"] <= 8, counts


async def test_claimers_asked_about_together_fold_as_when_each_is_read_alone(ledger: Writer, uid: str):
    """Ghost claims, a claim before its claimer registered, garbage on a ghost's registration subject, a real
    claim and a take-over after its owner left: the session read (which asks about the next claimers in one
    request) gives the state and anomalies of a fold that reads every claimer's registrations one by one."""
    sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
    early, real, late = f"{uid}-early", f"{uid}-real", f"{uid}-late"
    await ledger.store.append(_claim(f"{uid}-ghost0", sid, 1))
    await ledger.store.append(_claim(early, sid, 5))  # before `early` registered: unknown incarnation
    await ledger.store.nc.jetstream().publish(event_subject("agent", f"{uid}-ghost1", "registered", f"{uid}-ghost1"),
                                              b"\x00 not an event")
    await ledger.store.append(_claim(f"{uid}-ghost1", sid, 1))
    inc_early = await ledger.store.append(_registered(early))
    inc_real = await ledger.store.append(_registered(real))
    await ledger.store.append(_claim(f"{uid}-ghost2", sid, 1))
    token = await ledger.store.append(_claim(real, sid, inc_real))
    await ledger.store.append(ev.AgentGoodbye(producer=ev.Producer(id=real, instance="x"), agent_id=real,
                                              instance_id=f"i-{real}", incarnation=inc_real, reason="done"))
    inc_late = await ledger.store.append(_registered(late))
    await ledger.store.append(_claim(late, sid, inc_late, previous_token=token))
    await ledger.store.append(_claim(early, sid, inc_early, previous_token=token))  # token moved on: stale
    state, _ = await ledger.session(sid)
    records = [i for i in await ledger.store.history("session", sid) if isinstance(i, Recorded)]
    alone = lc.SessionFold(records)
    while (need := alone.advance()) is not None:
        what, agent_id = need
        if what == lc.REGISTRATIONS:
            alone.learn(what, agent_id, await ledger.store.registered(agent_id))
        else:
            alone.learn(what, agent_id, [i for i in await ledger.store.history("agent", agent_id)
                                         if isinstance(i, Recorded)])
    together = await ledger.store.session_fold(records)
    assert state == alone.state == together.state
    assert state is not None and state.owner == late
    assert together.anomalies == alone.anomalies and len(alone.anomalies) >= 4


async def test_take_over_judged_on_an_owners_history_with_unreadable_bytes_on_its_subjects(ledger: Writer, uid: str):
    """Garbage on the owner's agent subjects (its registration, goodbye and death subjects) is skipped by
    agent_at: a take-over of a live owner stays flagged, one after its real death applies."""
    sid, b, inc, token = await _owned_by_b(ledger, uid)
    c = f"{uid}-c"
    inc_c = await ledger.store.append(_registered(c))
    js = ledger.store.nc.jetstream()
    for verb, producer in (("registered", b), ("goodbye", b), ("declared_dead", "monitor"), ("fenced", b)):
        await js.publish(event_subject("agent", b, verb, producer), b"\x00\xff not an event")
    await ledger.store.append(_claim(c, sid, inc_c, previous_token=token))
    state, _ = await ledger.session(sid)
    assert state is not None and state.owner == b and state.token == token  # b is alive: live_owner
    await ledger.store.append(ev.AgentDeclaredDead(producer=MONITOR, agent_id=b, incarnation=inc, reason="missed"))
    take_over = await ledger.store.append(_claim(c, sid, inc_c, previous_token=token))
    state, _ = await ledger.session(sid)
    assert state is not None and state.owner == c and state.token == take_over


async def test_route_read_judges_its_owner_through_the_same_take_over_lookup(ledger: Writer, uid: str):
    """Writer.route() builds session_at from the same lookups: after a flagged take-over by c of b's live
    session, c's route write is flagged (c is not the owner), b's applies."""
    sid, b, _, token = await _owned_by_b(ledger, uid)
    c = f"{uid}-c"
    inc_c = await ledger.store.append(_registered(c))
    await ledger.store.append(_claim(c, sid, inc_c, previous_token=token))
    rid = f"{uid}-r"
    await ledger.store.append(ev.RouteCreated(producer=ev.Producer(id=b, instance="x"), route_id=rid,
                                              session_id=sid, endpoint="e"))
    await ledger.store.append(ev.RouteTransitioned(producer=ev.Producer(id=c, instance="x"), route_id=rid,
                                                   from_state=lc.PENDING, to_state=lc.STARTING, token=token))
    route, _ = await ledger.route(rid)
    assert route is not None and route.state == lc.PENDING
    await ledger.store.append(ev.RouteTransitioned(producer=ev.Producer(id=b, instance="x"), route_id=rid,
                                                   from_state=lc.PENDING, to_state=lc.STARTING, token=token))
    route, _ = await ledger.route(rid)
    assert route is not None and route.state == lc.STARTING


async def test_take_overs_by_many_registered_agents_do_not_make_every_session_read_read_their_histories(
        ledger: Writer, uid: str):
    sid, b, _, token = await _owned_by_b(ledger, uid)
    for i in range(40):
        c = f"{uid}-c{i}"
        inc_c = await ledger.store.append(_registered(c))
        await ledger.store.append(_claim(c, sid, inc_c, previous_token=token))  # b is alive: each flagged
    with counting(ledger.store) as counts:
        state, _ = await ledger.session(sid)
    assert state is not None and state.owner == b and state.token == token
    assert counts["agent"] <= 2, counts


async def test_session_for_claim_refuses_a_take_over_of_a_live_owner_and_allows_it_of_a_dead_one(
        ledger: Writer, uid: str):
    """The reclaimer's decision reads the owner's state (session_for_claim) and applies the same rule as the
    fold: nothing is written while b lives; after b's death the take-over is written and the fold applies it."""
    sid, b, inc, token = await _owned_by_b(ledger, uid)
    c = f"{uid}-c"
    inc_c = await ledger.store.append(_registered(c))
    reclaimer = Writer(ledger.store, ev.Producer(id="reclaimer-test", instance=new_id()))
    who = decide.AgentRef(c, f"i-{c}", inc_c)
    last = await ledger.store.last_seq()
    with pytest.raises(LedgerError):
        await reclaimer.claim_session(sid, who, reason="failover", previous_token=token)
    assert await ledger.store.last_seq() == last  # refused before anything was written
    await ledger.store.append(ev.AgentDeclaredDead(producer=MONITOR, agent_id=b, incarnation=inc, reason="missed"))
    new_token = await reclaimer.claim_session(sid, who, reason="failover", previous_token=token)
    state, _ = await ledger.session(sid)
    assert state is not None and state.owner == c and state.token == new_token


# --- (2) the Agent's watch: an owner's history read on a take-over claim -------------------------------


async def test_take_over_claims_for_made_up_agents_read_the_owners_history_at_most_once_per_batch(
        ledger: Writer, uid: str):
    async with agent_of(ledger, f"{uid}-a1") as a1:
        sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
        token = (await a1.claim(sid)).token
        batches = [0]
        real_prefetch = a1.watch.prefetch

        async def prefetch(batch: list[object]) -> None:
            batches[0] += 1
            await real_prefetch(batch)  # type: ignore[arg-type]

        a1.watch.prefetch = prefetch  # type: ignore[method-assign]
        with counting(a1.store) as counts:
            last = 0
            for i in range(40):
                last = await ledger.store.append(_claim(f"{uid}-ghost{i}", sid, 1, previous_token=token))
            await eventually(lambda: a1.judged_through(sid) >= last, timeout=30.0,
                             what="a1 judging every forged take-over")
        del a1.watch.prefetch
        assert sid in a1.owned and a1.owned[sid].token == token
        assert counts["agent"] <= batches[0], (counts, batches)


async def test_forged_take_over_claims_for_made_up_agents_do_not_grow_the_agents_memory(ledger: Writer, uid: str):
    async with agent_of(ledger, f"{uid}-a1") as a1:
        sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
        token = (await a1.claim(sid)).token
        last = 0
        for i in range(300):
            last = await ledger.store.append(_claim(f"{uid}-ghost{i}", sid, 1, previous_token=token))
        await eventually(lambda: a1.judged_through(sid) >= last, timeout=60.0,
                         what="a1 judging every forged take-over")
        assert sid in a1.owned
        assert len(a1.watch.registrations.known) <= 50, f"{len(a1.watch.registrations.known)} agents remembered"


async def test_take_overs_on_an_owner_with_a_bloated_history_cost_reads_bounded_by_the_history_once(
        ledger: Writer, uid: str):
    history, claims = 400, 6
    async with agent_of(ledger, f"{uid}-a1") as a1:
        sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
        token = (await a1.claim(sid)).token
        for i in range(history):
            await ledger.store.append(ev.AgentUnreachableReported(
                producer=ev.Producer(id=f"{uid}-m{i % 50}", instance="m"), agent_id=a1.agent_id,
                incarnation=a1.incarnation, error="forged"))
        with counting(a1.store) as counts:
            for i in range(claims):
                seq = await ledger.store.append(_claim(f"{uid}-ghost{i}", sid, 1, previous_token=token))
                await eventually(lambda seq=seq: a1.judged_through(sid) >= seq, timeout=30.0,
                                 what="a1 judging the forged take-over")  # one batch per claim
        assert sid in a1.owned and a1.fenced is None
        assert counts["agent_records"] <= history + 50 * claims, counts


async def test_a_take_over_of_the_agents_session_by_a_registered_agent_while_it_is_alive_changes_nothing(
        ledger: Writer, uid: str):
    """c (registered) names a1's current token while a1 is alive: the watch reads a1's history, flags it
    live_owner like the fold, and a1 keeps running the session."""
    async with agent_of(ledger, f"{uid}-a1") as a1:
        sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
        token = (await a1.claim(sid)).token
        c = f"{uid}-c"
        inc_c = await ledger.store.append(_registered(c))
        seq = await ledger.store.append(_claim(c, sid, inc_c, previous_token=token))
        await eventually(lambda: a1.judged_through(sid) >= seq, timeout=30.0, what="a1 judging the take-over")
        assert sid in a1.owned and a1.owned[sid].token == token
        state, _ = await ledger.session(sid)
        assert state is not None and state.owner == a1.agent_id and state.token == token


async def test_a_take_over_in_the_same_batch_as_the_owners_drain_moves_the_session_as_the_fold_does(
        ledger: Writer, uid: str):
    """A drain the agent did not write (forged on its own subject) and c's take-over right after it, likely in
    one watch batch: agent_at read at the batch's end must still see the drain before the claim, so a1 lets
    the session go exactly as the fold gives it to c (no two owners)."""
    async with agent_of(ledger, f"{uid}-a1") as a1:
        sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
        token = (await a1.claim(sid)).token
        c = f"{uid}-c"
        inc_c = await ledger.store.append(_registered(c))
        await ledger.store.append(authorized(ev.AgentDraining(
            producer=FORGER, agent_id=a1.agent_id, incarnation=a1.incarnation, deadline=ev.utcnow(), reason="x")))
        take_over = await ledger.store.append(_claim(c, sid, inc_c, previous_token=token))
        state, _ = await ledger.session(sid)
        assert state is not None and state.owner == c and state.token == take_over
        await eventually(lambda: sid not in a1.owned, timeout=30.0, what="a1 letting the taken-over session go")


# --- (4) the appender's duplicate check -------------------------------------------------------------------


async def test_a_duplicate_ack_on_garbage_under_our_event_id_is_not_reported_as_written(ledger: Writer, uid: str):
    sid, b, inc, token = await _owned_by_b(ledger, uid)
    event_id = f"takeover-{uid}"
    js = ledger.store.nc.jetstream()
    await js.publish(event_subject("session", sid, "claimed", "mallory"), b"\x00garbage",
                     headers={"Nats-Msg-Id": event_id})
    await ledger.store.append(ev.AgentDeclaredDead(producer=MONITOR, agent_id=b, incarnation=inc, reason="missed"))
    c = f"{uid}-c"
    inc_c = await ledger.store.append(_registered(c))
    claim = ev.SessionClaimed(producer=ev.Producer(id="reclaimer", instance="r"), session_id=sid, agent_id=c,
                              instance_id=f"i-{c}", incarnation=inc_c, reason="failover", previous_token=token,
                              event_id=event_id)
    with pytest.raises(EventIdTaken):
        await ledger.store.append(claim)


async def test_garbage_under_the_monitors_derived_death_id_does_not_swallow_the_death(store: EventStore, uid: str):
    ledger = Writer(store, MONITOR)
    a1 = f"{uid}-a1"
    inc = await store.append(_registered(a1))
    event_id = f"dead-{a1}-{inc}"
    await store.nc.jetstream().publish(event_subject("agent", a1, "declared_dead", "mallory"), b"\x00garbage",
                                       headers={"Nats-Msg-Id": event_id})
    monitor, _, _ = _monitor(store, Log(), a1)
    await monitor._write(ev.AgentDeclaredDead(producer=MONITOR, agent_id=a1, incarnation=inc, reason="missed",
                                              event_id=event_id))
    state, _ = await ledger.agent(a1)
    assert state is not None and state.status == lc.A_DEAD


async def test_a_duplicate_ack_on_another_verbs_message_under_our_event_id_is_refused(ledger: Writer, uid: str):
    """The same trick on another verb of the entity (garbage on `session.<sid>.released.mallory`) is refused."""
    sid, b, inc, token = await _owned_by_b(ledger, uid)
    event_id = f"takeover-{uid}"
    js = ledger.store.nc.jetstream()
    await js.publish(event_subject("session", sid, "released", "mallory"), b"\x00garbage",
                     headers={"Nats-Msg-Id": event_id})
    claim = ev.SessionClaimed(producer=ev.Producer(id="reclaimer", instance="r"), session_id=sid, agent_id=b,
                              instance_id=f"i-{b}", incarnation=inc, reason="failover", previous_token=token,
                              event_id=event_id)
    with pytest.raises(EventIdTaken):
        await ledger.store.append(claim)
    state, _ = await ledger.session(sid)
    assert state is not None and state.token == token


async def test_a_real_retry_of_our_own_event_is_still_taken_as_written(ledger: Writer, uid: str):
    """The honest duplicate (our own event id, our own subject, already stored) settles with its sequence."""
    sid, b, inc, token = await _owned_by_b(ledger, uid)
    event = ev.SessionReleased(producer=ev.Producer(id=b, instance="x"), session_id=sid, agent_id=b,
                               incarnation=inc, token=token, reason="done", event_id=new_id())
    first = await ledger.store.append(event)
    assert await ledger.store.append(event) == first


async def test_a_duplicate_whose_read_back_fails_is_retried_and_settles_as_written(ledger: Writer, uid: str):
    """The read-back of an honest duplicate fails (the leader is away: injected here as two StoreErrors on the
    real read-back); the append is retried through the sweeper, reads back again and settles with the stored
    sequence - neither a false EventIdTaken nor a second copy."""
    sid, b, inc, token = await _owned_by_b(ledger, uid)
    event = ev.SessionReleased(producer=ev.Producer(id=b, instance="x"), session_id=sid, agent_id=b,
                               incarnation=inc, token=token, reason="done", event_id=new_id())
    first = await ledger.store.append(event)
    appender = ledger.store._appender
    real_read_back = appender._read_back
    failures = [2]

    async def flaky(subject_filter: str, seq: int) -> object:
        if failures[0] > 0:
            failures[0] -= 1
            raise StoreError("leader away")
        return await real_read_back(subject_filter, seq)

    appender._read_back = flaky  # type: ignore[assignment]
    try:
        assert await ledger.store.append(event) == first
    finally:
        appender._read_back = real_read_back
    assert failures[0] == 0  # both failures were met, and retried past
    assert [i.seq for i in await ledger.store.history("session", sid) if i.seq > token] == [first]


# --- (5) the monitor's per-reporter unreachable reports --------------------------------------------------


def _monitor(store: EventStore, log: Log, agent_id: str) -> tuple[LivenessMonitor, Follower, int]:
    follower = Follower(store, heartbeats=False)
    monitor = LivenessMonitor(Writer(store, MONITOR), follower)
    reg = log(_registered(agent_id), int(ev.utcnow().timestamp() * 1e9))  # registered just now: not overdue
    monitor._heard(LEDGER_STREAM, [reg], follower.state.apply_all([reg]))
    return monitor, follower, reg.seq


def _report(log: Log, agent_id: str, reporter: str, incarnation: int, at_ns: int) -> Recorded:
    return log(ev.AgentUnreachableReported(producer=ev.Producer(id=reporter, instance="r"), agent_id=agent_id,
                                           incarnation=incarnation, error="timeout"), at_ns)


def _feed(monitor: LivenessMonitor, follower: Follower, items: list[Recorded]) -> None:
    monitor._heard(LEDGER_STREAM, items, follower.state.apply_all(items))


async def test_thousands_of_reporters_keep_the_monitors_reports_bounded_and_a_real_suspicion_happens(
        store: EventStore):
    """3 honest reports, then 5000 from distinct forged reporters: memory stays at MAX_REPORTERS, and the
    honest ones being evicted never keeps the agent from being suspected (the newest reports are kept)."""
    log = Log()
    monitor, follower, inc = _monitor(store, log, "a1")
    now = ev.utcnow()
    base = int(now.timestamp() * 1e9) - 5_000_000_000
    _feed(monitor, follower, [_report(log, "a1", f"honest{i}", inc, base + i) for i in range(3)])
    _feed(monitor, follower, [_report(log, "a1", f"forged{i}", inc, base + 10 + i) for i in range(5000)])
    reports = monitor._reports[("a1", inc)]
    assert len(reports) == MAX_REPORTERS and not any(r.startswith("honest") for r in reports)
    agent = follower.state.ledger.agents["a1"]
    verdict = rules.judge(agent, None, sorted(reports.values()), now, monitor.settings, "monitor")
    assert verdict is not None and verdict.kind == rules.SUSPECT


async def test_a_reporter_counts_once_however_often_it_reports(store: EventStore):
    log = Log()
    monitor, follower, inc = _monitor(store, log, "a1")
    now = ev.utcnow()
    base = int(now.timestamp() * 1e9) - 1_000_000_000
    _feed(monitor, follower, [_report(log, "a1", "mallory", inc, base + i) for i in range(1000)])
    assert len(monitor._reports[("a1", inc)]) == 1
    agent = follower.state.ledger.agents["a1"]
    assert rules.judge(agent, None, sorted(monitor._reports[("a1", inc)].values()), now, monitor.settings,
                       "monitor") is None


async def test_reports_naming_made_up_incarnations_do_not_grow_the_monitors_memory(store: EventStore):
    log = Log()
    monitor, follower, inc = _monitor(store, log, "a1")
    at = int(ev.utcnow().timestamp() * 1e9)
    _feed(monitor, follower, [_report(log, "a1", "mallory", inc + 1 + i, at) for i in range(5000)])
    assert len(monitor._reports) <= 2, f"{len(monitor._reports)} (agent, incarnation) keys"


async def test_reports_naming_another_incarnation_never_count_toward_the_current_ones_suspicion(store: EventStore):
    log = Log()
    monitor, follower, inc = _monitor(store, log, "a1")
    now = ev.utcnow()
    at = int(now.timestamp() * 1e9) - 1_000_000_000
    _feed(monitor, follower, [_report(log, "a1", f"r{i}", inc + 7, at + i) for i in range(10)])
    agent = follower.state.ledger.agents["a1"]
    reports = sorted(monitor._reports.get(("a1", agent.incarnation), {}).values())
    assert reports == [] and rules.judge(agent, None, reports, now, monitor.settings, "monitor") is None
