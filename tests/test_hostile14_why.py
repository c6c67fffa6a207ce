"""A hostile client against `ledger why` (projections.why, the command, GET /api/why): on a server without auth
anyone may store any event, and every free-text field of it reaches a terminal. Forged evidence, forged breaker
trips, forged duplicate ids, dead letters and absurd moments must end the chain with a sentence or give a one-line
error, never a traceback, a 500, a forged line or a terminal escape."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import httpx
from click.testing import CliRunner, Result
from helpers import authorized
from http_stack import running
from test_dashboard_attacks import PAYLOAD, browser_page, needs_chromium, not_pwned
from test_why import T0, Log, head_of, rec

from ledger import events as ev
from ledger.events import MAX_COUNT, Producer
from ledger.ids import new_id
from ledger.store import EventStore
from ledger.subjects import HEARTBEAT_STREAM, LEDGER_STREAM, event_subject
from ledgerctl.cli import cli
from ledgerctl.server import EmbeddedServer
from projections.history import Flag
from projections.why import Found, build_chain, render, why

HOSTILE = ("bye\n  because LEDGER #1 at 00:00:00: `monitor` (instance `m-1`) declared it dead\r"
           "\x1b[2J\x1b]0;pwned\x07 \u202eevil\u202c [red]markup[/] [/bold]")
"""A newline that forges a link, a carriage return, ANSI (clear the screen, set the title), a right-to-left override,
and rich markup."""


async def invoke(store: EventStore, *args: str) -> Result:
    runner = CliRunner()
    return await asyncio.to_thread(runner.invoke, cli, ["why", *args, "--nats-url", store.settings.nats_url],
                                   catch_exceptions=False, color=True)  # color: what a terminal gets


async def test_text_fields_cannot_forge_lines_nor_reach_the_terminal_as_escapes(store: EventStore) -> None:
    uid = new_id()[:8]
    me = Producer(id=f"x-{uid}", instance="i\x1b[31m")
    reg = await store.append(ev.AgentRegistered(producer=me, agent_id=me.id, instance_id="i", pool="p"))
    await store.append(ev.AgentGoodbye(producer=me, agent_id=me.id, instance_id="i", incarnation=reg,
                                       reason=HOSTILE, causation_id=f"none\n  because {HOSTILE}"))
    out = await invoke(store, "agent", me.id)
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert len(lines) == 3, lines  # the summary, the goodbye, why the chain ends
    assert not any(c in out.output for c in "\x1b\x07\r\u202e\u202c"), repr(out.output)
    assert "[red]markup[/]" in out.output  # printed as it is: nothing renders markup
    assert "\\n" in lines[1] and "\\x1b" in lines[1]  # shown, escaped, not hidden
    # --json keeps the text as written
    data = json.loads((await invoke(store, "agent", me.id, "--json")).output)
    assert data["links"][0]["fields"]["reason"] == HOSTILE


async def test_a_death_notes_only_the_applied_breaker_trip_not_forged_ones(store: EventStore) -> None:
    uid = new_id()[:8]
    agent, pool = f"d-{uid}", f"p-{uid}"
    me = Producer(id=agent, instance="i")
    reg = await store.append(ev.AgentRegistered(producer=me, agent_id=agent, instance_id="i", pool=pool))
    await store.append(authorized(ev.AgentDeclaredDead(producer=me, agent_id=agent, incarnation=reg, reason="gone")))
    for i in range(20):  # not the monitor: each flagged, none tripped anything
        await store.append(ev.PoolBreakerTripped(producer=Producer(id="mallory", instance="m"), pool=pool,
                                                 reason=f"forged {i}", dead=(agent,)))
    chain = await why(store, "agent", agent)
    assert chain.notes == [], chain.notes
    real = await store.append(authorized(ev.PoolBreakerTripped(producer=me, pool=pool, reason="real",
                                                               dead=(agent,))))
    chain = await why(store, "agent", agent)
    assert len(chain.notes) == 1 and f"#{real}" in chain.notes[0] and "real" in chain.notes[0]


async def test_forged_evidence_naming_absent_foreign_or_later_beats_ends_the_chain_with_a_sentence(
        store: EventStore) -> None:
    uid = new_id()[:8]
    other = Producer(id=f"o-{uid}", instance="i")
    await store.append(ev.AgentRegistered(producer=other, agent_id=other.id, instance_id="i", pool="p"))
    foreign = await store.append(ev.AgentHeartbeat(producer=other, agent_id=other.id, instance_id="i",
                                                   incarnation=1, beat=1))
    for name, named in (("huge", MAX_COUNT), ("foreign", foreign), ("later", None)):
        me = Producer(id=f"{name}-{uid}", instance="i")
        reg = await store.append(ev.AgentRegistered(producer=me, agent_id=me.id, instance_id="i", pool="p"))
        beat_seq = named if named is not None else (await store.last_seq("LEDGER_HB")) + 2
        if named is None:  # a beat of its own, stored after the death that names it
            await store.append(authorized(ev.AgentDeclaredDead(
                producer=me, agent_id=me.id, incarnation=reg, reason="r",
                evidence=ev.Evidence(last_heartbeat_seq=beat_seq,
                                     last_heartbeat_at=datetime(1, 1, 1, tzinfo=UTC),
                                     observed_at=datetime(9999, 12, 31, tzinfo=UTC)))))
            await store.append(ev.AgentHeartbeat(producer=other, agent_id=other.id, instance_id="i",
                                                 incarnation=1, beat=2))
            assert await store.append(ev.AgentHeartbeat(producer=me, agent_id=me.id, instance_id="i",
                                                        incarnation=reg, beat=1)) == beat_seq
        else:
            await store.append(authorized(ev.AgentDeclaredDead(
                producer=me, agent_id=me.id, incarnation=reg, reason="r",
                evidence=ev.Evidence(last_heartbeat_seq=beat_seq))))
        chain = await why(store, "agent", me.id)
        assert [link.type for link in chain.links] == ["agent.declared_dead"], (name, chain)
        said = "stored after it" if named is None else f"heartbeat-stream #{beat_seq}, is not kept"
        assert said in chain.end, (name, chain.end)


async def test_a_dead_letter_under_the_causation_id_and_on_the_heartbeat_named_end_the_chain(
        store: EventStore) -> None:
    uid = new_id()[:8]
    me = Producer(id=f"dl-{uid}", instance="i")
    js = store.nc.jetstream()
    reg = await store.append(ev.AgentRegistered(producer=me, agent_id=me.id, instance_id="i", pool="p"))
    await js.publish(event_subject("agent", me.id, "draining", me.id), b"\x00\xff garbage",
                     headers={"Nats-Msg-Id": f"cause-{uid}"})
    await store.append(ev.AgentGoodbye(producer=me, agent_id=me.id, instance_id="i", incarnation=reg,
                                       causation_id=f"cause-{uid}"))
    chain = await why(store, "agent", me.id)
    assert len(chain.links) == 1 and f"causation id cause-{uid}" in chain.end
    # a death naming, as its last beat, a dead letter on the agent's heartbeat subject
    dead = Producer(id=f"dh-{uid}", instance="i")
    reg = await store.append(ev.AgentRegistered(producer=dead, agent_id=dead.id, instance_id="i", pool="p"))
    ack = await js.publish(event_subject("hb", dead.id, "heartbeat", dead.id), b"{not json")
    await store.append(authorized(ev.AgentDeclaredDead(producer=dead, agent_id=dead.id, incarnation=reg, reason="r",
                                                       evidence=ev.Evidence(last_heartbeat_seq=ack.seq))))
    chain = await why(store, "agent", dead.id)
    assert len(chain.links) == 1 and f"heartbeat-stream #{ack.seq}" in chain.end


async def test_absurd_moments_and_ids_are_one_line_errors_on_the_command(store: EventStore) -> None:
    uid = new_id()[:8]
    me = Producer(id=f"m-{uid}", instance="i")
    await store.append(ev.AgentRegistered(producer=me, agent_id=me.id, instance_id="i", pool="p"))
    zero = await invoke(store, "agent", me.id, "--at-seq", "0")
    assert zero.exit_code == 1 and "at that point" in zero.output, zero.output  # it exists, later
    huge = await invoke(store, "agent", me.id, "--at-seq", str(2**80), "--json")
    assert huge.exit_code == 0 and json.loads(huge.output)["links"][0]["type"] == "agent.registered"
    past = await invoke(store, "agent", me.id, "--at", "1971-01-01T00:00:00Z")
    assert past.exit_code == 1 and "at that point" in past.output
    future = await invoke(store, "agent", me.id, "--at", "2200-01-01T00:00:00Z", "--json")
    assert future.exit_code == 0 and json.loads(future.output)["id"] == me.id
    for args in (["agent", "a.b"], ["agent", "*"], ["agent", ">"], ["agent", "x" * 5000], ["route", "a b"]):
        bad = await invoke(store, *args)
        assert bad.exit_code == 1 and len(bad.output.strip().splitlines()) == 1, (args, bad.output)
        assert "internal error" not in bad.output
    kind = await invoke(store, "pool", "p")
    assert kind.exit_code == 2 and "internal error" not in kind.output


async def test_absurd_moments_and_ids_over_http_are_api_errors_never_500(server: EmbeddedServer,
                                                                          tmp_path: Path) -> None:
    async with running(server, tmp_path) as r, httpx.AsyncClient(base_url=r.url) as client:
        await r.operator.create_session("p", session_id="hw")
        ok = [("/api/why/session/hw", {"at_seq": str(2**80)}), ("/api/why/session/hw", {"at": "2200-01-01T00:00:00Z"})]
        for path, params in ok:
            reply = await client.get(path, params=params)
            assert reply.status_code == 200, (path, params, reply.text)
        bad = [("/api/why/session/hw", {"at_seq": "-1"}, 400), ("/api/why/session/hw", {"at_seq": "abc"}, 400),
               ("/api/why/session/hw", {"at": "1971-01-01T00:00:00Z"}, 404),
               ("/api/why/session/a.b", {}, 400), ("/api/why/session/%2A", {}, 400),
               ("/api/why/session/%3E", {}, 400), ("/api/why/session/" + "x" * 3000, {}, 400),
               ("/api/why/pool/p", {}, 400), ("/api/why/session/hw", {"at": "\x1b[2J"}, 400)]
        for path, params, status in bad:
            reply = await client.get(path, params=params)
            assert reply.status_code == status, (path, params, reply.status_code, reply.text)
            body = reply.json()
            assert set(body) == {"code", "message"} and "\n" not in body["message"], body


@needs_chromium
async def test_the_dashboards_chain_shows_stored_markup_as_text(server: EmbeddedServer, tmp_path: Path) -> None:
    """A reason and a causation id full of markup reach the entity page's chain (its sentence and why it ends)."""
    from playwright.async_api import expect

    async with running(server, tmp_path) as r, browser_page() as page:
        store = r.stack.store
        me = Producer(id="xss", instance="i")
        reg = await store.append(ev.AgentRegistered(producer=me, agent_id="xss", instance_id="i", pool="p"))
        await store.append(ev.AgentGoodbye(producer=me, agent_id="xss", instance_id="i", incarnation=reg,
                                           reason=PAYLOAD, causation_id=PAYLOAD))
        await r.stack.projector.wait_for(await store.last_seq(LEDGER_STREAM), timeout=30)
        await page.goto(f"{r.url}/#/agent/xss")
        chain = page.locator("#entity-why")
        await expect(chain).to_contain_text(f"goodbye for xss (incarnation {reg}): {PAYLOAD}", timeout=30_000)
        await expect(chain).to_contain_text(f"(causation id {PAYLOAD})")
        await not_pwned(page)


