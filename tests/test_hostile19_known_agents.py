"""Hostile tests of the session reads that keep what they learnt of agents (`ledger.known_agents`): whatever the
interleaving of appends and reads, a fold with the cache gives the state and anomalies a fold reading everything
gives (`_alone`), and a claim is decided on the owner's state now. On a real nats-server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from helpers import eventually
from test_hostile18 import _alone, _records
from test_known_agents import _goodbye
from test_reads_attack import _claim, _registered

from ledger import events as ev
from ledger import lifecycle as lc
from ledger.codec import Recorded
from ledger.errors import InvalidInput
from ledger.known_agents import KnownAgents
from ledger.store import EventStore
from ledger.subjects import LEDGER_STREAM, event_subject
from ledger.writer import Writer

MONITOR = ev.Producer(id="monitor-test", instance="m")


async def _dead(store: EventStore, agent_id: str, incarnation: int) -> int:
    return await store.append(ev.AgentDeclaredDead(producer=MONITOR, agent_id=agent_id, incarnation=incarnation,
                                                   reason="missed"))


async def _same_as_alone(store: EventStore, records: list[Recorded], kept: lc.SessionFold) -> lc.SessionFold:
    alone = await _alone(store, records)
    assert (kept.state, kept.anomalies) == (alone.state, alone.anomalies), (kept.state, alone.state)
    return alone


@pytest.mark.parametrize("limit", [None, 2], ids=["default-limit", "limit-2"])
async def test_gathered_folds_sharing_the_cache_fold_as_alone_while_agents_come_and_go(
        ledger: Writer, uid: str, limit: int | None):
    """Rounds of take-overs between four agents, one of them leaving (goodbye, then declared dead) and
    registering again each round; each round folds every session at once (asyncio.gather, half with
    min_last_seq, half without) while registrations, deaths and claims land in the middle. With a limit of 2
    every fold evicts what the others just read."""
    store = ledger.store
    if limit is not None:
        store.known_agents = KnownAgents(store, limit=limit)
    agents = [f"{uid}-a{i}" for i in range(4)]
    inc = {a: await store.append(_registered(a)) for a in agents}
    sids = [f"{uid}-s{i}" for i in range(6)]
    for sid in sids:
        await ledger.create_session("p", session_id=sid)
    tokens: dict[str, int] = {}
    applied = flagged = 0
    for round_ in range(4):
        for i, sid in enumerate(sids):
            a = agents[(i + round_) % 4]
            tokens[sid] = await store.append(_claim(a, sid, inc[a], previous_token=tokens.get(sid)))
        victim = agents[round_ % 4]
        await (_goodbye(store, victim, inc[victim]) if round_ % 2 else _dead(store, victim, inc[victim]))
        for i, sid in enumerate(sids[:3]):  # take-overs from the victim (gone: applies) and others (alive: not)
            by = agents[(i + round_ + 2) % 4]
            await store.append(_claim(by, sid, inc[by], previous_token=tokens[sid]))
        inc[victim] = await store.append(_registered(victim))
        records = {sid: await _records(store, sid) for sid in sids}

        async def land(victim: str = victim) -> None:  # in the middle of the folds
            for _ in range(3):
                await _goodbye(store, victim, inc[victim])
                inc[victim] = await store.append(_registered(victim))
                await asyncio.sleep(0)

        folds = await asyncio.gather(
            *(store.session_fold(records[sid], min_last_seq=records[sid][-1].seq if k % 2 else None)
              for k, sid in enumerate(sids)), land())
        for sid, kept in zip(sids, folds[:-1], strict=True):
            assert isinstance(kept, lc.SessionFold)
            await _same_as_alone(store, records[sid], kept)
            assert kept.state is not None
            applied += kept.state.token != tokens[sid] or kept.state.claims > 1
            flagged += len(kept.anomalies)
        if limit is not None:
            assert len(store.known_agents.timelines) <= limit
    assert applied and flagged  # neither every take-over refused nor every one applied



async def _claimed_with_a_floor_past_the_end(ledger: Writer, uid: str, name: str) -> tuple[str, int, str, int]:
    """x registered, a session `name` it claimed, and a floor 1,000 past the stream's end: (x, its incarnation,
    the session, the floor)."""
    x = f"{uid}-x"
    inc = await ledger.store.append(_registered(x))
    sid, _ = await ledger.create_session("p", session_id=f"{uid}-{name}")
    await ledger.store.append(_claim(x, sid, inc))
    return x, inc, sid, await ledger.store.last_seq(LEDGER_STREAM) + 1000


async def test_a_claimers_registration_below_a_floor_past_the_streams_end_is_read(ledger: Writer, uid: str):
    """A session read asked for a replica holding a sequence the stream has not reached: a single node answers
    it at once with what it has. What the cache then knows of the claimer reaches only as far as that, not
    to the floor asked: a registration landing below the floor applies to a later claim, as alone."""
    store = ledger.store
    x, inc, s1, far = await _claimed_with_a_floor_past_the_end(ledger, uid, "s1")
    state, _ = await ledger.session(s1, min_last_seq=far)
    assert state is not None and state.owner == x
    inc2 = await store.append(_registered(x))  # a new incarnation, below `far`
    s2, _ = await ledger.create_session("p", session_id=f"{uid}-s2")
    token = await store.append(_claim(x, s2, inc2))
    records = await _records(store, s2)
    await _same_as_alone(store, records, await store.session_fold(records))
    state, _ = await ledger.session(s2)
    assert state is not None and state.owner == x and state.owner_incarnation == inc2 and state.token == token


async def test_an_owners_goodbye_below_a_claim_floor_past_the_streams_end_is_seen(ledger: Writer, uid: str):
    """`session_for_claim` asked past the stream's end: the owner's state it learns must not count as known up
    to that floor, or its goodbye since is never read and a take-over the ledger allows is refused."""
    store = ledger.store
    x, inc, sid, far = await _claimed_with_a_floor_past_the_end(ledger, uid, "s")
    (_, owner), _ = await ledger.session_for_claim(sid, min_last_seq=far)
    assert isinstance(owner, lc.AgentState) and owner.status == lc.A_ALIVE
    await _goodbye(store, x, inc)
    (_, owner), _ = await ledger.session_for_claim(sid)
    now, _ = await ledger.agent(x)
    assert owner == now and now is not None and now.status != lc.A_ALIVE


@contextmanager
def _floors(store: EventStore) -> Iterator[list[tuple[str, int | None]]]:
    """(what, min_last_seq) of every agent read the store makes while inside."""
    seen: list[tuple[str, int | None]] = []
    real_history, real_read, real_ever = store.history, store.read, store.ever_registered

    async def history(family: str, entity_id: str, **kw: object) -> object:
        if family == "agent":
            seen.append((f"history {entity_id}", kw.get("min_last_seq")))  # type: ignore[arg-type]
        return await real_history(family, entity_id, **kw)  # type: ignore[arg-type]

    async def read(subject_filter: str, **kw: object) -> object:
        seen.append((f"read {subject_filter}", kw.get("min_last_seq")))  # type: ignore[arg-type]
        return await real_read(subject_filter, **kw)  # type: ignore[arg-type]

    async def ever_registered(agent_ids: object, **kw: object) -> object:
        seen.append(("ever_registered", kw.get("min_last_seq")))  # type: ignore[arg-type]
        return await real_ever(agent_ids, **kw)  # type: ignore[arg-type]

    store.history, store.read, store.ever_registered = history, read, ever_registered  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        store.history, store.read, store.ever_registered = real_history, real_read, real_ever  # type: ignore[method-assign]


async def test_a_fold_without_min_last_seq_reads_agents_from_a_replica_holding_the_history(ledger: Writer, uid: str):
    """What a fold learns is kept as known up to the history's end, for every later fold: each read it learns
    from must come from a replica holding that end (Direct Get without min_last_seq may be answered by one
    lagging behind it - missing a registration or a death the next folds would then never read)."""
    store = ledger.store
    x, y = f"{uid}-x", f"{uid}-y"
    inc_x, inc_y = await store.append(_registered(x)), await store.append(_registered(y))
    sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
    for i in range(3):
        await store.append(_claim(f"{uid}-ghost{i}", sid, 1))
    token = await store.append(_claim(x, sid, inc_x))
    await _dead(store, x, inc_x)
    await store.append(_claim(y, sid, inc_y, previous_token=token))
    records = await _records(store, sid)
    end = records[-1].seq
    with _floors(store) as floors:
        kept = await store.session_fold(records)
    await _same_as_alone(store, records, kept)
    assert kept.state is not None and kept.state.owner == y
    assert {what.split()[0] for what, _ in floors} == {"ever_registered", "read", "history"}, floors
    assert all(floor is not None and floor >= end for _, floor in floors), (end, floors)


async def test_forged_registrations_and_garbage_on_an_agents_subjects_fold_as_alone(ledger: Writer, uid: str):
    """A registration another client wrote in x's name (flagged: its incarnation claims nothing), garbage on
    x's own registration subject and on its goodbye subject, before and after what the cache knows."""
    store = ledger.store
    js = store.nc.jetstream()
    x, y, mallory = f"{uid}-x", f"{uid}-y", f"{uid}-mallory"
    inc_x, inc_y = await store.append(_registered(x)), await store.append(_registered(y))
    forged = await store.append(ev.AgentRegistered(producer=ev.Producer(id=mallory, instance="m"), agent_id=x,
                                                   instance_id="another", pool="p"))
    await js.publish(event_subject("agent", x, "registered", x), b"\x00 junk")
    await js.publish(event_subject("agent", x, "goodbye", x), b"{not json")
    sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
    await store.append(_claim(x, sid, forged))  # the forged incarnation: flagged
    token = await store.append(_claim(x, sid, inc_x))
    await store.append(_claim(y, sid, inc_y, previous_token=token))  # x lives: flagged
    for _ in range(2):  # read whole, then from the cache
        records = await _records(store, sid)
        await _same_as_alone(store, records, await store.session_fold(records))
    await js.publish(event_subject("agent", x, "registered", x), b"\xff")
    await _goodbye(store, x, inc_x)
    await js.publish(event_subject("agent", x, "goodbye", x), b"")
    taken = await store.append(_claim(y, sid, inc_y, previous_token=token))  # x gone: applies
    records = await _records(store, sid)
    kept = await store.session_fold(records)
    await _same_as_alone(store, records, kept)
    assert kept.state is not None and kept.state.owner == y and kept.state.token == taken
    assert [seq for seq, _ in kept.anomalies][:2] == [records[1].seq, records[3].seq]


