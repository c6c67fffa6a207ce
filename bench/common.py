"""What the benchmarks share: run against --url, or an embedded nats-server started for the run."""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ledgerctl.server import EmbeddedServer, ServerConfig, free_port


def server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="use this NATS server instead of starting an embedded one")
    parser.add_argument("--sync-always", action="store_true", help="embedded server fsyncs every write")


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


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]
