"""A running stack with the HTTP server on it, and two in-process SDK agents in one pool (for the HTTP tests)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from consumers.liveness_rules import LivenessSettings
from ledger import events as ev
from ledger.agent import Agent
from ledger.ids import new_id
from ledger.settings import Settings
from ledger.writer import Writer
from ledgerctl.http import http_server
from ledgerctl.server import EmbeddedServer
from ledgerctl.stack import Stack, UpSettings, running_stack


@dataclass
class Running:
    stack: Stack
    url: str
    """The HTTP server's."""
    operator: Writer


def up_settings(server: EmbeddedServer, tmp_path: Path) -> UpSettings:
    return UpSettings(nats_url=server.url, data_dir=tmp_path, db=tmp_path / "projection.sqlite3",
                      connection=Settings(nats_url=server.url), liveness=LivenessSettings(grace=0))


@contextlib.asynccontextmanager
async def running(server: EmbeddedServer, tmp_path: Path) -> AsyncIterator[Running]:
    async with running_stack(up_settings(server, tmp_path), lambda line: None) as stack, \
            http_server(stack, "127.0.0.1", 0) as url:
        yield Running(stack, url, Writer(stack.store, ev.Producer(id="operator-test", instance=new_id())))


@contextlib.asynccontextmanager
async def agent(server: EmbeddedServer, agent_id: str, pool: str = "gpu", *, capacity: int = 4,
                ttl: float = 3.0) -> AsyncIterator[Agent]:
    async with Writer.connect(Settings(nats_url=server.url), producer_id=agent_id) as ledger, \
            Agent(ledger, agent_id=agent_id, pool=pool, capacity=capacity, heartbeat=0.2, ttl=ttl) as a:
        yield a
