"""`ledger agents | sessions | routes | pools | anomalies | history | rebuild` against a projected file."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import start_binary_server

from ledger import events as ev
from ledger.settings import Settings
from ledger.store import EventStore
from ledgerctl.cli import cli
from projections.projector import Projector
from projections.settings import ProjectionSettings

CLI = ev.Producer(id="cli", instance="t")


async def ledger(*args: str) -> Result:
    """Run a `ledger` command as a user would (each runs its own event loop, so off this one)."""
    return await asyncio.to_thread(CliRunner().invoke, cli, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def projected(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """A small fleet on a server of this module's own, projected once into a file for every test here."""
    server = start_binary_server(tmp_path_factory.mktemp("cli-nats"))
    try:
        yield asyncio.run(project(server.url, tmp_path_factory.mktemp("cli-db") / "p.sqlite3"))
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
        await store.append(ev.RouteCreated(producer=CLI, route_id=route, session_id=session, endpoint="chat"))
        await store.append(ev.RouteTransitioned(producer=me, route_id=route, from_state="PENDING",
                                                to_state="STARTING", token=token))
        async with Projector(store, ProjectionSettings(db=str(db))) as projector:
            await projector.ready(timeout=30)
    return {"db": str(db), "url": url, "agent": agent, "pool": pool, "session": session, "route": route,
            "created": created, "token": token}


async def test_views_as_json(projected: dict[str, object]):
    p = projected
    base = ["--db", str(p["db"]), "--json"]
    agents = json.loads((await ledger("agents", *base, "--pool", str(p["pool"]))).output)
    assert [(a["agent_id"], a["health"], a["sessions"]) for a in agents["items"]] == [(p["agent"], "alive", 1)]
    assert agents["position"]["source"] == "projection"
    sessions = json.loads((await ledger("sessions", *base, "--owner", str(p["agent"]))).output)
    assert [(s["session_id"], s["state"], s["token"]) for s in sessions["items"]] == [
        (p["session"], "assigned", p["token"])]
    routes = json.loads((await ledger("routes", *base, "--session", str(p["session"]))).output)
    assert [(r["status"], r["sub_status"]) for r in routes["items"]] == [("PROVISIONING", "STARTING")]
    pools = json.loads((await ledger("pools", *base)).output)
    mine = next(x for x in pools["items"] if x["pool"] == p["pool"])
    assert (mine["agents"], mine["sessions"], mine["free_capacity"]) == ({"alive": 1}, {"assigned": 1}, 2)


async def test_views_of_the_past(projected: dict[str, object]):
    p = projected
    past = ["--db", str(p["db"]), "--nats-url", str(p["url"]), "--json", "--at-seq", str(p["created"])]
    sessions = json.loads((await ledger("sessions", *past, "--pool", str(p["pool"]))).output)
    assert [(s["state"], s["owner"]) for s in sessions["items"]] == [("pending", None)]
    assert sessions["position"]["ledger_seq"] == p["created"]
    assert sessions["position"]["source"].startswith("the projection's versions")  # an index, not a replay
    history = json.loads((await ledger("history", "session", str(p["session"]), "--nats-url", str(p["url"]),
                                       "--json")).output)
    assert [e["type"] for e in history["entries"]] == ["session.created", "session.claimed"]
    now = await ledger("agents", "--db", str(p["db"]), "--nats-url", str(p["url"]), "--as-of", "now",
                       "--pool", str(p["pool"]))
    assert now.exit_code == 0 and str(p["agent"]) in now.output and "alive" in now.output


async def test_tables_for_people(projected: dict[str, object]):
    p = projected
    out = (await ledger("sessions", "--db", str(p["db"]), "--pool", str(p["pool"]))).output
    assert str(p["session"]) in out and "assigned" in out and "LEDGER #" in out
    out = (await ledger("history", "route", str(p["route"]), "--nats-url", str(p["url"]))).output
    assert "route.transitioned" in out and "PENDING -> STARTING" in out


async def test_rebuild_command(projected: dict[str, object]):
    p = projected
    result = await ledger("rebuild", "--db", str(p["db"]), "--nats-url", str(p["url"]))
    assert result.exit_code == 0 and "rebuilt" in result.output
    agents = json.loads((await ledger("agents", "--db", str(p["db"]), "--json", "--pool", str(p["pool"]))).output)
    assert [a["agent_id"] for a in agents["items"]] == [p["agent"]]


@pytest.mark.parametrize("args, message, code", [
    (["agents", "--as-of", "yesterday"], "'yesterday' is not a time", 2),  # a usage error, as for every time option
    (["agents", "--as-of", "-5m", "--at-seq", "3"], "use --as-of or --at-seq, not both", 1),
    (["sessions"], "no projection file at", 1),
    (["anomalies", "--entity", "widget:w1"], "--entity is KIND:ID", 1),
])
async def test_user_mistakes_are_one_line_errors(projected: dict[str, object], tmp_path: Path, args: list[str],
                                                 message: str, code: int):
    db = str(projected["db"]) if args[0] != "sessions" else str(tmp_path / "missing.sqlite3")
    result = await ledger(*args, "--db", db, "--nats-url", str(projected["url"]))
    assert result.exit_code == code
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0]


async def test_an_unknown_entity_is_a_one_line_error(projected: dict[str, object]):
    result = await ledger("history", "agent", "nobody-at-all", "--nats-url", str(projected["url"]))
    assert result.exit_code == 1 and result.output.strip() == "Error: the ledger holds no event for agent nobody-at-all"
