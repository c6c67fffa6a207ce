"""What every `ledger` command shares: the NATS URL option, settings, async running, clean errors."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click

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