async def test_a_claim_naming_a_future_registration_then_read_with_a_floor_past_it(ledger: Writer, uid: str):
    """The ask together records the claimer as unregistered up to the history's end; its registration lands
    just after. Read again with a floor past the registration, the claim still names a future incarnation
    (flagged, as alone), and a claim after the registration applies."""
    store = ledger.store
    sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
    f = f"{uid}-future"
    await store.append(_claim(f"{uid}-ghost", sid, 1))
    claim_seq = await store.append(_claim(f, sid, await store.last_seq(LEDGER_STREAM) + 2))
    records = await _records(store, sid)
    await _same_as_alone(store, records, await store.session_fold(records))
    inc = await store.append(_registered(f))
    assert inc == claim_seq + 1
    for floor in (None, inc, inc + 1):
        kept = await store.session_fold(records, min_last_seq=floor)
        await _same_as_alone(store, records, kept)
        assert kept.state is not None and kept.state.owner is None
    s2, _ = await ledger.create_session("p", session_id=f"{uid}-s2")
    token = await store.append(_claim(f, s2, inc))
    records2 = await _records(store, s2)
    kept = await store.session_fold(records2)
    await _same_as_alone(store, records2, kept)
    assert kept.state is not None and kept.state.owner == f and kept.state.token == token


