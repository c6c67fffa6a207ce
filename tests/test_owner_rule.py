"""One rule for owner writes, claims and supersession: the SDK's decisions and the fold agree (pure)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger import codec, decide
from ledger import events as ev
from ledger import lifecycle as lc
from ledger.errors import LedgerError, NotFound, StaleToken, Superseded

T0 = datetime(2026, 11, 1, tzinfo=UTC)
SID = "s1"
AGENTS = ("a1", "a2")
WRITE_SEQ = 100


def session(status: str, owner: str | None, owner_incarnation: int | None, token: int | None) -> lc.SessionState:
    return lc.SessionState(session_id=SID, pool="p", platform="default", region="default", labels={}, idle_ttl=None,
                           status=status, created_at=T0, owner=owner, owner_incarnation=owner_incarnation,
                           token=token, last_seq=10)


states = st.one_of(st.none(), st.builds(
    session, st.sampled_from(lc.SESSION_STATES), st.sampled_from((*AGENTS, None)),
    st.sampled_from((1, 2, 3, None)), st.sampled_from((5, 6, None))))


def write(kind: str, agent_id: str, incarnation: int, token: int) -> codec.Recorded:
    producer = ev.Producer(id=agent_id, instance="i")
    event: ev.Event
    if kind == "release":
        event = ev.SessionReleased(producer=producer, session_id=SID, agent_id=agent_id, incarnation=incarnation,
                                   token=token)
    else:
        event = ev.SessionResourceReported(producer=producer, session_id=SID, agent_id=agent_id,
                                           incarnation=incarnation, token=token, platform_resource_id="pod")
    return codec.Recorded("LEDGER", WRITE_SEQ, codec.subject_of(event), WRITE_SEQ, event)


def refusal(state: lc.SessionState | None, who: decide.AgentRef, token: int,
            current: lc.CurrentIncarnation | None) -> type[LedgerError] | None:
    try:
        decide.check_owner(state, SID, who, token, current)
    except LedgerError as e:
        return type(e)
    return None


@given(state=states, kind=st.sampled_from(("release", "resource")), agent_id=st.sampled_from(AGENTS),
       incarnation=st.sampled_from((1, 2, 3)), token=st.sampled_from((5, 6, 7)),
       registered=st.one_of(st.none(), st.just("unchecked"), st.sampled_from((1, 2, 3))))
def test_check_owner_refuses_exactly_the_owner_writes_the_fold_flags(
        state: lc.SessionState | None, kind: str, agent_id: str, incarnation: int, token: int,
        registered: int | str | None):
    """`registered`: the writer's current incarnation (None: never registered; "unchecked": no lookup)."""
    if registered == "unchecked":
        current, incarnation_at = None, None
    else:
        def current(a: str) -> int | None:
            return registered if a == agent_id else None  # type: ignore[return-value]

        def incarnation_at(a: str, seq: int) -> int | None:
            assert seq == WRITE_SEQ
            return current(a)
    who = decide.AgentRef(agent_id, "i", incarnation)
    after, anomaly = lc.evolve_session(state, write(kind, agent_id, incarnation, token), incarnation_at)
    refused = refusal(state, who, token, current)
    assert (refused is None) == (anomaly is None), (anomaly, refused)
    if anomaly is None:
        assert after is not state
        return
    assert after is state
    if state is None:
        assert refused is NotFound
    elif anomaly.kind in (lc.SUPERSEDED_INCARNATION, lc.UNKNOWN_ENTITY):
        assert refused is Superseded
    else:
        assert anomaly.kind in (lc.STALE_TOKEN, lc.AFTER_FINAL) and refused is StaleToken


def test_the_incarnation_that_counts_is_the_one_that_claimed():
    """Before: the fold let a new incarnation write under its predecessor's token (decide refused it), and
    decide let a superseded incarnation write (the fold refused it). Now both refuse both."""
    held = session(lc.S_ASSIGNED, "a1", 1, 5)
    successor = decide.AgentRef("a1", "i2", 2)
    _, anomaly = lc.evolve_session(held, write("resource", "a1", 2, 5), lambda a, seq: 2)
    assert anomaly is not None and anomaly.kind == lc.STALE_TOKEN
    assert refusal(held, successor, 5, None) is StaleToken
    zombie = decide.AgentRef("a1", "i1", 1)
    _, anomaly = lc.evolve_session(held, write("resource", "a1", 1, 5), lambda a, seq: 2)
    assert anomaly is not None and anomaly.kind == lc.SUPERSEDED_INCARNATION
    assert refusal(held, zombie, 5, lambda a: 2) is Superseded
    assert refusal(held, zombie, 5, lambda a: 1) is None


@given(state=states, agent_id=st.sampled_from((*AGENTS, "ghost")), incarnation=st.sampled_from((1, 2, 3)),
       previous=st.sampled_from((5, 6, None)), reason=st.sampled_from(("initial", "failover")))
def test_every_claim_decide_claim_produces_is_one_the_fold_applies(
        state: lc.SessionState | None, agent_id: str, incarnation: int, previous: int | None, reason: str):
    who = decide.AgentRef(agent_id, "i", incarnation)
    try:
        event = decide.decide_claim(state, SID, who, producer=ev.Producer(id=agent_id, instance="i"),
                                    reason=reason, previous_token=previous)
    except LedgerError:
        return
    rec = codec.Recorded("LEDGER", WRITE_SEQ, codec.subject_of(event), WRITE_SEQ, event)
    assert lc.session_event_problem(state, rec, lambda a, seq: incarnation if a == agent_id else None) is None
    after, _ = lc.evolve_session(state, rec)
    assert lc.owns(after, agent_id, incarnation)


@given(tokens=st.dictionaries(st.sampled_from([f"s{i}" for i in range(12)]), st.integers(1, 10_000), max_size=12),
       capacity=st.integers(1, 12))
def test_an_agent_over_capacity_gives_up_exactly_its_newest_extra_claims(tokens: dict[str, int], capacity: int):
    extra = decide.excess_sessions(tokens, capacity)
    assert len(extra) == max(0, len(tokens) - capacity) and len(set(extra)) == len(extra)
    kept = set(tokens) - set(extra)
    assert all(tokens[e] >= tokens[k] for e in extra for k in kept)
    assert decide.excess_sessions(tokens, capacity) == extra  # the same holdings, the same answer
    assert decide.excess_sessions({k: tokens[k] for k in kept}, capacity) == []


@given(regs=st.lists(st.tuples(st.integers(1, 50), st.sampled_from(("me", "other", "third"))), max_size=8),
       incarnation=st.integers(1, 50))
def test_only_a_later_registration_by_another_process_supersedes(regs: list[tuple[int, str]], incarnation: int):
    by = lc.superseded_by(regs, incarnation, "me")
    later_by_others = [seq for seq, instance in regs if seq > incarnation and instance != "me"]
    assert by == (max(later_by_others) if later_by_others else None)
    # What a lagging replica answers (only registrations up to some point) never supersedes by itself.
    assert lc.superseded_by([r for r in regs if r[0] <= incarnation], incarnation, "me") is None


async def test_an_owner_termination_under_a_stale_token_is_refused_before_it_is_written(store):
    from ledger.client import Ledger

    ledger = Ledger(store, ev.Producer(id="operator-ops", instance="i"))
    sid, _ = await ledger.create_session("p")
    with pytest.raises(StaleToken):
        await ledger.terminate_session(sid, token=12345)  # the fold would flag it: it is never written
    state, last = await ledger.session(sid)
    assert state is not None and state.status == lc.S_PENDING
