"""The demo's narrator tells what the fold applied, never what it refused (a forgery, a race)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from histories import Builder
from samples import sample

from ledger import events as ev
from ledger.subjects import LEDGER_STREAM
from ledgerctl.cli.demo import Feed
from projections.state import LedgerState


def test_the_narrator_tells_applied_events_and_not_refused_ones(tmp_path: Path) -> None:
    b = Builder()
    registered = b.add(sample(ev.AgentRegistered, agent_id="a1", producer=ev.Producer(id="a1", instance="i")))
    forged = b.add(sample(ev.AgentDeclaredDead, agent_id="a1", incarnation=registered.seq,
                          producer=ev.Producer(id="mallory", instance="m")))  # only the monitor may declare deaths
    state = LedgerState()
    changes = state.apply_all([registered, forged])
    assert [c.applied for c in changes] == [True, False]  # the fold refused the forgery
    told: list[str] = []
    follower = SimpleNamespace(listen=lambda listener: None, state=state)
    feed = Feed(SimpleNamespace(follower=follower), told.append, tmp_path)  # type: ignore[arg-type]
    feed._heard(LEDGER_STREAM, [registered, forged], changes)
    assert len(told) == 1 and "a1 registered" in told[0]
    assert "dead:a1" not in feed.stored_ns
