"""Heartbeats and the lease they renew: if no heartbeat is acknowledged within `ttl` seconds, the agent fences
itself, and registers again as a new incarnation as soon as the broker answers.

The liveness monitor declares an agent dead `ttl` after the last heartbeat it *stored*, which is never earlier
than the send time of the last heartbeat we saw acknowledged, so the agent has stopped acting before anyone may
take its sessions. Heartbeats come from the agent's own task, so they keep flowing while the application's work
loop is blocked (on a full queue, say).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ledger import codec
from ledger import events as ev
from ledger.errors import LedgerError
from ledger.settings import Settings

if TYPE_CHECKING:
    from .handle import Agent

log = logging.getLogger(__name__)

BEAT_SESSIONS_BYTES = codec.MAX_EVENT_BYTES // 2
"""Room in a heartbeat for the list of owned sessions; `load` always carries the full count."""


def beat_sessions(owned: dict[str, object] | set[str], budget: int = BEAT_SESSIONS_BYTES) -> tuple[str, ...]:
    """The owned sessions a heartbeat lists: all of them while they fit, else as many as fit (sorted). A beat
    too large to encode would not be sent, and an agent owning thousands of sessions would fence itself."""
    listed: list[str] = []
    used = 0
    for sid in sorted(owned):
        used += len(sid) + 3  # quotes and comma in the JSON array
        if used > budget:
            break
        listed.append(sid)
    return tuple(listed)


@dataclass
class AgentStats:
    beats_sent: int = 0
    beats_acked: int = 0
    ack_latencies: deque[float] = field(default_factory=lambda: deque(maxlen=1000))
    """Seconds from sending a heartbeat to its acknowledgement, most recent last."""


def warn_if_slow_to_notice_a_silent_server(agent_id: str, settings: Settings, ttl: float) -> None:
    """A frozen server keeps the socket open: only pings notice it, and the lease must outlast that."""
    def notices_after(s: Settings) -> float:
        return s.ping_interval * (s.max_outstanding_pings + 1)

    slow = notices_after(settings)
    if slow > max(ttl / 4, notices_after(settings.for_lease(ttl))):
        log.warning("%s: this connection notices a silent server only after ~%.0f s of pings, a large part "
                    "of the %g s ttl; connect with Settings.for_lease(ttl) to move to another node in time",
                    agent_id, slow, ttl)


class Lease:
    """The beat loop: beat every `heartbeat` seconds, fence when the lease ran out, register again while fenced."""

    def __init__(self, agent: Agent, *, heartbeat: float, ttl: float) -> None:
        self._agent = agent
        self.heartbeat = heartbeat
        self.ttl = ttl
        self.stats = AgentStats()
        self._from = 0.0
        """When the lease was last renewed: the send time of the newest acknowledged beat (or registration)."""
        self._beat = 0

    def renewed_at(self, started: float) -> None:
        """A new incarnation: its lease runs from when its registration was sent."""
        self._from = started

    async def run(self) -> None:
        a = self._agent
        next_beat = time.monotonic()
        while not a._closing:
            if a.superseded:
                # Replaced by a newer process: it never beats or registers again, so this task is done
                # (waking up for a lease that can no longer be renewed would spin).
                return
            now = time.monotonic()
            if a.fenced is None and now >= next_beat:
                await self._send_beat()
                next_beat = now + self.heartbeat
                a._catch_up_on_writes()
            if a.fenced is None and now - self._from > self.ttl:
                a._fence(f"no heartbeat acknowledged for {now - self._from:.1f} s (ttl {self.ttl:g} s)")
            if a.fenced is not None and not a.superseded and not a._closing:
                await a.registration.again()
                next_beat = time.monotonic()
                continue
            wake = min(next_beat, self._from + self.ttl + 0.001)
            await asyncio.sleep(max(0.0, wake - time.monotonic()))

    async def _send_beat(self) -> None:
        a = self._agent
        self._beat += 1
        beat = ev.AgentHeartbeat(producer=a.producer, agent_id=a.agent_id, instance_id=a.instance_id,
                                 incarnation=a.incarnation, beat=self._beat, load=a.load,
                                 capacity=a.capacity, sessions=beat_sessions(set(a.sessions)))
        sent, incarnation = time.monotonic(), a.incarnation
        try:
            future = await a.store.submit(beat)
        except LedgerError as e:
            log.debug("%s: heartbeat not sent: %s", a.agent_id, e)
            return
        self.stats.beats_sent += 1
        future.add_done_callback(lambda f: self._on_ack(f, sent, incarnation))

    def _on_ack(self, future: asyncio.Future[int], sent: float, incarnation: int) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        self.stats.beats_acked += 1
        self.stats.ack_latencies.append(time.monotonic() - sent)
        if incarnation == self._agent.incarnation and self._agent.fenced is None:
            self._from = max(self._from, sent)
