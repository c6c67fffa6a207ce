"""One liveness assessment, one policy: the views, the monitor, the reclaimer and self-claiming agents agree."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner
from helpers import eventually
from hypothesis import example, given, settings
from hypothesis import strategies as st

from consumers import liveness_rules as lr
from consumers import reclaim_rules as rr
from ledger import codec
from ledger import events as ev
from ledger import lifecycle as lc
from ledger.agent import Agent
from ledger.codec import Recorded
from ledger.errors import ConfigError
from ledger.ids import new_id
from ledger.settings import DEFAULT_NATS_URL, Settings
from ledger.store import EventStore
from ledger.writer import Writer
from ledgerctl.agent_process import SelfClaimer
from ledgerctl.cli import cli
from ledgerctl.cli.up import env_line
from ledgerctl.stack import UpSettings
from projections.beats import Beat
from projections.health import ALIVE, DEAD, SUSPECT, HealthPolicy, agent_health
from projections.settings import ProjectionSettings

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# --- the views and the monitor judge alike (pure) -----------------------------------------------------------------

@settings(max_examples=400, deadline=None)
@given(interval=st.floats(0.1, 30), ttl_intervals=st.floats(1.1, 20), beat_age=st.one_of(st.none(), st.floats(0, 600)),
       suspected=st.one_of(st.none(), st.floats(0, 600)), age=st.floats(0, 600),
       suspect_after=st.integers(1, 6), dead_after=st.one_of(st.none(), st.floats(0.5, 300)))
@example(interval=5.0, ttl_intervals=6.0, beat_age=0.0, suspected=16.0, age=41.0, suspect_after=3, dead_after=None)
def test_the_views_and_the_monitor_agree_on_every_agent_beat_and_moment(
        interval: float, ttl_intervals: float, beat_age: float | None, suspected: float | None, age: float,
        suspect_after: int, dead_after: float | None):
    """For an agent the log calls alive: the view says dead exactly when the monitor declares it dead, alive
    exactly when the monitor has nothing to declare and the agent is not overdue, and suspect otherwise."""
    policy = HealthPolicy(suspect_after_missed=suspect_after, dead_after=dead_after)
    now = at(1000)
    agent = lc.AgentState(agent_id="a1", incarnation=7, instance_id="i", pool="p", platform="default",
                          region="default", labels={}, capacity=4, heartbeat_interval=interval,
                          ttl=interval * ttl_intervals, registered_at=now - timedelta(seconds=age),
                          status=lc.A_ALIVE, reason="registered", status_since=at(0), status_seq=7,
                          suspected_at=now - timedelta(seconds=suspected) if suspected is not None else None)
    beat_at = None if beat_age is None else min(now, agent.registered_at + timedelta(seconds=beat_age))
    beat = None if beat_at is None else Beat(agent_id="a1", incarnation=7, instance_id="i", seq=3, beat=1,
                                             sent_at=beat_at, stored_ns=codec.to_ns(beat_at), load=0, capacity=4,
                                             sessions=0)
    last = lr.LastBeat(3, codec.from_ns(beat.stored_ns)) if beat is not None else None
    shown, _ = agent_health(agent, beat, now, policy)
    settings = lr.LivenessSettings(policy=policy)
    verdict = lr.judge(agent, last, [], now, settings)
    overdue = lr.overdue(agent, last, now, settings)
    standing = agent.suspected_at is not None and (beat_at is None or beat_at <= agent.suspected_at)
    assert (shown == DEAD) == (verdict is not None and verdict.kind == lr.DEAD)
    assert (shown == ALIVE) == (verdict is None and not overdue and not standing)
    if shown == SUSPECT:
        assert verdict is None or verdict.kind == lr.SUSPECT
        assert overdue or standing
    if overdue or (verdict is not None and verdict.kind == lr.SUSPECT):
        assert shown in (SUSPECT, DEAD)
    # And the claimers: only an agent the views call alive may take sessions.
    assert (rr.ineligible(agent, beat, now, policy=policy) is None) == (shown == ALIVE)


def test_the_policy_comes_from_the_environment_and_flags_win():
    assert HealthPolicy.from_env({}) == HealthPolicy()
    env = {"LEDGER_SUSPECT_AFTER_MISSED": "2", "LEDGER_DEAD_AFTER": "12.5"}
    assert HealthPolicy.from_env(env) == HealthPolicy(suspect_after_missed=2, dead_after=12.5)
    assert HealthPolicy.from_env(env, suspect_after_missed=5) == HealthPolicy(suspect_after_missed=5, dead_after=12.5)
    with pytest.raises(ConfigError, match="liveness policy"):
        HealthPolicy.from_env({"LEDGER_SUSPECT_AFTER_MISSED": "0"})


def test_ledger_up_tells_the_agents_and_views_the_policy_its_consumers_use():
    up = UpSettings(nats_url=None, liveness=lr.LivenessSettings(policy=HealthPolicy(suspect_after_missed=2,
                                                                                    dead_after=12)))
    line = env_line(up, DEFAULT_NATS_URL) or ""
    assert "LEDGER_SUSPECT_AFTER_MISSED=2" in line and "LEDGER_DEAD_AFTER=12" in line
    policy_env = dict(kv.split("=") for kv in line.split()[1:] if kv.startswith(("LEDGER_S", "LEDGER_DEAD")))
    assert HealthPolicy.from_env(policy_env) == up.liveness.policy
    assert "LEDGER_SUSPECT" not in (env_line(UpSettings(nats_url=None), DEFAULT_NATS_URL) or "")


def test_the_projection_settings_hold_no_liveness_policy():
    """Health is derived at query time, with the policy the views are given: the projector stores none."""
    assert "suspect_after_missed" not in ProjectionSettings.__struct_fields__


def test_a_bad_policy_in_the_environment_is_one_line():
    result = CliRunner().invoke(cli, ["agents", "--db", "/nonexistent/p.sqlite3"],
                                env={"LEDGER_SUSPECT_AFTER_MISSED": "many"})
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output.startswith("Error: invalid liveness policy") and len(result.output.splitlines()) == 1


# --- the reclaimer honours the flags given to `ledger consumers` ----------------------------------------------------

@contextlib.contextmanager
def ledger_consumers(url: str, *flags: str):  # type: ignore[no-untyped-def]
    proc = subprocess.Popen([sys.executable, "-m", "ledgerctl", "consumers", "--no-monitor", "--no-watchdog",
                             *flags, "--nats-url", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("running reclaimer"), line + (proc.stderr.read() if proc.stderr else "")
        yield proc
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


@pytest.mark.parametrize("flag, value, interval", [("--dead-after", "1", 100.0), ("--suspect-after", "1", 1.0)])
async def test_the_reclaimer_judges_eligibility_by_the_flags_given_to_ledger_consumers(
        store: EventStore, settings: Settings, uid: str, flag: str, value: str, interval: float):
    """a1 registers and never beats: under the default policy it stays eligible for minutes (its interval is
    long, its ttl longer), and, least loaded and first by name, would be given the session; under the flag
    it is silent past the bound after a second, so the session goes to a2, which beats."""
    pool = f"{uid}-pool"
    silent, beating = f"{uid}-a1", f"{uid}-a2"
    me = Writer(store, ev.Producer(id=silent, instance=new_id()))
    registered = await me.append(ev.AgentRegistered(producer=me.producer, agent_id=silent, instance_id=new_id(),
                                                    pool=pool, capacity=4, heartbeat_interval=interval, ttl=1000.0))
    [stored] = [r for r in await store.history("agent", silent) if isinstance(r, Recorded) and r.seq == registered]
    operator = Writer(store, ev.Producer(id="operator-test", instance=new_id()))
    async with Agent(Writer(store, ev.Producer(id=beating, instance=new_id())), agent_id=beating, pool=pool,
                     capacity=4, heartbeat=0.2, ttl=5.0):
        with ledger_consumers(settings.nats_url, flag, value):
            # The bound is one second after a1's registration (stored time, the server's clock on this machine).
            await eventually(lambda: time.time_ns() > stored.timestamp_ns + 1.5e9, what="a1 silent past the bound")
            sid, _ = await operator.create_session(pool, session_id=f"{uid}-s1")

            async def owner() -> str | None:
                return (await operator.session(sid))[0].owner

            assert await eventually(owner, timeout=20, what="the reclaimer placing the session") == beating


# --- a self-claiming agent judges itself as the reclaimer does ---------------------------------------------------

async def _follower_sees(claimer: SelfClaimer, check) -> None:  # type: ignore[no-untyped-def]
    await eventually(lambda: claimer.follower.caught_up.is_set() and check(claimer.follower.state), timeout=20,
                     what="the self-claimer's state catching up")


async def test_a_self_claimer_judges_itself_by_the_policy_it_is_given(store: EventStore, uid: str):
    pool = f"{uid}-pool"
    operator = Writer(store, ev.Producer(id="operator-test", instance=new_id()))
    sid, _ = await operator.create_session(pool, session_id=f"{uid}-s1")
    agent_id = f"{uid}-a1"
    async with Agent(Writer(store, ev.Producer(id=agent_id, instance=new_id())), agent_id=agent_id, pool=pool,
                     capacity=4, heartbeat=1.0, ttl=1000.0) as agent:
        strict = SelfClaimer(agent, lambda _: None, HealthPolicy(suspect_after_missed=1))
        default = SelfClaimer(agent, lambda _: None)
        follows = [asyncio.create_task(c.follower.run()) for c in (strict, default)]
        try:
            for claimer in (strict, default):
                await _follower_sees(claimer, lambda s: sid in s.ledger.sessions and s.current_beat(agent_id))
            for claimer in (strict, default):
                beat = claimer.follower.state.current_beat(agent_id)
                assert beat is not None
                # 1.5 intervals after its newest beat, with nothing in between (no await): suspect under the
                # strict policy, alive under the default one.
                later = codec.from_ns(beat.stored_ns) + timedelta(seconds=1.5)
                wanted = [c.session_id for c in claimer.wanted(now=later)]
                assert wanted == ([] if claimer is strict else [sid])
        finally:
            for task in follows:
                task.cancel()
            await asyncio.gather(*follows, return_exceptions=True)


async def test_a_suspected_agent_does_not_claim_for_itself(store: EventStore, uid: str):
    pool = f"{uid}-pool"
    operator = Writer(store, ev.Producer(id="operator-test", instance=new_id()))
    monitor = Writer(store, ev.Producer(id="monitor", instance=new_id()))
    sid, _ = await operator.create_session(pool, session_id=f"{uid}-s1")
    agent_id = f"{uid}-a1"
    # A long interval: its first beat is its last for the length of the test, so nothing clears the suspicion.
    async with Agent(Writer(store, ev.Producer(id=agent_id, instance=new_id())), agent_id=agent_id, pool=pool,
                     capacity=4, heartbeat=100.0, ttl=1000.0) as agent:
        claimer = SelfClaimer(agent, lambda _: None)
        follow = asyncio.create_task(claimer.follower.run())
        try:
            await _follower_sees(claimer, lambda s: sid in s.ledger.sessions and s.current_beat(agent_id))
            assert [c.session_id for c in claimer.wanted()] == [sid]  # eligible: it would claim
            await monitor.append(ev.AgentSuspected(producer=monitor.producer, agent_id=agent_id,
                                                   incarnation=agent.incarnation, reason="unreachable_reports"))
            await _follower_sees(claimer, lambda s: s.ledger.agents[agent_id].suspected_at is not None)
            assert claimer.wanted() == []
            await claimer.claim_what_needs_an_owner()
            assert (await operator.session(sid))[0].status == lc.S_PENDING
        finally:
            follow.cancel()
            await asyncio.gather(follow, return_exceptions=True)


# --- one time grammar, one-line errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["sessions", "--as-of"], ["agents", "--as-of"], ["replay", "--since"],
                                  ["replay", "--until"], ["check", "--since"]])
@pytest.mark.parametrize("when", ["-999999999d", "2300-01-01", "1969-12-31", "yesterday"])
def test_every_time_option_refuses_what_it_cannot_hold_in_one_line(args: list[str], when: str):
    result = CliRunner().invoke(cli, [*args, when, "--nats-url", "nats://127.0.0.1:1"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    [line] = result.output.splitlines()
    assert line.startswith(f"Error: Invalid value for '{args[1]}': "), line
    assert ("out of range" in line) == (when != "yesterday") and ("is not a time" in line) == (when == "yesterday")


def test_replay_reads_the_same_relative_times_as_the_views(settings: Settings, uid: str):
    for when in ("90s ago", "-1h30m", "now"):
        result = CliRunner().invoke(cli, ["replay", "--since", when, "--session", f"{uid}-s",
                                          "--nats-url", settings.nats_url])
        assert result.exit_code == 0, result.output
