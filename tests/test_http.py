"""The HTTP API on a running stack: the same answers as `Query` in-process, errors as one-line JSON, live events,
/metrics as Prometheus text, and /readyz following the projector's catch-up."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import msgspec
from helpers import eventually
from http_stack import agent, running, up_settings
from prometheus_client.parser import text_string_to_metric_families

from ledger import events as ev
from ledger.codec import Recorded
from ledger.settings import Settings
from ledger.store import EventStore
from ledger.subjects import LEDGER_STREAM
from ledgerctl.http import Parts, http_server, serve
from ledgerctl.http.sse import EventFeed
from ledgerctl.server import EmbeddedServer
from ledgerctl.stack import running_stack
from projections.follow import Follower
from projections.projector import Projector
from projections.query import Query
from projections.settings import ProjectionSettings
from projections.state import Change


def items(page: dict, *keys: str) -> list[tuple]:  # type: ignore[type-arg]
    return [tuple(i[k] for k in keys) for i in page["items"]]


async def owner(client: httpx.AsyncClient, session_id: str) -> str | None:
    found = (await client.get("/api/sessions")).json()["items"]
    return next((s["owner"] for s in found if s["session_id"] == session_id and s["state"] == "assigned"), None)


async def test_the_api_answers_as_query_does_now_and_as_of_the_past(server: EmbeddedServer, tmp_path: Path):
    async with running(server, tmp_path) as r, agent(server, "a1"), agent(server, "a2"), \
            httpx.AsyncClient(base_url=r.url, timeout=30) as client:
        _, created = await r.operator.create_session("gpu", session_id="s1")
        await r.operator.create_session("gpu", session_id="s2")
        await r.operator.create_route("r1", session_id="s1", endpoint="chat")
        await eventually(lambda: owner(client, "s1"), timeout=30, what="s1 claimed")
        await eventually(lambda: owner(client, "s2"), timeout=30, what="s2 claimed")
        async with Query.open(r.stack.projector.path, r.stack.store) as q:
            now = await q.sessions()
            got = (await client.get("/api/sessions")).json()
            assert got["items"] == msgspec.to_builtins(now.items)
            agents = await q.agents(pool="gpu")
            got = (await client.get("/api/agents", params={"pool": "gpu"})).json()
            keys = ("agent_id", "pool", "status", "incarnation", "sessions")
            assert items(got, *keys) == [tuple(getattr(a, k) for k in keys) for a in agents.items]
            assert {a["health"] for a in got["items"]} == {"alive"}
            got = (await client.get("/api/routes", params={"session": "s1"})).json()
            assert items(got, "route_id", "state") == [(v.route_id, v.state) for v in (await q.routes()).items]
            got = (await client.get("/api/pools")).json()
            assert items(got, "pool", "sessions") == [(p.pool, p.sessions) for p in (await q.pools()).items]
            # One page of them, and how many there are in all (a page after s1 holds s2 alone)
            got = (await client.get("/api/sessions", params={"limit": "1"})).json()
            assert (items(got, "session_id"), got["total"]) == ([("s1",)], 2)
            got = (await client.get("/api/sessions", params={"after": "s1"})).json()
            assert (items(got, "session_id"), got["total"]) == ([("s2",)], 2)

            # As of s1's creation: pending, no owner - from JetStream, as Query answers it.
            past = (await client.get("/api/sessions", params={"as_of": str(created)})).json()
            assert items(past, "session_id", "state", "owner") == [("s1", "pending", None)]
            assert past["items"] == msgspec.to_builtins((await q.sessions(as_of=created)).items)
            before = (await client.get("/api/sessions", params={"as_of": "1970-01-02T00:00:00Z"})).json()
            assert before["items"] == []

            history = (await client.get("/api/history/session/s1")).json()
            assert history == msgspec.to_builtins(await q.history("session", "s1"))
            assert [e["type"] for e in history["entries"]][:2] == ["session.created", "session.claimed"]
            got = (await client.get("/api/anomalies")).json()
            assert got["items"] == msgspec.to_builtins((await q.anomalies()).items)

        # A page asks for everything at once: each answer stands (one read transaction at a time).
        paths = ["/api/agents", "/api/sessions", "/api/routes", "/api/pools", "/api/anomalies"] * 3
        replies = await asyncio.gather(*(client.get(p) for p in paths))
        assert [x.status_code for x in replies] == [200] * len(paths), [x.text for x in replies]


async def test_bad_filters_times_and_unknown_entities_are_one_line_json_errors(server: EmbeddedServer,
                                                                                tmp_path: Path):
    async with running(server, tmp_path) as r, httpx.AsyncClient(base_url=r.url, timeout=30) as client:
        _, seq = await r.operator.create_session("gpu", session_id="s1")
        await r.stack.projector.wait_for(seq)
        cases = [
            ("/api/agents?health=zombie", 400, "invalid_query", "zombie"),
            ("/api/sessions?state=asleep", 400, "invalid_query", "asleep"),
            ("/api/sessions?as_of=not-a-time", 400, "invalid_query", "not-a-time"),
            ("/api/anomalies?limit=0", 400, "invalid_query", "limit"),
            ("/api/anomalies?limit=many", 400, "invalid_query", "limit"),
            ("/api/sessions?limit=0", 400, "invalid_query", "limit"),
            ("/api/routes?offset=-1", 400, "invalid_query", "offset"),
            ("/api/history/planet/p1", 400, "invalid_query", "planet"),
            ("/api/history/session/nobody", 404, "unknown_entity", "nobody"),
            ("/api/nothing-here", 404, "not_found", ""),
        ]
        for path, status, code, mentions in cases:
            reply = await client.get(path)
            assert reply.status_code == status, (path, reply.text)
            assert reply.headers["content-type"].startswith("application/json"), path
            body = reply.json()
            assert set(body) == {"code", "message"} and body["code"] == code, (path, body)
            assert "\n" not in body["message"] and mentions in body["message"], (path, body)


async def test_the_openapi_document_describes_the_api_from_the_query_structs(server: EmbeddedServer,
                                                                              tmp_path: Path):
    async with running(server, tmp_path) as r, httpx.AsyncClient(base_url=r.url, timeout=30) as client:
        doc = (await client.get("/schema/openapi.json")).json()
        assert (await client.get("/schema")).json() == doc  # JSON, not a viewer that loads scripts from a CDN
    assert {"/api/agents", "/api/sessions", "/api/routes", "/api/pools", "/api/anomalies",
            "/api/history/{kind}/{entity_id}", "/api/events", "/healthz", "/readyz"} <= set(doc["paths"])
    params = {p["name"] for p in doc["paths"]["/api/sessions"]["get"]["parameters"]}
    assert params == {"pool", "state", "owner", "as_of", "limit", "offset", "after"}
    schemas = doc["components"]["schemas"]
    assert {"SessionView", "AgentView", "RouteView", "PoolView", "EntityHistory"} <= set(schemas)
    assert "token" in schemas["SessionView"]["properties"]


async def test_server_sent_events_deliver_each_new_stored_event(server: EmbeddedServer, tmp_path: Path):
    async with running(server, tmp_path) as r, httpx.AsyncClient(base_url=r.url, timeout=30) as client:
        async with client.stream("GET", "/api/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.aiter_lines()

            async def next_event() -> tuple[str, str]:
                kind = data = ""
                async for line in lines:
                    if line.startswith("event:"):
                        kind = line.split(":", 1)[1].strip()
                    elif line.startswith("data:"):
                        data = line.split(":", 1)[1].strip()
                    elif not line and kind:
                        return kind, data
                raise AssertionError("the stream ended")

            assert (await asyncio.wait_for(next_event(), 30))[0] == "hello"
            _, seq = await r.operator.create_session("gpu", session_id="live-1")
            kind, data = await asyncio.wait_for(next_event(), 30)
            event = json.loads(data)
            assert kind == "stored" and event["type"] == "session.created" and event["seq"] == seq
            assert event["entity"] == "session/live-1" and event["body"]["session_id"] == "live-1"
            assert event["stream"] == LEDGER_STREAM and event["subject"].startswith("ledger.session.live-1.")


def _item(seq: int) -> tuple[Recorded, Change]:
    e = ev.SessionCreated(producer=ev.Producer(id="operator-t", instance="i"), session_id=f"s{seq}", pool="gpu")
    item = Recorded(stream=LEDGER_STREAM, seq=seq, subject=f"ledger.session.s{seq}.created.operator-t",
                    timestamp_ns=int(datetime(2026, 1, 1, tzinfo=UTC).timestamp() * 1e9), event=e)
    return item, Change("session", f"s{seq}", None, None)


async def test_a_client_too_slow_for_its_queue_is_dropped_not_buffered(tmp_path: Path):
    feed = EventFeed(queue_size=3)
    slow, fast = feed.subscribe(), feed.subscribe()
    first = asyncio.ensure_future(anext(fast))
    pending = asyncio.ensure_future(anext(slow))
    await eventually(lambda: feed.subscribers == 2, what="both subscribed")
    item, change = _item(1)
    feed.heard(LEDGER_STREAM, [item], [change])
    assert (await first).seq == 1 and (await pending).seq == 1
    for seq in range(2, 8):  # the fast one reads each; the slow one reads nothing more
        item, change = _item(seq)
        feed.heard(LEDGER_STREAM, [item], [change])
        assert (await anext(fast)).seq == seq
    assert feed.subscribers == 1 and feed.dropped == 1
    rest = [e.seq async for e in slow]
    assert rest == [], "a dropped client's stream ends, rather than replaying what it missed"
    feed.close()
    assert [e async for e in fast] == []


async def test_readyz_is_503_until_the_projector_has_caught_up_and_healthz_is_always_200(
        server: EmbeddedServer, tmp_path: Path):
    settings = Settings(nats_url=server.url)
    async with EventStore.connect(settings) as store:
        for i in range(20):
            await store.append(ev.SessionCreated(producer=ev.Producer(id="operator-t", instance="i"),
                                                 session_id=f"s{i}", pool="gpu"))
        follower = Follower(store)
        projector = Projector(store, ProjectionSettings(db=str(tmp_path / "p.sqlite3")), follower=follower)
        async with serve(Parts(Query(None, store), store, follower, projector)) as url, \
                httpx.AsyncClient(base_url=url, timeout=30) as client:
            assert (await client.get("/healthz")).status_code == 200
            reply = await client.get("/readyz")
            assert reply.status_code == 503 and reply.json()["status"] == "catching up"
            async with projector:
                following = asyncio.create_task(follower.run())
                try:
                    async def ready() -> bool:
                        return (await client.get("/readyz")).status_code == 200
                    await eventually(ready, timeout=30, what="/readyz 200")
                    assert (await client.get("/readyz")).json()["committed"][LEDGER_STREAM] >= 20
                finally:
                    following.cancel()
                    await asyncio.gather(following, return_exceptions=True)


FAMILIES = {"ledger_stream_last_seq", "ledger_stream_applied_seq", "ledger_projected_seq", "ledger_projection_lag",
            "ledger_dead_letters", "ledger_anomalies", "ledger_agents", "ledger_sessions", "ledger_orphaned_sessions",
            "ledger_pool_breaker_open", "ledger_pool_breaker_trips", "ledger_consumer_writes",
            "ledger_consumer_judged", "ledger_events_applied", "ledger_failover_latency_seconds"}


async def test_metrics_parse_as_prometheus_text_and_time_a_failover(server: EmbeddedServer, tmp_path: Path):
    async with running(server, tmp_path) as r, agent(server, "a2"), \
            httpx.AsyncClient(base_url=r.url, timeout=30) as client:
        async with agent(server, "a1"):
            for sid in ("s1", "s2", "s3"):
                await r.operator.create_session("gpu", session_id=sid)
            await eventually(lambda: owner(client, "s3"), timeout=30, what="s3 claimed")
            owners = {sid: await owner(client, sid) for sid in ("s1", "s2", "s3")}
        moved = [sid for sid, o in owners.items() if o == "a1"]  # a1 said goodbye: these fail over to a2
        assert moved, f"the reclaimer spreads three sessions over two agents: {owners}"

        async def all_on_a2() -> bool:
            return all([await owner(client, sid) == "a2" for sid in owners])
        await eventually(all_on_a2, timeout=30, what="a1's sessions on a2")
        await r.operator.store.nc.jetstream().publish("ledger.session.x.created.operator-t", b"not json")
        await eventually(lambda: r.stack.follower.state.ledger.dead_letters, timeout=30, what="the dead letter")

        reply = await client.get("/metrics")
        assert reply.headers["content-type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(reply.text)}
    assert set(families) >= FAMILIES, FAMILIES - set(families)

    def value(name: str, sample: str, **labels: str) -> float:
        return next(s.value for s in families[name].samples if s.name == sample and s.labels == labels)

    assert value("ledger_sessions", "ledger_sessions", pool="gpu", state="assigned") == 3
    assert value("ledger_agents", "ledger_agents", pool="gpu", health="alive") == 1
    assert value("ledger_agents", "ledger_agents", pool="gpu", health="gone") == 1
    assert value("ledger_orphaned_sessions", "ledger_orphaned_sessions") == 0
    assert value("ledger_pool_breaker_open", "ledger_pool_breaker_open", pool="gpu") == 0
    assert value("ledger_dead_letters", "ledger_dead_letters_total", stream=LEDGER_STREAM,
                 reason=next(iter(r.stack.follower.state.ledger.dead_letters))) == 1
    assert value("ledger_consumer_writes", "ledger_consumer_writes_total", consumer="reclaimer") >= 3 + len(moved)
    last = value("ledger_stream_last_seq", "ledger_stream_last_seq", stream=LEDGER_STREAM)
    assert last >= value("ledger_projected_seq", "ledger_projected_seq", stream=LEDGER_STREAM) > 0
    assert value("ledger_events_applied", "ledger_events_applied_total", stream=LEDGER_STREAM) > 0
    assert value("ledger_failover_latency_seconds", "ledger_failover_latency_seconds_count") == len(moved)



async def test_a_browser_left_open_on_the_event_stream_does_not_hold_the_server_shutdown(server: EmbeddedServer,
                                                                                         tmp_path: Path):
    async with running_stack(up_settings(server, tmp_path), lambda line: None) as stack, \
            contextlib.AsyncExitStack() as http:
        url = await http.enter_async_context(http_server(stack, "127.0.0.1", 0))
        async with httpx.AsyncClient(base_url=url, timeout=30) as client, client.stream("GET", "/api/events") as stream:
            lines = stream.aiter_lines()
            assert (await asyncio.wait_for(anext(lines), 30)).startswith(":")  # the hello's comment line
            await asyncio.wait_for(http.aclose(), 30)  # the server stops with the stream open
            # The stream ends as a response does (not cut off by uvicorn's forced close after its grace period).
            rest = await asyncio.wait_for(_drain(lines), 30)
            assert len(rest) < 100 and not any(line.startswith("event: stored") for line in rest), rest


async def _drain(lines: AsyncIterator[str]) -> list[str]:
    rest = []
    async for line in lines:
        rest.append(line)
        if len(rest) > 100:
            break
    return rest
