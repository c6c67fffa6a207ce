"""Hostile tests of two rules: a claim only for an agent of the session's pool/platform/region (foreign_placement),
and `lc.SessionFold` (one session's history folded with lookups read only as its rule asks), with the caches the
agent's watch keeps for it.

Pure parts: generated histories where agents register (again) in other placements, claims decided on one
registration land after the next (the race), registrations are forged by other clients - the whole-log fold,
`SessionFold` (at once and resumed) and the independent checker must agree on every claim. Real-server parts: the
SDK's refusals, and the watch's caches under many claimers.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from histories import CLI, MONITOR, RECLAIMER, Builder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger import check as ck
from ledger import codec, decide
from ledger import events as ev
from ledger import lifecycle as lc
from ledger.codec import Recorded
from ledger.errors import LedgerError, NotClaimable
from projections.state import LedgerState

AGENTS = ("a0", "a1", "a2")
SESSIONS = ("s0", "s1", "s2")
PLACEMENTS = (("p", "default", "default"), ("p", "gpu", "default"), ("q", "default", "eu"))
DRAWN = (PLACEMENTS[0], PLACEMENTS[0], PLACEMENTS[0], PLACEMENTS[1], PLACEMENTS[2])
"""Placements as drawn: mostly the same one (claims that apply, take-overs), often others."""
ACTIONS = ("register", "register", "forge_registration", "create_session", "claim", "claim", "claim",
           "decided_claim", "decided_claim", "decided_claim", "raced_claim", "takeover", "takeover", "release",
           "goodbye", "dead", "drain", "orphan")


def me(agent: str) -> ev.Producer:
    return ev.Producer(id=agent, instance=f"{agent}-i")


def _current(b: Builder, agent: str) -> lc.AgentState | None:
    return b.model.ledger.agents.get(agent)


def _register(b: Builder, agent: str, placement: tuple[str, str, str], producer: ev.Producer | None = None) -> int:
    pool, platform, region = placement
    return b.add(ev.AgentRegistered(producer=producer or me(agent), agent_id=agent, instance_id=f"{agent}-{b.clock}",
                                    pool=pool, platform=platform, region=region, ttl=3600.0)).seq


def _step(draw: st.DrawFn, b: Builder, action: str) -> None:
    agent = draw(st.sampled_from(AGENTS))
    sid = draw(st.sampled_from(SESSIONS))
    state = b.model.ledger.sessions.get(sid)
    cur = _current(b, agent)
    match action:
        case "register":
            _register(b, agent, draw(st.sampled_from(DRAWN)))
        case "forge_registration":  # another client registers `agent` somewhere else: every fold flags it
            other = draw(st.sampled_from([a for a in AGENTS if a != agent] + ["cli"]))
            _register(b, agent, draw(st.sampled_from(DRAWN)), ev.Producer(id=other, instance="x"))
        case "create_session":
            pool, platform, region = draw(st.sampled_from(DRAWN))
            b.add(ev.SessionCreated(producer=CLI, session_id=sid, pool=pool, platform=platform, region=region))
        case "claim":  # anything: any incarnation (also a made-up one), any previous token
            incarnation = draw(st.one_of(st.just(cur.incarnation if cur else 1), st.integers(1, 200)))
            previous = draw(st.one_of(st.none(), st.just(state.token if state else None)))
            b.add(ev.SessionClaimed(producer=draw(st.sampled_from((me(agent), RECLAIMER))), session_id=sid,
                                    agent_id=agent, instance_id="i", incarnation=incarnation, previous_token=previous,
                                    reason="failover"))
        case "takeover":  # naming the current token (the fold asks the owner's history), for any placement
            if state is not None and state.token is not None and cur is not None:
                b.add(ev.SessionClaimed(producer=draw(st.sampled_from((me(agent), RECLAIMER))), session_id=sid,
                                        agent_id=agent, instance_id="i", incarnation=cur.incarnation,
                                        previous_token=state.token, reason="failover"))
        case "decided_claim" | "raced_claim":
            # What the SDK writes: decided on the session's state and the claimer's current registration (told as
            # AgentRef.placement, as the Agent and the reclaimer tell it). Raced: the agent registers again (maybe
            # elsewhere) between the decision and the append.
            if cur is None:
                return
            who = decide.AgentRef(agent, cur.instance_id, cur.incarnation, lc.placement_of(cur))
            owner = b.model.ledger.agents.get(state.owner) if state is not None and state.owner else lc.NO_OWNER_STATE
            try:
                event = decide.decide_claim(state, sid, who, producer=RECLAIMER, reason="failover",
                                            previous_token=state.token if state is not None else None, owner=owner)
            except LedgerError:
                return
            if action == "raced_claim":
                _register(b, agent, draw(st.sampled_from(DRAWN)))
            rec = b.add(event)
            b.registrations.setdefault("decided", []).append(rec.seq)
        case "release":
            if state is not None and state.owner is not None and state.token is not None:
                b.add(ev.SessionReleased(producer=me(state.owner), session_id=sid, agent_id=state.owner,
                                         incarnation=state.owner_incarnation or 0, token=state.token))
        case "goodbye":
            if cur is not None:
                b.add(ev.AgentGoodbye(producer=me(agent), agent_id=agent, instance_id="i",
                                      incarnation=cur.incarnation))
        case "dead":
            if cur is not None:
                b.add(ev.AgentDeclaredDead(producer=MONITOR, agent_id=agent, reason="ttl",
                                           incarnation=cur.incarnation))
        case "drain":
            if cur is not None:
                b.add(ev.AgentDraining(producer=me(agent), agent_id=agent, incarnation=cur.incarnation,
                                       deadline=b.now()))
        case "orphan":
            if state is not None and state.token is not None:
                b.add(ev.SessionOrphaned(producer=RECLAIMER, session_id=sid, reason="owner_gone",
                                         previous_token=state.token))


def populated(draw: st.DrawFn) -> Builder:
    """A history's start: some of AGENTS registered and every session of SESSIONS created, each in a drawn
    placement."""
    b = Builder()
    for agent in AGENTS:
        if draw(st.booleans()):
            _register(b, agent, draw(st.sampled_from(DRAWN)))
    for sid in SESSIONS:
        pool, platform, region = draw(st.sampled_from(DRAWN))
        b.add(ev.SessionCreated(producer=CLI, session_id=sid, pool=pool, platform=platform, region=region))
    return b


@st.composite
def placement_histories(draw: st.DrawFn) -> Builder:
    b = populated(draw)
    for action in draw(st.lists(st.sampled_from(ACTIONS), min_size=5, max_size=40)):
        _step(draw, b, action)
    return b


def _ledger(b: Builder) -> list[Recorded]:
    return [r for r in b.items if isinstance(r, Recorded) and r.stream == "LEDGER"]


def _fold_session(ledger: list[Recorded], records: list[Recorded], fold: lc.SessionFold | None = None,
                  asked: list[tuple[str, str]] | None = None) -> lc.SessionFold:
    folded = fold if fold is not None else lc.SessionFold(records)
    while (need := folded.advance()) is not None:
        if asked is not None:
            asked.append(need)
        what, agent = need
        history = [r for r in ledger if r.event.family == "agent" and r.event.entity_id == agent]
        folded.learn(what, agent, history if what == lc.HISTORY
                     else [r for r in history if isinstance(r.event, ev.AgentRegistered)])
    return folded


def _whole(b: Builder) -> tuple[LedgerState, dict[str, set[tuple[int, str]]]]:
    whole = LedgerState()
    flagged: dict[str, set[tuple[int, str]]] = {}
    for change in whole.apply_all(b.items):
        if change.kind == "session" and change.anomaly is not None:
            flagged.setdefault(change.id, set()).add((change.anomaly.seq, change.anomaly.kind))
    return whole, flagged


def _raw(ledger: list[Recorded]) -> list[ck.RawMessage]:
    out = []
    for r in ledger:
        encoded = codec.encode(r.event)
        out.append(ck.RawMessage("LEDGER", r.seq, encoded.subject, r.timestamp_ns, encoded.payload))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=placement_histories(), data=st.data())
def test_session_fold_at_once_and_resumed_agrees_with_the_whole_log_on_every_placement(b: Builder, data: Any):
    """Agents registering again in other pools/platforms/regions, forged registrations, claims for made-up
    incarnations, claims decided on one registration that land after the next: `SessionFold` (what
    `Writer.session`, `ledger history` and the watch fold with) gives the whole-log fold's state and flags for
    every session - folded at once, or folded up to any point and resumed with what it learnt."""
    whole, flagged = _whole(b)
    ledger = _ledger(b)
    for sid in SESSIONS:
        records = [r for r in ledger if r.event.family == "session" and r.event.entity_id == sid]
        folded = _fold_session(ledger, records)
        assert folded.state == whole.ledger.sessions.get(sid)
        assert {(seq, a.kind) for seq, a in folded.anomalies} == flagged.get(sid, set())
        k = data.draw(st.integers(0, len(records)), label=f"split {sid}")
        first = _fold_session(ledger, records[:k])
        resumed = _fold_session(ledger, records[k:], lc.SessionFold(records[k:], first.state, first.registrations,
                                                                    first.timelines))
        assert resumed.state == folded.state
        assert first.anomalies + resumed.anomalies == folded.anomalies


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=placement_histories())
def test_a_fold_event_by_event_on_caches_read_as_far_as_each_event_agrees_with_the_whole_log(b: Builder):
    """As the agent's watch folds: one event at a time on the state before it, with registrations and owner
    histories kept across events, each read only as far as the event being judged (`through`) and read on from
    there when a later event needs more (`AgentTimeline.extend`), registrations of known agents noted as they land:
    the whole-log fold's state and flags, and no history read twice over the same stretch."""
    whole, flagged = _whole(b)
    ledger = _ledger(b)
    for sid in SESSIONS:
        registrations: dict[str, list[lc.AgentState]] = {}
        timelines: dict[str, lc.AgentTimeline] = {}
        state: lc.SessionState | None = None
        anomalies: list[tuple[int, lc.Anomaly]] = []
        for rec in (r for r in ledger if r.event.family == "session" and r.event.entity_id == sid):
            for agent in registrations:  # the watch notes every registration of a known agent before judging
                registrations[agent] = lc.as_registered(
                    r for r in ledger if isinstance(r.event, ev.AgentRegistered) and r.event.entity_id == agent
                    and r.seq <= rec.seq)
            folded = lc.SessionFold([rec], state, registrations, timelines)
            while (need := folded.advance()) is not None:
                what, agent = need
                history = [r for r in ledger if r.event.family == "agent" and r.event.entity_id == agent]
                if what == lc.REGISTRATIONS:
                    folded.learn(what, agent, [r for r in history if isinstance(r.event, ev.AgentRegistered)
                                               and r.seq <= rec.seq])
                else:
                    after = timelines[agent].through if agent in timelines else 0
                    assert after < rec.seq  # asked only for what it has not read
                    folded.learn(what, agent, [r for r in history if after < r.seq <= rec.seq], through=rec.seq)
            state = folded.state
            anomalies += folded.anomalies
        assert state == whole.ledger.sessions.get(sid)
        assert {(seq, a.kind) for seq, a in anomalies} == flagged.get(sid, set())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=placement_histories())
