"""A hostile client against the HTTP API and the dashboard: on a server without auth anyone may store any event,
and every free-text field (a reason, an error, a detail, an endpoint, a label) reaches a browser, /metrics and the
live feed. Stored markup must be shown as text and never run; /metrics must still parse; the live feed must stay
bounded per client and forget a client that left; absurd parameters must be one-line 4xx answers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from helpers import authorized, eventually
from http_stack import Running, running
from prometheus_client.parser import text_string_to_metric_families

from ledger import events as ev
from ledger.ids import TOKEN_PATTERN
from ledger.subjects import LEDGER_STREAM
from ledger.writer import Writer
from ledgerctl.http import app as app_module
from ledgerctl.http import server as http_server_module
from ledgerctl.http.sse import EventFeed
from ledgerctl.server import EmbeddedServer

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")

IMG = '<img src=x onerror="window.__pwned=1">'
SCRIPT = '"><script>window.__pwned=1</script>'
QUOTE = "'><svg onload=window.__pwned=1>"
PAYLOAD = f"{IMG} {SCRIPT} {QUOTE}"
JS_URL = "javascript:window.__pwned=1"
METRIC_TEXT = 'a"b\nc\\d}{x="y"'
"""Quotes, a newline, a backslash and braces: what a hand-built Prometheus line would break on."""
FORGED_SSE = 'x\n\nevent: stored\ndata: {"type": "forged"}\n\nretry: 1\n'


def writer(r: Running, producer: str) -> Writer:
    return Writer(r.stack.store, ev.Producer(id=producer, instance="mallory"))


@contextlib.contextmanager
def app_feeds(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[EventFeed]]:
    """The live feed of each app the HTTP server makes (the real create_app, its result kept)."""
    feeds: list[EventFeed] = []
    real = app_module.create_app

    def keeping(parts: Any) -> Any:
        app = real(parts)
        feeds.append(app.state.ledger.feed)
        return app

    monkeypatch.setattr(http_server_module, "create_app", keeping)
    yield feeds


async def store_hostile_text(r: Running, server: EmbeddedServer) -> dict[str, int]:
    """Every free-text field a client may fill, filled with markup; returns the sequences of the key events."""
    store = r.stack.store
    evil = writer(r, "evil")
    seqs: dict[str, int] = {}
    seqs["registered"] = await evil.append(ev.AgentRegistered(
        producer=evil.producer, agent_id="evil", instance_id="mallory", pool="gpu", labels={PAYLOAD: PAYLOAD}))
    await r.operator.create_session("gpu", session_id="xs", labels={PAYLOAD: JS_URL})
    # The writer refuses a claim reason outside its list; a forger appends the claim itself.
    seqs["claimed"] = await store.append(authorized(ev.SessionClaimed(
        producer=evil.producer, session_id="xs", agent_id="evil", instance_id="mallory",
        incarnation=seqs["registered"], reason=PAYLOAD)))
    await r.operator.create_session("gpu", session_id="xt")
    await r.operator.terminate_session("xt", reason=PAYLOAD)
    await r.operator.create_route("rx", session_id="xs", endpoint=JS_URL, deployment=PAYLOAD)
    await r.operator.report_health("rx", healthy=False, detail=PAYLOAD)
    await r.operator.report_unreachable("evil", error=PAYLOAD)
    await store.append(authorized(ev.AgentSuspected(producer=evil.producer, agent_id="evil",
                                                    incarnation=seqs["registered"], reason=PAYLOAD,
                                                    evidence=ev.Evidence(detail=PAYLOAD))))
    await store.append(authorized(ev.PoolBreakerTripped(producer=evil.producer, pool="gpu", reason=PAYLOAD)))
    # Flagged, not applied: a goodbye of an incarnation that never was (the anomaly's detail is shown).
    await store.append(ev.AgentGoodbye(producer=evil.producer, agent_id="evil", instance_id=PAYLOAD,
                                       incarnation=999_999, reason=PAYLOAD))
    seqs["goodbye"] = await store.append(ev.AgentGoodbye(producer=evil.producer, agent_id="evil",
                                                         instance_id="mallory", incarnation=seqs["registered"],
                                                         reason=PAYLOAD))
    # Not an event at all: a dead letter, whose reason quotes the bad field.
    nc = await nats.connect(server.url)
    try:
        await nc.jetstream().publish("ledger.agent.evil.goodbye.evil",
                                     json.dumps({"type": "agent.goodbye", PAYLOAD: METRIC_TEXT}).encode())
    finally:
        await nc.close()
    last = await store.last_seq(LEDGER_STREAM)
    await r.stack.projector.wait_for(last, timeout=30)
    return seqs


@contextlib.asynccontextmanager
async def browser_page() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                           args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            yield await browser.new_page(viewport={"width": 1500, "height": 1000})
        finally:
            await browser.close()


async def not_pwned(page: Any) -> None:
    assert await page.evaluate("typeof window.__pwned") == "undefined", "stored markup ran in the page"
    assert await page.locator("img[src=x], script:not([src]), svg").count() == 0, "stored markup became elements"


@needs_chromium
async def test_stored_markup_is_shown_as_text_and_never_runs(server: EmbeddedServer, tmp_path: Path) -> None:
    from playwright.async_api import expect

    async with running(server, tmp_path) as r, browser_page() as page:
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("dialog", lambda d: errors.append(f"dialog {d.message}"))
        await page.goto(r.url + "/")
        await expect(page.locator("#live")).to_have_text("live", timeout=30_000)

        # Stored while the page is open: the newest-events panel and the tables follow live (SSE).
        await store_hostile_text(r, server)
        await expect(page.locator('#sessions tr[data-id="xt"] td.claim')).to_have_text(PAYLOAD, timeout=30_000)
        await expect(page.locator('#pools tr[data-id="gpu"] td.breaker')).to_contain_text(PAYLOAD, timeout=30_000)
        await expect(page.locator("#events tbody")).to_contain_text("agent.goodbye", timeout=30_000)
        await expect(page.locator("#events tbody")).to_contain_text("dead_letter", timeout=30_000)
        await expect(page.locator("#anomalies tbody")).not_to_contain_text("none", timeout=30_000)
        await not_pwned(page)

        # A fresh page reads the same from /api/events/recent and the API.
        await page.goto(r.url + "/?fresh")
        await expect(page.locator('#sessions tr[data-id="xt"] td.claim')).to_have_text(PAYLOAD, timeout=30_000)
        await not_pwned(page)

        # Each entity page: the story, the causal chains, and every entry (opened).
        stories = {"session/xs": "xs was claimed by evil", "agent/evil": "evil said goodbye",
                   "route/rx": "route.created", "pool/gpu": "pool.breaker_tripped", "session/xt": "terminated"}
        for entity, said in stories.items():
            await page.goto(f"{r.url}/#/{entity}")
            await page.reload()
            await expect(page.locator("#entity-story")).to_contain_text(said, timeout=30_000)
            await page.locator("#entity details summary").click()
            await not_pwned(page)
        await page.goto(f"{r.url}/#/session/xs")
        await page.reload()
        story = page.locator("#entity-story")
        await expect(story).to_contain_text("xs was claimed by evil", timeout=30_000)
        await expect(story).to_contain_text(f"({PAYLOAD}, token #")
        # (the reclaimer may also have claimed xs for evil as soon as it was created, a cause of its own)
        goodbye_cause = story.locator("ol.chain li", has_text="because evil said goodbye at")
        await expect(goodbye_cause.first).to_contain_text(f"({PAYLOAD})", timeout=30_000)
        await page.goto(f"{r.url}/#/agent/evil")
        await page.reload()
        goodbye = page.locator("#entity-story > li", has_text="evil said goodbye at")
        await expect(goodbye.first).to_contain_text(f"({PAYLOAD})", timeout=30_000)
        await expect(page.locator("#entity-story")).to_contain_text("suspected evil", timeout=30_000)
        await not_pwned(page)

        # Every link on every page goes to an entity of this dashboard or its JSON, never a javascript: URL.
        hrefs = await page.eval_on_selector_all("a", "els => els.map(a => a.getAttribute('href'))")
        assert hrefs and all(h.startswith(("#/", "/")) for h in hrefs), hrefs
        assert not errors, errors


async def test_metrics_parse_whatever_text_was_stored(server: EmbeddedServer, tmp_path: Path) -> None:
    async with running(server, tmp_path) as r, httpx.AsyncClient(base_url="") as client:
        await store_hostile_text(r, server)
        reply = await client.get(r.url + "/metrics")
        assert reply.status_code == 200
        families = list(text_string_to_metric_families(reply.text))
        names = {f.name for f in families}
        assert {"ledger_dead_letters", "ledger_anomalies", "ledger_agents", "ledger_pool_breaker_open"} <= names
        dead = [s for f in families if f.name == "ledger_dead_letters" for s in f.samples]
        assert dead and sum(s.value for s in dead) >= 1, dead
        # No stored free text becomes a label value: labels are ids, pool names and codes (tokens), so neither
        # escaping nor a reason's cardinality is at stake; prometheus_client writes the text (no hand-built lines).
        values = {v for f in families for s in f.samples for k, v in s.labels.items() if k != "le"}
        assert values and all(re.match(TOKEN_PATTERN, v) for v in values), values
        breaker = {s.labels["pool"]: s.value for f in families if f.name == "ledger_pool_breaker_open"
                   for s in f.samples}
        assert breaker.get("gpu") == 1, breaker


async def test_a_flood_drops_a_subscriber_that_does_not_read_and_a_gone_client_is_forgotten(
        server: EmbeddedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with app_feeds(monkeypatch) as feeds:
        async with running(server, tmp_path) as r:
            feed = feeds[0]
            before = feed.subscribers
            # A real browser-like client that connects, hears one event, and leaves.
            async with httpx.AsyncClient(timeout=30) as client:
                async with client.stream("GET", r.url + "/api/events") as stream:
                    await eventually(lambda: feed.subscribers == before + 1, timeout=30, what="subscribed")
                    # A reason that would end the SSE message and forge another if it reached the wire raw.
                    await r.operator.create_session("gpu", session_id="hello")
                    await r.operator.terminate_session("hello", reason=FORGED_SSE)
                    data: list[dict[str, Any]] = []
                    async for line in stream.aiter_lines():
                        assert not line.startswith("event:") or line in ("event: hello", "event: stored"), line
                        if line.startswith("data:"):
                            data.append(json.loads(line.removeprefix("data:")))
                        if data and data[-1].get("type") == "session.terminated":
                            break
                    assert data[-1]["body"]["reason"] == FORGED_SSE
                    assert [d.get("type") for d in data[1:]] == ["session.created", "session.terminated"], data
            await eventually(lambda: feed.subscribers == before, timeout=30, what="the gone client forgotten")

            # A subscriber that never reads while a forger floods: its queue stops at its bound and it is dropped.
            slow = feed.subscribe()
            first = slow.__anext__()
            waiting = asyncio.ensure_future(first)
            await eventually(lambda: feed.subscribers == before + 1, timeout=30, what="slow subscriber")
            evil = writer(r, "evil")
            for i in range(feed.queue_size + 10):
                await evil.store.append(ev.AgentUnreachableReported(producer=evil.producer, agent_id="evil",
                                                                    error=f"{i} {PAYLOAD}"))
                assert all(s.queue.qsize() <= feed.queue_size for s in feed._subscribers)
            await eventually(lambda: feed.dropped == 1 and feed.subscribers == before, timeout=60,
                             what="the slow subscriber dropped")
            await waiting  # it heard the first event; then its stream ends
            rest = [e async for e in slow]
            assert rest == [], "a dropped subscriber's queue is emptied"
            assert len(feed.recent) <= feed.recent.maxlen  # type: ignore[operator]


BAD_REQUESTS = [
    "/api/anomalies?limit=" + "9" * 40,
    "/api/anomalies?limit=-1",
    "/api/anomalies?limit=abc",
    "/api/sessions?as_of=-5",
    "/api/sessions?as_of=" + "9" * 40,
    "/api/sessions?as_of=99999999999999999999w%20ago",
    "/api/sessions?as_of=-9999999999999999999999d",
    "/api/sessions?as_of=9999-12-31T23:59:59Z",
    "/api/sessions?as_of=0001-01-01",
    "/api/sessions?as_of=nan",
    "/api/agents?as_of=%00",
    "/api/history/agent/..%2f..%2fetc%2fpasswd",
    "/api/history/..%2f..%2fetc/passwd",
    "/api/history/secrets/x",
    "/api/history/agent/" + "a" * 5000,
    "/api/history/session/%00",
    "/static/..%2f..%2fetc/passwd",
    "/static/..%2fapp.py",
    "/static/%2e%2e/app.py",
    "/static/../app.py",
    "/static/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/entity/agent/..%2f..%2fetc%2fpasswd",
]


async def raw_get(url: str, path: str) -> httpx.Response:
    """GET `path` exactly as written (an HTTP client normalises ../ in a URL it builds); one request, closed."""
    host, port = httpx.URL(url).host, httpx.URL(url).port
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout=30)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    headers = [(name, value) for name, _, value in (line.partition(b": ") for line in head.split(b"\r\n")[1:])]
    return httpx.Response(status, headers=headers, content=body)


async def test_absurd_parameters_and_path_traversal_are_one_line_4xx(server: EmbeddedServer, tmp_path: Path) -> None:
    async with running(server, tmp_path) as r, httpx.AsyncClient(timeout=30) as client:
        await r.operator.create_session("gpu", session_id="s1")
        assert (await client.get(r.url + "/static/dashboard.js")).status_code == 200  # the files are served
        failures = []
        for path in BAD_REQUESTS:
            reply = await raw_get(r.url, path)
            body = reply.text
            leaked = "root:" in body or "create_app" in body or "def " in body
            # The dashboard's page for any entity id is the page; a path with a slash in the id is no route.
            page = path.startswith("/entity/") and reply.status_code == 200 and "<title>session ledger" in body
            ok = (page or 400 <= reply.status_code < 500) and not leaked
            if ok and not page and (path.startswith(("/api/", "/entity/"))):
                try:
                    error = reply.json()
                except ValueError:
                    ok = False
                else:
                    ok = isinstance(error, dict) and set(error) == {"code", "message"} and "\n" not in error["message"]
            if not ok:
                failures.append(f"{path} -> {reply.status_code} {body[:200]!r}")
        assert not failures, "\n".join(failures)


async def test_a_flood_of_big_events_drops_a_subscriber_that_does_not_read_at_its_byte_bound(
        server: EmbeddedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The queue's 1,000 events are a count: one event may be 64 KB (codec.MAX_EVENT_BYTES), so 1,000 of them
    would be 64 MB encoded, several times that as Python objects, held for one slow client. The feed bounds bytes
    too."""
    with app_feeds(monkeypatch) as feeds:
        async with running(server, tmp_path) as r:
            feed = feeds[0]
            before = feed.subscribers
            slow = feed.subscribe()
            waiting = asyncio.ensure_future(slow.__anext__())
            await eventually(lambda: feed.subscribers == before + 1, timeout=30, what="slow subscriber")
            evil = writer(r, "evil")
            labels = {f"k{i}": "x" * 4000 for i in range(15)}  # ~60 KB, under codec.MAX_EVENT_BYTES
            events = (feed.queue_bytes // 60_000) + 5
            assert events < feed.queue_size, "the count bound alone would never drop this subscriber"
            for i in range(events):
                await evil.store.append(ev.SessionCreated(producer=evil.producer, session_id=f"big-{i}", pool="gpu",
                                                          labels=labels))
            await eventually(lambda: feed.dropped == 1 and feed.subscribers == before, timeout=60,
                             what="the slow subscriber dropped at its byte bound")
            await waiting
            assert [e async for e in slow] == []