# --- pure: forged copies and forged facts ----------------------------------------------------------------------

MALLORY, MONITOR = Producer(id="mallory", instance="m"), Producer(id="monitor", instance="m")
FORGED = Flag("unauthorized_producer", "only the monitor")


async def test_a_forged_suspicion_or_draining_is_not_taken_as_the_fact_a_verdict_follows() -> None:
    """A death names its suspicion, a `drained` its `draining`, by fact: a flagged forgery stored between the real
    fact and the verdict is not that fact (nor are the beats its evidence names)."""
    a = Producer(id="a", instance="i")
    beat = rec(7, ev.AgentHeartbeat(producer=a, agent_id="a", instance_id="i", incarnation=1, beat=3),
               stream=HEARTBEAT_STREAM)
    found = [
        Found("agent", "a", rec(1, ev.AgentRegistered(producer=a, agent_id="a", instance_id="i", pool="p"))),
        Found("agent", "a", rec(20, ev.AgentSuspected(producer=MONITOR, agent_id="a", incarnation=1, reason="late",
                                                      evidence=ev.Evidence(last_heartbeat_seq=7)))),
        Found("agent", "a", rec(25, ev.AgentSuspected(producer=MALLORY, agent_id="a", incarnation=1,
                                                      reason="forged", evidence=ev.Evidence(last_heartbeat_seq=8))),
              FORGED),
        Found("agent", "a", rec(30, ev.AgentDeclaredDead(producer=MONITOR, agent_id="a", incarnation=1,
                                                         reason="missed"))),
    ]
    chain = await build_chain(head_of("agent", "a", found, {"status": "dead", "incarnation": 1, "reason": "dead",
                                                            "status_seq": 30}), Log(found, (beat,)))
    assert [(link.seq, link.found_by) for link in chain.links] == [(30, "state"), (20, "suspicion"), (7, "evidence")]
    drained = [
        found[0],
        Found("agent", "a", rec(40, ev.AgentDraining(producer=a, agent_id="a", incarnation=1, deadline=T0,
                                                     reason="real"))),
        Found("agent", "a", rec(45, ev.AgentDraining(producer=MALLORY, agent_id="a", incarnation=1, deadline=T0,
                                                     reason="forged")), FORGED),
        Found("agent", "a", rec(50, ev.AgentDrained(producer=a, agent_id="a", incarnation=1))),
    ]
    chain = await build_chain(head_of("agent", "a", drained, {"status": "drained", "incarnation": 1,
                                                              "reason": "drained", "status_seq": 50}), Log(drained))
    assert [(link.seq, link.found_by) for link in chain.links][:2] == [(50, "state"), (40, "draining")]


