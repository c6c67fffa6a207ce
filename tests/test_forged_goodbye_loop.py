"""A forged goodbye for a live agent alone in its pool (written with the agent's own identity: the folds flag
one by any other producer): the agent comes back as a new incarnation and the
sessions settle with it, instead of an endless claim -> orphan loop with the reclaimer (issue 9, section 2)."""

from __future__ import annotations

from fleet import agents, consumers, events, ledger_on
from helpers import eventually

from ledger import events as ev
from ledger import lifecycle as lc
from ledgerctl.server import EmbeddedServer

HEARTBEAT, TTL = 0.2, 1.5
MAX_CLAIMS = 4
"""Claims per session it may take to settle: the first, at most a couple made before the agent saw the
forgery, and the one for its new incarnation. A loop makes dozens."""


def owns(state: lc.SessionState | None, agent_id: str, incarnation: int) -> bool:
    return state is not None and (state.status, state.owner, state.owner_incarnation) == (
        lc.S_ASSIGNED, agent_id, incarnation)




async def test_a_forged_goodbye_for_an_agent_alone_in_its_pool_settles(server: EmbeddedServer):
    async with ledger_on(server.url) as ledger, agents(server.url, "solo", ["a1"], heartbeat=HEARTBEAT,
                                                        ttl=TTL) as procs, \
            consumers(server.url, watchdog=False):
        sessions = [(await ledger.create_session("solo", session_id=f"s{i}"))[0] for i in range(3)]

        async def owned_by_current(expect_after: int = 0) -> int | None:
            agent, _ = await ledger.agent("a1")
            if agent is None or agent.status != lc.A_ALIVE or agent.incarnation <= expect_after:
                return None
            states = [(await ledger.session(sid))[0] for sid in sessions]
            ok = all(owns(s, "a1", agent.incarnation) for s in states)
            return agent.incarnation if ok else None

        first = await eventually(owned_by_current, timeout=20, what="every session claimed by a1")
        await ledger.store.append(ev.AgentGoodbye(producer=ev.Producer(id="a1", instance="m"), agent_id="a1",
                                                  instance_id="forged", incarnation=first, reason="forged"))
        second = await eventually(lambda: owned_by_current(first), timeout=20,
                                  what="a1 back as a new incarnation, owning every session again")
        # A later session is placed too (the consumers and the agent are past the forgery) ...
        marker, _ = await ledger.create_session("solo", session_id="marker")

        async def marker_placed() -> bool:
            state, _ = await ledger.session(marker)
            return owns(state, "a1", second)

        await eventually(marker_placed, timeout=20, what="a new session placed with a1")
        # ... and the forgery cost each session only a bounded number of claims, not a loop.
        for sid in sessions:
            claims = [e for e in await events(ledger.store, "session", sid) if isinstance(e, ev.SessionClaimed)]
            assert len(claims) <= MAX_CLAIMS, [(c.incarnation, c.reason) for c in claims]
        assert procs["a1"].proc.poll() is None
