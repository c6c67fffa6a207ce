"""A client written from the README alone ("Writing events from another language"), as a JavaScript one would be.

It uses only raw nats-py requests - no ledger code - and follows the README literally: register an agent, create
a session with compare-and-set (expected 0 on the creations), claim it with compare-and-set on the session's
history (the expected sequence is the creation's, from its acknowledgement: nothing is read first), replay the
history. Only the checks of the result use the ledger (its fold, `Writer.session`); the second test checks the
README's compare-and-set table against what the SDK itself sends.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from nats.aio.client import Client as NATS

from ledger import events as ev
from ledger import lifecycle as lc
from ledger.decide import AgentRef
from ledger.writer import Writer
from ledgerctl.schema import COMPARE_AND_SET


def iso_now() -> str:
    """What JavaScript's `new Date().toISOString()` gives: milliseconds and a `Z`."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


async def publish(nc: NATS, subject: str, body: dict[str, Any], expect: tuple[int, str] | None = None
                  ) -> dict[str, Any]:
    """README: publish as a request (the reply is JetStream's acknowledgement) with Nats-Msg-Id = event_id, and
    for a compare-and-set the expected last sequence on a subject filter."""
    headers = {"Nats-Msg-Id": body["event_id"]}
    if expect is not None:
        headers["Nats-Expected-Last-Subject-Sequence"] = str(expect[0])
        headers["Nats-Expected-Last-Subject-Sequence-Subject"] = expect[1]
    reply = await nc.request(subject, json.dumps(body).encode(), timeout=10, headers=headers)
    ack: dict[str, Any] = json.loads(reply.data)
    return ack


async def test_a_client_from_the_readme_creates_claims_and_replays(ledger: Writer, nats_server: Any, uid: str):
    nc = NATS()
    await nc.connect(nats_server.url)
    try:
        agent, instance, session, operator = f"{uid}-js-agent", uuid.uuid4().hex, f"{uid}-js-s", "operator-js"

        # 1. The agent registers; the acknowledgement's seq is its incarnation.
        registered = await publish(nc, f"ledger.agent.{agent}.registered.{agent}", {
            "type": "agent.registered", "event_id": str(uuid.uuid4()), "time": iso_now(),
            "producer": {"id": agent, "instance": instance}, "agent_id": agent, "instance_id": instance,
            "pool": "gpu"})
        assert "error" not in registered, registered
        incarnation = registered["seq"]

        # 2. An operator creates the session, only if it was never created.
        created_on = f"ledger.session.{session}.created.*"
        creation = {"type": "session.created", "event_id": str(uuid.uuid4()), "time": iso_now(),
                    "producer": {"id": operator, "instance": "js-1"}, "session_id": session, "pool": "gpu"}
        created = await publish(nc, f"ledger.session.{session}.created.{operator}", creation, expect=(0, created_on))
        assert "error" not in created, created
        again = await publish(nc, f"ledger.session.{session}.created.{operator}",
                              {**creation, "event_id": str(uuid.uuid4())}, expect=(0, created_on))
        assert again["error"]["err_code"] == 10071, again  # it exists: the compare-and-set refuses a second one

        # 3. The agent claims it, expecting the creation as the session's last message.
        history = f"ledger.session.{session}.>"
        claim = {"type": "session.claimed", "event_id": str(uuid.uuid4()), "time": iso_now(),
                 "producer": {"id": agent, "instance": instance}, "session_id": session, "agent_id": agent,
                 "instance_id": instance, "incarnation": incarnation, "reason": "initial"}
        claimed = await publish(nc, f"ledger.session.{session}.claimed.{agent}", claim,
                                expect=(created["seq"], history))
        assert "error" not in claimed, claimed
        late = await publish(nc, f"ledger.session.{session}.claimed.{agent}",
                             {**claim, "event_id": str(uuid.uuid4())}, expect=(created["seq"], history))
        assert late["error"]["err_code"] == 10071, late  # decided on a state that is gone: refused

        # 4. Replay the session's history (an ordered consumer on the entity's filter).
        js = nc.jetstream()
        sub = await js.subscribe(history, ordered_consumer=True)
        replayed = [json.loads((await sub.next_msg(timeout=10)).data)["type"] for _ in range(2)]
        await sub.unsubscribe()
        assert replayed == ["session.created", "session.claimed"]
    finally:
        await nc.close()

    state, last = await ledger.session(session)
    assert state is not None and last == claimed["seq"]
    assert (state.status, state.owner, state.token, state.owner_incarnation) == (
        lc.S_ASSIGNED, agent, claimed["seq"], incarnation)


async def test_the_documented_compare_and_set_headers_are_the_ones_the_sdk_sends(ledger: Writer, nats_server: Any,
                                                                                  uid: str):
    """The README's table (ledgerctl.schema.COMPARE_AND_SET) against what the SDK's own writes carry, as a plain
    subscriber sees them on the wire."""
    session = f"{uid}-sdk-s"
    nc = NATS()
    await nc.connect(nats_server.url)
    try:
        sub = await nc.subscribe(f"ledger.session.{session}.>")
        await nc.flush()  # the server has the subscription before the SDK, on its own connection, publishes
        created = (await ledger.create_session("gpu", session_id=session))[1]
        reclaimer = Writer(ledger.store, ev.Producer(id="reclaimer-test", instance="r-1"))
        claimed = await reclaimer.claim_session(session, AgentRef(f"{uid}-a", "i-1", 1))
        terminated = await ledger.terminate_session(session, reason="done")
        seen = [await sub.next_msg(timeout=10) for _ in range(3)]
    finally:
        await nc.close()
    expected_last = {"session.created": 0, "session.claimed": created, "session.terminated": claimed}
    for msg in seen:
        tag = json.loads(msg.data)["type"]
        rule = COMPARE_AND_SET[tag]
        assert msg.headers is not None
        assert msg.headers["Nats-Msg-Id"] == json.loads(msg.data)["event_id"]
        assert msg.headers["Nats-Expected-Last-Subject-Sequence-Subject"] == rule.filter.replace("<id>", session)
        assert msg.headers["Nats-Expected-Last-Subject-Sequence"] == str(expected_last[tag]), tag
    assert terminated > claimed > created
