"""Hostile input on a running ledger: nothing crashes, nothing is skipped silently, new work still flows.

A corpus of bad messages is published with raw nats-py on every subject family while the projector, the
consumers (monitor, reclaimer, watchdog) and agents run on a real server. Each bad message must come out as a
dead letter with a reason (in LEDGER_DLQ and in the projection's counters), and a session created afterwards
must still be claimed and projected.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import eventually
from nats.js.errors import NotFoundError
from test_cli_entities import ledger_cli, ok, one_line_error

from consumers.group import ConsumerGroup
from consumers.liveness_rules import LivenessSettings
from ledger import codec
from ledger import events as ev
from ledger.agent import Agent
from ledger.settings import Settings
from ledger.store import EventStore
from ledger.subjects import DLQ_STREAM, HEARTBEAT_STREAM, LEDGER_STREAM
from ledger.writer import Writer
from ledgerctl.server import EmbeddedServer
from projections.projector import Projector
from projections.query import Query
from projections.settings import ProjectionSettings

DEPTH = 10_000
CLI = ev.Producer(id="cli", instance="hostile")




@contextlib.asynccontextmanager
async def running_consumers(store: EventStore) -> AsyncIterator[tuple[ConsumerGroup, asyncio.Task[None]]]:
    """The consumers of `ledger up`, in this process; the task is handed out so a test can see it still runs."""
    parts = ConsumerGroup(store, liveness=LivenessSettings(grace=0.3))
    task = asyncio.create_task(parts.run())
    try:
        await asyncio.wait_for(parts.follower.caught_up.wait(), 20)
        yield parts, task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


def nested_objects(depth: int = DEPTH) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def nested_arrays(depth: int = DEPTH) -> bytes:
    return b"[" * depth + b"]" * depth


def _payload(event: ev.Event) -> dict:  # type: ignore[type-arg]
    return json.loads(codec.encode(event).payload)


def _bytes(payload: object) -> bytes:
    return json.dumps(payload).encode()


def valid_events(agent: str) -> dict[str, ev.Event]:
    """One valid event per subject family, about entities nobody else uses."""
    return {
        "agent": ev.AgentRegistered(producer=ev.Producer(id="h-agent", instance="x"), agent_id="h-agent",
                                    instance_id="x", pool="hostile"),
        "hb": ev.AgentHeartbeat(producer=ev.Producer(id=agent, instance="x"), agent_id=agent, instance_id="x",
                                incarnation=1, beat=1),
        "session": ev.SessionCreated(producer=CLI, session_id="h-session", pool="hostile"),
        "route": ev.RouteCreated(producer=CLI, route_id="h-route", session_id="h-session", endpoint="e"),
        "pool": ev.PoolBreakerReset(producer=CLI, pool="hostile", reason="forged"),
    }


# A field of each family's event to give the wrong type, and a value that breaks its constraint.
WRONG_TYPE = {"agent": ("capacity", "many"), "hb": ("beat", [1]), "session": ("pool", 7),
              "route": ("endpoint", {"x": 1}), "pool": ("reason", 3.5)}
OUT_OF_RANGE = {"agent": ("ttl", -5), "hb": ("load", -1), "session": ("idle_ttl", -1),
                "route": ("probe", {"stale_after": None, "initial_delay": -5}), "pool": ("v", 0)}


def corpus(agent: str) -> list[tuple[str, str, bytes]]:
    """(label, subject, payload) for every kind of bad message on every subject family."""
    rnd = random.Random(9)
    out: list[tuple[str, str, bytes]] = []
    for family, event in valid_events(agent).items():
        subject = codec.subject_of(event)
        good = _payload(event)
        raw = _bytes(good)
        _, _, entity, verb, producer = subject.split(".")
        wrong_entity = f"ledger.{family}.{entity}-other.{verb}.{producer}"
        wrong_verb = f"ledger.{family}.{entity}.released.{producer}"
        wrong_producer = f"ledger.{family}.{entity}.{verb}.evil"
        field, value = WRONG_TYPE[family]
        limit, bad = OUT_OF_RANGE[family]
        items = {
            "empty": (subject, b""),
            "random-bytes": (subject, rnd.randbytes(300)),
            "truncated": (subject, raw[: len(raw) // 2]),
            "unknown-type": (subject, _bytes({**good, "type": f"{family}.teleported"})),
            "wrong-field-type": (subject, _bytes({**good, field: value})),
            "array": (subject, b"[1, 2, 3]"),
            "null": (subject, b"null"),
            "nested-objects": (subject, nested_objects()),
            "nested-arrays": (subject, nested_arrays()),
            "nested-in-event": (subject, raw[:-1] + b', "extra": ' + nested_arrays() + b"}"),
            "oversized": (subject, _bytes({**good, "padding": "x" * (codec.MAX_EVENT_BYTES + 1000)})),
            "wrong-entity": (wrong_entity, raw),
            "wrong-verb": (wrong_verb, raw),
            "wrong-producer": (wrong_producer, raw),
            "no-event-id": (subject, _bytes({k: v for k, v in good.items() if k != "event_id"})),
            "no-time": (subject, _bytes({k: v for k, v in good.items() if k != "time"})),
            "out-of-range": (subject, _bytes({**good, limit: bad})),
            "naive-time": (subject, _bytes({**good, "time": "2026-11-01T12:00:00"})),
        }
        out += [(f"{family}:{label}", s, data) for label, (s, data) in items.items()]
    return out


async def dead_letters(store: EventStore) -> dict[tuple[str, int], tuple[str, str]]:
    """(stream, seq) of each dead-lettered message -> (dead-letter subject, reason header)."""
    jsm = store.nc.jsm()
    info = await jsm.stream_info(DLQ_STREAM)
    found = {}
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        with contextlib.suppress(NotFoundError):
            msg = await jsm.get_msg(DLQ_STREAM, seq)
            h = msg.headers or {}
            if "Ledger-Dlq-Seq" in h and h.get("Ledger-Dlq-Consumer") == "projector":
                found[(h["Ledger-Dlq-Stream"], int(h["Ledger-Dlq-Seq"]))] = (msg.subject, h["Ledger-Dlq-Reason"])
    return found


async def test_a_hostile_corpus_on_every_subject_family_is_dead_lettered_and_work_goes_on(
        server: EmbeddedServer, tmp_path: Path):
    settings = Settings(nats_url=server.url)
    db = tmp_path / "projection.sqlite3"
    async with EventStore.connect(settings) as store:
        ledger = Writer(store, ev.Producer(id="operator-test", instance="t"))
        async with Projector(store, ProjectionSettings(db=str(db))) as projector, \
                running_consumers(store) as (_, consumers_task), \
                Agent(ledger, agent_id="a1", pool="gpu", capacity=50, heartbeat=0.2, ttl=5) as a1, \
                Agent(ledger, agent_id="a2", pool="gpu", capacity=50, heartbeat=0.2, ttl=5) as a2:
            before, _ = await ledger.create_session("gpu", session_id="before")
            await eventually(lambda: before in a1.owned or before in a2.owned, timeout=20,
                             what="a session claimed before the corpus")
            js = store.nc.jetstream()
            published: dict[tuple[str, int], str] = {}
            for label, subject, data in corpus("a1"):  # a1's newest beat becomes hostile too, again and again
                ack = await js.publish(subject, data)
                published[(ack.stream, ack.seq)] = label
            # Forged dead letters: nothing reads them as events, they are only counted.
            forged = 0
            for subject, data, headers in [
                ("ledger.dlq.LEDGER.malformed", random.Random(1).randbytes(100), None),
                ("ledger.dlq.LEDGER.too-deep", nested_objects(), {"Ledger-Dlq-Seq": "not-a-number"}),
                ("ledger.dlq.LEDGER_HB.x", b"", {"Ledger-Dlq-Stream": "NOPE", "Ledger-Dlq-Reason": "\u2603"}),
            ]:
                await js.publish(subject, data, headers=headers, stream=DLQ_STREAM)
                forged += 1

            # After the corpus: a new session is still claimed, by an agent, and projected.
            after, _ = await ledger.create_session("gpu", session_id="after")
            owner = await eventually(lambda: "a1" if after in a1.owned else "a2" if after in a2.owned else None,
                                     timeout=30, what="a session created after the corpus being claimed")
            last = await store.last_seq()
            await projector.wait_for(last, timeout=30)
            await projector.wait_for(await store.last_seq(HEARTBEAT_STREAM), HEARTBEAT_STREAM, timeout=30)

            assert not projector.task.done() and not consumers_task.done()  # type: ignore[union-attr]
            assert a1.fenced is None and a2.fenced is None
            beats = a1.stats.beats_acked
            await eventually(lambda: a1.stats.beats_acked > beats, timeout=10, what="a1 still beating")

            letters = await dead_letters(store)
            missing = sorted(label for key, label in published.items() if key not in letters)
            assert not missing, f"not dead-lettered: {missing}"
            for key, label in published.items():
                subject, reason = letters[key]
                code = codec.reason_code(reason)
                assert code in codec.REASONS and subject == f"ledger.dlq.{key[0]}.{code}", (label, subject, reason)
            codes = {tuple(label.split(":")): codec.reason_code(letters[key][1]) for key, label in published.items()}
            for family in valid_events("a1"):
                expected = {"nested-objects": "too-deep", "nested-in-event": "too-deep", "oversized": "oversized",
                            "no-event-id": "missing-envelope", "no-time": "missing-envelope", "array": "invalid",
                            "null": "invalid", "unknown-type": "unknown-type", "wrong-entity": "wrong-subject",
                            "wrong-verb": "wrong-subject", "wrong-producer": "wrong-subject",
                            "out-of-range": "invalid", "naive-time": "invalid", "wrong-field-type": "invalid"}
                assert {k: codes[(family, k)] for k in expected} == expected, family

            async with Query.open(str(db)) as q:
                counted = {(d.stream, d.reason): d.count for d in await q.dead_letters()}
                by_stream = {s: sum(n for (st, _), n in counted.items() if st == s)
                             for s in (LEDGER_STREAM, HEARTBEAT_STREAM)}
                assert by_stream == {s: sum(1 for (st, _) in published if st == s)
                                     for s in (LEDGER_STREAM, HEARTBEAT_STREAM)}
                row = next(r for r in (await q.sessions(pool="gpu")).items if r.session_id == after)
                assert (row.owner, row.token) == (owner, (await ledger.session(after))[0].token)
            dlq = (await store.nc.jsm().stream_info(DLQ_STREAM)).state.messages
            assert dlq == len(published) + forged


async def test_the_monitor_survives_a_deeply_nested_newest_beat_and_declares_the_agent_dead(
        server: EmbeddedServer):
    async with EventStore.connect(Settings(nats_url=server.url)) as store:
        ledger = Writer(store, ev.Producer(id="operator-test", instance="t"))
        me = ev.Producer(id="gone", instance="g1")
        incarnation = await store.append(ev.AgentRegistered(producer=me, agent_id="gone", instance_id="g1",
                                                            pool="p", heartbeat_interval=0.2, ttl=1.0))
        await store.append(ev.AgentHeartbeat(producer=me, agent_id="gone", instance_id="g1",
                                             incarnation=incarnation, beat=1))
        await store.nc.jetstream().publish("ledger.hb.gone.heartbeat.gone", nested_objects())
        async with running_consumers(store) as (_, task):
            async def declared() -> bool:
                state, _ = await ledger.agent("gone")
                return state is not None and state.status == "dead"

            await eventually(declared, timeout=30, what="the agent declared dead")
            assert not task.done()
        dead = [r.event for r in await store.history("agent", "gone")
                if isinstance(r, codec.Recorded) and isinstance(r.event, ev.AgentDeclaredDead)]
        assert [e.incarnation for e in dead] == [incarnation]


async def test_a_replay_dead_letters_a_deeply_nested_lifecycle_message_instead_of_skipping_it(
        server: EmbeddedServer):
    async with EventStore.connect(Settings(nats_url=server.url)) as store:
        js = store.nc.jetstream()
        bad = (await js.publish("ledger.session.s1.created.cli", nested_objects())).seq
        good = await store.append(ev.SessionCreated(producer=CLI, session_id="s2", pool="p"))
        items = [item async for batch in store.replay() for item in batch]
        assert [i.seq for i in items] == [bad, good]
        assert isinstance(items[0], codec.Unreadable) and codec.reason_code(items[0].reason) == "too-deep"


def test_history_of_an_agent_with_a_deeply_nested_message_prints_no_traceback(server: EmbeddedServer,
                                                                              tmp_path: Path):
    async def seed() -> None:
        async with EventStore.connect(Settings(nats_url=server.url)) as store:
            me = ev.Producer(id="h1", instance="i")
            incarnation = await store.append(ev.AgentRegistered(producer=me, agent_id="h1", instance_id="i", pool="p"))
            await store.append(ev.AgentHeartbeat(producer=me, agent_id="h1", instance_id="i",
                                                 incarnation=incarnation, beat=1))
            js = store.nc.jetstream()
            # Deep inside an event, and deep as the newest beat: both made msgspec raise RecursionError.
            await js.publish("ledger.agent.h1.goodbye.h1", b'{"type": "agent.goodbye", "x": ' + nested_arrays() + b"}")
            await js.publish("ledger.hb.h1.heartbeat.h1", nested_objects())

    asyncio.run(seed())
    env = {**os.environ, "LEDGER_NATS_URL": server.url, "LEDGER_DB": str(tmp_path / "none.sqlite3")}
    for args in ([], ["--json"]):
        result = subprocess.run([sys.executable, "-m", "ledgerctl", "history", "agent", "h1", *args],
                                capture_output=True, text=True, timeout=60, env=env, check=False)
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        assert "dead letter" in result.stdout or args, result.stdout
    found = json.loads(result.stdout)
    assert [(e["type"], codec.reason_code(e["dead_letter"] or "")) for e in found["entries"]] == [
        ("agent.registered", ""), ("dead_letter", "too-deep")]
    assert any("not a heartbeat" in note for note in found["notes"]), found["notes"]


@pytest.mark.parametrize("args,field", [
    (["--stale-after", "nan"], "stale_after"),
    (["--initial-delay", "-5"], "initial_delay"),
    (["--start-timeout", "nan"], "start_timeout"),
    (["--stop-timeout", "inf"], "stop_timeout"),
], ids=["stale-nan", "delay-negative", "start-nan", "stop-inf"])
def test_the_cli_refuses_a_route_the_ledger_could_not_read(settings: Settings, uid: str, args: list[str],
                                                          field: str):
    sid, rid = f"{uid}-s", f"{uid}-r"
    ok(ledger_cli(settings, "session", "create", "--pool", "gpu", "--session-id", sid))
    one_line_error(ledger_cli(settings, "route", "create", rid, "--session", sid, "--endpoint", "chat", *args), field)
    one_line_error(ledger_cli(settings, "route", "show", rid), "does not exist")  # nothing was written


def test_the_cli_refuses_a_session_with_an_unreadable_idle_ttl(settings: Settings, uid: str):
    sid = f"{uid}-s"
    one_line_error(ledger_cli(settings, "session", "create", "--pool", "gpu", "--session-id", sid, "--idle-ttl",
                              "nan"), "idle_ttl")
    one_line_error(ledger_cli(settings, "session", "show", sid), "does not exist")
