"""`ledger why`: the chain of causes behind an entity's state, on logs the SDK and the consumers wrote on a real
server (a killed agent, a goodbye, a route's watchdog timeout, forged causation ids), and its sentences."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import msgspec
import pytest
from click.testing import CliRunner
from fleet import agents, consumers, ledger_on
from helpers import eventually
from http_stack import running

from ledger import events as ev
from ledger import lifecycle as lc
from ledger.agent import Agent
from ledger.codec import Recorded
from ledger.events import Producer
from ledger.ids import new_id
from ledger.settings import Settings
from ledger.store import EventStore
from ledger.subjects import HEARTBEAT_STREAM, LEDGER_STREAM
from ledger.writer import Writer
from ledgerctl.cli import cli
from ledgerctl.server import EmbeddedServer
from projections.errors import UnknownEntity
from projections.history import EntityHistory, Flag, HistoryEntry
from projections.why import MAX_LINKS, Chain, Found, build_chain, describe, headline, render, why

HEARTBEAT, TTL = 0.2, 1.5


async def records(store: EventStore, family: str, entity_id: str) -> list[Recorded]:
    return [r for r in await store.history(family, entity_id) if isinstance(r, Recorded)]


def of_type(items: list[Recorded], cls: type[ev.Event]) -> list[Recorded]:
    return [r for r in items if isinstance(r.event, cls)]


def types(chain: Chain, skip: tuple[str, ...] = ("agent.suspected",)) -> list[str]:
    return [link.type for link in chain.links if link.type not in skip]


# --- on real logs ----------------------------------------------------------------------------------------------


async def test_a_killed_agents_session_is_explained_by_its_claim_orphaning_death_and_last_beat(
        server: EmbeddedServer) -> None:
    async with ledger_on(server.url) as ledger:
        await ledger.create_session("gpu", session_id="s1")
        async with agents(server.url, "gpu", ["a1"], heartbeat=HEARTBEAT, ttl=TTL) as procs:
            await eventually(lambda: owner_is(ledger, "s1", "a1"), timeout=30, what="a1 claims s1")
            async with consumers(server.url, watchdog=False):
                procs["a1"].kill9()  # no goodbye: only the monitor can tell it is gone
                await eventually(lambda: status_is(ledger, "s1", lc.S_ORPHANED), timeout=30,
                                 what="s1 orphaned once a1 is declared dead (nobody else to take it)")
                async with agents(server.url, "gpu", ["a2"], heartbeat=HEARTBEAT, ttl=TTL):
                    await eventually(lambda: owner_is(ledger, "s1", "a2"), timeout=30, what="a2 claims s1")
        store = ledger.store
        session, agent = await records(store, "session", "s1"), await records(store, "agent", "a1")
        [claim_a1, claim_a2] = of_type(session, ev.SessionClaimed)
        [orphaned] = of_type(session, ev.SessionOrphaned)
        [dead] = of_type(agent, ev.AgentDeclaredDead)
        assert isinstance(dead.event, ev.AgentDeclaredDead)
        beat_seq = dead.event.evidence.last_heartbeat_seq

        chain = await why(store, "session", "s1")
        assert types(chain) == ["session.claimed", "session.orphaned", "agent.declared_dead", "agent.heartbeat"]
        links = [link for link in chain.links if link.type != "agent.suspected"]
        assert [link.seq for link in links] == [claim_a2.seq, orphaned.seq, dead.seq, beat_seq]
        assert [link.stream for link in links] == [LEDGER_STREAM] * 3 + [HEARTBEAT_STREAM]
        assert [link.found_by for link in links[:3]] == ["state", "causation_id", "causation_id"]
        assert links[2].producer == "monitor" and links[3].entity == "a1"
        assert chain.summary.startswith(f"s1 is owned by a2 (incarnation {claim_a2.event.incarnation}")  # type: ignore[attr-defined]
        assert "a heartbeat is a sign of life" in chain.end
        text = "\n".join(render(chain))
        assert f"{HEARTBEAT_STREAM} #{beat_seq}" in text and f"{LEDGER_STREAM} #{dead.seq}" in text
        assert f"dead after {TTL:g} s" in text and f"ttl {TTL:g} s" in text and "`monitor` (instance" in text

        # --at-seq before the failover: the first owner's chain (its claim of the new session)
        before = await why(store, "session", "s1", seq=orphaned.seq - 1)
        assert [link.seq for link in before.links] == [claim_a1.seq, session[0].seq]
        assert before.links[0].fields["agent_id"] == "a1" and before.links[1].type == "session.created"
        assert before.summary.startswith("s1 is owned by a1") and before.at == f"LEDGER #{orphaned.seq - 1}"
        # --at a time: the same moment, as stored
        at = await why(store, "session", "s1", time=session[1].stored_at)
        assert [link.seq for link in at.links] == [claim_a1.seq, session[0].seq]

        # the agent itself: dead, because of its last beat
        dead_chain = await why(store, "agent", "a1")
        assert types(dead_chain) == ["agent.declared_dead", "agent.heartbeat"]
        assert dead_chain.links[0].seq == dead.seq and dead_chain.summary.startswith("a1 (incarnation")
        assert " is dead " in dead_chain.summary


async def owner_is(ledger: Writer, session_id: str, agent_id: str) -> bool:
    state, _ = await ledger.session(session_id)
    return state is not None and state.owner == agent_id


async def status_is(ledger: Writer, session_id: str, status: str) -> bool:
    state, _ = await ledger.session(session_id)
    return state is not None and state.status == status


async def test_a_session_handed_on_after_a_goodbye_names_the_goodbye(server: EmbeddedServer) -> None:
    async with ledger_on(server.url) as ledger:
        await ledger.create_session("gpu", session_id="s2")
        async with agents(server.url, "gpu", ["b1", "b2"], heartbeat=HEARTBEAT, ttl=TTL) as procs, \
                consumers(server.url, watchdog=False):
            first = await eventually(lambda: owner_of(ledger, "s2"), timeout=30, what="s2 claimed")
            other = "b2" if first == "b1" else "b1"
            assert await procs[first].terminate() == 0  # SIGTERM: a goodbye
            await eventually(lambda: owner_is(ledger, "s2", other), timeout=30, what="s2 handed on")
        [goodbye] = of_type(await records(ledger.store, "agent", first), ev.AgentGoodbye)
        claim = of_type(await records(ledger.store, "session", "s2"), ev.SessionClaimed)[-1]
        chain = await why(ledger.store, "session", "s2")
        assert [(link.type, link.seq) for link in chain.links] == [("session.claimed", claim.seq),
                                                                   ("agent.goodbye", goodbye.seq)]
        assert chain.links[1].producer == first and chain.links[1].found_by == "causation_id"
        assert f"said goodbye for {first}" in chain.links[1].sentence
        assert chain.end == f"agent.goodbye #{goodbye.seq} names no cause"


async def owner_of(ledger: Writer, session_id: str) -> str | None:
    state, _ = await ledger.session(session_id)
    return state.owner if state is not None else None


async def test_a_route_the_watchdog_timed_out_names_the_timeout_and_the_claim_it_waited_on(
        server: EmbeddedServer) -> None:
    async with EventStore.connect(Settings(nats_url=server.url)) as store:
        operator = Writer(store, Producer(id="operator-test", instance=new_id()))
        await operator.create_session("p", session_id="rs")
        async with Agent(Writer(store, Producer(id="c1", instance=new_id())), agent_id="c1", pool="p",
                         heartbeat=0.5, ttl=30) as agent:
            claim = await agent.claim("rs")
            await operator.create_route("r1", session_id="rs", endpoint="http://127.0.0.1:9", start_timeout=0.2)
            async with consumers(server.url, monitor=False, reclaimer=False):
                await eventually(lambda: route_is(operator, "r1", lc.FAILED_TO_START), timeout=30,
                                 what="r1 failed to start")
            route = await records(store, "route", "r1")
            chain = await why(store, "route", "r1")
            assert [(link.type, link.seq) for link in chain.links] == [("route.transitioned", route[-1].seq),
                                                                       ("session.claimed", claim.token)]
            head = chain.links[0]
            assert head.producer == "watchdog" and "not started within start_timeout" in head.sentence
            assert head.fields["to_state"] == lc.FAILED_TO_START and chain.links[1].kind == "session"
            assert chain.summary.startswith("r1 is FAILED_TO_START")
            # the transition before it: STARTING, because the session was claimed
            earlier = await why(store, "route", "r1", seq=route[1].seq)
            assert earlier.links[0].fields["to_state"] == lc.STARTING and earlier.links[1].seq == claim.token


async def route_is(ledger: Writer, route_id: str, state: str) -> bool:
    route, _ = await ledger.route(route_id)
    return route is not None and route.state == state


async def test_forged_causation_loops_and_missing_causes_end_the_chain_and_say_so(store: EventStore) -> None:
    uid = new_id()[:8]
    me = Producer(id=f"f-{uid}", instance="forger")
    agent_id = me.id
    reg = await store.append(ev.AgentRegistered(producer=me, agent_id=agent_id, instance_id="forger", pool="p"))
    # a goodbye naming itself as its cause
    await store.append(ev.AgentGoodbye(producer=me, agent_id=agent_id, instance_id="forger", incarnation=reg,
                                       event_id=f"self-{uid}", causation_id=f"self-{uid}"))
    chain = await why(store, "agent", agent_id)
    assert len(chain.links) == 1 and "already in this chain" in chain.end and "loop" in chain.end

    # two events naming each other: the draining names the later goodbye, which names the draining
    other = f"g-{uid}"
    reg2 = await store.append(ev.AgentRegistered(producer=Producer(id=other, instance="i"), agent_id=other,
                                                 instance_id="i", pool="p"))
    drain = await store.append(ev.AgentDraining(
        producer=Producer(id=other, instance="i"), agent_id=other, incarnation=reg2,
        deadline=datetime.now(UTC) + timedelta(hours=1), event_id=f"d-{uid}", causation_id=f"bye-{uid}"))
    bye = await store.append(ev.AgentGoodbye(producer=Producer(id=other, instance="i"), agent_id=other,
                                             instance_id="i", incarnation=reg2, event_id=f"bye-{uid}",
                                             causation_id=f"d-{uid}"))
    chain = await why(store, "agent", other)
    assert [link.seq for link in chain.links] == [bye, drain]
    assert "already in this chain" in chain.end

    # a cause named but nowhere in the log
    lost = f"l-{uid}"
    reg3 = await store.append(ev.AgentRegistered(producer=Producer(id=lost, instance="i"), agent_id=lost,
                                                 instance_id="i", pool="p"))
    await store.append(ev.AgentGoodbye(producer=Producer(id=lost, instance="i"), agent_id=lost, instance_id="i",
                                       incarnation=reg3, causation_id="no-such-event"))
    chain = await why(store, "agent", lost)
    assert chain.end == "cause not found in the log (causation id no-such-event)" and len(chain.links) == 1


async def test_a_forged_death_reads_as_written_by_its_forger(store: EventStore) -> None:
    """A death written by a client that may not write one is named by its producer and flagged, and a claim the
    forgery's id is named by says so."""
    uid = new_id()[:8]
    victim = Producer(id=f"v-{uid}", instance="i")
    reg = await store.append(ev.AgentRegistered(producer=victim, agent_id=victim.id, instance_id="i", pool="p"))
    forged = await store.append(ev.AgentDeclaredDead(producer=Producer(id="mallory", instance="m"),
                                                     agent_id=victim.id, incarnation=reg, reason="says so",
                                                     event_id=f"fake-{uid}"))
    await store.append(ev.AgentGoodbye(producer=victim, agent_id=victim.id, instance_id="i", incarnation=reg,
                                       causation_id=f"fake-{uid}"))
    chain = await why(store, "agent", victim.id)
    assert [link.seq for link in chain.links][1] == forged
    fake = chain.links[1]
    assert fake.producer == "mallory" and not fake.applied and fake.flag is not None
    assert "`mallory` (instance `m`) declared" in fake.sentence
    assert "flagged, not applied" in render(chain)[2]