def test_no_claim_the_sdk_decides_on_a_registration_is_ever_foreign_and_the_checker_agrees_on_every_claim(
        b: Builder):
    """A claim decided with the claimer's registration told (AgentRef.placement) is never flagged
    foreign_placement - landing after the claimer registered again elsewhere it is a superseded incarnation's
    (never applied, never a violation). The independent checker flags a foreign claim exactly where the folds do,
    and ends with the folds' owner and token for every session: no session two owners, none owned by a claim the
    folds refused."""
    whole, flagged = _whole(b)
    decided = set(b.registrations.get("decided", []))
    foreign = {seq for kinds in flagged.values() for seq, kind in kinds if kind == lc.FOREIGN_PLACEMENT}
    assert not decided & foreign
    report = ck.check(_raw(_ledger(b)))
    checker_foreign = {v.seq for v in report.violations
                       if v.kind == ck.CLAIM_FOR_UNAVAILABLE_AGENT and "the session is in" in v.detail}
    assert checker_foreign == foreign
    # A claim decided for an agent that has gone (the generator decides on registrations, not on liveness, which
    # the reclaimer's own rule checks) is the checker's claim for an unavailable agent: fair, and not this test's.
    assert not any(v.seq in decided for v in report.violations
                   if v.kind != ck.STRANDED and ", which is " not in v.detail), report.violations
    checker = ck.fold(_raw(_ledger(b)))
    for sid in SESSIONS:
        s, state = checker.sessions.get(sid), whole.ledger.sessions.get(sid)
        assert ((s.owner, s.token) if s else None) == ((state.owner, state.token) if state else None), sid


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=placement_histories())
def test_what_the_reclaimers_rules_plan_by_placement_the_fold_applies_and_no_waiting_session_is_left(b: Builder):
    """The reclaimer (and `ledger agent`, which plans with itself alone) keys eligible agents by their
    registration's (pool, platform, region) and tells it as AgentRef.placement: every claim it plans, decided on
    the fold's state, is one the fold applies (never foreign), and every pending or orphaned session with an
    alive agent of its own placement is planned a claim - none is left waiting while one could run it."""
    from consumers import reclaim_rules as rules

    agents = b.model.ledger.agents
    sessions = b.model.ledger.sessions
    eligible: dict[tuple[str, str, str], list[rules.Capacity]] = {}
    for a in agents.values():
        if a.status == lc.A_ALIVE:
            who = decide.AgentRef(a.agent_id, a.instance_id, a.incarnation, lc.placement_of(a))
            eligible.setdefault(lc.placement_of(a), []).append(rules.Capacity(agent=who, load=0, capacity=99))
    actions = rules.plan(sessions.values(), agents, eligible, b.model.ledger.pools)
    planned = {a.session_id for a in actions if isinstance(a, rules.ClaimFor)}
    for s in sessions.values():
        if s.status in (lc.S_PENDING, lc.S_ORPHANED) and lc.placement_of(s) in eligible:
            assert s.session_id in planned, s
    for action in actions:
        if not isinstance(action, rules.ClaimFor):
            continue
        state = sessions[action.session_id]
        owner = agents.get(state.owner) if state.owner else lc.NO_OWNER_STATE
        event = decide.decide_claim(state, action.session_id, action.agent, producer=RECLAIMER, reason=action.reason,
                                    previous_token=action.previous_token, owner=owner)
        seq = b.seq["LEDGER"] + 1
        rec = Recorded("LEDGER", seq, codec.subject_of(event), seq, event)
        assert lc.session_event_problem(state, rec, lambda a, _: agents[a].incarnation if a in agents else None,
                                        lambda a, _: agents.get(a)) is None


