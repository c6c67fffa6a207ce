"""`ledger drain AGENT`: ask an agent to hand its sessions off and stop taking claims (as `nomad node drain`).

The command writes an operator's request (`agent.drain_requested`) for the agent's current incarnation; the agent
itself answers with `draining`, the reclaimer moves its sessions to other agents of its pool, and the agent says
`drained` once it owns none. `--wait` follows that to the end, bounded by the deadline.
"""

from __future__ import annotations

import asyncio
import re
import time
from datetime import datetime

import click

from ledger import events as ev
from ledger import lifecycle as lc
from ledger.codec import Recorded
from ledger.writer import Writer

from .common import async_command, echo, nats_url_option, producer_id_option, settings_from

POLL_INTERVAL = 0.5
"""Seconds between two reads of the agent's state while --wait follows the drain."""

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^(?:\d+(?:\.\d+)?[smhd])+$")
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


class DurationParam(click.ParamType):
    """A duration as people type it: `90` (seconds), `90s`, `10m`, `1h30m`, `2d`."""

    name = "DURATION"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> object:
        if isinstance(value, int | float):
            return float(value)
        text = str(value).strip().lower()
        try:
            seconds = float(text) if not _DURATION.match(text) else sum(
                float(n) * _UNITS[u] for n, u in _PART.findall(text))
        except ValueError:
            self.fail(f"{value!r} is not a duration: use seconds (90) or units (90s, 10m, 1h30m, 2d)", param, ctx)
        if not 0 < seconds <= ev.MAX_SECONDS:
            self.fail(f"{value!r} must be more than 0 s and at most {ev.MAX_SECONDS:.0f} s", param, ctx)
        return seconds


class NotDrained(click.ClickException):
    """--wait ended without the agent's `drained`: exit code 1, one line."""


@click.command("drain")
@click.argument("agent_id", metavar="AGENT")
@click.option("--deadline", type=DurationParam(), default="1h", show_default=True,
              help="How long the agent has to hand its sessions off (90s, 10m, 1h30m).")
@click.option("--reason", default="", help="Why, for the log (shown in the agent's status).")
@click.option("--incarnation", type=click.IntRange(min=1), default=None,
              help="Drain only this incarnation (refused when it is no longer the agent's current one).")
@click.option("--wait", is_flag=True, help="Wait until the agent wrote `drained` (at most until the deadline), "
              "showing its sessions left.")
@nats_url_option
@producer_id_option
@async_command
async def drain_command(agent_id: str, deadline: float, reason: str, incarnation: int | None, wait: bool,
                        nats_url: str, producer_id: str) -> None:
    """Drain AGENT: it takes no new claims and its sessions move to other agents of its pool.

    The agent answers the request itself (it writes `draining`, then `drained` once its sessions were handed
    off); a request names one incarnation, so it never drains a process that registered since.

    \b
    ledger drain a1 --deadline 10m --reason "kernel upgrade" --wait
    """
    async with Writer.connect(settings_from(nats_url), producer_id=producer_id) as ledger:
        seq, request = await ledger.request_drain(agent_id, deadline=deadline, reason=reason,
                                                  incarnation=incarnation)
        echo(f"drain of agent {agent_id} (incarnation {request.incarnation}) requested (#{seq}), "
             f"deadline {request.deadline:%Y-%m-%d %H:%M:%S} UTC")
        if wait:
            await _wait_drained(ledger, request)


async def _wait_drained(ledger: Writer, request: ev.AgentDrainRequested) -> None:
    """Follow the drain until the agent's `drained`, printing each change of its status or sessions left."""
    agent_id, incarnation = request.agent_id, request.incarnation
    shown: tuple[str, int | None] | None = None
    end = time.monotonic() + max(0.0, (request.deadline - ev.utcnow()).total_seconds())
    while True:  # bounded: until the deadline, POLL_INTERVAL apart
        state, _ = await ledger.agent(agent_id)
        if state is None or state.incarnation != incarnation:
            raise NotDrained(f"agent {agent_id} registered again (incarnation "
                             f"{state.incarnation if state else '?'}) before incarnation {incarnation} drained")
        left = await _sessions_left(ledger, agent_id, incarnation)
        if (state.status, left) != shown:
            shown = (state.status, left)
            echo(f"  {agent_id}: {state.status}" + (f", {left} session(s) left" if left is not None else "")
                 + ("" if state.status != lc.A_DRAINING else f" ({_remaining(request.deadline)} to the deadline)"))
        if state.status == lc.A_DRAINED:
            echo(f"agent {agent_id} drained (#{state.status_seq})")
            return
        if state.status not in (lc.A_ALIVE, lc.A_DRAINING):
            raise NotDrained(f"agent {agent_id} is {state.status} ({state.reason}); it will not write drained")
        if time.monotonic() >= end:
            raise NotDrained(f"agent {agent_id} did not drain by the deadline: it is {state.status}"
                             + (f" with {left} session(s) left" if left is not None else ""))
        await asyncio.sleep(min(POLL_INTERVAL, max(0.0, end - time.monotonic())))


async def _sessions_left(ledger: Writer, agent_id: str, incarnation: int) -> int | None:
    """Sessions the agent's newest heartbeat of this incarnation lists (None: no such beat)."""
    last = await ledger.store.last("hb", agent_id)
    if isinstance(last, Recorded) and isinstance(last.event, ev.AgentHeartbeat) \
            and last.event.incarnation == incarnation:
        return len(last.event.sessions)
    return None


def _remaining(deadline: datetime) -> str:
    seconds = max(0, int((deadline - ev.utcnow()).total_seconds()))
    minutes, s = divmod(seconds, 60)
    return f"{minutes}m{s:02d}s" if minutes else f"{s}s"
