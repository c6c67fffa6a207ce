"""What the benchmarks share: run against --url or an embedded nats-server; `ledger up` as a process; /proc figures."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ledgerctl.server import EmbeddedServer, ServerConfig, free_port  # noqa: E402 - after the path is set

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1024 * 1024


def server_options(parser: argparse.ArgumentParser, *, sync_always: bool = True) -> None:
    parser.add_argument("--url", help="use this NATS server instead of starting an embedded one")
    parser.add_argument("--sync-always", action=argparse.BooleanOptionalAction, default=sync_always,
                        help="the embedded server fsyncs every write, as `ledger up` runs it "
                             f"(default: {'on' if sync_always else 'off'})")


def run_against_server(args: argparse.Namespace, run: Callable[[str], Coroutine[Any, Any, None]]) -> None:
    """asyncio.run(run(url)) on --url, or on a fresh embedded server that is removed afterwards."""
    if args.url:
        asyncio.run(run(args.url))
        return
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ServerConfig(data_dir=Path(tmp), port=free_port(), sync_always=args.sync_always)
        with EmbeddedServer(cfg) as server:
            print(f"nats-server {'.'.join(map(str, server.version or ()))} on {server.url} "
                  f"(sync_interval: {'always' if args.sync_always else 'default'})", flush=True)
            asyncio.run(run(server.url))


def pct(values: Sequence[float], p: float) -> float:
    """The p-th percentile (nearest rank) of values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


# --- /proc ---------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds `pid` has used (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` (0 once it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except OSError:
        return 0


def children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(c) for c in (task / "children").read_text().split()]
    return out


@dataclass
class Meter:
    """CPU share (of one core) and RSS of one process between two readings."""

    name: str
    pid: int
    _cpu: float = 0.0
    _at: float = 0.0
    samples: list[tuple[float, int]] = field(default_factory=list)
    """(cpu share since the previous reading, rss bytes) per reading."""

    def __post_init__(self) -> None:
        self._cpu, self._at = cpu_seconds(self.pid), time.monotonic()

    def read(self) -> tuple[float, int]:
        cpu, at = cpu_seconds(self.pid), time.monotonic()
        share = (cpu - self._cpu) / max(at - self._at, 1e-9)
        self._cpu, self._at = cpu, at
        sample = (share, rss_bytes(self.pid))
        self.samples.append(sample)
        return sample

    def summary(self) -> str:
        if not self.samples:
            return f"{self.name:<14} (no samples)"
        shares = [s for s, _ in self.samples]
        rss = [r for _, r in self.samples]
        return (f"{self.name:<14} CPU mean {100 * sum(shares) / len(shares):5.1f} % max {100 * max(shares):5.1f} %"
                f" of a core   RSS first {rss[0] / MiB:6.1f} MiB  last {rss[-1] / MiB:6.1f} MiB  "
                f"max {max(rss) / MiB:6.1f} MiB")


# --- `ledger up` as a process ----------------------------------------------------


@dataclass
class LedgerUp:
    """A `ledger up` process (embedded nats-server with fsync always, projector, consumers), as a user runs it."""

    proc: subprocess.Popen[bytes]
    url: str
    data_dir: Path
    lines: list[str]

    @property
    def server_pid(self) -> int:
        """The nats-server it started (its child)."""
        for child in children(self.proc.pid):
            with contextlib.suppress(OSError):
                if "nats-server" in Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace"):
                    return child
        raise SystemExit("ledger up has no nats-server child")

    @property
    def db(self) -> Path:
        return self.data_dir / "projection.sqlite3"


def _spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env())