def test_a_claim_decided_on_one_registration_landing_after_the_next_elsewhere_strands_nothing():
    """The race, spelt out: the reclaimer decides a claim for a0 as registered in pool p (R1); a0 registers again
    in pool q (R2) before the claim lands. Every fold flags it as a superseded incarnation's (not foreign), the
    checker counts it (no violation), the session stays pending - and a claim for a p agent then applies, while
    one for a0 (now of q) is refused by the SDK before it is written."""
    b = Builder()
    r1 = _register(b, "a0", PLACEMENTS[0])
    a1 = _register(b, "a1", PLACEMENTS[0])
    b.add(ev.SessionCreated(producer=CLI, session_id="s0", pool="p"))
    state = b.model.ledger.sessions["s0"]
    event = decide.decide_claim(state, "s0", decide.AgentRef("a0", "i", r1, PLACEMENTS[0]), producer=RECLAIMER,
                                reason="initial")
    r2 = _register(b, "a0", PLACEMENTS[2])
    late = b.add(event).seq
    whole, flagged = _whole(b)
    assert flagged["s0"] == {(late, lc.SUPERSEDED_INCARNATION)}
    assert whole.ledger.sessions["s0"].status == lc.S_PENDING
    report = ck.check(_raw(_ledger(b)))
    assert report.clean and report.flagged == {ck.SUPERSEDED_INCARNATION: 1}
    with pytest.raises(NotClaimable, match="q/default/eu"):
        decide.decide_claim(whole.ledger.sessions["s0"], "s0", decide.AgentRef("a0", "i", r2, PLACEMENTS[2]),
                            producer=RECLAIMER, reason="initial")
    claim = b.add(decide.decide_claim(whole.ledger.sessions["s0"], "s0", decide.AgentRef("a1", "i", a1,
                                                                                          PLACEMENTS[0]),
                                      producer=RECLAIMER, reason="initial")).seq
    whole, _ = _whole(b)
    assert (whole.ledger.sessions["s0"].owner, whole.ledger.sessions["s0"].token) == ("a1", claim)
    assert ck.check(_raw(_ledger(b))).clean


