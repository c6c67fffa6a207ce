"""`ledger drain AGENT`: an operator's drain request, answered by the agent's own drain, on a real server.

The operator writes `agent.drain_requested` for one incarnation; the agent, seeing it on its own subjects,
writes `draining`, the reclaimer hands its sessions to the other agents of the pool, and the agent writes
`drained`. A request for an older incarnation is flagged by the fold and ignored by the agent, and an agent's
own credentials cannot ask another agent to drain.
"""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import timedelta

import pytest
from fleet import agents, consumers, events, ledger_on
from helpers import eventually

from ledger import authority, codec
from ledger import events as ev
from ledger import lifecycle as lc
from ledger.agent import Agent
from ledger.codec import Recorded
from ledger.errors import IllegalTransition, NotAuthorized
from ledger.writer import Writer
from ledgerctl import permissions
from ledgerctl.server import EmbeddedServer

HEARTBEAT, TTL = 0.2, 3.0
CLI_TIMEOUT = 120.0
"""A bound on one `ledger` process, never its expected duration."""


async def ledger_cli(url: str, *args: str) -> tuple[int, str, str]:
    """Run `ledger ARGS` without blocking the loop the in-process agents run on."""
    env = {**os.environ, "LEDGER_NATS_URL": url}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "ledgerctl", *args, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def one_line_error(result: tuple[int, str, str], *needles: str) -> None:
    code, _, err = result
    assert code != 0 and "Traceback" not in err, err
    assert len([ln for ln in err.strip().splitlines() if ln.startswith("Error")]) == 1, err
    for needle in needles:
        assert needle in err, err


def agent_of(ledger: Writer, agent_id: str, **kw: object) -> Agent:
    options = {"pool": "gpu", "capacity": 10, "heartbeat": HEARTBEAT, "ttl": TTL, **kw}
    return Agent(ledger, agent_id=agent_id, **options)  # type: ignore[arg-type]


async def agent_records(ledger: Writer, agent_id: str) -> list[Recorded]:
    return [r for r in await ledger.store.history("agent", agent_id) if isinstance(r, Recorded)]


async def test_ledger_drain_moves_every_session_to_the_pool_and_the_agent_writes_drained(server: EmbeddedServer):
    async with ledger_on(server.url) as ledger, agent_of(ledger, "a") as a, agent_of(ledger, "b") as b:
        sessions = [(await ledger.create_session("gpu", session_id=f"s{i}"))[0] for i in range(4)]
        for sid in sessions:
            await a.claim(sid)
        assert set(a.owned) == set(sessions)
        async with consumers(server.url, watchdog=False, monitor=False):
            code, out, err = await ledger_cli(server.url, "drain", "a", "--deadline", "10m", "--reason", "upgrade",
                                              "--wait")
            assert code == 0, err
            assert f"drain of agent a (incarnation {a.incarnation}) requested" in out
            assert "session(s) left" in out and out.rstrip().splitlines()[-1].startswith("agent a drained")
            await eventually(lambda: set(b.owned) == set(sessions), what="b owning every session of a")
        assert a.draining and not a.owned
        for sid in sessions:
            claim = [e for e in await events(ledger.store, "session", sid) if isinstance(e, ev.SessionClaimed)][-1]
            assert (claim.agent_id, claim.reason, claim.previous_owner) == ("b", "drain", "a")
        records = await agent_records(ledger, "a")
        request = next(r.event for r in records if isinstance(r.event, ev.AgentDrainRequested))
        draining = next(r.event for r in records if isinstance(r.event, ev.AgentDraining))
        # The agent wrote its own drain, naming the operator's request as its cause.
        assert request.producer.id == "cli" and request.reason == "upgrade" and request.incarnation == a.incarnation
        assert draining.producer.id == "a" and draining.causation_id == request.event_id
        assert draining.reason == "requested by cli: upgrade" and draining.deadline == request.deadline
        state, flagged = lc.fold(lc.evolve_agent, records)
        assert flagged == []
        assert state is not None and state.status == lc.A_DRAINED
        assert (state.drain_requested_by, state.drain_request_id) == ("cli", request.event_id)
        assert state.drain_request_deadline == request.deadline


