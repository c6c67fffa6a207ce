"""`ledger whatif`: the liveness rules re-run over a recorded log with other settings.

Known answers first: generated beat gaps, with the verdicts they must give derived from the gaps alone (an agent
dies in the first silence longer than dead-after, is suspected in each silence of more than suspect-after
intervals before that). Then: a log whose verdicts a tick-driven monitor made with the real rules replays to no
difference under its own settings. Then a real fleet, a real monitor and the command.
"""

from __future__ import annotations

import asyncio
import json
import signal
from datetime import UTC, datetime, timedelta

from click.testing import CliRunner
from fleet import agents, consumers, ledger_on
from helpers import eventually
from hypothesis import given, settings
from hypothesis import strategies as st

from consumers import liveness_rules as rules
from consumers import whatif as wi
from ledger import codec
from ledger import events as ev
from ledger.codec import Item, Recorded
from ledger.subjects import HEARTBEAT_STREAM, LEDGER_STREAM
from ledgerctl.cli import cli
from ledgerctl.server import EmbeddedServer
from projections.health import HealthPolicy
from projections.state import LedgerState
from projections.timespec import parse_duration

T0 = datetime(2026, 11, 1, tzinfo=UTC)
MONITOR = ev.Producer(id="monitor", instance="m")


def ms(n: int) -> datetime:
    return T0 + timedelta(milliseconds=n)


class Log:
    """Items numbered as the two streams would number them, appended in stored-time order."""

    def __init__(self) -> None:
        self.items: list[Item] = []
        self.seq = {LEDGER_STREAM: 0, HEARTBEAT_STREAM: 0}
        self.beats: dict[str, int] = {}

    def add(self, event: ev.Event, when: datetime) -> Recorded:
        stream = HEARTBEAT_STREAM if type(event).family == "hb" else LEDGER_STREAM
        self.seq[stream] += 1
        rec = Recorded(stream, self.seq[stream], codec.subject_of(event), codec.to_ns(when), event)
        self.items.append(rec)
        return rec

    def register(self, agent: str, pool: str, when: datetime, interval: float, ttl: float) -> int:
        me = ev.Producer(id=agent, instance=f"{agent}-i")
        return self.add(ev.AgentRegistered(producer=me, agent_id=agent, instance_id=f"{agent}-i", pool=pool,
                                           heartbeat_interval=interval, ttl=ttl), when).seq

    def beat(self, agent: str, incarnation: int, when: datetime) -> int:
        self.beats[agent] = self.beats.get(agent, 0) + 1
        me = ev.Producer(id=agent, instance=f"{agent}-i")
        return self.add(ev.AgentHeartbeat(producer=me, agent_id=agent, instance_id=f"{agent}-i",
                                          incarnation=incarnation, beat=self.beats[agent]), when).seq


# gaps between beats, in ms: tenths of a second plus 30 ms, so no silence ever ends exactly on a turn
gaps = st.lists(st.integers(1, 60).map(lambda tenths: tenths * 100 + 30), min_size=1, max_size=12)


def beating(fleet: list[list[int]], interval: float, ttl: float, tail: int) -> tuple[Log, dict[str, list[tuple]]]:
    """Each agent (its own pool) registers at 0 and beats after each of its gaps; the log ends `tail` ms after
    the last beat of all. Returns the log and each agent's silences: (start ms, length ms, beat seq or 0)."""
    log = Log()
    incarnations = {f"a{i}": log.register(f"a{i}", f"p{i}", T0, interval, ttl) for i in range(len(fleet))}
    beats = sorted((sum(g[:k + 1]), i) for i, g in enumerate(fleet) for k in range(len(g)))
    end = beats[-1][0] + tail
    starts: dict[str, list[tuple[int, int]]] = {agent: [(0, 0)] for agent in incarnations}
    for when, i in beats:
        agent = f"a{i}"
        starts[agent].append((when, log.beat(agent, incarnations[agent], ms(when))))
    silences = {agent: [(s, (nxt[0] if nxt else end) - s, seq) for (s, seq), nxt in
                        zip(marks, [*marks[1:], None], strict=True)] for agent, marks in starts.items()}
    log.add(ev.SessionCreated(producer=ev.Producer(id="cli", instance="c"), session_id="end", pool="p0"), ms(end))
    return log, silences


