"""How long each view takes on a big projection: `ledger agents | sessions | routes | pools` with N of each.

    python bench/views.py              # 20,000 agents, sessions and routes
    python bench/views.py --n 2000     # a smoke run

The projection file is written with the projection's own writer (one batch, as the projector commits), so no
NATS server is needed. Each view runs as a table and as JSON, first page and --all: in-process through the
`ledger` command (click's runner, output captured and discarded), and as a command in a process of its own
(start-up included: printed alone first). Each median time is printed beside the baseline, the raw SQL SELECT
of the same rows (sqlite3, the same joins, the same LIMIT), with the in-process time's ratio to it.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from click.testing import CliRunner

from ledger.events import utcnow
from ledger.lifecycle import AgentState, RouteState, SessionState
from ledger.subjects import HEARTBEAT_STREAM, LEDGER_STREAM
from ledgerctl.cli import cli
from projections.beats import Beat
from projections.db import ProjectionDB
from projections.writer import Batch

POOLS = 10


async def build(path: Path, n: int) -> None:
    """N agents (POOLS pools), N sessions (each owned by one agent) and N routes, in one committed batch."""
    now = utcnow()
    agents, sessions, routes, beats = {}, {}, {}, {}
    for i in range(n):
        agent, pool = f"a-{i:06d}", f"pool-{i % POOLS}"
        agents[agent] = AgentState(agent_id=agent, incarnation=i + 1, instance_id=f"i-{i}", pool=pool,
                                   platform="default", region="default", labels={}, capacity=4,
                                   heartbeat_interval=5.0, ttl=15.0, registered_at=now - timedelta(hours=1),
                                   status="alive", reason="registered", status_since=now - timedelta(hours=1),
                                   status_seq=i + 1)
        beats[agent] = Beat(agent_id=agent, incarnation=i + 1, instance_id=f"i-{i}", seq=i + 1, beat=1,
                            sent_at=now, stored_ns=time.time_ns(), load=1, capacity=4, sessions=1)
        session = f"s-{i:06d}"
        sessions[session] = SessionState(session_id=session, pool=pool, platform="default", region="default",
                                         labels={}, idle_ttl=None, status="assigned", created_at=now, owner=agent,
                                         owner_instance=f"i-{i}", owner_incarnation=i + 1, token=n + i, claims=1,
                                         claim_reason="pending", status_since=now, last_seq=n + i)
        route = f"r-{i:06d}"
        routes[route] = RouteState(route_id=route, session_id=session, endpoint=f"chat-{i}", deployment="d",
                                   probe=None, start_timeout=300.0, stop_timeout=300.0, state="RUNNING",
                                   state_since=now, state_seq=2 * n + i, created_at=now, traffic="ACTIVE")
    db = await ProjectionDB.open(path)
    try:
        stamp = time.time_ns()
        checkpoints = [(LEDGER_STREAM, 3 * n, stamp, 0, stamp), (HEARTBEAT_STREAM, n, stamp, 0, stamp)]
        await db.commit(Batch(agents, sessions, routes, {}, beats, [], [], checkpoints, [], []))
    finally:
        await db.close()


def median_time(run: object, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def view(args: list[str]) -> None:
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    if result.exit_code != 0:
        raise SystemExit(f"ledger {' '.join(args)} failed: {result.output}")


def command(args: list[str]) -> None:
    """`ledger ARGS` as a user runs it: a new process, start-up (imports) included, output to /dev/null."""
    subprocess.run([sys.executable, "-m", "ledgerctl", *args], stdout=subprocess.DEVNULL, check=True, timeout=600)


VIEWS = {
    "agents": "SELECT a.doc, b.doc FROM agents a LEFT JOIN beats b USING (agent_id) ORDER BY a.agent_id",
    "sessions": "SELECT s.doc, a.doc, b.doc FROM sessions s LEFT JOIN agents a ON a.agent_id = s.owner "
                "LEFT JOIN beats b ON b.agent_id = s.owner ORDER BY s.session_id",
    "routes": "SELECT doc FROM routes ORDER BY route_id",
    "pools": "SELECT a.doc, b.doc FROM agents a LEFT JOIN beats b USING (agent_id)",
}
"""View -> the raw SELECT of the rows it shows (the baseline)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000, help="agents, sessions and routes (each)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (the median is printed)")
    parser.add_argument("--db", type=Path, help="keep the projection file here (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.db or Path(tmp) / "views.sqlite3"
        started = time.perf_counter()
        asyncio.run(build(path, args.n))
        print(f"projection of {args.n:,} agents, sessions and routes built in {time.perf_counter() - started:.2f} s")
        startup = median_time(lambda: command(["--help"]), args.repeat)
        print(f"start-up of the command alone (`ledger --help`): {startup * 1e3:.0f} ms")
        print(f"{'view':<28} {'in-process':>10} {'command':>9} {'raw SELECT':>11} {'ratio':>7}")
        for name, sql in VIEWS.items():
            for label, extra, limit in (("table", [], 100), ("table --all", ["--all"], None),
                                        ("--json", ["--json", "--limit", "100"], 100),
                                        ("--json --all", ["--json", "--all"], None)):
                if name == "pools" and label not in ("table", "--json"):
                    continue  # one row per pool, always all of them: no pages
                argv = [name, "--db", str(path), *(extra[:1] if name == "pools" else extra)]
                took = median_time(lambda argv=argv: view(argv), args.repeat)
                whole = median_time(lambda argv=argv: command(argv), args.repeat)
                query = sql + (f" LIMIT {limit}" if limit and name != "pools" else "")

                def raw(query: str = query) -> None:
                    with sqlite3.connect(path) as conn:
                        conn.execute(query).fetchall()
                base = median_time(raw, args.repeat)
                print(f"{name + ' ' + label:<28} {took * 1e3:>8.0f}ms {whole * 1e3:>7.0f}ms {base * 1e3:>9.1f}ms "
                      f"{took / base:>6.0f}x", flush=True)


if __name__ == "__main__":
    main()
