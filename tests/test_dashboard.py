"""The dashboard in headless Chromium (Debian's, driven by Playwright): it loads, shows a failover live, shows the
past through its as-of control, and tells an entity's history with the causal chain of each change (a goodbye,
a kill -9)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from fleet import agents as fleet_processes
from helpers import eventually
from http_stack import agent, running
from prometheus_client.parser import text_string_to_metric_families

from ledger.subjects import LEDGER_STREAM
from ledgerctl.server import EmbeddedServer

CHROMIUM = Path("/usr/bin/chromium")
DOCS = Path(__file__).parent.parent / "docs"
"""Where the README's screenshots live: rewritten only with LEDGER_TEST_SCREENSHOTS=1 (a test run leaves the
tree clean otherwise; the shots go to the test's tmp directory)."""

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                "(apt-get install chromium; .ci/run installs it when root)")


async def test_the_dashboard_shows_a_failover_live_the_past_and_the_causal_chain(server: EmbeddedServer,
                                                                                  tmp_path: Path):
    from playwright.async_api import async_playwright, expect

    shots = DOCS if os.environ.get("LEDGER_TEST_SCREENSHOTS") == "1" else tmp_path
    async with running(server, tmp_path) as r, contextlib.AsyncExitStack() as fleet:
        agents = {name: await fleet.enter_async_context(contextlib.AsyncExitStack()) for name in ("a1", "a2")}
        for name, held in agents.items():
            await held.enter_async_context(agent(server, name))
        async with fleet_processes(server.url, "cpu", ["c1", "c2"]) as cpu:
            await r.operator.create_session("cpu", session_id="batch-1")
            await r.operator.create_session("gpu", session_id="s1")
            await r.operator.create_route("r1", session_id="s1", endpoint="chat")

            async def owner(session_id: str) -> str | None:
                state, _ = await r.operator.session(session_id)
                return state.owner if state is not None and state.status == "assigned" else None
            first = await eventually(lambda: owner("s1"), timeout=30, what="s1 claimed")
            batch_owner = await eventually(lambda: owner("batch-1"), timeout=30, what="batch-1 claimed")
            other = next(n for n in agents if n != first)
            before_failover = await r.stack.store.last_seq(LEDGER_STREAM)
            await r.stack.projector.wait_for(before_failover, timeout=30)

            async with async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                                   args=["--no-sandbox", "--disable-gpu",
                                                         "--disable-background-networking"])
                try:
                    page = await browser.new_page(viewport={"width": 1500, "height": 1000})
                    errors: list[str] = []
                    page.on("pageerror", lambda e: errors.append(str(e)))
                    await page.goto(r.url + "/")
                    s1_owner = page.locator('#sessions tr[data-id="s1"] td.owner')
                    await expect(s1_owner).to_contain_text(first, timeout=30_000)
                    await expect(page.locator("#live")).to_have_text("live", timeout=30_000)
                    await expect(page.locator('#agents tr[data-id="a1"] td.health')).to_have_text("alive")
                    await expect(page.locator('#pools tr[data-id="gpu"] td.breaker')).to_have_text("closed")
                    await page.evaluate("window.notReloaded = true")

                    # The owner leaves (goodbye): the reclaimer moves s1 to the other agent; the page follows, live.
                    await agents[first].aclose()
                    await expect(s1_owner).to_contain_text(other, timeout=30_000)
                    await expect(page.locator(f'#agents tr[data-id="{first}"] td.health')).to_have_text("gone")
                    assert await page.evaluate("window.notReloaded === true"), "the page was reloaded"
                    await expect(page.locator("#events tbody")).to_contain_text("agent.goodbye")
                    await page.screenshot(path=str(shots / "dashboard.png"), full_page=True)

                    # As of the sequence before the failover: the first owner again, said to be the past.
                    await page.locator("#asof-seq").evaluate(
                        "(el, seq) => { el.value = String(seq); el.dispatchEvent(new Event('change')); }",
                        before_failover)
                    await expect(page.locator("#asof-banner")).to_contain_text(f"#{before_failover}")
                    await expect(s1_owner).to_contain_text(first, timeout=30_000)
                    await expect(page.locator("#position")).to_contain_text(f"LEDGER #{before_failover}")
                    await page.locator("#asof-now").click()
                    await expect(s1_owner).to_contain_text(other, timeout=30_000)

                    # The entity page: s1's history, the move told with its cause.
                    await page.goto(r.url + "/#/session/s1")
                    story = page.locator("#entity-story")
                    await expect(story).to_contain_text(f"s1 moved from {first} to {other}", timeout=30_000)
                    await expect(story).to_contain_text(f"because {first} said goodbye", timeout=30_000)
                    await expect(page.locator("#entity-state")).to_contain_text(f"owner {other}")

                    # kill -9 of batch-1's owner: the monitor declares it dead when its beats stop; the page tells why.
                    batch_other = next(n for n in cpu if n != batch_owner)
                    cpu[batch_owner].kill9()
                    await page.goto(r.url + "/#/session/batch-1")
                    story = page.locator("#entity-story")
                    await expect(story).to_contain_text(f"batch-1 moved from {batch_owner} to {batch_other}",
                                                        timeout=60_000)
                    await expect(story).to_contain_text(f"because the monitor declared {batch_owner} dead")
                    await expect(story).to_contain_text("last beat #")
                    why = page.locator("#entity-why")  # the chain `ledger why` tells, above the history
                    await expect(why).to_contain_text(f"Why: batch-1 is owned by {batch_other}", timeout=30_000)
                    await expect(why).to_contain_text("`monitor` (instance")
                    await expect(why).to_contain_text(f"declared {batch_owner} dead")
                    await expect(why.locator('li[data-stream="LEDGER_HB"]')).to_contain_text("on the heartbeat stream")
                    await page.screenshot(path=str(shots / "entity.png"), full_page=True)

                    # The same death in /metrics: the monitor's verdict counted, both failovers timed.
                    reply = await page.request.get(r.url + "/metrics")
                    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                               for f in text_string_to_metric_families(await reply.text()) for s in f.samples}
                    assert samples[("ledger_consumer_writes_total", (("consumer", "monitor"),))] >= 1
                    assert samples[("ledger_failover_latency_seconds_count", ())] == 2
                    assert not errors, errors
                finally:
                    await browser.close()
    assert (shots / "dashboard.png").stat().st_size > 10_000 and (shots / "entity.png").stat().st_size > 10_000