async def test_ledger_agent_processes_drain_on_request(server: EmbeddedServer):
    """The same with the reference agent (`ledger agent` processes, in push mode): the drained process's
    sessions all end with the other one, and it stays up, drained."""
    async with ledger_on(server.url) as ledger, \
            agents(server.url, "gpu", ["p1"], heartbeat=HEARTBEAT, ttl=TTL, self_claim=False) as first:
        async with consumers(server.url, watchdog=False, monitor=False):
            sessions = [(await ledger.create_session("gpu", session_id=f"ps{i}"))[0] for i in range(3)]
            await eventually(lambda: _owners(ledger, sessions, {"p1"}), what="p1 owning every session")
            async with agents(server.url, "gpu", ["p2"], heartbeat=HEARTBEAT, ttl=TTL, self_claim=False):
                code, out, err = await ledger_cli(server.url, "drain", "p1", "--deadline", "2m", "--wait")
                assert code == 0, err
                assert out.rstrip().splitlines()[-1].startswith("agent p1 drained")
                await eventually(lambda: _owners(ledger, sessions, {"p2"}), what="p2 owning every session")
                assert first["p1"].proc.poll() is None  # drained, not gone: it stays up, owning nothing
        state, _ = await ledger.agent("p1")
        assert state is not None and state.status == lc.A_DRAINED and state.drain_requested_by == "cli"


async def _owners(ledger: Writer, sessions: list[str], expected: set[str]) -> bool:
    owners = {(await ledger.session(sid))[0].owner for sid in sessions}  # type: ignore[union-attr]
    return owners == expected


async def test_a_request_for_an_older_incarnation_is_flagged_and_drains_nothing(server: EmbeddedServer):
    async with ledger_on(server.url) as ledger:
        async with agent_of(ledger, "a") as first:
            old = first.incarnation
        async with agent_of(ledger, "a") as a:
            assert a.incarnation > old
            # Written as by a request made before the restart (an operator's, so only its incarnation is wrong).
            stale = ev.AgentDrainRequested(producer=ledger.producer, agent_id="a", incarnation=old,
                                           deadline=ev.utcnow() + timedelta(minutes=10), reason="stale")
            stale_seq = await ledger.append(stale)
            # The SDK refuses to name an incarnation that is not the current one.
            with pytest.raises(IllegalTransition, match=f"incarnation {old} is not the current one"):
                await ledger.request_drain("a", incarnation=old)
            one_line_error(await ledger_cli(server.url, "drain", "a", "--incarnation", str(old)),
                           f"incarnation {old} is not the current one")
            # A valid request after it: the watch judges in log order, so by the time the agent drains on this
            # one it has judged the stale one - had it applied that, its drain would name the stale one.
            fresh_seq, fresh = await ledger.request_drain("a", deadline=600, reason="fresh")
            assert fresh_seq > stale_seq
            await eventually(lambda: a.draining, what="a draining on the fresh request")
            records = await eventually(lambda: _with_draining(ledger, "a"), what="a's draining in the log")
        state, anomalies = lc.fold(lc.evolve_agent, records)
        assert [(seq, x.kind) for seq, x in anomalies] == [(stale_seq, lc.SUPERSEDED_INCARNATION)]
        assert state is not None and state.drain_request_id == fresh.event_id
        drains = [r.event for r in records if isinstance(r.event, ev.AgentDraining)]
        assert [(d.incarnation, d.causation_id) for d in drains] == [(a.incarnation, fresh.event_id)]


async def _with_draining(ledger: Writer, agent_id: str) -> list[Recorded] | None:
    records = await agent_records(ledger, agent_id)
    return records if any(isinstance(r.event, ev.AgentDraining) for r in records) else None


async def test_an_agents_credentials_cannot_ask_another_agent_to_drain(server: EmbeddedServer):
    async with ledger_on(server.url) as ledger, agent_of(ledger, "a") as a:
        as_b = Writer(ledger.store, ev.Producer(id="b", instance="inst-b"))
        with pytest.raises(NotAuthorized, match="only an operator may write it"):
            await as_b.request_drain("a")
        forged = ev.AgentDrainRequested(producer=as_b.producer, agent_id="a", incarnation=a.incarnation,
                                        deadline=ev.utcnow() + timedelta(minutes=10))
        with pytest.raises(NotAuthorized):
            await as_b.append(forged)
        with pytest.raises(NotAuthorized):  # nor for itself: an agent drains itself with `Agent.drain`
            await as_b.request_drain("b")
        # Nothing was written; the server's permissions derive from the same table: no agent may publish it.
        assert not [r for r in await agent_records(ledger, "a") if isinstance(r.event, ev.AgentDrainRequested)]
        request_subject = codec.subject_of(forged)
        assert not any(_covers(s, request_subject) for s in permissions.event_subjects_for_agent("b"))
        assert any(_covers(s, subject_for("cli")) for s in
                   permissions.event_subjects_for_role(authority.OPERATOR, ["cli"]))
        assert not a.draining


