"""`ledger session ...`, `ledger route ...`, `ledger unreachable`: writes any client may make."""

from __future__ import annotations

import base64
from datetime import datetime

import click
import msgspec

from ledger import lifecycle as lc
from ledger.events import Probe
from ledger.writer import Writer
from projections.history import session_as_of
from projections.text import printable
from projections.timespec import EXAMPLES

from .common import TimeParam, async_command, echo, nats_url_option, producer_id_option, settings_from, to_json


def checkpoint_data(data: bytes) -> tuple[str, str]:
    """(encoding, text) to show a checkpoint's bytes safely: as text if they are printable UTF-8 (newlines and
    tabs allowed), else as base64 - never raw bytes that could drive the terminal."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and text.replace("\n", "").replace("\t", "").isprintable():
        return "utf-8", text
    return "base64", base64.b64encode(data).decode("ascii")


def checkpoint_json(cp: lc.Checkpoint) -> dict[str, object]:
    encoding, shown = checkpoint_data(cp.data)
    return {"seq": cp.seq, "size": len(cp.data), "agent_id": cp.agent_id, "token": cp.token, "at": cp.at,
            "note": cp.note, "encoding": encoding, "data": shown}


def checkpoint_lines(cp: lc.Checkpoint) -> list[str]:
    encoding, shown = checkpoint_data(cp.data)
    head = (f"#{cp.seq} by {cp.agent_id} (token {cp.token}) at {cp.at}, {len(cp.data)} bytes"
            + (f" ({encoding})" if encoding != "utf-8" else "") + (f": {printable(cp.note)}" if cp.note else ""))
    return [head, *(shown.splitlines() or [""])] if cp.data else [head]


def _show(state: msgspec.Struct | None, last_seq: int, as_json: bool, what: str) -> None:
    if state is None:
        raise click.ClickException(f"{what} does not exist")
    checkpoint = state.checkpoint if isinstance(state, lc.SessionState) else None
    if as_json:
        doc: dict[str, object] = {"state": state, "last_seq": last_seq}
        if isinstance(state, lc.SessionState):  # the state has the bytes as base64; this says how to read them
            doc["checkpoint"] = checkpoint_json(checkpoint) if checkpoint is not None else None
        echo(to_json(doc))
        return
    for key, value in msgspec.structs.asdict(state).items():
        if key == "checkpoint":
            continue
        if value not in (None, "", {}, ()):
            echo(f"{key:>22}: {printable(str(value))}")  # a reason, a label: any client's text
    echo(f"{'last_seq':>22}: {last_seq}")
    if checkpoint is not None:
        first, *rest = checkpoint_lines(checkpoint)
        echo(f"{'checkpoint':>22}: {first}")
        for line in rest:
            echo(f"{'':>22}  | {line}")


@click.group("session")
def session_group() -> None:
    """Create, inspect and terminate sessions (bound to a pool, never to an agent)."""


@session_group.command("create")
@click.option("--pool", required=True)
@click.option("--platform", default="default", show_default=True)
@click.option("--region", default="default", show_default=True)
@click.option("--session-id", default=None, help="Default: a new random id.")
@click.option("--idle-ttl", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds of idleness after which the session may be released.")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="Repeatable.")
@nats_url_option
@producer_id_option
@async_command
async def session_create(pool: str, platform: str, region: str, session_id: str | None, idle_ttl: float | None,
                         labels: tuple[str, ...], nats_url: str, producer_id: str) -> None:
    """Create a session; an agent of its pool will claim it."""
    label_map = {}
    for item in labels:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--label")
        label_map[key] = value
    async with Writer.connect(settings_from(nats_url), producer_id=producer_id) as ledger:
        sid, seq = await ledger.create_session(pool, session_id=session_id, platform=platform, region=region,
                                               labels=label_map, idle_ttl=idle_ttl)
    echo(f"created session {sid} in pool {pool}/{platform}/{region} (#{seq})")


@session_group.command("terminate")
@click.argument("session_id")
@click.option("--reason", default="", help="Why, for the log.")
@nats_url_option
@producer_id_option
@async_command
async def session_terminate(session_id: str, reason: str, nats_url: str, producer_id: str) -> None:
    """End a session for good."""
    async with Writer.connect(settings_from(nats_url), producer_id=producer_id) as ledger:
        seq = await ledger.terminate_session(session_id, reason=reason)
    echo(f"terminated session {session_id} (#{seq})")


@session_group.command("show")
@click.argument("session_id")
@click.option("--json", "as_json", is_flag=True, help="JSON output (a checkpoint's bytes as text or base64, "
                                                      "with its size).")
@click.option("--as-of", "as_of", type=TimeParam(), default=None, help=f"The session as it was at TIME: {EXAMPLES}.")
@click.option("--at-seq", type=click.IntRange(min=0), default=None, metavar="N",
              help="The session as it was just after LEDGER stream sequence N.")
@nats_url_option
@async_command
async def session_show(session_id: str, as_json: bool, as_of: datetime | None, at_seq: int | None,
                       nats_url: str) -> None:
    """A session's current state, folded from its history, with the newest checkpoint its owners recorded.

    \b
    Example:
      ledger session show s-42
      ledger session show s-42 --as-of '10 minutes ago' --json
    """
    if as_of is not None and at_seq is not None:
        raise click.UsageError("use --as-of or --at-seq, not both")
    async with Writer.connect(settings_from(nats_url)) as ledger:
        if as_of is None and at_seq is None:
            state, last = await ledger.session(session_id)
        else:
            state, last = await session_as_of(ledger.store, session_id, seq=at_seq, time=as_of)
    _show(state, last, as_json, f"session {session_id}" + (" at that point" if as_of or at_seq is not None else ""))


@click.group("route")
def route_group() -> None:
    """Create routes (serving replicas) and move them along their lifecycle.

    \b
    PENDING -> STARTING -> WARMING_UP -> RUNNING (traffic ACTIVE)
    STARTING -> FAILED_TO_START;  WARMING_UP -> TERMINATING
    any live state -> TERMINATING -> TERMINATED
    """


@route_group.command("create")
@click.argument("route_id")
@click.option("--session", "session_id", required=True, help="The session that serves this route.")
@click.option("--endpoint", required=True)
@click.option("--deployment", default="")
@click.option("--probe/--no-probe", default=True, show_default=True, help="Whether a health probe gates RUNNING.")
@click.option("--initial-delay", type=float, default=60.0, show_default=True,
              help="Seconds a WARMING_UP route has to pass its first probe.")
@click.option("--stale-after", type=float, default=30.0, show_default=True,
              help="Seconds after which a health report counts as stale.")
@click.option("--start-timeout", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
              help="Seconds a STARTING route may take.")
@click.option("--stop-timeout", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
              help="Seconds a TERMINATING route may take.")
@click.option("--on-stale", type=click.Choice(["ignore", "deactivate", "terminate"]), default="deactivate",
              show_default=True, help="What the watchdog does with a RUNNING route whose health went stale.")
@nats_url_option
@producer_id_option
@async_command
async def route_create(route_id: str, session_id: str, endpoint: str, deployment: str, probe: bool,
                       initial_delay: float, stale_after: float, start_timeout: float, stop_timeout: float,
                       on_stale: str, nats_url: str, producer_id: str) -> None:
    """Create a route in PENDING for a session."""
    spec = Probe(initial_delay=initial_delay, stale_after=stale_after, on_stale=on_stale) if probe else None
    async with Writer.connect(settings_from(nats_url), producer_id=producer_id) as ledger:
        seq = await ledger.create_route(route_id, session_id=session_id, endpoint=endpoint, deployment=deployment,
                                        probe=spec, start_timeout=start_timeout, stop_timeout=stop_timeout)
    echo(f"created route {route_id} for session {session_id} in PENDING (#{seq})")


@route_group.command("transition")
@click.argument("route_id")
@click.argument("to_state", type=click.Choice(lc.ROUTE_STATES, case_sensitive=False))
@click.option("--reason", default="")
@click.option("--address", default=None, help="host:port once the route's session runs.")
@click.option("--traffic", type=click.Choice([lc.TRAFFIC_ACTIVE, lc.TRAFFIC_INACTIVE]), default=None)
@nats_url_option
@producer_id_option
@async_command
async def route_transition(route_id: str, to_state: str, reason: str, address: str | None, traffic: str | None,
                           nats_url: str, producer_id: str) -> None:
    """Move a route to TO_STATE (refused, naming both states, when illegal)."""
    async with Writer.connect(settings_from(nats_url), producer_id=producer_id) as ledger:
        before, _ = await ledger.route(route_id)
        seq = await ledger.transition_route(route_id, to_state.upper(), reason=reason, address=address,
                                            traffic=traffic)
    echo(f"route {route_id}: {before.state if before else '?'} -> {to_state.upper()} (#{seq})")


@route_group.command("health")
@click.argument("route_id")
@click.option("--healthy/--unhealthy", required=True)
@click.option("--detail", default="")
@nats_url_option
@producer_id_option
@async_command
async def route_health(route_id: str, healthy: bool, detail: str, nats_url: str, producer_id: str) -> None:
    """Report a health probe result for a route."""
    async with Writer.connect(settings_from(nats_url), producer_id=producer_id) as ledger:
        state, _ = await ledger.route(route_id)
        if state is None:
            raise click.ClickException(f"route {route_id} does not exist")
        seq = await ledger.report_health(route_id, healthy=healthy, detail=detail)
    echo(f"route {route_id}: {'healthy' if healthy else 'unhealthy'} (#{seq})")


@route_group.command("show")
@click.argument("route_id")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@nats_url_option
@async_command
async def route_show(route_id: str, as_json: bool, nats_url: str) -> None:
    """A route's current state, folded from its history."""
    async with Writer.connect(settings_from(nats_url)) as ledger:
        state, last = await ledger.route(route_id)
    _show(state, last, as_json, f"route {route_id}")


@click.command("unreachable")
@click.argument("agent_id")
@click.option("--error", default="", help="What failed (connection refused, timeout ...).")
@nats_url_option
@producer_id_option
@async_command
async def unreachable_command(agent_id: str, error: str, nats_url: str, producer_id: str) -> None:
    """Report that this client failed to reach AGENT_ID (usage-time failure report)."""
    async with Writer.connect(settings_from(nats_url), producer_id=producer_id) as ledger:
        seq = await ledger.report_unreachable(agent_id, error=error)
    echo(f"reported {agent_id} unreachable (#{seq})")
