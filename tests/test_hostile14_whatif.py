"""Hostile inputs to `ledger whatif`: extreme options, hostile logs. Every answer is a report or a one-line error,
never a traceback; `--json` is always one valid JSON object. Real nats-server."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest
from click.testing import CliRunner
from fleet import consumers, ledger_on
from helpers import eventually
from test_whatif import T0, Log, ms

from consumers import whatif as wi
from ledger import events as ev
from ledger import lifecycle as lc
from ledger.settings import Settings
from ledger.writer import Writer
from ledgerctl.cli import cli
from ledgerctl.server import EmbeddedServer
from projections.timespec import LATEST


async def invoke(settings: Settings, *args: str) -> tuple[int, str]:
    result = await asyncio.to_thread(CliRunner().invoke, cli, ["whatif", *args, "--nats-url", settings.nats_url])
    return result.exit_code, result.output + (repr(result.exception) if result.exit_code not in (0, 1, 2) else "")


EXTREMES = [
    ["--tolerance", "inf"],
    ["--tolerance", "1e300"],
    ["--until", f"{LATEST:%Y-%m-%dT%H:%M:%S}+00:00"],
    ["--since", "1970-01-01T00:00:00+00:00"],
    ["--since", "1970-01-01T00:00:00+00:00", "--until", f"{LATEST:%Y-%m-%dT%H:%M:%S}+00:00"],
    ["--dead-after", "inf"],
    ["--dead-after", "1e300"],
    ["--pool", "no-such-pool"],
    ["--suspect-after", str(2**70)],
    ["--until", "now", "--tolerance", "inf"],
    ["--until", "now", "--tolerance", "1e300"],
    ["--until", "now", "--tolerance", "1e12"],
    ["--since", "-1h", "--until", "now", "--dead-after", "inf", "--tolerance", "inf"],
    ["--until", "1970-01-01T00:00:00+00:00"],
    ["--until", f"{LATEST:%Y-%m-%dT%H:%M:%S}+00:00", "--tolerance", "1e9"],
]


@pytest.mark.parametrize("args", EXTREMES, ids=[" ".join(a) for a in EXTREMES])
async def test_extreme_options_give_a_report_or_one_line_never_a_traceback(settings: Settings, ledger: Writer,
                                                                             uid: str, args: list[str]):
    await ledger.create_session("p", session_id=f"{uid}-s")  # a log with something in it
    code, out = await invoke(settings, *args, "--json")
    assert "Traceback" not in out and code in (0, 2), out
    if code == 0:
        doc = json.loads(out)
        assert "summary" in doc
    else:
        assert out.strip().splitlines()[-1].startswith("Error: "), out  # click's usage lines, then one error
    code, out = await invoke(settings, *args)
    assert "Traceback" not in out and code in (0, 2), out


# --- hostile logs, pure -------------------------------------------------------------------------------------

CLI = ev.Producer(id="cli", instance="c")


def replay(log: Log, **settings: float) -> wi.Report:
    recorded = wi.recorded_settings(log.items)
    return wi.whatif(log.items, recorded.liveness(**settings), recorded=recorded)  # type: ignore[arg-type]


def test_a_verdict_forged_by_a_client_is_not_a_recorded_death_nor_a_counterfactual_one():
    log = Log()
    incarnation = log.register("a", "p", T0, 1.0, 3.0)
    log.beat("a", incarnation, ms(500))
    log.add(ev.AgentDeclaredDead(producer=CLI, agent_id="a", incarnation=incarnation, reason="missed_heartbeats",
                                 evidence=ev.Evidence(dead_after=3.0)), ms(900))
    log.add(ev.AgentSuspected(producer=CLI, agent_id="a", incarnation=incarnation, reason="missed_heartbeats",
                              evidence=ev.Evidence(last_heartbeat_seq=1)), ms(950))
    for k in range(1, 10):
        log.beat("a", incarnation, ms(500 + 1000 * k))
    log.add(ev.SessionCreated(producer=CLI, session_id="end", pool="p"), ms(10_000))
    report = replay(log)
    assert report.recorded == wi.Tally(deaths=0, suspicions=0, trips=0, failovers=0)
    assert report.whatif == report.recorded and report.differences == []
    assert wi.recorded_settings(log.items).verdicts == 0  # nor do they say what the monitor ran with


@pytest.mark.parametrize("seconds", [5e-324, 1e-9, ev.MAX_SECONDS])
def test_an_agent_with_the_codecs_smallest_or_largest_interval_and_ttl_is_judged(seconds: float):
    log = Log()
    incarnation = log.register("a", "p", T0, seconds, seconds)
    log.beat("a", incarnation, ms(500))
    log.add(ev.SessionCreated(producer=CLI, session_id="end", pool="p"), ms(10_000))
    report = replay(log, dead_after=2.0)
    deaths = [d for d in report.differences if d.what == wi.DEATH]
    [death] = deaths  # dead just after 2 s of silence (a microsecond: "more than dead-after")
    assert death.kind == wi.ADDED and death.whatif is not None
    assert abs((death.whatif.at - ms(2500)).total_seconds()) < 0.001
    assert json.loads(msgspec.json.encode(replay(log)))["summary"]


def test_an_agent_registering_a_thousand_times_dies_at_most_once_its_last_incarnation():
    log = Log()
    last = 0
    for k in range(1000):
        last = log.register("a", "p", ms(10 * k), 1.0, 3.0)
    log.add(ev.SessionCreated(producer=CLI, session_id="end", pool="p"), ms(20_000))
    report = replay(log)
    deaths = [d for d in report.differences if d.what == wi.DEATH]
    assert [(d.kind, d.incarnation) for d in deaths] == [(wi.ADDED, last)]


class CountingAgents(dict):  # type: ignore[type-arg]
    """The replay's fold of agents, counting the states a scan of all of them reads."""

    scanned = 0

    def values(self):  # type: ignore[no-untyped-def,override]
        for value in super().values():
            CountingAgents.scanned += 1
            yield value