async def test_a_checkpointed_session_keeps_its_claim_as_the_cause_and_notes_the_checkpoint(store: EventStore) -> None:
    """A checkpoint changes no owner: the chain still starts at the claim, and a note says what the next owner
    would resume from; `--at-seq` before it has no such note."""
    uid = new_id()[:8]
    me = Producer(id=f"c-{uid}", instance="i")
    reg = await store.append(ev.AgentRegistered(producer=me, agent_id=me.id, instance_id="i", pool="p"))
    await store.append(ev.SessionCreated(producer=Producer(id="cli", instance="t"), session_id=f"s-{uid}", pool="p"))
    token = await store.append(ev.SessionClaimed(producer=me, session_id=f"s-{uid}", agent_id=me.id,
                                                 instance_id="i", incarnation=reg))
    saved = await store.append(ev.SessionCheckpointed(producer=me, session_id=f"s-{uid}", agent_id=me.id,
                                                      incarnation=reg, token=token, data=b"step=41", note="n"))
    chain = await why(store, "session", f"s-{uid}")
    assert chain.links[0].seq == token and chain.links[0].type == "session.claimed"
    assert chain.notes == [f"its last checkpoint is LEDGER #{saved}, written by {me.id} under token {token} (7 bytes)"]
    earlier = await why(store, "session", f"s-{uid}", seq=token)
    assert earlier.notes == []
    [rec] = [r for r in await records(store, "session", f"s-{uid}") if r.seq == saved]
    assert describe(rec) == (f"`{me.id}` (instance `i`) checkpointed s-{uid} for {me.id} under token {token} "
                             "(7 bytes: n)")


