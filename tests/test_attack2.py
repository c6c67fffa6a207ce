"""Hostile tests of the agent's newest watch (issue 9): every agent's registrations followed and cached, its
own lifecycle folded with evolve_agent, compare-and-set re-registration. Real nats-server; forgeries are
appended raw (nats-py) or with a forged producer, as a hostile client would. Waiting is bounded polling on a
condition (helpers.eventually), never a bare sleep.
"""

from __future__ import annotations

from helpers import eventually

from ledger import events as ev
from ledger import lifecycle as lc
from ledger.client import Ledger
from ledger.subjects import event_subject

from test_agent_judges import FORGER, agent_of


async def test_an_unreadable_message_on_the_agents_registration_subject_does_not_keep_it_fenced_for_ever(
        ledger: Ledger, uid: str):
    """Garbage published raw on `ledger.agent.<id>.registered.*` is no registration (every reader skips it),
    yet it is the subject's last sequence: a re-registration whose compare-and-set expects the last
    registration the watch knows of conflicts with it, every time. Fenced by a forged goodbye, the agent must
    still come back as a new incarnation."""
    async with agent_of(ledger, f"{uid}-a1") as a1:
        first = a1.incarnation
        js = ledger.store.nc.jetstream()
        await js.publish(event_subject("agent", a1.agent_id, "registered", "mallory"), b"\x00not an event")
        await ledger.store.append(ev.AgentGoodbye(producer=FORGER, agent_id=a1.agent_id, instance_id=a1.instance_id,
                                                  incarnation=first, reason="forged"))
        await eventually(lambda: a1.fenced is not None or a1.incarnation != first, timeout=10,
                         what="the agent fencing itself on the forged goodbye")
        await eventually(lambda: a1.fenced is None and a1.incarnation > first and not a1.superseded, timeout=15,
                         what="the agent registering again past the unreadable message")
        state, _ = await ledger.agent(a1.agent_id)
        assert state is not None and state.incarnation == a1.incarnation and state.status == lc.A_ALIVE