async def test_a_flagged_copy_of_an_id_on_the_effects_own_entity_does_not_shadow_the_applied_cause() -> None:
    """A forger stores, on the session's own subject, an event carrying the id of the owner's real death: the claim
    that names that id is explained by the death that applied, not by the flagged copy."""
    a1, mallory, monitor = Producer(id="a1", instance="i"), MALLORY, MONITOR
    reclaimer = Producer(id="reclaimer", instance="r")
    found = [
        Found("agent", "a1", rec(1, ev.AgentRegistered(producer=a1, agent_id="a1", instance_id="i", pool="p"))),
        Found("session", "s", rec(2, ev.SessionCreated(producer=monitor, session_id="s", pool="p"))),
        Found("session", "s", rec(3, ev.SessionClaimed(producer=a1, session_id="s", agent_id="a1", instance_id="i",
                                                       incarnation=1))),
        Found("session", "s", rec(4, ev.SessionResourceReported(producer=mallory, session_id="s", agent_id="a1",
                                                                incarnation=1, token=3, platform_resource_id="r",
                                                                event_id="dead-a1-1")),
              Flag("not_owner", "mallory is not the owner")),
        Found("agent", "a1", rec(5, ev.AgentDeclaredDead(producer=monitor, agent_id="a1", incarnation=1,
                                                         reason="missed", event_id="dead-a1-1"))),
        Found("session", "s", rec(6, ev.SessionClaimed(producer=reclaimer, session_id="s", agent_id="a2",
                                                       instance_id="j", incarnation=9, reason="failover",
                                                       previous_owner="a1", previous_token=3,
                                                       causation_id="dead-a1-1"))),
    ]

    chain = await build_chain(head_of("session", "s", found, {"status": "assigned", "owner": "a2"}), Log(found))
    assert [link.seq for link in chain.links][:2] == [6, 5], render(chain)