def test_an_owner_that_registers_again_elsewhere_loses_its_sessions_to_its_old_pool_only():
    """a0 owns a p session, then registers again in q: its sessions are its predecessor's (owner_superseded), a
    take-over by a0's new incarnation is refused (another placement) and flagged if written anyway, a take-over
    for an agent of p applies; the checker agrees throughout."""
    b = Builder()
    r1 = _register(b, "a0", PLACEMENTS[0])
    a1 = _register(b, "a1", PLACEMENTS[0])
    b.add(ev.SessionCreated(producer=CLI, session_id="s0", pool="p"))
    token = b.add(ev.SessionClaimed(producer=me("a0"), session_id="s0", agent_id="a0", instance_id="i",
                                    incarnation=r1)).seq
    r2 = _register(b, "a0", PLACEMENTS[2])
    state = b.model.ledger.sessions["s0"]
    owner = b.model.ledger.agents["a0"]
    assert lc.owner_replaceable(state, owner) == (lc.OWNER_SUPERSEDED, None)
    with pytest.raises(NotClaimable, match="only an agent of the session's own pool"):
        decide.decide_claim(state, "s0", decide.AgentRef("a0", "i", r2, PLACEMENTS[2]), producer=me("a0"),
                            reason="failover", previous_token=token, owner=owner)
    forged = b.add(ev.SessionClaimed(producer=me("a0"), session_id="s0", agent_id="a0", instance_id="i",
                                     incarnation=r2, previous_token=token, reason="failover")).seq
    taken = b.add(decide.decide_claim(state, "s0", decide.AgentRef("a1", "i", a1, PLACEMENTS[0]),
                                      producer=RECLAIMER, reason="failover", previous_token=token, owner=owner)).seq
    whole, flagged = _whole(b)
    assert flagged["s0"] == {(forged, lc.FOREIGN_PLACEMENT)}
    assert (whole.ledger.sessions["s0"].owner, whole.ledger.sessions["s0"].token) == ("a1", taken)
    ledger = _ledger(b)
    folded = _fold_session(ledger, [r for r in ledger if r.event.family == "session"])
    assert folded.state == whole.ledger.sessions["s0"]
    report = ck.check(_raw(ledger))
    assert [(v.kind, v.seq) for v in report.violations] == [(ck.CLAIM_FOR_UNAVAILABLE_AGENT, forged)]


def test_a_session_folds_the_same_whether_or_not_its_placement_fields_were_written():
    """A session created and an agent registered without platform and region (an older writer, another client)
    are of default/default: the checker's placement and the folds' agree (no foreign claim either way)."""
    b = Builder()
    r = b.add(ev.AgentRegistered(producer=me("a0"), agent_id="a0", instance_id="i", pool="p")).seq
    created = ev.SessionCreated(producer=CLI, session_id="s0", pool="p")
    b.add(created)
    b.add(ev.SessionClaimed(producer=me("a0"), session_id="s0", agent_id="a0", instance_id="i", incarnation=r))
    raw = []
    for m in _raw(_ledger(b)):
        payload = msgspec.json.decode(m.data)
        payload.pop("platform", None)
        payload.pop("region", None)
        raw.append(ck.RawMessage(m.stream, m.seq, m.subject, m.stored_ns, msgspec.json.encode(payload)))
    assert ck.check(raw).clean
    whole, flagged = _whole(b)
    assert not flagged and whole.ledger.sessions["s0"].owner == "a0"


# --- the SDK against a real server ------------------------------------------------------------------------------


async def _check_stream(store: Any) -> ck.Report:
    from ledgerctl.cli.check import read_raw

    return ck.check([*await read_raw(store, ck.LEDGER), *await read_raw(store, ck.HEARTBEATS)])


async def test_a_claim_across_placements_is_refused_in_one_line_and_one_of_the_same_placement_applies(server: Any):
    """An agent of p/gpu/eu self-claiming a p/default/default session, and the reclaimer's `claim_session` for it
    without a placement told (read from its registration), are refused before anything is written, in one line
    naming both placements; the sessions of its own placement it claims; `ledger check` finds the log clean."""
    from fleet import ledger_on

    from ledger.agent import Agent
    from ledger.writer import Writer

    async with ledger_on(server.url) as operator:
        store = operator.store
        plain, _ = await operator.create_session("p", session_id="plain")
        gpu, _ = await operator.create_session("p", session_id="gpu", platform="gpu", region="eu")
        agent = Agent(Writer(store, ev.Producer(id="a-gpu", instance="i1")), agent_id="a-gpu", pool="p",
                      platform="gpu", region="eu", capacity=2, heartbeat=0.2, ttl=5.0)
        async with agent:
            before = (await store.stream_facts(ck.LEDGER)).last_seq
            with pytest.raises(NotClaimable) as refused:
                await agent.claim(plain)
            text = str(refused.value)
            assert "\n" not in text and "p/gpu/eu" in text and "p/default/default" in text, text
            reclaimer = Writer(store, ev.Producer(id="reclaimer", instance="r"))
            with pytest.raises(NotClaimable, match="p/gpu/eu"):
                await reclaimer.claim_session(plain, decide.AgentRef(agent.agent_id, agent.instance_id,
                                                                     agent.incarnation))
            assert (await store.stream_facts(ck.LEDGER)).last_seq == before  # nothing written
            mine = await agent.claim(gpu)
            state, _ = await operator.session(gpu)
            assert state is not None and (state.owner, state.token) == (agent.agent_id, mine.token)
            state, _ = await operator.session(plain)
            assert state is not None and state.status == lc.S_PENDING
            report = await _check_stream(store)
        assert report.clean, report.violations


async def test_an_agent_that_registers_again_in_another_pool_hands_its_old_sessions_to_its_old_pool(server: Any):
    """a-x owns a p session; a process of the same agent id registers in q (a new incarnation): the old one is
    superseded and stops, the new one may not take the session over (another pool: refused in one line), an agent
    of p may (owner_superseded), the new incarnation's goodbye is clean, and `ledger check` finds no violation."""
    from fleet import ledger_on
    from helpers import eventually

    from ledger.agent import Agent
    from ledger.writer import Writer

    def agent_of(agent_id: str, pool: str, instance: str) -> Agent:
        return Agent(Writer(store, ev.Producer(id=agent_id, instance=instance)), agent_id=agent_id, pool=pool,
                     heartbeat=0.2, ttl=5.0)

    async with ledger_on(server.url) as operator:
        store = operator.store
        sid, _ = await operator.create_session("p", session_id="s")
        async with agent_of("a-x", "p", "old") as old, agent_of("a-p", "p", "p1") as other:
            held = await old.claim(sid)
            async with agent_of("a-x", "q", "new") as new:
                await eventually(lambda: old.superseded, what="the old incarnation superseded")
                with pytest.raises(NotClaimable) as refused:
                    await new.claim(sid, reason="failover", previous_token=held.token)
                assert "\n" not in str(refused.value) and "q/default/default" in str(refused.value)
                taken = await other.claim(sid, reason="failover", previous_token=held.token)
                state, _ = await operator.session(sid)
                assert state is not None and (state.owner, state.token) == ("a-p", taken.token)
                await eventually(lambda: sid not in old.owned, what="the old incarnation let go")
                assert sid not in new.owned
            report = await _check_stream(store)
    assert report.clean, report.violations