async def test_an_unknown_entity_or_a_moment_before_it_is_one_error(store: EventStore) -> None:
    with pytest.raises(UnknownEntity, match="no event for session nope"):
        await why(store, "session", f"nope-{new_id()[:6]}")
    uid = new_id()[:8]
    _, seq = await Writer(store, Producer(id="operator-test", instance="t")).create_session("p",
                                                                                          session_id=f"w-{uid}")
    with pytest.raises(UnknownEntity, match="at that point"):
        await why(store, "session", f"w-{uid}", seq=seq - 1)


# --- the command ----------------------------------------------------------------------------------------------


async def test_the_command_prints_the_chain_or_json_and_one_line_errors(store: EventStore) -> None:
    uid = new_id()[:8]
    writer = Writer(store, Producer(id="operator-test", instance="t"))
    await writer.create_session("p", session_id=f"c-{uid}")
    await writer.terminate_session(f"c-{uid}", reason="done")
    url = store.settings.nats_url
    runner = CliRunner()

    async def run(*args: str):  # type: ignore[no-untyped-def]
        return await asyncio.to_thread(runner.invoke, cli, ["why", *args, "--nats-url", url], catch_exceptions=False)

    text = await run("session", f"c-{uid}")
    assert text.exit_code == 0, text.output
    assert text.output.splitlines()[0].startswith(f"c-{uid} is terminated, done since")
    assert "`operator-test` (instance `t`) terminated" in text.output
    out = await run("session", f"c-{uid}", "--json")
    assert out.exit_code == 0
    data = json.loads(out.output)
    assert [link["type"] for link in data["links"]] == ["session.terminated"]
    link = data["links"][0]
    assert {"seq", "stream", "kind", "entity", "type", "time", "producer", "sentence", "fields"} <= set(link)
    assert link["fields"]["reason"] == "done" and link["stream"] == LEDGER_STREAM
    missing = await run("session", f"none-{uid}")
    assert missing.exit_code == 1 and len(missing.output.strip().splitlines()) == 1
    assert "no event for session" in missing.output
    both = await run("session", f"c-{uid}", "--at", "now", "--at-seq", "1")
    assert both.exit_code == 1 and "not both" in both.output
    bad = await run("session", f"c-{uid}", "--at", "yesterday-ish")
    assert bad.exit_code == 2 and "not a time" in bad.output
    helped = runner.invoke(cli, ["why", "--help"])
    assert helped.exit_code == 0 and "Example" in helped.output and "--at-seq" in helped.output


