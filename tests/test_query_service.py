"""The NATS query service against a real nats-server and a projection file a real Projector wrote."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner, Result
from conftest import start_binary_server
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER

from ledger import events as ev
from ledger import subjects
from ledger.errors import InvalidInput
from ledger.settings import Settings
from ledger.store import EventStore
from ledgerctl import query_protocol as qp
from ledgerctl.cli import cli
from ledgerctl.query_client import RemoteQuery
from ledgerctl.query_service import QueryService
from ledgerctl.server import EmbeddedServer
from projections.errors import InvalidQuery, UnknownEntity
from projections.projector import Projector
from projections.query import Query
from projections.settings import ProjectionSettings

CLI = ev.Producer(id="cli", instance="t")
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


async def ledger(*args: str) -> Result:
    """Run a `ledger` command as a user would (each runs its own event loop, so off this one)."""
    return await asyncio.to_thread(CliRunner().invoke, cli, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def projected(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    server = start_binary_server(tmp_path_factory.mktemp("query-nats"))
    try:
        yield asyncio.run(project(server.url, tmp_path_factory.mktemp("query-db") / "p.sqlite3"))
    finally:
        server.stop()


async def project(url: str, db: Path) -> dict[str, object]:
    agent, pool, session, route = "a-1", "gpu", "s-1", "r-1"
    me = ev.Producer(id=agent, instance="i")
    async with EventStore.connect(Settings(nats_url=url), ensure=True) as store:
        inc = await store.append(ev.AgentRegistered(producer=me, agent_id=agent, instance_id="i", pool=pool,
                                                    capacity=2))
        await store.append(ev.AgentHeartbeat(producer=me, agent_id=agent, instance_id="i", incarnation=inc, beat=1,
                                             load=0, capacity=2))
        created = await store.append(ev.SessionCreated(producer=CLI, session_id=session, pool=pool))
        token = await store.append(ev.SessionClaimed(producer=me, session_id=session, agent_id=agent,
                                                     instance_id="i", incarnation=inc))
        claimed_at = datetime.now(UTC)  # after the claim's ack, before the route: same host, same clock
        await store.append(ev.RouteCreated(producer=CLI, route_id=route, session_id=session, endpoint="chat"))
        # a flagged event: a route transition with a stale token
        last = await store.append(ev.RouteTransitioned(producer=me, route_id=route, from_state="PENDING",
                                                to_state="STARTING", token=token + 1000))
        async with Projector(store, ProjectionSettings(db=str(db))) as projector:
            await projector.ready(timeout=30)
    return {"db": str(db), "url": url, "agent": agent, "pool": pool, "session": session, "route": route,
            "created": created, "token": token, "claimed_at": claimed_at, "last": last}


@contextlib.asynccontextmanager
async def serving(p: dict[str, object]) -> AsyncIterator[tuple[EventStore, Query, QueryService]]:
    async with EventStore.connect(Settings(nats_url=str(p["url"])), name="query-service") as store, \
            Query.open(str(p["db"]), store) as query, QueryService.start(store, query) as service:
        yield store, query, service


@contextlib.asynccontextmanager
async def client(p: dict[str, object]) -> AsyncIterator[EventStore]:
    async with EventStore.connect(Settings(nats_url=str(p["url"])), name="query-client") as store:
        yield store


def error_of(reply: object) -> tuple[str, str] | None:
    headers = getattr(reply, "headers", None) or {}
    return (headers[ERROR_CODE_HEADER], headers[ERROR_HEADER]) if ERROR_CODE_HEADER in headers else None


def test_query_subjects_are_no_event_subjects_and_no_stream_captures_them():
    def matches(pattern: str, subject: str) -> bool:
        p, s = pattern.split("."), subject.split(".")
        for i, tok in enumerate(p):
            if tok == ">":
                return len(s) > i
            if i >= len(s) or (tok != "*" and tok != s[i]):
                return False
        return len(p) == len(s)

    filters = [*subjects.LEDGER_SUBJECTS, *subjects.HEARTBEAT_SUBJECTS, *subjects.DLQ_SUBJECTS, f"{subjects.PREFIX}.>"]
    for view in qp.VIEWS:
        subject = qp.query_subject(view)
        assert not [f for f in filters if matches(f, subject)], subject
        with pytest.raises(InvalidInput):
            subjects.parse(subject)
    assert matches(qp.QUERY_SUBJECTS, qp.query_subject("agents"))  # the helper itself can say yes


async def test_ping_finds_the_service_and_info_lists_its_endpoints(projected: dict[str, object]):
    async with serving(projected) as (_, _, service), client(projected) as c:
        ping = json.loads((await c.nc.request(f"$SRV.PING.{qp.SERVICE_NAME}", b"", timeout=10)).data)
        assert (ping["name"], ping["id"]) == (qp.SERVICE_NAME, service.id)
        info = json.loads((await c.nc.request(f"$SRV.INFO.{qp.SERVICE_NAME}", b"", timeout=10)).data)
        assert [(e["name"], e["subject"], e["queue_group"]) for e in info["endpoints"]] == [
            (v, qp.query_subject(v), qp.QUEUE_GROUP) for v in qp.VIEWS]
        await c.nc.request(qp.query_subject("pools"), b"{}", timeout=10)
        stats = json.loads((await c.nc.request(f"$SRV.STATS.{qp.SERVICE_NAME}", b"", timeout=10)).data)
        assert {e["name"]: e["num_requests"] for e in stats["endpoints"]}["pools"] == 1


async def test_each_endpoint_answers_what_query_answers_in_process(projected: dict[str, object]):
    p = projected
    seq = int(str(p["created"]))
    cases: list[tuple[str, dict[str, object], object]] = []
    async with serving(p) as (_, q, _), client(p) as c:
        moment = p["claimed_at"]
        assert isinstance(moment, datetime)
        cases = [
            ("agents", {"pool": p["pool"], "now": NOW}, await q.agents(pool=str(p["pool"]), now=NOW)),
            ("agents", {"health": "dead", "now": NOW}, await q.agents(health="dead", now=NOW)),
            ("sessions", {"owner": p["agent"], "now": NOW}, await q.sessions(owner=str(p["agent"]), now=NOW)),
            ("sessions", {"owner": p["agent"], "limit": 1, "offset": 1, "now": NOW},  # none left, one in all
             await q.sessions(owner=str(p["agent"]), limit=1, offset=1, now=NOW)),
            ("agents", {"after": p["agent"], "now": NOW}, await q.agents(after=str(p["agent"]), now=NOW)),
            ("routes", {"limit": 1, "now": NOW}, await q.routes(limit=1, now=NOW)),
            ("anomalies", {"limit": None}, await q.anomalies(limit=None)),  # null: all of them (one, as above)
            ("sessions", {"at_seq": seq, "now": NOW}, await q.sessions(as_of=seq, now=NOW)),
            ("sessions", {"as_of": moment.isoformat(), "now": NOW}, await q.sessions(as_of=moment, now=NOW)),
            ("routes", {"session": p["session"], "now": NOW}, await q.routes(session=str(p["session"]), now=NOW)),
            ("routes", {"at_seq": seq, "now": NOW}, await q.routes(as_of=seq, now=NOW)),
            ("pools", {"now": NOW}, await q.pools(now=NOW)),
            ("pools", {"at_seq": seq, "now": NOW}, await q.pools(as_of=seq, now=NOW)),
            ("anomalies", {"entity_kind": "route"}, await q.anomalies(entity_kind="route")),
            ("anomalies", {"at_seq": p["last"]}, await q.anomalies(as_of=int(str(p["last"])))),
            ("history", {"kind": "session", "entity_id": p["session"]}, await q.history("session", str(p["session"]))),
            ("history", {"kind": "session", "entity_id": p["session"], "at_seq": seq},
             await q.history("session", str(p["session"]), as_of=seq)),
        ]
        for view, body, expected in cases:
            reply = await c.nc.request(qp.query_subject(view), msgspec.json.encode(body), timeout=30)
            assert error_of(reply) is None, (view, body, error_of(reply))
            got = reply.data
            if view == "anomalies":  # judged at the clock's now: no `now` to pass (Query.anomalies has none)
                page = msgspec.json.decode(got, type=qp.REPLIES[view])
                got = msgspec.json.encode(msgspec.structs.replace(
                    page, position=msgspec.structs.replace(page.position, now=expected.position.now)))  # type: ignore[attr-defined]
            assert got == msgspec.json.encode(expected), (view, body)
    states = [[s.state for s in page.items] for view, body, page in cases  # type: ignore[attr-defined]
              if view == "sessions" and "owner" not in body]
    assert states == [["pending"], ["assigned"]]  # as of the creation, as of just after the claim
    assert [a.entity_id for view, _, page in cases if view == "anomalies"
            for a in page.items] == [p["route"]] * 3, "the stale-token transition is flagged"  # type: ignore[attr-defined]


async def test_remote_query_returns_the_same_structs_and_says_who_answered(projected: dict[str, object]):
    p = projected
    seq = int(str(p["created"]))
    async with serving(p) as (_, q, service), client(p) as c:
        remote = await RemoteQuery.find(c.nc)
        assert remote is not None
        for local, there in [(await q.agents(now=NOW), await remote.agents(now=NOW)),
                             (await q.sessions(as_of=seq, now=NOW), await remote.sessions(as_of=seq, now=NOW)),
                             (await q.routes(now=NOW), await remote.routes(now=NOW)),
                             (await q.sessions(limit=1, now=NOW), await remote.sessions(limit=1, now=NOW)),
                             (await q.anomalies(limit=None), await remote.anomalies(limit=None)),
                             (await q.pools(now=NOW), await remote.pools(now=NOW)),
                             (await q.anomalies(limit=5), await remote.anomalies(limit=5))]:
            assert (there.items, there.total) == (local.items, local.total)
            assert there.position.source.startswith(f"query service {qp.SERVICE_NAME} {service.id}")
            # anomalies are judged at the clock's now (Query.anomalies takes no `now`)
            assert msgspec.structs.replace(there.position, source=local.position.source,
                                           now=local.position.now) == local.position
        assert await remote.history("route", str(p["route"])) == await q.history("route", str(p["route"]))
        with pytest.raises(InvalidQuery, match="unknown health"):
            await remote.agents(health="sleepy")
        with pytest.raises(UnknownEntity, match="no event for agent nobody"):
            await remote.history("agent", "nobody")


@pytest.mark.parametrize("view, body, code, message", [
    ("agents", b"\xff\xfe garbage", qp.BAD_REQUEST, "bad request"),
    ("agents", b"{\"pool\": ", qp.BAD_REQUEST, "bad request"),
    ("agents", b"[" * 100_000 + b"]" * 100_000, qp.BAD_REQUEST, "bad request"),
    ("agents", b"{\"pool\": " + b"[" * 50_000 + b"]" * 50_000 + b"}", qp.BAD_REQUEST, "bad request"),
    ("agents", b"{\"colour\": \"red\"}", qp.BAD_REQUEST, "colour"),
    ("agents", b"{\"health\": \"sleepy\"}", qp.BAD_REQUEST, "unknown health 'sleepy'"),
    ("sessions", b"{\"state\": \"a\\r\\nX-Injected: 1\"}", qp.BAD_REQUEST, "unknown session state"),
    ("sessions", b"{\"at_seq\": 3, \"as_of\": \"2026-01-01T00:00:00Z\"}", qp.BAD_REQUEST, "not both"),
    ("anomalies", b"{\"limit\": 99999999999999999999999}", qp.BAD_REQUEST, "limit"),
    ("anomalies", b"{\"limit\": 0}", qp.BAD_REQUEST, "limit"),
    ("sessions", b"{\"limit\": 0}", qp.BAD_REQUEST, "limit"),
    ("routes", b"{\"offset\": -1}", qp.BAD_REQUEST, "offset"),
    ("agents", b"{\"after\": \"\"}", qp.BAD_REQUEST, "length"),
    ("pools", b"{\"at_seq\": -1}", qp.BAD_REQUEST, "at_seq"),
    ("pools", b"{\"at_seq\": 9223372036854775807}", qp.BAD_REQUEST, "9223372036854775807"),
    ("history", b"{}", qp.BAD_REQUEST, "kind"),
    ("history", b"{\"kind\": \"widget\", \"entity_id\": \"w\"}", qp.BAD_REQUEST, "widget"),
    ("history", b"{\"kind\": \"session\", \"entity_id\": \"nobody\"}", qp.UNKNOWN_ENTITY, "nobody"),
    ("routes", b"{\"session\": \"" + b"x" * 10_000 + b"\"}", qp.BAD_REQUEST, "length"),
])
async def test_a_bad_or_hostile_request_is_an_error_reply_and_the_service_answers_on(
        projected: dict[str, object], view: str, body: bytes, code: str, message: str):
    async with serving(projected) as _, client(projected) as c:
        reply = await c.nc.request(qp.query_subject(view), body, timeout=30)
        found = error_of(reply)
        assert found is not None and found[0] == code and message in found[1], found
        assert "\n" not in found[1] and "\r" not in found[1] and reply.data == b""
        after = await c.nc.request(qp.query_subject("pools"), b"", timeout=30)
        assert error_of(after) is None and msgspec.json.decode(after.data)["items"]


async def test_without_a_projection_file_the_service_says_not_ready(projected: dict[str, object]):
    async with client(projected) as store, QueryService.start(store, None, not_ready="no projection file at X"):
        reply = await store.nc.request(qp.query_subject("agents"), b"{}", timeout=30)
        assert error_of(reply) == (qp.NOT_READY, "not ready: no projection file at X")


async def test_two_replicas_in_the_queue_group_both_serve(projected: dict[str, object]):
    async with serving(projected) as (_, _, one), serving(projected) as (_, _, two), client(projected) as c:
        served: dict[str, int] = {}
        for _ in range(200):  # each request goes to one member, at random: 200 all to one is 2**-199
            reply = await c.nc.request(qp.query_subject("pools"), b"{}", timeout=30)
            assert error_of(reply) is None
            by = reply.headers[qp.SERVED_BY]  # type: ignore[index]
            served[by] = served.get(by, 0) + 1
            if len(served) == 2:
                break
        assert set(served) == {one.id, two.id}
        ping = await c.nc.request(f"$SRV.PING.{qp.SERVICE_NAME}.{two.id}", b"", timeout=10)
        assert json.loads(ping.data)["id"] == two.id


async def test_ledger_sessions_from_another_directory_answers_from_the_service(projected: dict[str, object],
                                                                             tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)  # no ledger-data/projection.sqlite3 here
    p = projected
    async with serving(p) as (_, _, service):
        result = await ledger("sessions", "--nats-url", str(p["url"]), "--json")
        assert result.exit_code == 0, result.output
        page = json.loads(result.output)
        assert [(s["session_id"], s["owner"]) for s in page["items"]] == [(p["session"], p["agent"])]
        assert page["position"]["source"].startswith(f"query service {qp.SERVICE_NAME} {service.id}")
        table = await ledger("agents", "--nats-url", str(p["url"]))
        assert table.exit_code == 0 and str(p["agent"]) in table.output and "query service" in table.output
        unknown = await ledger("history", "agent", "nobody", "--nats-url", str(p["url"]))
        assert unknown.exit_code == 1 and len(unknown.output.strip().splitlines()) == 1


async def test_with_neither_a_file_nor_a_service_the_view_says_so_in_one_line(projected: dict[str, object],
                                                                               tmp_path: Path):
    db = tmp_path / "missing.sqlite3"
    result = await ledger("sessions", "--db", str(db), "--nats-url", str(projected["url"]))
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert f"no projection file at {db} and no query service answered on NATS at {projected['url']}" in lines[0]
    assert "ledger up" in lines[0]


LEDGER = [sys.executable, "-m", "ledgerctl"]


def _env() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}, "COLUMNS": "200"}


async def _line(proc: asyncio.subprocess.Process, timeout: float = 60) -> bytes:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    if not line:
        assert proc.stderr is not None
        raise AssertionError(f"exited {await proc.wait()}: {(await proc.stderr.read()).decode()}")
    return line


@contextlib.asynccontextmanager
async def running(*args: str, cwd: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(*LEDGER, *args, cwd=cwd, env=_env(), stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def stopped_by_sigint(proc: asyncio.subprocess.Process) -> int:
    proc.send_signal(signal.SIGINT)
    return await asyncio.wait_for(proc.wait(), 30)


@pytest.mark.parametrize("source", ["file", "service"])
async def test_watch_shows_the_view_again_after_an_event_and_ends_on_sigint(server: EmbeddedServer, tmp_path: Path,
                                                                            source: str):
    db = tmp_path / "p.sqlite3"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    async with EventStore.connect(Settings(nats_url=server.url)) as store, \
            Projector(store, ProjectionSettings(db=str(db))) as projector:
        await store.append(ev.SessionCreated(producer=CLI, session_id="s-before", pool="p"))
        await projector.ready(timeout=30)
        args = ["sessions", "--watch", "--json", "--nats-url", server.url]
        async with contextlib.AsyncExitStack() as stack:
            if source == "service":
                query = await stack.enter_async_context(Query.open(db, store))
                await stack.enter_async_context(QueryService.start(store, query))
            else:
                args += ["--db", str(db)]
            proc = await stack.enter_async_context(running(*args, cwd=elsewhere))
            first = json.loads(await _line(proc))
            assert [s["session_id"] for s in first["items"]] == ["s-before"]
            assert first["position"]["source"].startswith("query service" if source == "service" else "projection")
            await store.append(ev.SessionCreated(producer=CLI, session_id="s-after", pool="p"))
            for _ in range(100):  # each line is one rendering; the barrier: one lists the new session
                ids = [s["session_id"] for s in json.loads(await _line(proc))["items"]]
                if "s-after" in ids:
                    break
            else:
                raise AssertionError("no rendering showed s-after")
            assert ids == ["s-after", "s-before"]
            assert await stopped_by_sigint(proc) == 0


async def test_query_service_command_waits_for_its_file_then_answers_and_ends_on_sigint(
        projected: dict[str, object], tmp_path: Path):
    db = tmp_path / "later.sqlite3"
    async with running("query-service", "--db", str(db), "--nats-url", str(projected["url"]), cwd=tmp_path) as proc, \
            client(projected) as c:
        assert b"query service ledger-query" in await _line(proc)
        reply = await c.nc.request(qp.query_subject("sessions"), b"{}", timeout=30)
        assert error_of(reply) == (qp.NOT_READY, f"not ready: no projection file at {db} yet")
        with sqlite3.connect(str(projected["db"])) as src, sqlite3.connect(db) as dst:
            src.backup(dst)
        assert f"answering from {db}".encode() in await _line(proc)
        reply = await c.nc.request(qp.query_subject("sessions"), b"{}", timeout=30)
        assert error_of(reply) is None
        assert [s["session_id"] for s in json.loads(reply.data)["items"]] == [projected["session"]]
        assert await stopped_by_sigint(proc) == 0


def test_an_error_without_a_message_is_named_by_its_type():
    """A request that timed out (asyncio's TimeoutError has no message) is answered "not ready: TimeoutError", not
    "not ready: " with nothing after it."""
    from ledgerctl import query_service

    error = query_service.error_of(TimeoutError())
    assert (error.code, error.description) == (qp.NOT_READY, "not ready: TimeoutError")
    error = query_service.error_of(TimeoutError("no answer in 5 s"))
    assert error.description == "not ready: no answer in 5 s"