class _FakeStore:
    """`registered` as the store answers it, from a dict the test changes; counts reads per agent."""

    def __init__(self) -> None:
        self.regs: dict[str, list[Recorded]] = {}
        self.reads: dict[str, int] = {}
        self.seq = 0

    def register(self, agent: str, placement: tuple[str, str, str]) -> Recorded:
        self.seq += 1
        pool, platform, region = placement
        event = ev.AgentRegistered(producer=me(agent), agent_id=agent, instance_id=f"i{self.seq}", pool=pool,
                                   platform=platform, region=region)
        rec = Recorded("LEDGER", self.seq, codec.subject_of(event), self.seq, event)
        self.regs.setdefault(agent, []).append(rec)
        return rec

    async def registered(self, agent_id: str, *, min_last_seq: int | None = None) -> list[Recorded]:
        self.reads[agent_id] = self.reads.get(agent_id, 0) + 1
        return list(self.regs.get(agent_id, []))


async def test_the_watchs_registrations_stay_bounded_and_an_agent_let_go_is_read_again_whole(
        monkeypatch: pytest.MonkeyPatch):
    """Learning more agents than the watch keeps lets the oldest go (never its own); a registration landing while
    an agent is let go is not half-noted, and the agent, needed again, is read whole: the fold then judges its
    claim on its newest registration (here: moved from q to p, so the claim applies)."""
    from ledger.agent import registration as reg

    monkeypatch.setattr(reg, "MAX_KNOWN_AGENTS", 4)
    store = _FakeStore()

    class _Writer:
        pass

    writer: Any = _Writer()
    writer.store = store
    known = reg.KnownRegistrations(writer, "own")
    store.register("own", PLACEMENTS[0])
    await known.learn(["own"], 0)
    ghosts = [f"g{i}" for i in range(12)]
    for g in ghosts:
        store.register(g, PLACEMENTS[2])
    for g in ghosts:  # one at a time, as a fold asks
        await known.learn([g], 0)
        assert len(known.table) <= 5 and "own" in known.table
    assert "g0" not in known.table
    moved = store.register("g0", PLACEMENTS[0])
    known.note(moved)  # let go: not kept as a one-registration list
    assert "g0" not in known.table
    created = ev.SessionCreated(producer=CLI, session_id="s0", pool="p")
    claim = ev.SessionClaimed(producer=RECLAIMER, session_id="s0", agent_id="g0", instance_id="i",
                              incarnation=moved.seq)
    records = [Recorded("LEDGER", 100, codec.subject_of(created), 100, created),
               Recorded("LEDGER", 101, codec.subject_of(claim), 101, claim)]
    folded = lc.SessionFold(records, None, known.table)
    while (need := folded.advance()) is not None:
        if need == (lc.HISTORY, "g0"):  # then its state at the claim (alive: registered, nothing since)
            folded.learn(lc.HISTORY, "g0", store.regs["g0"])
            continue
        assert need == (lc.REGISTRATIONS, "g0")
        await known.learn([need[1]], 0)
    assert not folded.anomalies and folded.state is not None and folded.state.owner == "g0"
    assert [r.incarnation for r in known.table["g0"]] == [store.regs["g0"][0].seq, moved.seq]
    assert store.reads["g0"] == 2 and store.reads["own"] == 1
    # A registration of an agent it keeps is noted in order (its newest is what a re-registration expects).
    newer = store.register("own", PLACEMENTS[1])
    known.note(newer)
    known.note(newer)  # twice (the watch and our own acknowledgement): once
    assert known.known["own"] == [store.regs["own"][0].seq, newer.seq] and known.newest("own") == newer.seq


async def test_a_watch_with_small_caches_judges_take_overs_on_registrations_read_again(
        server: Any, monkeypatch: pytest.MonkeyPatch):
    """The watch's caches shrunk to a few agents, its session's history full of reclaimer claims for agents of
    another region (each flagged foreign_placement, each asking a registrations read): the agent gains its own
    claim; once it drains, a take-over for an agent whose registration the watch let go and which since
    registered in the session's placement applies (it loses the session, as the ledger says), while one for an
    agent of another placement - forged registrations of the session's placement notwithstanding - does not."""
    from fleet import ledger_on
    from helpers import eventually

    from ledger.agent import Agent
    from ledger.agent import registration as reg
    from ledger.agent import watch as watch_module
    from ledger.writer import Writer

    monkeypatch.setattr(reg, "MAX_KNOWN_AGENTS", 3)
    monkeypatch.setattr(watch_module, "MAX_TIMELINES", 2)
    rec_producer = ev.Producer(id="reclaimer", instance="r")

    def registration(agent: str, placement: tuple[str, str, str], producer: ev.Producer | None = None
                     ) -> ev.AgentRegistered:
        pool, platform, region = placement
        return ev.AgentRegistered(producer=producer or me(agent), agent_id=agent, instance_id=f"{agent}-i",
                                  pool=pool, platform=platform, region=region, ttl=3600.0)

    async with ledger_on(server.url) as operator:
        store = operator.store
        sid, _ = await operator.create_session("p", session_id="s")
        ghosts = [f"g{i}" for i in range(8)]
        incarnations = {g: await store.append(registration(g, PLACEMENTS[2])) for g in ghosts}
        for g in ghosts:
            await store.append(ev.SessionClaimed(producer=rec_producer, session_id=sid, agent_id=g,
                                                 instance_id=f"{g}-i", incarnation=incarnations[g]))
        lost: list[str] = []
        agent = Agent(Writer(store, ev.Producer(id="a-p", instance="i")), agent_id="a-p", pool="p", heartbeat=0.2,
                      ttl=5.0, on_lost=lambda s, why: lost.append(s))
        async with agent:
            claimed = await Writer(store, rec_producer).claim_session(sid, agent.ref)
            await eventually(lambda: sid in agent.owned, what="the agent gains its claim")
            assert agent.owned[sid].token == claimed
            table = agent.watch.registrations.table
            assert len(table) <= 4 and agent.agent_id in table
            await agent.drain()
            # g1 forged into p by another client, then a take-over for g1 (of eu): flagged, the agent keeps it.
            await store.append(registration("g1", PLACEMENTS[0], ev.Producer(id="g2", instance="x")))
            forged = await store.append(ev.SessionClaimed(
                producer=rec_producer, session_id=sid, agent_id="g1", instance_id="g1-i",
                incarnation=incarnations["g1"], previous_token=claimed, reason="drain"))
            await eventually(lambda: agent.judged_through(sid) >= forged, what="the forged take-over judged")
            assert sid in agent.owned and not lost
            state, _ = await operator.session(sid)
            assert state is not None and state.owner == "a-p"
            # g0, let go by the watch, registers in p: its take-over applies.
            assert "g0" not in table
            again = await store.append(registration("g0", PLACEMENTS[0]))
            taken = await Writer(store, rec_producer).claim_session(
                sid, decide.AgentRef("g0", "g0-i", again), reason="drain", previous_token=claimed)
            await eventually(lambda: lost == [sid], what="the agent loses the session")
            state, _ = await operator.session(sid)
            assert state is not None and (state.owner, state.token) == ("g0", taken)