async def test_the_http_api_tells_the_same_chain_and_maps_errors_as_the_history_does(server: EmbeddedServer,
                                                                                       tmp_path: Path) -> None:
    async with running(server, tmp_path) as r, httpx.AsyncClient(base_url=r.url) as client:
        _, created = await r.operator.create_session("p", session_id="h1")
        ended = await r.operator.terminate_session("h1", reason="done")
        reply = await client.get("/api/why/session/h1")
        assert reply.status_code == 200, reply.text
        assert reply.json() == msgspec.to_builtins(await why(r.stack.store, "session", "h1"))
        assert [link["seq"] for link in reply.json()["links"]] == [ended]
        past = (await client.get("/api/why/session/h1", params={"at_seq": created})).json()
        assert [link["type"] for link in past["links"]] == ["session.created"] and past["at"] == f"LEDGER #{created}"
        for path, status, code in [("/api/why/planet/p1", 400, "invalid_query"),
                                   ("/api/why/session/nobody", 404, "unknown_entity"),
                                   (f"/api/why/session/h1?at_seq={created - 1}", 404, "unknown_entity"),
                                   ("/api/why/session/h1?at=whenever", 400, "invalid_query"),
                                   ("/api/why/session/h1?at=now&at_seq=1", 400, "invalid_query")]:
            reply = await client.get(path)
            assert (reply.status_code, reply.json()["code"]) == (status, code), (path, reply.text)


