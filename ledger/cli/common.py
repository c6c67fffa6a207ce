"""What every `ledger` command shares: the NATS URL option, settings, async running, clean errors."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import click
import msgspec

from ..errors import LedgerError
from ..settings import DEFAULT_NATS_URL, Settings

T = TypeVar("T")


def nats_url_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--nats-url", envvar="LEDGER_NATS_URL", default=DEFAULT_NATS_URL, show_default=True, show_envvar=True,
        help="NATS server(s) to use, comma-separated for a cluster.",
    )(f)


def settings_from(nats_url: str | None, **overrides: Any) -> Settings:
    return Settings.from_env(nats_url=nats_url, **overrides)


def run(coro: Awaitable[T]) -> T:
    """Run a command's coroutine; LedgerError becomes a one-line message and exit code 1."""
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except LedgerError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        sys.exit(130)


def async_command(f: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return run(f(*args, **kwargs))

    return wrapper


def stop_signals() -> asyncio.Event:
    """An event set by the first SIGINT or SIGTERM (the loop keeps running to shut down cleanly)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def echo(msg: str) -> None:
    click.echo(msg)


_RELATIVE = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(value: str) -> datetime:
    """ISO-8601 (naive means UTC), 'now', or relative like -5m, -2h, -30s, -1d."""
    text = value.strip()
    now = datetime.now(timezone.utc)
    if text == "now":
        return now
    if len(text) >= 3 and text[0] == "-" and text[-1] in _RELATIVE and text[1:-1].replace(".", "", 1).isdigit():
        return now - timedelta(seconds=float(text[1:-1]) * _RELATIVE[text[-1]])
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a time: use ISO-8601 (2026-11-22T14:03:00Z), 'now' or -5m/-2h/-1d")
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


class TimeParam(click.ParamType):
    name = "TIME"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> object:
        if not isinstance(value, str):
            return value
        try:
            return parse_time(value)
        except click.BadParameter as e:
            self.fail(e.message, param, ctx)


def to_json(value: object) -> str:
    return msgspec.json.encode(value).decode()


def producer_id_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--as", "producer_id", envvar="LEDGER_PRODUCER_ID", default="cli", show_default=True,
                        show_envvar=True, help="Producer id written on the events (the last subject token).")(f)