def _spoiled(b: Builder, seq: int, bad: dict[str, Any]) -> list[ck.RawMessage]:
    """The history as stored, with message `seq` given `bad` fields (one every reader dead-letters)."""
    out = []
    for m in _raw(_ledger(b)):
        if m.seq == seq:
            payload = msgspec.json.decode(m.data)
            payload.update(bad)
            spoiled = ck.RawMessage(m.stream, m.seq, m.subject, m.stored_ns, msgspec.json.encode(payload))
            assert isinstance(codec.read(m.stream, m.seq, m.subject, m.stored_ns, spoiled.data), codec.Unreadable)
            out.append(spoiled)
        else:
            out.append(m)
    return out


@pytest.mark.parametrize("bad", [{"region": None}, {"platform": 5}, {"region": ""}, {"platform": "no spaces"}])
def test_the_checker_takes_no_registration_or_session_every_reader_dead_letters_for_its_placement(
        bad: dict[str, Any]):
    """A registration (or a session's creation) whose platform or region no reader can read is a dead letter to
    every fold: a0 never registered, its claim is flagged, a1's applies. The checker agrees (not an event: a0's
    claim is one for an agent never registered, a1's applies). Failed before the fix in ledger/check.py parse():
    the checker read the bad value as "default", applied a0's claim, and reported a1's as overlapping_ownership."""
    b = Builder()
    unreadable = b.add(ev.AgentRegistered(producer=me("a0"), agent_id="a0", instance_id="i", pool="p")).seq
    good = b.add(ev.AgentRegistered(producer=me("a1"), agent_id="a1", instance_id="i", pool="p")).seq
    b.add(ev.SessionCreated(producer=CLI, session_id="s0", pool="p"))
    forged = b.add(ev.SessionClaimed(producer=me("a0"), session_id="s0", agent_id="a0", instance_id="i",
                                     incarnation=unreadable)).seq
    b.add(ev.SessionClaimed(producer=me("a1"), session_id="s0", agent_id="a1", instance_id="i", incarnation=good))
    raw = _spoiled(b, unreadable, bad)
    # What the folds make of the log as stored: a0 never registered, its claim flagged, a1's applies.
    state = LedgerState()
    state.apply_all([codec.read(m.stream, m.seq, m.subject, m.stored_ns, m.data) for m in raw])
    assert state.ledger.sessions["s0"].owner == "a1"
    report = ck.check(raw)
    # a0's claim is one for an agent never registered, as to the folds; a1's applies (no overlap).
    assert [(v.kind, v.seq) for v in report.violations] == [(ck.CLAIM_FOR_UNAVAILABLE_AGENT, forged)]
    assert report.not_events == 1
    # A session created with such a placement is no session to the checker either: a claim of it is one of a
    # session never created, as to every fold.
    b2 = Builder()
    r = b2.add(ev.AgentRegistered(producer=me("a0"), agent_id="a0", instance_id="i", pool="p")).seq
    created = b2.add(ev.SessionCreated(producer=CLI, session_id="s0", pool="p")).seq
    b2.add(ev.SessionClaimed(producer=me("a0"), session_id="s0", agent_id="a0", instance_id="i", incarnation=r))
    report = ck.check(_spoiled(b2, created, bad))
    assert report.not_events == 1
    assert [v.kind for v in report.violations] == [ck.ILLEGAL_TRANSITION]