# --- pure: the walk and the sentences without a server -----------------------------------------------------------


T0 = datetime(2026, 11, 1, 7, 21, 0, tzinfo=UTC)


def rec(seq: int, event: ev.Event, *, stream: str = LEDGER_STREAM, at: float | None = None) -> Recorded:
    stored = T0 + timedelta(seconds=at if at is not None else seq)
    ns = int(stored.timestamp()) * 1_000_000_000
    return Recorded(stream=stream, seq=seq, subject="x", timestamp_ns=ns, event=event)


class Log:
    """A Source over lists: histories by entity, beats by sequence."""

    def __init__(self, found: list[Found], beats: list[Recorded] = ()) -> None:  # type: ignore[assignment]
        self.found, self.beats = found, {b.seq: b for b in beats}

    async def events(self, kind: str, entity_id: str) -> list[Found]:
        return [f for f in self.found if (f.kind, f.entity) == (kind, entity_id)]

    async def beat(self, agent_id: str, seq: int) -> Recorded | None:
        return self.beats.get(seq)


def head_of(kind: str, entity_id: str, found: list[Found], state: dict[str, object]) -> EntityHistory:
    mine = [f for f in found if (f.kind, f.entity) == (kind, entity_id)]
    return EntityHistory(kind=kind, id=entity_id, state=state, entries=[
        HistoryEntry(seq=f.record.seq, stored_at=f.record.stored_at, type=f.record.event.type_tag(),
                     event_id=f.record.event.event_id, applied=f.flag is None, event={"x": 1}) for f in mine])


MONITOR, RECLAIMER = Producer(id="monitor", instance="m-1"), Producer(id="reclaimer", instance="r-1")


