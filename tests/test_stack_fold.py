"""`ledger up`'s stack folds the log once: one follower, one state, for the projector and the consumers."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from helpers import eventually

from consumers.follow import Item
from consumers.liveness_rules import LivenessSettings
from ledger import events as ev
from ledger.agent import Agent
from ledger.codec import Recorded
from ledger.ids import new_id
from ledger.settings import Settings
from ledger.store import EventStore
from ledger.subjects import HEARTBEAT_STREAM, LEDGER_STREAM
from ledger.writer import Writer
from ledgerctl.server import EmbeddedServer
from ledgerctl.stack import Stack, UpSettings, running_stack
from projections.state import Change


class Heard:
    """A listener of the stack's follower: every item it told as applied, by stream, and every item recalled."""

    def __init__(self) -> None:
        self.seqs: dict[str, Counter[int]] = {LEDGER_STREAM: Counter(), HEARTBEAT_STREAM: Counter()}
        self.recalled: Counter[int] = Counter()

    def __call__(self, stream: str, items: list[Item], changes: list[Change]) -> None:
        if not changes:  # already in the state the follower resumed from: told again, not applied
            assert stream == LEDGER_STREAM and not self.seqs[stream]
            self.recalled.update(item.seq for item in items)
            return
        assert len(items) == len(changes)
        self.seqs[stream].update(item.seq for item in items)


async def one_reader(store: EventStore, stream: str) -> bool:
    """Whether the server has exactly one consumer on the stream (each is a reader folding it)."""
    return (await store.nc.jsm().stream_info(stream)).state.consumer_count == 1


async def create_sessions(stack: Stack, ids: list[str]) -> int:
    ledger = Writer(stack.store, ev.Producer(id="operator-test", instance=new_id()))
    seq = 0
    for sid in ids:
        _, seq = await ledger.create_session("gpu", session_id=sid)
    return seq


def up_settings(server: EmbeddedServer, tmp_path: Path, **more: object) -> UpSettings:
    return UpSettings(nats_url=server.url, data_dir=tmp_path, db=tmp_path / "projection.sqlite3",
                      connection=Settings(nats_url=server.url), **more)  # type: ignore[arg-type]


async def test_up_folds_each_event_once_into_the_state_the_projector_and_consumers_share(server: EmbeddedServer,
                                                                                           tmp_path: Path):
    heard = Heard()
    async with running_stack(up_settings(server, tmp_path), lambda line: None, listeners=[heard]) as stack:
        last = await create_sessions(stack, [f"s{i}" for i in range(1, 6)])
        await stack.projector.wait_for(last)
        await stack.follower.caught_up.wait()
        # Everything is following by now: one reader per stream (the projector and the consumers had one each).
        await eventually(lambda: one_reader(stack.store, LEDGER_STREAM), what="exactly one reader of LEDGER")
        await eventually(lambda: one_reader(stack.store, HEARTBEAT_STREAM), what="exactly one reader of LEDGER_HB")
        assert stack.projector.state is stack.follower.state
        assert stack.consumers.follower is stack.follower
        assert set(stack.follower.state.sessions) == {f"s{i}" for i in range(1, 6)}
        assert heard.seqs[LEDGER_STREAM] == Counter(range(1, last + 1))  # each event applied and told once
        assert not heard.recalled
        assert stack.projector.events == last


async def test_up_resumes_its_one_state_from_the_projection_instead_of_the_whole_log(server: EmbeddedServer,
                                                                                      tmp_path: Path):
    s = up_settings(server, tmp_path)
    async with running_stack(s, lambda line: None) as stack:
        first = await create_sessions(stack, ["s1", "s2", "s3"])
        await stack.projector.wait_for(first)

    heard = Heard()
    async with running_stack(s, lambda line: None, listeners=[heard]) as stack:
        # Resumed from the file: the consumers act on a state that has everything, without reading it again.
        assert stack.follower.state.ledger.seq == first
        assert set(stack.consumers.follower.state.sessions) == {"s1", "s2", "s3"}
        last = await create_sessions(stack, ["s4"])
        await stack.projector.wait_for(last)
        await stack.follower.caught_up.wait()
        assert heard.seqs[LEDGER_STREAM] == Counter(range(first + 1, last + 1))
        assert set(stack.follower.state.sessions) == {"s1", "s2", "s3", "s4"}
        assert stack.projector.events == last - first  # the projector heard nothing twice
        # What the monitor keeps beside the state (reports, deaths in its windows) is told again once, first.
        assert heard.recalled == Counter(range(1, first + 1))


async def test_up_restarted_remembers_the_failure_reports_made_before_within_the_monitors_window(
        server: EmbeddedServer, tmp_path: Path):
    s = up_settings(server, tmp_path, liveness=LivenessSettings(grace=0))
    async with Writer.connect(Settings(nats_url=server.url), producer_id="operator-test") as ledger, \
            Agent(ledger, agent_id="a1", pool="gpu", heartbeat=0.2, ttl=30):
        async with running_stack(s, lambda line: None) as stack:
            for reporter in ("operator-r1", "operator-r2"):  # two reports: one short of a suspicion
                last = await Writer(ledger.store, ev.Producer(id=reporter, instance="i")).report_unreachable("a1")
            await stack.projector.wait_for(last)

        async with running_stack(s, lambda line: None) as stack:
            assert stack.follower.state.ledger.seq >= last  # resumed from the file, not from the log's start
            await Writer(ledger.store, ev.Producer(id="operator-r3", instance="i")).report_unreachable("a1")

            def suspected() -> bool:
                agent = stack.follower.state.agents.get("a1")
                return agent is not None and agent.suspected_at is not None

            await eventually(suspected, timeout=10,
                             what="a1 suspected on three reports, two of them before the restart")
            [suspicion] = [r.event for r in await ledger.store.history("agent", "a1")
                           if isinstance(r, Recorded) and isinstance(r.event, ev.AgentSuspected)]
            assert suspicion.evidence.reports == 3