def test_the_demo_leaves_a_log_the_checker_finds_clean_of_foreign_claims(tmp_path: Any):
    """`ledger demo --exit --pause 0` (two pools, a kill and a SIGTERM, the reclaimer handing sessions over): its
    log has no claim for an agent of another placement, no violation at all, and the folds flag no
    foreign_placement."""
    import asyncio
    import os
    import subprocess
    import sys

    from conftest import start_binary_server

    from ledger.settings import Settings
    from ledger.store import EventStore

    demo = tmp_path / "demo"
    subprocess.run([sys.executable, "-m", "ledgerctl", "demo", "--exit", "--pause", "0", "--no-http",
                    "--data-dir", str(demo)], env=dict(os.environ), check=True, timeout=300, capture_output=True)
    server = start_binary_server(demo)
    try:
        async def read() -> tuple[ck.Report, list[Any]]:
            from ledgerctl.cli.check import read_raw

            async with EventStore.connect(Settings(nats_url=server.url), check=False) as store:
                ledger = await read_raw(store, ck.LEDGER)
                return ck.check([*ledger, *await read_raw(store, ck.HEARTBEATS)]), ledger

        report, ledger = asyncio.run(read())
    finally:
        server.stop()
    assert report.clean, report.violations
    assert report.events > 0 and not report.flagged.get(ck.CLAIM_FOR_UNAVAILABLE_AGENT)
    state = LedgerState()
    claims = 0
    for m in ledger:
        item = codec.read(m.stream, m.seq, m.subject, m.stored_ns, m.data)
        change = state.apply(item)
        assert change is None or change.anomaly is None or change.anomaly.kind != lc.FOREIGN_PLACEMENT, change
        claims += isinstance(item, Recorded) and isinstance(item.event, ev.SessionClaimed) and change is not None \
            and change.anomaly is None
    assert claims > len(state.ledger.sessions) > 0  # sessions were claimed, and claimed again on failover


@pytest.mark.parametrize("retain", [0.0, 600.0], ids=["retired", "kept"])
def test_a_claim_for_an_agent_the_whole_log_fold_retired_is_judged_alike_by_every_fold(retain: float):
    """A claim for an agent gone at the claim, once the whole-log fold has let go of it (`retain` 0) and while it
    keeps it: a fold of the session's history alone (what the SDK, `ledger history` and the watch fold) reads the
    agent's registrations from the log and finds the incarnation, yet leaves the session as the whole-log fold
    does (pending: the claim is final_claimer here, and there final_claimer or, retired, for an unknown agent), so the
    reclaimer's next claim, planned from the projection and decided on what the SDK reads, is not refused. Before
    the rule, the SDK said assigned to the gone agent and refused that claim as an overlap at every step."""
    from consumers import reclaim_rules as rules
    from projections.state import LifecycleState

    b = Builder()
    r = _register(b, "a0", PLACEMENTS[0])
    b.add(ev.AgentGoodbye(producer=me("a0"), agent_id="a0", instance_id="i", incarnation=r))
    a1 = _register(b, "a1", PLACEMENTS[0])
    b.add(ev.SessionCreated(producer=CLI, session_id="s0", pool="p"))
    # a0's process, gone, claims for the incarnation that said goodbye (an agent may claim for itself).
    b.add(ev.SessionClaimed(producer=me("a0"), session_id="s0", agent_id="a0", instance_id="i", incarnation=r))
    whole = LedgerState(ledger=LifecycleState(retain=retain))  # 0: a0 retired at once (by default 600 s after)
    changes = whole.apply_all(b.items)
    assert ("a0" in whole.ledger.agents) == (retain > 0)
    ledger = _ledger(b)
    folded = _fold_session(ledger, [x for x in ledger if x.event.family == "session"])
    claim_seq = ledger[-1].seq
    assert [(seq, a.kind) for seq, a in folded.anomalies] == [(claim_seq, lc.FINAL_CLAIMER)]
    whole_kind = changes[-1].anomaly.kind if changes[-1] is not None and changes[-1].anomaly else None
    assert whole_kind == (lc.FINAL_CLAIMER if retain else lc.UNKNOWN_ENTITY)  # retired: a claim for nobody
    assert folded.state is not None and folded.state.status == lc.S_PENDING
    # What the reclaimer plans from the projection, decided on what the SDK reads: refused, at every step.
    agents = whole.ledger.agents
    who = decide.AgentRef("a1", agents["a1"].instance_id, a1, PLACEMENTS[0])
    actions = rules.plan(whole.ledger.sessions.values(), agents,
                         {PLACEMENTS[0]: [rules.Capacity(agent=who, load=0, capacity=9)]}, whole.ledger.pools)
    claim = next(a for a in actions if isinstance(a, rules.ClaimFor))
    refused = None
    try:
        decide.decide_claim(folded.state, "s0", claim.agent, producer=RECLAIMER, reason=claim.reason,
                            previous_token=claim.previous_token)
    except NotClaimable as e:
        refused = e
    assert folded.state == whole.ledger.sessions["s0"] and refused is None, (folded.state, refused)


async def test_ledger_history_and_a_routes_read_judge_a_foreign_claim_as_the_fold_does(store: Any, uid: str):
    """`ledger history` of a session (and a route's read, which folds its session's history for the token) after a
    reclaimer's claim for an agent of another region, then an agent that re-registered into the session's
    placement, then its claim: the foreign one flagged foreign_placement, the second applied, as of any point."""
    from ledger.writer import Writer
    from projections.history import entity_history, session_as_of

    sid, agent = f"{uid}-s", f"{uid}-a"
    operator = Writer(store, ev.Producer(id="operator-test", instance="o"))
    reclaimer = ev.Producer(id="reclaimer", instance="r")
    await operator.create_session("p", session_id=sid, region="eu")

    def registration(region: str) -> ev.AgentRegistered:
        return ev.AgentRegistered(producer=me(agent), agent_id=agent, instance_id=f"i-{region}", pool="p",
                                  region=region)

    first = await store.append(registration("us"))
    foreign = await store.append(ev.SessionClaimed(producer=reclaimer, session_id=sid, agent_id=agent,
                                                   instance_id="i-us", incarnation=first))
    second = await store.append(registration("eu"))
    with pytest.raises(NotClaimable, match="p/default/us"):  # the SDK refuses the first incarnation's claim
        await Writer(store, reclaimer).claim_session(sid, decide.AgentRef(agent, "i-us", first))
    token = await Writer(store, reclaimer).claim_session(sid, decide.AgentRef(agent, "i-eu", second))
    await operator.create_route(f"{uid}-r", session_id=sid, endpoint="e")
    history = await entity_history(store, "session", sid)
    flags = {e.seq: e.anomaly.kind if e.anomaly else None for e in history.entries}
    assert flags[foreign] == lc.FOREIGN_PLACEMENT and flags[token] is None
    assert history.state is not None and history.state["owner"] == agent and history.state["token"] == token
    before, _ = await session_as_of(store, sid, seq=second)
    assert before is not None and before.status == lc.S_PENDING
    route, _ = await operator.route(f"{uid}-r")
    assert route is not None