def failover_log() -> tuple[list[Found], list[Recorded]]:
    a2, a3 = Producer(id="a2", instance="i2"), Producer(id="a3", instance="i3")
    beat = rec(34, ev.AgentHeartbeat(producer=a2, agent_id="a2", instance_id="i2", incarnation=3, beat=9),
               stream=HEARTBEAT_STREAM, at=27)
    evidence = ev.Evidence(last_heartbeat_at=beat.stored_at, last_heartbeat_seq=34, heartbeat_interval=1.0,
                           dead_after=5.0, detail="5.1s since a beat; dead after 5s (by monitor)")
    found = [
        Found("agent", "a2", rec(3, ev.AgentRegistered(producer=a2, agent_id="a2", instance_id="i2", pool="p",
                                                       heartbeat_interval=1.0, ttl=5.0, event_id="reg-a2"))),
        Found("session", "s1", rec(5, ev.SessionCreated(producer=Producer(id="op", instance="o"), session_id="s1",
                                                        pool="p", event_id="created"))),
        Found("session", "s1", rec(7, ev.SessionClaimed(producer=a2, session_id="s1", agent_id="a2", instance_id="i2",
                                                        incarnation=3, causation_id="created", event_id="c1"))),
        Found("agent", "a2", rec(30, ev.AgentDeclaredDead(producer=MONITOR, agent_id="a2", incarnation=3,
                                                          reason="missed_heartbeats", evidence=evidence,
                                                          causation_id="reg-a2", event_id="dead-a2-3"))),
        Found("session", "s1", rec(32, ev.SessionClaimed(
            producer=RECLAIMER, session_id="s1", agent_id="a3", instance_id="i3", incarnation=20, reason="failover",
            previous_owner="a2", previous_token=7, causation_id="dead-a2-3", event_id="c2"))),
    ]
    del a3
    return found, [beat]


async def test_the_pure_walk_reads_a_failover_as_claim_death_beat() -> None:
    found, beats = failover_log()
    state = {"status": "assigned", "owner": "a3", "owner_incarnation": 20, "token": 32, "claim_reason": "failover",
             "cause_id": "c2"}
    chain = await build_chain(head_of("session", "s1", found, state), Log(found, beats))
    assert [(link.type, link.seq, link.stream) for link in chain.links] == [
        ("session.claimed", 32, LEDGER_STREAM), ("agent.declared_dead", 30, LEDGER_STREAM),
        ("agent.heartbeat", 34, HEARTBEAT_STREAM)]
    assert chain.summary == ("s1 is owned by a3 (incarnation 20, token 32, reason failover) since 07:21:32 "
                             "(session.claimed #32)")
    dead = chain.links[1].sentence
    assert dead.startswith("`monitor` (instance `m-1`) declared a2 dead (incarnation 3): missed_heartbeats")
    assert "last beat heartbeat-stream #34 at 07:21:27" in dead and "dead after 5 s" in dead and "ttl 5 s" in dead
    # the beat goes missing (past retention): the chain ends saying so
    chain = await build_chain(head_of("session", "s1", found, state), Log(found))
    assert len(chain.links) == 2 and "heartbeat-stream #34, is not kept" in chain.end


async def test_the_pure_walk_stops_at_a_cause_stored_after_its_effect_and_at_the_link_limit() -> None:
    p = Producer(id="x", instance="i")
    # event 10 names 11 as its cause: a cause after its effect
    found = [Found("agent", "x", rec(9, ev.AgentRegistered(producer=p, agent_id="x", instance_id="i", pool="p"))),
             Found("agent", "x", rec(10, ev.AgentDraining(producer=p, agent_id="x", incarnation=9, deadline=T0,
                                                          event_id="e10", causation_id="e11"))),
             Found("agent", "x", rec(11, ev.AgentDrainRequested(producer=p, agent_id="x", incarnation=9,
                                                                deadline=T0, event_id="e11")))]
    chain = await build_chain(head_of("agent", "x", found[:2], {"status": "draining", "incarnation": 9,
                                                                  "reason": "draining", "status_seq": 10}),
                              Log(found))
    assert len(chain.links) == 1 and "stored after it" in chain.end
    # a long forged chain of causes, each before the last: cut at the limit
    long = [Found("agent", "y", rec(100 + i, ev.AgentDrainRequested(
        producer=p, agent_id="y", incarnation=1, deadline=T0, event_id=f"y{i}",
        causation_id=f"y{i - 1}" if i else None))) for i in range(MAX_LINKS + 5)]
    chain = await build_chain(head_of("agent", "y", long, {"status": "alive", "incarnation": 1, "reason": "r",
                                                             "status_seq": long[-1].record.seq}), Log(long))
    assert len(chain.links) == MAX_LINKS and chain.end == f"the chain is cut at {MAX_LINKS} links"