def subject_for(producer: str) -> str:
    return f"ledger.agent.a.drain_requested.{producer}"


def _covers(pattern: str, subject: str) -> bool:
    p, s = pattern.split("."), subject.split(".")
    if p[-1] == ">":
        return len(s) >= len(p) and all(x in ("*", y) for x, y in zip(p[:-1], s, strict=False))
    return len(p) == len(s) and all(x in ("*", y) for x, y in zip(p, s, strict=False))


async def test_drain_explains_itself_and_refuses_in_one_line(server: EmbeddedServer):
    code, out, err = await ledger_cli(server.url, "drain", "--help")
    assert code == 0, err
    assert "Usage: ledger drain [OPTIONS] AGENT" in out and "--deadline" in out and "--wait" in out
    one_line_error(await ledger_cli(server.url, "drain", "nobody"), "agent nobody is not registered")
    one_line_error(await ledger_cli(server.url, "drain", "a", "--deadline", "soon"), "is not a duration")
    async with ledger_on(server.url) as ledger:
        async with agent_of(ledger, "gone-agent"):
            pass  # its goodbye on leaving
        one_line_error(await ledger_cli(server.url, "drain", "gone-agent"), "agent gone-agent is gone",
                       "only an alive agent can drain")
        assert not [r for r in await agent_records(ledger, "gone-agent")
                    if isinstance(r.event, ev.AgentDrainRequested)]


# --- the fold of a request, alone ------------------------------------------------------------------------------


def _rec(event: ev.Event, seq: int) -> Recorded:
    return Recorded("LEDGER", seq, codec.subject_of(event), 1_800_000_000_000_000_000 + seq, event)


def _request(incarnation: int, producer: str = "operator-ops") -> ev.AgentDrainRequested:
    return ev.AgentDrainRequested(producer=ev.Producer(id=producer, instance="i"), agent_id="a",
                                  incarnation=incarnation, deadline=ev.utcnow() + timedelta(minutes=5))


def _registered() -> Recorded:
    return _rec(ev.AgentRegistered(producer=ev.Producer(id="a", instance="i1"), agent_id="a", instance_id="i1",
                                   pool="gpu"), 1)


def test_the_fold_records_a_request_without_changing_the_status():
    state, _ = lc.evolve_agent(None, _registered())
    request = _request(1)
    after, anomaly = lc.evolve_agent(state, _rec(request, 2))
    assert anomaly is None and after is not None
    assert (after.status, after.status_seq) == (lc.A_ALIVE, 1)  # the agent's own `draining` moves it
    assert (after.drain_requested_by, after.drain_request_id, after.last_seq) == ("operator-ops", request.event_id, 2)
    assert after.drain_request_deadline == request.deadline


@pytest.mark.parametrize(("incarnation", "producer", "kind"), [
    (0, "operator-ops", lc.SUPERSEDED_INCARNATION),
    (5, "operator-ops", lc.UNKNOWN_INCARNATION),
    (1, "b", lc.UNAUTHORIZED_PRODUCER),
    (1, "a", lc.UNAUTHORIZED_PRODUCER),
])
def test_the_fold_flags_a_request_for_another_incarnation_or_by_an_agent(incarnation: int, producer: str,
                                                                        kind: str):
    state, _ = lc.evolve_agent(None, _registered())
    after, anomaly = lc.evolve_agent(state, _rec(_request(incarnation, producer), 2))
    assert anomaly is not None and anomaly.kind == kind
    assert after == state


def test_the_fold_flags_a_request_for_an_agent_that_left():
    state, _ = lc.evolve_agent(None, _registered())
    gone, _ = lc.evolve_agent(state, _rec(ev.AgentGoodbye(producer=ev.Producer(id="a", instance="i1"), agent_id="a",
                                                          instance_id="i1", incarnation=1), 2))
    after, anomaly = lc.evolve_agent(gone, _rec(_request(1), 3))
    assert anomaly is not None and anomaly.kind == lc.ILLEGAL_TRANSITION and "while agent is gone" in anomaly.detail
    assert after == gone