def expected(silences: list[tuple], dead_after_ms: int, suspect_ms: int) -> tuple[int | None, dict[int, int]]:
    """(death ms or None, {beat seq: suspicion ms}) from the silences alone. A beat that comes at the very moment
    the agent would turn suspect comes first; the window's end is judged too (a silence to it may just reach)."""
    suspicions = {}
    for i, (start, length, seq) in enumerate(silences):
        reaches = length >= suspect_ms if i == len(silences) - 1 else length > suspect_ms
        if reaches and suspect_ms < dead_after_ms:
            suspicions[seq] = start + suspect_ms
        if length > dead_after_ms:
            return start + dead_after_ms, suspicions
    return None, suspicions


def close(a: datetime, b: datetime) -> bool:
    return abs((a - b).total_seconds()) < 0.001


@settings(max_examples=60, deadline=None)
@given(fleet=st.lists(gaps, min_size=1, max_size=4), tail=st.integers(0, 6000),
       dead_after=st.one_of(st.none(), st.integers(1, 5).map(lambda s: s * 1000 + 550)),
       suspect_after=st.integers(1, 5))
def test_replayed_deaths_and_suspicions_are_those_the_beat_gaps_give(fleet: list[list[int]], tail: int,
                                                                      dead_after: int | None, suspect_after: int):
    interval, ttl = 1.0, 3.55
    log, silences = beating(fleet, interval, ttl, tail)
    recorded = wi.recorded_settings(log.items)
    assert recorded.verdicts == 0 and recorded.dead_after is None  # nothing recorded: the defaults
    choice = rules.LivenessSettings(policy=HealthPolicy(suspect_after_missed=suspect_after,
                                                        dead_after=dead_after / 1000 if dead_after else None))
    report = wi.whatif(log.items, choice, recorded=recorded)
    assert all(d.kind == wi.ADDED and d.recorded is None for d in report.differences)  # no verdict was recorded
    deaths = {d.subject: d.whatif.at for d in report.differences if d.what == wi.DEATH and d.whatif}
    suspected = {(d.subject, d.whatif.last_beat_seq or 0): d.whatif.at for d in report.differences
                 if d.what == wi.SUSPICION and d.whatif}
    want_deaths, want_suspicions = {}, {}
    for agent, agent_silences in silences.items():
        death, suspicions = expected(agent_silences, dead_after or round(ttl * 1000), suspect_after * 1000)
        if death is not None:
            want_deaths[agent] = ms(death)
        want_suspicions.update({(agent, seq): ms(at) for seq, at in suspicions.items()})
    assert deaths.keys() == want_deaths.keys()
    assert all(close(deaths[a], want_deaths[a]) for a in deaths), (deaths, want_deaths)
    assert suspected.keys() == want_suspicions.keys()
    assert all(close(suspected[k], want_suspicions[k]) for k in suspected)
    assert not [d for d in report.differences if d.what == wi.BREAKER]  # one agent a pool: never a breaker
    assert report.whatif.deaths == len(want_deaths) and report.recorded.deaths == 0


# --- a log made by a monitor that judges on a tick, with the real rules ---------------------------------------


TTL_MADE = 3.55


