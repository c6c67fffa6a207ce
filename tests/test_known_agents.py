"""Session reads keep what they learnt of agents (`ledger.known_agents`): the next read asks only what follows the
part known, and folds exactly as a read of everything would - registrations and deaths that land in between
included. On a real nats-server."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from test_hostile18 import _alone, _records
from test_reads_attack import _claim, _registered

from ledger import events as ev
from ledger.agent import Agent
from ledger.codec import Recorded
from ledger.errors import InvalidInput
from ledger.store import EventStore
from ledger.subjects import LEDGER_STREAM
from ledger.writer import Writer
from ledgerctl.server import EmbeddedServer


@contextmanager
def reads_of(store: EventStore) -> Iterator[list[tuple[str, int]]]:
    """(what, after) of every history and filtered read the store makes while inside."""
    seen: list[tuple[str, int]] = []
    real_history, real_read = store.history, store.read

    async def history(family: str, entity_id: str, *, after: int = 0, **kw: object) -> object:
        seen.append((f"{family}:{entity_id}", after))
        return await real_history(family, entity_id, after=after, **kw)  # type: ignore[arg-type]

    async def read(subject_filter: str, *, after: int = 0, **kw: object) -> object:
        seen.append((subject_filter, after))
        return await real_read(subject_filter, after=after, **kw)  # type: ignore[arg-type]

    store.history, store.read = history, read  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        store.history, store.read = real_history, real_read  # type: ignore[method-assign]


async def _goodbye(store: EventStore, agent_id: str, incarnation: int) -> int:
    return await store.append(ev.AgentGoodbye(producer=ev.Producer(id=agent_id, instance=f"i-{agent_id}"),
                                              agent_id=agent_id, instance_id=f"i-{agent_id}",
                                              incarnation=incarnation))


async def _owned_then_taken_over(store: EventStore, sid: str, owner: tuple[str, int], by: tuple[str, int]) -> None:
    """`sid` claimed by `owner`, then claimed by `by` from it (a take-over: the fold judges the owner's state)."""
    await store.append(ev.SessionCreated(producer=ev.Producer(id="operator", instance="o"), session_id=sid,
                                         pool="p"))
    token = await store.append(_claim(owner[0], sid, owner[1]))
    await store.append(_claim(by[0], sid, by[1], previous_token=token))


async def _folds_as_alone(store: EventStore, sid: str) -> None:
    records = await _records(store, sid)
    kept = await store.session_fold(records)
    alone = await _alone(store, records)
    assert kept.state == alone.state and kept.anomalies == alone.anomalies, (kept.state, alone.state)


async def test_a_second_session_read_asks_only_what_follows_of_the_agents_it_knows(ledger: Writer, uid: str):
    store = ledger.store
    x, y = f"{uid}-x", f"{uid}-y"
    inc_x, inc_y = await store.append(_registered(x)), await store.append(_registered(y))
    for i in range(30):  # the log moves on: a whole read would start back at the registrations
        await ledger.create_session("p", session_id=f"{uid}-filler-{i}")
    await _owned_then_taken_over(store, f"{uid}-a", (x, inc_x), (y, inc_y))
    with reads_of(store) as first:
        await _folds_as_alone(store, f"{uid}-a")
    assert any(what == f"agent:{x}" and after == 0 for what, after in first), first  # read whole, once
    known_through = await store.last_seq(LEDGER_STREAM)
    await _owned_then_taken_over(store, f"{uid}-b", (x, inc_x), (y, inc_y))
    records = await _records(store, f"{uid}-b")
    with reads_of(store) as second:
        kept = await store.session_fold(records)
    about_agents = [(what, after) for what, after in second if x in what or y in what]
    assert about_agents and all(after >= known_through for _, after in about_agents), second
    alone = await _alone(store, records)
    assert kept.state == alone.state and kept.anomalies == alone.anomalies
    assert kept.state is not None and kept.state.owner == x and kept.anomalies  # x lives: y's take-over flagged


async def test_a_registration_and_a_goodbye_after_the_part_known_are_read_for_later_claims(ledger: Writer, uid: str):
    """What lands after a read is read by the next one that needs it: a new incarnation's claim applies, the old
    incarnation's claim is flagged, and a take-over from an owner that said goodbye since is judged on it."""
    store = ledger.store
    x, y = f"{uid}-x", f"{uid}-y"
    inc_x, inc_y = await store.append(_registered(x)), await store.append(_registered(y))
    await _owned_then_taken_over(store, f"{uid}-a", (x, inc_x), (y, inc_y))
    await _folds_as_alone(store, f"{uid}-a")  # x's registrations and history are known now
    await _goodbye(store, x, inc_x)
    inc_x2 = await store.append(_registered(x))
    for sid, claimer in ((f"{uid}-new", (x, inc_x2)), (f"{uid}-old", (x, inc_x))):
        await ledger.create_session("p", session_id=sid)
        await store.append(_claim(claimer[0], sid, claimer[1]))
        await _folds_as_alone(store, sid)
    new, _ = await ledger.session(f"{uid}-new")
    old, _ = await ledger.session(f"{uid}-old")
    assert new is not None and new.owner == x and new.owner_incarnation == inc_x2
    assert old is not None and old.owner is None  # the incarnation that said goodbye claims nothing
    await _owned_then_taken_over(store, f"{uid}-c", (x, inc_x2), (y, inc_y))
    await _folds_as_alone(store, f"{uid}-c")
    await _goodbye(store, x, inc_x2)  # x leaves; y takes over a session x owned since before
    sid = f"{uid}-d"
    await ledger.create_session("p", session_id=sid)
    token = await store.append(_claim(x, sid, inc_x2))
    await _goodbye(store, y, inc_y)
    await store.append(_claim(y, sid, inc_y, previous_token=token))  # by an agent gone before it: flagged
    await _folds_as_alone(store, sid)


async def test_a_registration_in_an_agents_name_by_another_client_does_not_supersede_it(ledger: Writer, uid: str):
    """Only the agent's own registration subject holds registrations the folds take: one another client wrote
    in its name (its own producer token) is flagged by every fold, so it must not fence the agent either (a
    one-message denial of service against any agent)."""
    async with Agent(ledger, agent_id=f"{uid}-a", pool="p", heartbeat=0.2, ttl=5.0) as agent:
        forger = ev.Producer(id=f"{uid}-mallory", instance="m")
        await ledger.store.append(ev.AgentRegistered(
            producer=forger, agent_id=agent.agent_id, instance_id="another-process", pool="p"))
        sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
        claim = await agent.claim(sid)
        assert not agent.superseded and agent.fenced is None
        state, _ = await ledger.session(sid)
        assert state is not None and state.owner == agent.agent_id and state.token == claim.token


async def test_a_read_of_unknown_claimers_keeps_their_absence_until_they_register(ledger: Writer, uid: str):
    """Claimers an ask found unregistered are known as such up to that history's end; one that registers later
    is read for a claim after its registration."""
    store = ledger.store
    sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
    ghosts = [f"{uid}-g{i}" for i in range(3)]
    for g in ghosts:
        await store.append(_claim(g, sid, 1))
    await _folds_as_alone(store, sid)
    inc = await store.append(_registered(ghosts[0]))
    token = await store.append(_claim(ghosts[0], sid, inc))
    records = [i for i in await store.history("session", sid) if isinstance(i, Recorded)]
    kept = await store.session_fold(records)
    alone = await _alone(store, records)
    assert kept.state == alone.state and kept.anomalies == alone.anomalies
    assert kept.state is not None and kept.state.owner == ghosts[0] and kept.state.token == token


async def test_the_cache_is_bounded(ledger: Writer, uid: str):
    """More agents than the store keeps: the oldest are let go, and a read of them again folds alike."""
    from ledger import known_agents

    store = ledger.store
    small = known_agents.KnownAgents(store, limit=2)
    store.known_agents = small
    agents = [f"{uid}-a{i}" for i in range(4)]
    incs = [await store.append(_registered(a)) for a in agents]
    for i, a in enumerate(agents):
        await _owned_then_taken_over(store, f"{uid}-s{i}", (a, incs[i]), (agents[(i + 1) % 4], incs[(i + 1) % 4]))
        await _folds_as_alone(store, f"{uid}-s{i}")
        assert len(small.timelines) <= 2 and len(small._registrations) <= 2
    await _folds_as_alone(store, f"{uid}-s0")


async def test_an_id_that_is_no_token_is_refused_before_any_read(ledger: Writer):
    """The cache reads a literal subject built from the id: `*`, `>` or a dot would make it a filter matching
    other agents' registrations, so it checks the id as `EventStore.registered` does."""
    for bad in ("*", ">", "a.b", "bad id"):
        with pytest.raises(InvalidInput):
            await ledger.store.known_agents.registrations(bad, 10)


async def test_a_claim_is_decided_on_the_owners_state_now_not_on_the_part_known(ledger: Writer, uid: str):
    """`session_for_claim` judges a take-over on the owner's state: known from an earlier read, it must still
    see what the owner wrote since (draining, then gone), or a take-over the ledger allows is refused until the
    session itself changes."""
    from datetime import UTC, datetime, timedelta

    store = ledger.store
    x = f"{uid}-x"
    inc = await store.append(_registered(x))
    sid, _ = await ledger.create_session("p", session_id=f"{uid}-s")
    await store.append(_claim(x, sid, inc))
    me = ev.Producer(id=x, instance=f"i-{x}")
    for later in (ev.AgentDraining(producer=me, agent_id=x, incarnation=inc,
                                   deadline=datetime.now(UTC) + timedelta(minutes=5)),
                  ev.AgentDrained(producer=me, agent_id=x, incarnation=inc)):
        (_, known), _ = await ledger.session_for_claim(sid)
        now, _ = await ledger.agent(x)
        assert known == now
        await store.append(later)
    (_, known), _ = await ledger.session_for_claim(sid)
    now, _ = await ledger.agent(x)
    assert known == now and now is not None and now.status != "alive"


async def test_claims_of_new_sessions_read_no_agent_history_from_the_start_again(ledger: Writer, uid: str):
    """The claim path as an agent runs it (superseded check, the session read, the owner's state for a
    take-over, the owner write): once the agents involved are known, no read of an agent starts back at the
    beginning of the log - the server answers such a wildcard read by scanning everything since the agent
    registered, which made `ledger up` fall from ~370 to ~40 sessions/s within 30 k sessions of churn."""
    from ledger.errors import LedgerError

    store = ledger.store
    y = f"{uid}-y"
    inc_y = await store.append(_registered(y))
    async with Agent(ledger, agent_id=f"{uid}-x", pool="p", heartbeat=0.2, ttl=5.0) as agent:
        for i in range(4):
            free, _ = await ledger.create_session("p", session_id=f"{uid}-free-{i}")
            taken, _ = await ledger.create_session("p", session_id=f"{uid}-taken-{i}")
            await store.append(_claim(y, taken, inc_y))
            with reads_of(store) as reads:
                await agent.claim(free)
                await agent.terminate(free)
                with pytest.raises(LedgerError):
                    await agent.claim(taken)  # y is alive: refused, judged on y's state now
            from_start = [(what, after) for what, after in reads
                          if after == 0 and (what.startswith("agent:") or "*" in what or ">" in what)]
            assert i == 0 or not from_start, (i, from_start)
            # Nor from y's own newest event (its registration, far back for a quiet agent): from what is known.
            of_y = [after for what, after in reads if what == f"agent:{y}"]
            assert i == 0 or (of_y and min(of_y) > inc_y), (i, of_y, inc_y)
        state, _ = await ledger.session(f"{uid}-taken-3")
        assert state is not None and state.owner == y


def test_a_cache_of_fewer_than_two_agents_is_refused(store: EventStore):
    """With room for fewer than two (a take-over's owner and claimer), a fold would read one agent, let the other
    go and ask for it again, forever."""
    from ledger.known_agents import KnownAgents

    for limit in (0, 1):
        with pytest.raises(ValueError):
            KnownAgents(store, limit=limit)
    assert KnownAgents(store, limit=2).timelines == {}


async def test_a_reconnect_lets_go_of_what_was_known(server: EmbeddedServer):
    """After the connection comes back the server may hold another log (restored, re-created): what a store
    and an agent's watch knew of agents is read again, not trusted. A real server restart on the same port."""
    from fleet import ledger_on
    from helpers import eventually

    async with ledger_on(server.url) as ledger:
        store = ledger.store
        x, y = "x", "y"
        inc_x, inc_y = await store.append(_registered(x)), await store.append(_registered(y))
        await _owned_then_taken_over(store, "s", (x, inc_x), (y, inc_y))
        await _folds_as_alone(store, "s")
        assert store.known_agents.timelines
        server.restart()
        await eventually(lambda: not store.known_agents.timelines, timeout=30, what="the caches let go")
        await _folds_as_alone(store, "s")  # read again, alike