@contextlib.asynccontextmanager
async def ledger_up(data_dir: Path, *extra: str, ready_within: float = 120.0) -> AsyncIterator[LedgerUp]:
    """Start `ledger up` on a free port (no HTTP), wait for its "ready" line, SIGTERM it on exit."""
    port = free_port()
    proc = _spawn([sys.executable, "-m", "ledgerctl", "up", "--data-dir", str(data_dir), "--port", str(port),
                   "--no-http", *extra])
    lines: list[str] = []
    drain: asyncio.Future[None] | None = None
    assert proc.stdout is not None
    stdout = proc.stdout

    async def read_until_ready() -> None:
        while True:
            line = (await asyncio.to_thread(stdout.readline)).decode(errors="replace")
            if not line:
                raise SystemExit("ledger up ended before it was ready:\n" + "".join(lines))
            lines.append(line)
            if line.startswith("ready"):
                return

    try:
        await asyncio.wait_for(read_until_ready(), ready_within)
        # Keep draining its output, so a chatty process never blocks on a full pipe.
        drain = asyncio.ensure_future(asyncio.to_thread(lambda: lines.extend(
            ln.decode(errors="replace") for ln in iter(stdout.readline, b""))))
        # With --nats-url it serves that server (started by the caller) instead of one of its own.
        url = extra[extra.index("--nats-url") + 1] if "--nats-url" in extra else f"nats://127.0.0.1:{port}"
        yield LedgerUp(proc, url, data_dir, lines)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, 60)
            except subprocess.TimeoutExpired:
                print("ledger up did not stop within 60 s of SIGTERM: killed", flush=True)
                proc.kill()
                await asyncio.to_thread(proc.wait, 10)
        if drain is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(drain, 10)


def projection_checkpoint(db: Path, stream: str) -> int:
    """The projection file's committed sequence of `stream` (0 before its first commit)."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return 0
    try:
        row = con.execute("SELECT seq FROM checkpoints WHERE stream = ?", (stream,)).fetchone()
    except sqlite3.Error:
        return 0
    finally:
        con.close()
    return int(row[0]) if row else 0


# --- the floor of a pipelined, acknowledged publish --------------------------------------------


class RawPublisher:
    """Pipelined raw publishes: one reply inbox, one wildcard subscription counting acknowledgements, a window.

    Per acknowledgement it only releases the window (and looks for an error by a byte search): the least a
    pipelined acknowledged publish costs in nats-py, used as the benchmarks' raw baseline and to pre-fill logs.
    """

    def __init__(self, nc: Any, window: int = 4096) -> None:
        self.nc = nc
        self._window = asyncio.Semaphore(window)
        self._size = window
        self.sent = 0
        self.acked = 0
        self.errors = 0
        self.first_error = b""
        self._prefix = ""
        self._sub: Any = None

    async def __aenter__(self) -> RawPublisher:
        self._prefix = self.nc.new_inbox() + "."
        self._sub = await self.nc.subscribe(self._prefix + "*", cb=self._on_ack)
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._sub.unsubscribe()

    async def _on_ack(self, msg: Any) -> None:
        if b'"error"' in msg.data:
            self.errors += 1
            self.first_error = self.first_error or msg.data
        self.acked += 1
        self._window.release()

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
        await self._window.acquire()
        self.sent += 1
        await self.nc.publish(subject, payload, reply=f"{self._prefix}{self.sent}", headers=headers)

    async def drain(self, within: float = 300.0) -> None:
        """Wait until every publish is acknowledged (SystemExit past `within` seconds or on a refusal)."""
        deadline = time.monotonic() + within
        while self.acked < self.sent:
            if time.monotonic() > deadline:
                raise SystemExit(f"raw publishes: {self.acked} of {self.sent} acknowledged after {within:.0f} s")
            await asyncio.sleep(0.01)
        if self.errors:
            raise SystemExit(f"raw publishes: {self.errors} refused, first: {self.first_error[:300]!r}")


async def stream_state(nc: Any, stream: str) -> dict[str, Any]:
    """A stream's state as the server reports it (nats-py's StreamState leaves out num_subjects)."""
    import json

    reply = await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=10)
    state: dict[str, Any] = json.loads(reply.data)["state"]
    return state