async def test_ids_that_are_no_token_are_refused_by_every_read_of_the_cache(ledger: Writer):
    """A wildcard or a dot would make the literal subject a filter over other agents' events."""
    known = ledger.store.known_agents
    for bad in ("*", ">", "a.b", "bad id", ""):
        with pytest.raises(InvalidInput):
            await known.read_history(bad, 10)
        with pytest.raises(InvalidInput):
            await known.current(bad, 1, min_last_seq=1)
        with pytest.raises(InvalidInput):
            await known.registrations(bad, 10)
    assert not known.timelines


async def test_the_watch_judges_take_overs_from_many_owners_with_two_timelines_kept(
        ledger: Writer, uid: str, monkeypatch: pytest.MonkeyPatch):
    """The watch's timelines live in a KnownAgents of MAX_TIMELINES: at 2 (the least: an owner and a claimer), a
    batch of take-over claims for us from sessions of three dead owners and of a live one (prefetched
    concurrently, each evicting the others' timeline) gives us exactly the sessions the ledger gives us."""
    from ledger.agent import Agent
    from ledger.agent import watch as watch_module

    monkeypatch.setattr(watch_module, "MAX_TIMELINES", 2)
    store = ledger.store
    reclaimer = ev.Producer(id="reclaimer-test", instance="r")
    owners = [f"{uid}-d{i}" for i in range(3)] + [f"{uid}-live"]
    inc = {o: await store.append(_registered(o)) for o in owners}
    tokens: dict[str, int] = {}
    for o in owners:
        for k in range(2):
            sid, _ = await ledger.create_session("p", session_id=f"{uid}-{o[-4:]}-{k}")
            tokens[sid] = await store.append(_claim(o, sid, inc[o]))
    for o in owners[:3]:
        await _dead(store, o, inc[o])
    async with Agent(ledger, agent_id=f"{uid}-a", pool="p", heartbeat=0.2, ttl=5.0, capacity=20) as a:
        assert len(a.watch.timelines) == 0
        last: dict[str, int] = {}
        for sid, token in sorted(tokens.items(), key=lambda t: t[0][-1]):  # owners interleaved
            last[sid] = await store.append(ev.SessionClaimed(
                producer=reclaimer, session_id=sid, agent_id=a.agent_id, instance_id=a.instance_id,
                incarnation=a.incarnation, reason="failover", previous_token=token))
        await eventually(lambda: all(a.judged_through(s) >= seq for s, seq in last.items()), timeout=30.0,
                         what="the watch judging every take-over")
        given = set()
        for sid in tokens:
            state, _ = await ledger.session(sid)
            assert state is not None
            if state.owner == a.agent_id:
                given.add(sid)
        assert given == {sid for sid in tokens if "-live-" not in sid}
        assert set(a.owned) == given
        assert len(a.watch.timelines) <= 2