def monitored(fleet: list[list[int]], pools: int, settings_: rules.LivenessSettings, tick_ms: int = 100,
              offset_ms: int = 60) -> Log:
    """Beats on a 100 ms grid, and what a monitor judging every `tick_ms` (at `offset_ms` past the grid) writes:
    suspicions, deaths, breaker trips and resets, through the rule functions the monitor calls."""
    log = Log()
    state = LedgerState()
    names = [f"a{i}" for i in range(len(fleet))]
    for i, name in enumerate(names):
        log.register(name, f"p{i % pools}", T0, 1.0, TTL_MADE)
        state.apply(log.items[-1])
    incarnation = {name: state.agents[name].incarnation for name in names}
    beats = sorted((sum(g[:k + 1]) // 100 * 100, f"a{i}") for i, g in enumerate(fleet) for k in range(len(g)))
    end = beats[-1][0] + 4000
    deaths: dict[str, list[tuple[str, datetime]]] = {}
    pending = list(beats)
    tick = offset_ms
    while tick <= end:
        while pending and pending[0][0] <= tick:
            when, name = pending.pop(0)
            log.beat(name, incarnation[name], ms(when))
            state.apply(log.items[-1])
        now = ms(tick)
        verdicts = []
        for agent in list(state.agents.values()):
            beat = state.current_beat(agent.agent_id)
            last = rules.LastBeat(beat.seq, codec.from_ns(beat.stored_ns)) if beat else None
            verdict = rules.judge(agent, last, [], now, settings_)
            if verdict is not None:
                verdicts.append((agent, verdict))

        def overdue(pool: str, now: datetime = now) -> set[str]:
            out = set()
            for a in state.agents.values():
                beat = state.current_beat(a.agent_id)
                last = rules.LastBeat(beat.seq, codec.from_ns(beat.stored_ns)) if beat else None
                if a.pool == pool and rules.overdue(a, last, now, settings_):
                    out.add(a.agent_id)
            return out

        dying = {a.pool: overdue(a.pool) for a, v in verdicts if v.kind == rules.DEAD}
        for agent, verdict in verdicts:
            members = [a for a in state.agents.values() if a.pool == agent.pool]
            for e in rules.verdict_events(agent, verdict, state.ledger.pools.get(agent.pool), members,
                                          deaths.get(agent.pool, []), dying.get(agent.pool, set()), now, settings_,
                                          MONITOR):
                state.apply(log.add(e, now))
            if verdict.kind == rules.DEAD:
                deaths.setdefault(agent.pool, []).append((agent.agent_id, now))
        for name, pool in list(state.ledger.pools.items()):
            if pool.breaker_open:
                members = [a for a in state.agents.values() if a.pool == name]
                why = rules.breaker_recovered(pool, members, deaths.get(name, []), now, settings_)
                if why is not None:
                    state.apply(log.add(ev.PoolBreakerReset(producer=MONITOR, pool=name, reason=why), now))
        tick += tick_ms
    return log


@settings(max_examples=25, deadline=None)
@given(fleet=st.lists(gaps, min_size=1, max_size=5), pools=st.integers(1, 2), suspect_after=st.integers(1, 4),
       dead_after=st.one_of(st.none(), st.integers(1, 4).map(lambda s: s + 0.55)),
       share=st.sampled_from((0.3, 0.5, 0.7)), window=st.sampled_from((2.0, 60.0)), cut=st.integers(0, 40_000))
def test_the_recorded_settings_replay_to_no_difference(fleet: list[list[int]], pools: int, suspect_after: int,
                                                       dead_after: float | None, share: float, window: float,
                                                       cut: int):
    made_with = rules.LivenessSettings(policy=HealthPolicy(suspect_after_missed=suspect_after, dead_after=dead_after),
                                       breaker_share=share, breaker_window=window, breaker_min_agents=3)
    log = monitored(fleet, pools, made_with)
    recorded = wi.recorded_settings(log.items)
    if recorded.verdicts:  # what the verdicts' evidence says is what the monitor ran with
        assert recorded.suspect_after_missed == suspect_after
        assert recorded.dead_after == (None if dead_after == TTL_MADE else dead_after)  # the ttl: each agent's own
    if recorded.trips:
        assert recorded.breaker_share == share and recorded.breaker_window == window
    report = wi.whatif(log.items, made_with, recorded=recorded)
    assert report.differences == [], report.differences
    assert ": no difference (" in report.summary
    window = wi.whatif(log.items, made_with, recorded=recorded, until=ms(cut))  # a window ending anywhere
    assert window.differences == [], window.differences
    # and a much longer dead-after avoids every recorded death, with the agents' evidence
    longer = wi.whatif(log.items, recorded.liveness(dead_after=1000.0), recorded=recorded)
    avoided = [d for d in longer.differences if d.what == wi.DEATH]
    assert len(avoided) == report.recorded.deaths and all(d.kind == wi.AVOIDED for d in avoided)
    assert all(d.recorded is not None and d.recorded.gap is not None and d.longest_gap is not None
               and d.longest_gap >= d.recorded.gap - 0.001 for d in avoided)


def test_a_goodbye_is_no_death_and_a_new_incarnation_is_judged_afresh():
    log = Log()
    first = log.register("a1", "p", T0, 1.0, 3.0)
    log.beat("a1", first, ms(1000))
    log.add(ev.AgentGoodbye(producer=ev.Producer(id="a1", instance="a1-i"), agent_id="a1", instance_id="a1-i",
                            incarnation=first), ms(1500))
    log.add(ev.AgentDeclaredDead(producer=MONITOR, agent_id="a1", incarnation=first, reason=rules.MISSED_HEARTBEATS,
                                 evidence=ev.Evidence(last_heartbeat_seq=1, dead_after=3.0)), ms(4100))  # no death
    second = log.register("a1", "p", ms(20_000), 1.0, 3.0)
    log.beat("a1", second, ms(21_000))  # then silent: dies 3 s later
    log.add(ev.SessionCreated(producer=ev.Producer(id="cli", instance="c"), session_id="end", pool="p"), ms(30_000))
    report = wi.whatif(log.items, rules.LivenessSettings(), recorded=wi.recorded_settings(log.items))
    assert report.recorded.deaths == 0  # a death declared after a goodbye is no death (the fold flags it)
    [death] = [d for d in report.differences if d.what == wi.DEATH]
    assert death.incarnation == second and death.kind == wi.ADDED and death.whatif is not None
    assert close(death.whatif.at, ms(24_000))


def test_a_window_starting_later_takes_the_log_before_it_as_recorded():
    log = Log()
    inc = log.register("a1", "p", T0, 1.0, 3.0)
    for t in range(1, 6):
        log.beat("a1", inc, ms(t * 1000))
    log.add(ev.AgentDeclaredDead(producer=MONITOR, agent_id="a1", incarnation=inc, reason=rules.MISSED_HEARTBEATS,
                                 evidence=ev.Evidence(last_heartbeat_seq=5, dead_after=3.0,
                                                      suspect_after_missed=3)), ms(8100))
    log.add(ev.SessionCreated(producer=ev.Producer(id="cli", instance="c"), session_id="end", pool="p"), ms(30_000))
    recorded = wi.recorded_settings(log.items)
    longer = recorded.liveness(dead_after=60.0)
    whole = wi.whatif(log.items, longer, recorded=recorded)
    assert [(d.what, d.kind) for d in whole.differences] == [(wi.SUSPICION, wi.ADDED), (wi.DEATH, wi.AVOIDED)]
    after = wi.whatif(log.items, longer, recorded=recorded, since=ms(9000))  # the death is before the window
    assert after.differences == [] and after.recorded.deaths == 0 and after.whatif.deaths == 0


# --- a real fleet, a real monitor, the command --------------------------------------------------------------


HEARTBEAT, TTL = 0.1, 1.5


async def whatif(url: str, *args: str) -> dict:  # type: ignore[type-arg]
    result = await asyncio.to_thread(CliRunner().invoke, cli, ["whatif", *args, "--json", "--nats-url", url])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


async def test_a_paused_agent_declared_dead_would_have_lived_with_a_longer_dead_after(server: EmbeddedServer):
    async with ledger_on(server.url) as ledger, agents(server.url, "gpu", ["a1", "a2", "a3"], heartbeat=HEARTBEAT,
                                                        ttl=TTL) as procs:
        sessions = [(await ledger.create_session("gpu", session_id=f"s{i}"))[0] for i in range(6)]

        async def placed() -> dict[str, str] | None:
            owners = {s: (await ledger.session(s))[0].owner for s in sessions}
            return owners if all(owners.values()) else None  # type: ignore[return-value]

        owners = await eventually(placed, what="every session claimed")
        victim = max(procs, key=lambda a: list(owners.values()).count(a))
        held = list(owners.values()).count(victim)
        async with consumers(server.url, watchdog=False):
            procs[victim].proc.send_signal(signal.SIGSTOP)  # no beat: declared dead after TTL
            try:
                async def declared() -> bool:
                    return any(isinstance(r, Recorded) and isinstance(r.event, ev.AgentDeclaredDead)
                               for r in await ledger.store.history("agent", victim))

                await eventually(declared, timeout=TTL + 20, what=f"{victim} declared dead")

                async def moved() -> bool:
                    lost = [s for s, o in owners.items() if o == victim]
                    return all([(await ledger.session(s))[0].owner not in (None, victim) for s in lost])

                await eventually(moved, timeout=20, what="its sessions failed over")
            finally:
                procs[victim].proc.send_signal(signal.SIGCONT)
        same = await whatif(server.url)
        assert same["recorded_settings"]["dead_after"] is None  # the agents' own ttl, read from the evidence
        assert same["recorded"]["deaths"] == 1 and same["recorded"]["failovers"] == held
        longer = await whatif(server.url, "--dead-after", "60s")
        deaths = [d for d in longer["differences"] if d["what"] == wi.DEATH]
        assert [(d["subject"], d["kind"]) for d in deaths] == [(victim, wi.AVOIDED)]
        assert deaths[0]["recorded"]["sessions"] == held and deaths[0]["recorded"]["last_beat_seq"] is not None
        assert f"1 of 1 death avoided, {held} failover{'s' if held != 1 else ''} avoided" in longer["summary"]
        shorter = await whatif(server.url, "--dead-after", "1s")
        assert not [d for d in shorter["differences"] if d["what"] == wi.DEATH and d["kind"] == wi.ADDED]


def test_nonsense_is_refused_in_one_line():
    runner = CliRunner()
    for args, what in ((["--dead-after", "-5"], "--dead-after"), (["--dead-after", "soon"], "not a duration"),
                       (["--breaker-share", "1.5"], "--breaker-share"), (["--suspect-after", "0"], "--suspect-after"),
                       (["--since", "-1m", "--until", "-1h"], "--until is before --since")):
        result = runner.invoke(cli, ["whatif", *args, "--nats-url", "nats://127.0.0.1:1"])
        assert result.exit_code == 2 and what in result.output, (args, result.output)
        assert "Traceback" not in result.output


def test_a_pool_failing_together_trips_the_breaker_unless_the_share_is_higher():
    # four agents of one pool: three stop beating together at 2 s, and the recorded monitor trips the breaker
    together = [[1000, 1000], [1000, 1000], [1000, 1000], [1000] * 12]
    log = monitored(together, 1, rules.LivenessSettings(breaker_share=0.5, breaker_window=2.0))
    recorded = wi.recorded_settings(log.items)
    assert recorded.trips == 1 and recorded.breaker_share == 0.5
    same = wi.whatif(log.items, recorded.liveness(), recorded=recorded)
    assert same.differences == [] and same.recorded.trips == 1 and same.recorded.deaths == 4  # the 4th: at the end
    higher = wi.whatif(log.items, recorded.liveness(breaker_share=0.9), recorded=recorded)
    assert [(d.what, d.kind, d.subject) for d in higher.differences] == [(wi.BREAKER, wi.AVOIDED, "p0")]
    assert higher.summary.endswith("1 breaker trip avoided")
    assert wi.whatif(log.items, recorded.liveness(breaker_share=0.9), recorded=recorded, pool="p1").differences == []


def test_a_window_ending_between_a_turn_and_the_monitors_next_tick_shows_no_difference():
    made_with = rules.LivenessSettings()
    log = monitored([[1030]], 1, made_with)  # one beat at 1 s: suspect at 4 s, written on the tick at 4.06 s
    recorded = wi.recorded_settings(log.items)
    [suspected] = [r for r in log.items if isinstance(r, Recorded) and isinstance(r.event, ev.AgentSuspected)]
    assert suspected.stored_at == ms(4060)
    report = wi.whatif(log.items, made_with, recorded=recorded, until=ms(4030))
    assert report.differences == [] and report.whatif.suspicions == 1 and report.recorded.suspicions == 0


@given(h=st.integers(0, 48), m=st.integers(0, 59), sec=st.integers(0, 59))
def test_a_duration_reads_as_the_seconds_it_names(h: int, m: int, sec: int):
    total = h * 3600 + m * 60 + sec
    assert parse_duration(f"{h}h{m}m{sec}s") == total == parse_duration(str(total)) == parse_duration(f"{total}s")


def test_the_replay_judges_with_the_monitors_own_rule_functions(monkeypatch):  # type: ignore[no-untyped-def]
    """One rule in one place: whatif calls liveness_rules' functions, it has no copy of them."""
    calls: dict[str, int] = {}
    for name in ("judgement", "overdue", "breaker_before_death", "verdict_events"):
        real = getattr(rules, name)

        def counted(*args, _real=real, _name=name, **kwargs):  # type: ignore[no-untyped-def]
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(rules, name, counted)
    log = monitored([[1000, 1000], [1000, 1000], [1000] * 8], 1, rules.LivenessSettings())
    calls.clear()
    report = wi.whatif(log.items, rules.LivenessSettings(), recorded=wi.recorded_settings(log.items))
    assert report.whatif.deaths >= 2
    assert set(calls) == {"judgement", "overdue", "breaker_before_death", "verdict_events"}