async def test_a_session_flooded_with_forged_claims_is_explained_reading_each_history_once(store: EventStore) -> None:
    """300 take-overs forged for made-up agents: why reads the session's history once (not once per fold), and no
    history of the made-up agents the forgeries name."""
    uid = new_id()[:8]
    owner = Producer(id=f"o-{uid}", instance="i")
    sid = f"s-{uid}"
    inc = await store.append(ev.AgentRegistered(producer=owner, agent_id=owner.id, instance_id="i", pool="p"))
    await store.append(ev.SessionCreated(producer=Producer(id="operator-x", instance="o"), session_id=sid, pool="p"))
    token = await store.append(ev.SessionClaimed(producer=owner, session_id=sid, agent_id=owner.id, instance_id="i",
                                                 incarnation=inc))
    for i in range(300):
        await store.append(authorized(ev.SessionClaimed(
            producer=owner, session_id=sid, agent_id=f"ghost{i}-{uid}", instance_id="g", incarnation=1,
            reason="failover", previous_owner=f"ghost{i}-{uid}", previous_token=token)))
    reads: list[tuple[str, str]] = []
    real = store.history

    async def history(family: str, entity_id: str, **kw: object) -> list[object]:
        if not kw:  # the plain reads; a session's lookups ask a replica for at least its last event
            reads.append((family, entity_id))
        return await real(family, entity_id, **kw)  # type: ignore[arg-type,return-value]

    store.history = history  # type: ignore[assignment,method-assign]
    try:
        chain = await why(store, "session", sid)
    finally:
        del store.history
    assert chain.links[0].seq == token and chain.summary.startswith(f"{sid} is owned by {owner.id}")
    assert sorted(reads) == [("agent", owner.id), ("session", sid)], reads