def test_sentences_name_the_writer_as_recorded_and_the_evidence() -> None:
    forged = rec(11, ev.AgentDeclaredDead(producer=Producer(id="eve", instance="laptop"), agent_id="a2",
                                          incarnation=3, reason="because",
                                          evidence=ev.Evidence(detail="trust me")))
    assert describe(forged) == ("`eve` (instance `laptop`) declared a2 dead (incarnation 3): because; "
                                "trust me")
    orphan = rec(12, ev.SessionOrphaned(producer=RECLAIMER, session_id="s1", reason="owner_dead",
                                        previous_owner="a2", previous_incarnation=3, previous_token=7))
    assert describe(orphan) == ("`reclaimer` (instance `r-1`) orphaned s1 from a2 (incarnation 3, token 7): "
                                "owner_dead")
    assert headline("session", "s1", None, None) == "session s1 has no state (none of its events applied)"
    assert headline("agent", "a1", {"status": "gone", "incarnation": 4, "reason": "goodbye: shutdown"}, None) == \
        "a1 (incarnation 4) is gone (goodbye: shutdown)"
    flagged = Found("agent", "a2", forged, Flag("unauthorized_producer", "only the monitor"))
    assert flagged.flag is not None


async def test_a_session_held_by_a_dead_owner_notes_the_open_breaker_and_the_death_the_trip() -> None:
    found, beats = failover_log()
    found = found[:-1]  # no take-over: the breaker held it
    found.append(Found("pool", "p", rec(29, ev.PoolBreakerTripped(producer=MONITOR, pool="p", reason="2 of 3 died",
                                                                  dead=("a1", "a2"), agents=3))))
    state = {"status": "assigned", "owner": "a2", "owner_incarnation": 3, "token": 7, "claim_reason": "initial",
             "pool": "p", "cause_id": "c1"}
    chain = await build_chain(head_of("session", "s1", found, state), Log(found, beats))
    assert [link.seq for link in chain.links] == [7, 5]
    assert len(chain.notes) == 2
    assert chain.notes[0].startswith("its owner a2 is no longer alive: LEDGER #30 at 07:21:30, `monitor`")
    assert "pool p's breaker is open" in chain.notes[1] and "LEDGER #29" in chain.notes[1]
    assert render(chain)[-1] == f"  note: {chain.notes[1]}"
    # before the death (a moment the notes respect): nothing to note
    early = await build_chain(head_of("session", "s1", found, state), Log(found, beats),
                              within=lambda r: r.seq <= 20)
    assert early.notes == []
    dead = await build_chain(head_of("agent", "a2", found, {"status": "dead", "incarnation": 3, "pool": "p",
                                                            "reason": "declared dead", "status_seq": 30}),
                             Log(found, beats))
    assert [link.type for link in dead.links] == ["agent.declared_dead", "agent.heartbeat"]
    assert dead.notes == [f"this death tripped pool p's breaker: LEDGER #29 at 07:21:29, {describe(found[-1].record)}"]


async def test_an_event_id_written_twice_reads_as_the_newest_stored_before_the_effect() -> None:
    p = Producer(id="x", instance="i")
    found = [Found("agent", "x", rec(9, ev.AgentRegistered(producer=p, agent_id="x", instance_id="i", pool="p"))),
             Found("agent", "x", rec(10, ev.AgentDrainRequested(producer=p, agent_id="x", incarnation=9,
                                                                deadline=T0, event_id="dup", reason="older"))),
             Found("agent", "x", rec(11, ev.AgentDrainRequested(producer=p, agent_id="x", incarnation=9,
                                                                deadline=T0, event_id="dup", reason="newer"))),
             Found("agent", "x", rec(12, ev.AgentDraining(producer=p, agent_id="x", incarnation=9, deadline=T0,
                                                          causation_id="dup"))),
             Found("agent", "x", rec(13, ev.AgentDrainRequested(producer=p, agent_id="x", incarnation=9,
                                                                deadline=T0, event_id="dup", reason="after")))]
    chain = await build_chain(head_of("agent", "x", found, {"status": "draining", "incarnation": 9,
                                                            "reason": "draining", "status_seq": 12}), Log(found))
    assert [link.seq for link in chain.links] == [12, 11] and chain.links[1].fields["reason"] == "newer"