async def test_a_recalled_death_whose_pool_cannot_be_read_yet_is_filed_once_the_read_succeeds(
        store: Any, uid: str, monkeypatch: pytest.MonkeyPatch):
    """The monitor reads the pool of a recalled death's incarnation before judging breakers; a read that fails
    (an election, an outage) fails that check only (a LedgerError, which its loop logs) and the death stays
    waiting: the next check files it under the pool it happened in, once, and never under the agent's pool now."""
    from consumers.follow import Follower
    from consumers.monitor import LivenessMonitor
    from ledger.errors import Unavailable
    from ledger.writer import Writer

    a1 = f"{uid}-a1"

    def registration(pool: str) -> ev.AgentRegistered:
        return ev.AgentRegistered(producer=me(a1), agent_id=a1, instance_id=f"i-{pool}", pool=pool, ttl=30)

    first = await store.append(registration(f"{uid}-pool-a"))
    died = await store.append(ev.AgentDeclaredDead(producer=ev.Producer(id="monitor", instance="m"), agent_id=a1,
                                                   incarnation=first, reason="missed_heartbeats"))
    second = await store.append(registration(f"{uid}-pool-b"))
    items = {r.seq: r for r in await store.history("agent", a1) if isinstance(r, Recorded)}
    follower = Follower(store, heartbeats=False)
    follower.state.apply_all([items[first], items[died], items[second]])
    monitor = LivenessMonitor(Writer(store, ev.Producer(id="monitor", instance="m")), follower)
    monitor._heard("LEDGER", [items[died]], [])
    real = store.registered
    failures = [1]

    async def flaky(agent_id: str, **kw: Any) -> list[Recorded]:
        if failures:
            failures.pop()
            raise Unavailable("no leader")
        return await real(agent_id, **kw)

    monkeypatch.setattr(store, "registered", flaky)
    with pytest.raises(LedgerError):
        await monitor.check(ev.utcnow())
    assert not any(monitor._deaths.values())
    await monitor.check(ev.utcnow())
    await monitor.check(ev.utcnow())
    filed = {pool: [agent for agent, _ in deaths] for pool, deaths in monitor._deaths.items() if deaths}
    assert filed == {f"{uid}-pool-a": [a1]}


async def test_the_reference_agent_claims_the_sessions_of_its_placement_only(server: Any):
    """`ledger agent`'s self-claimer (p/gpu/eu) among sessions of its pool on other platforms and regions: it
    claims those of its own placement, never plans (nor tries) one of another, and the log stays clean."""
    import asyncio

    from fleet import ledger_on
    from helpers import eventually

    from ledger.agent import Agent
    from ledger.writer import Writer
    from ledgerctl.agent_process import SelfClaimer

    async with ledger_on(server.url) as operator:
        store = operator.store
        others = [(await operator.create_session("p", session_id=f"plain{i}"))[0] for i in range(2)]
        others.append((await operator.create_session("p", session_id="gpu-us", platform="gpu", region="us"))[0])
        mine = [(await operator.create_session("p", session_id=f"gpu{i}", platform="gpu", region="eu"))[0]
                for i in range(2)]
        agent = Agent(Writer(store, ev.Producer(id="a-gpu", instance="i")), agent_id="a-gpu", pool="p",
                      platform="gpu", region="eu", capacity=5, heartbeat=0.2, ttl=5.0)
        said: list[str] = []
        async with agent:
            claimer = SelfClaimer(agent, said.append)
            task = asyncio.create_task(claimer.run())
            try:
                await eventually(lambda: set(agent.owned) == set(mine), what="its own placement's sessions")
                assert not {c.session_id for c in claimer.wanted()} & set(others)
            finally:
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            for sid in others:
                state, _ = await operator.session(sid)
                assert state is not None and state.status == lc.S_PENDING and state.claims == 0
            report = await _check_stream(store)
    assert report.clean, report.violations
    assert not report.flagged.get(ck.CLAIM_FOR_UNAVAILABLE_AGENT)


async def test_an_agent_never_runs_a_session_of_another_placement_the_log_claims_for_it(store: Any, uid: str):
    """A claim for our agent of a session of another region, written raw by a reclaimer (its view wrong, or a
    forgery under its id): every fold flags it, and the agent's watch neither gains the session nor calls it
    gained; a claim of its own placement right after it is gained."""
    from helpers import eventually

    from ledger.agent import Agent
    from ledger.writer import Writer

    operator = Writer(store, ev.Producer(id="operator-test", instance="o"))
    reclaimer = ev.Producer(id="reclaimer", instance="r")
    foreign_sid, _ = await operator.create_session("p", session_id=f"{uid}-us", region="us")
    own_sid, _ = await operator.create_session("p", session_id=f"{uid}-eu", region="eu")
    gained: list[str] = []
    agent = Agent(Writer(store, ev.Producer(id=f"{uid}-a", instance="i")), agent_id=f"{uid}-a", pool="p",
                  region="eu", capacity=2, heartbeat=0.2, ttl=5.0, on_gained=lambda c, why: gained.append(c.session_id))
    async with agent:
        forged = await store.append(ev.SessionClaimed(producer=reclaimer, session_id=foreign_sid,
                                                      agent_id=agent.agent_id, instance_id=agent.instance_id,
                                                      incarnation=agent.incarnation))
        token = await Writer(store, reclaimer).claim_session(own_sid, agent.ref)
        assert token > forged
        # (the watch judges the log in order: the forged claim before the real one)
        await eventually(lambda: own_sid in agent.owned, what="its own placement's session gained")
        assert foreign_sid not in agent.owned and foreign_sid not in gained
        state, _ = await operator.session(foreign_sid)
        assert state is not None and state.status == lc.S_PENDING