async def test_the_worst_messages_on_the_subjects_the_claim_path_reads_leave_it_working(ledger: Writer, uid: str):
    """On an agent's own registration and history subjects, published raw by another client: JSON objects nested
    6 k deep (msgspec raises RecursionError on such input), a payload of 512 KiB, odd headers, and
    another agent's well-formed registration and goodbye (an event whose entity is not the subject's). The
    agent's superseded check, its claims, the watch, a session read and the owner's state for a take-over all
    go on, and fold as alone: none of it is a registration or a goodbye of the agent."""
    from ledger.agent import Agent
    from ledger.codec import encode
    from ledger.decide import AgentRef
    from ledger.errors import NotClaimable

    store = ledger.store
    nc = store.nc
    y = f"{uid}-y"
    inc_y = await store.append(_registered(y))
    async with Agent(ledger, agent_id=f"{uid}-x", pool="p", heartbeat=0.2, ttl=5.0) as agent:
        x = agent.agent_id
        other = encode(_registered(y)), encode(ev.AgentGoodbye(producer=ev.Producer(id=y, instance=f"i-{y}"),
                                                               agent_id=y, instance_id=f"i-{y}",
                                                               incarnation=inc_y))
        # A request, not a publish: its reply is the stream's ack, so each message is stored before the read
        # below asks as far as the stream's last sequence (a publish and a flush do not wait for the store).
        for verb in ("registered", "goodbye"):
            subject = event_subject("agent", x, verb, x)
            await nc.request(subject, b'{"type":' * 6_000 + b"1" + b"}" * 6_000, timeout=5)  # under the size bound
            await nc.request(subject, b'{"a":' + b"x" * (512 * 1024) + b"}", timeout=5)
            await nc.request(subject, b"{}", headers={"Nats-Msg-Id": "", "X-Junk": "x" * 4096}, timeout=5)
        for out in other:
            await nc.request(event_subject("agent", x, out.subject.split(".")[3], x), out.payload,
                             headers=out.headers, timeout=5)
        stored = await store.history("agent", x, min_last_seq=await store.last_seq(LEDGER_STREAM))
        assert [i.seq for i in stored if isinstance(i, Recorded)] == [agent.incarnation]  # its registration only
        reasons = {str(getattr(i, "reason", "")).split(":")[0] for i in stored if not isinstance(i, Recorded)}
        assert {"too-deep", "oversized", "invalid", "wrong-subject"} <= reasons, reasons
        sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
        claim = await agent.claim(sid)  # the superseded check reads the registration subject above
        assert not agent.superseded and agent.fenced is None
        records = await _records(store, sid)
        await _same_as_alone(store, records, await store.session_fold(records))
        (state, owner), _ = await ledger.session_for_claim(sid)  # the owner's state, its history read
        assert state is not None and state.owner == x and state.token == claim.token
        assert isinstance(owner, lc.AgentState) and owner.status == lc.A_ALIVE
        assert owner == (await ledger.agent(x))[0]
        reclaimer = Writer(store, ev.Producer(id="reclaimer", instance="r"))
        with pytest.raises(NotClaimable):  # x is alive: a take-over is refused on its state now
            await reclaimer.claim_session(sid, AgentRef(agent_id=y, instance_id=f"i-{y}", incarnation=inc_y),
                                          previous_token=claim.token, reason="failover")
        await eventually(lambda: sid in agent.owned, what="the watch keeps the agent's session")
        taken = await _records(store, sid)
        await _same_as_alone(store, taken, await store.session_fold(taken))