def test_a_death_reads_its_own_pool_not_the_whole_fleet(monkeypatch: pytest.MonkeyPatch):
    """Work, not time: N silent agents, one per pool, all die. Each death's breaker question is about its pool (1
    agent); scanning the whole fleet for it is N x N agent states read (minutes at 20,000 agents)."""
    n = 300
    log = Log()
    for k in range(n):
        log.register(f"a{k}", f"p{k}", T0, 1.0, 3.0)
    log.add(ev.SessionCreated(producer=CLI, session_id="end", pool="p0"), ms(10_000))
    init = wi._Run.__init__

    def counting_init(self, *args, **kw):  # type: ignore[no-untyped-def]
        init(self, *args, **kw)
        self.agents = CountingAgents()

    monkeypatch.setattr(wi._Run, "__init__", counting_init)
    CountingAgents.scanned = 0
    report = replay(log)
    assert report.whatif.deaths == n
    assert CountingAgents.scanned <= 2 * n, CountingAgents.scanned


def test_an_until_past_the_logs_end_adds_no_death_for_the_silence_after_it():
    """The log ends; the agents did not stop beating. Judging past its newest item would kill every live agent."""
    log = Log()
    incarnation = log.register("a", "p", T0, 1.0, 3.0)
    for k in range(1, 6):
        log.beat("a", incarnation, ms(1000 * k))
    recorded = wi.recorded_settings(log.items)
    for until in (ms(5000), ms(5000 + 3500), ms(3_600_000)):
        report = wi.whatif(log.items, recorded.liveness(), recorded=recorded, until=until)
        assert report.differences == [], (until, report.differences)
        assert report.whatif == wi.Tally(deaths=0, suspicions=0, trips=0, failovers=0)


async def test_the_monitor_judges_an_agent_registered_with_the_smallest_interval_and_goes_on(
        server: EmbeddedServer):
    """A client may register itself with heartbeat_interval 5e-324 (the codec's least): the one liveness rule
    computed int(inf) missed beats and stopped the monitor for every agent; it is declared dead after its ttl."""
    async with ledger_on(server.url) as ledger:
        tiny = ev.Producer(id="tiny", instance="t")
        await ledger.store.append(ev.AgentRegistered(producer=tiny, agent_id="tiny", instance_id="t", pool="p",
                                                     heartbeat_interval=5e-324, ttl=0.5))
        plain = ev.Producer(id="plain", instance="q")
        await ledger.store.append(ev.AgentRegistered(producer=plain, agent_id="plain", instance_id="q", pool="q",
                                                     heartbeat_interval=0.1, ttl=0.5))
        async with consumers(server.url, watchdog=False):
            for agent_id in ("tiny", "plain"):
                async def dead(agent_id: str = agent_id) -> bool:
                    state, _ = await ledger.agent(agent_id)
                    return state is not None and state.status == lc.A_DEAD

                await eventually(dead, timeout=20, what=f"{agent_id} declared dead")