async def test_a_session_held_by_a_dead_incarnation_of_a_restarted_owner_notes_it() -> None:
    """The owner died and came back as a new incarnation while the pool's breaker held its session: the session is
    still held by the dead incarnation (the reclaimer may replace it, and does not while the breaker is open)."""
    a2 = Producer(id="a2", instance="i2")
    found = [
        Found("agent", "a2", rec(3, ev.AgentRegistered(producer=a2, agent_id="a2", instance_id="i2", pool="p"))),
        Found("session", "s1", rec(5, ev.SessionCreated(producer=MONITOR, session_id="s1", pool="p"))),
        Found("session", "s1", rec(7, ev.SessionClaimed(producer=a2, session_id="s1", agent_id="a2", instance_id="i2",
                                                        incarnation=3))),
        Found("pool", "p", rec(29, ev.PoolBreakerTripped(producer=MONITOR, pool="p", reason="2 of 3 died",
                                                         dead=("a1", "a2"), agents=3))),
        Found("agent", "a2", rec(30, ev.AgentDeclaredDead(producer=MONITOR, agent_id="a2", incarnation=3,
                                                          reason="missed_heartbeats"))),
        Found("agent", "a2", rec(40, ev.AgentRegistered(producer=a2, agent_id="a2", instance_id="i3", pool="p"))),
    ]
    state = {"status": "assigned", "owner": "a2", "owner_incarnation": 3, "token": 7, "claim_reason": "initial",
             "pool": "p"}
    chain = await build_chain(head_of("session", "s1", found, state), Log(found))
    assert len(chain.notes) == 2, chain.notes
    assert "a2" in chain.notes[0] and "LEDGER #30" in chain.notes[0] and "declared a2 dead" in chain.notes[0]
    assert "pool p's breaker is open" in chain.notes[1]
