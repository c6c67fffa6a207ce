"""What every `ledger` command shares: the NATS URL and credential options, settings, async running, clean errors."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click
import msgspec

from ledger.errors import LedgerError
from ledger.settings import DEFAULT_NATS_URL, ENV_PREFIX, Settings
from projections.errors import InvalidQuery
from projections.timespec import parse_time

T = TypeVar("T")


_SECURITY_OPTIONS = [
    # (flag, Settings field, help)
    ("--creds", "creds_file", "NATS credentials file (.creds: user JWT and nkey seed)."),
    ("--nkey-seed", "nkey_seed_file",
     "File holding an nkey user seed (SU...); the server lists the user's public key."),
    ("--user", "user", "NATS user name (with --password)."),
    ("--password", "password", ("NATS password for --user. Prefer the environment variable: a command line is "
                                "visible to every user of the machine.")),
    ("--token", "token", "NATS authentication token. Prefer the environment variable, as for --password."),
    ("--tls-ca", "tls_ca_file", "CA certificate (PEM) that signed the server's certificate [default: the system's]."),
    ("--tls-cert", "tls_cert_file", "Client certificate (PEM) for servers that verify clients (mutual TLS)."),
    ("--tls-key", "tls_key_file", "Private key (PEM) of --tls-cert."),
]
_META_KEY = "ledger.connection"


def connection_options(f: Callable[..., Any] | None = None, *, url_default: str | None = DEFAULT_NATS_URL,
                       url_help: str = "NATS server(s) to use, comma-separated for a cluster (nats:// or tls://)."
                       ) -> Any:
    """--nats-url and the credential and TLS options, for every command that connects.

    The command receives only `nats_url`; the rest waits in the click context for `settings_from`, so a
    command needs no change to be secured. Each option can also come from LEDGER_<SETTING>.
    """
    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            ctx = click.get_current_context()
            ctx.meta[_META_KEY] = {field: kwargs.pop(field) for _, field, _ in _SECURITY_OPTIONS}
            return f(*args, **kwargs)

        for flag, field, help_text in reversed(_SECURITY_OPTIONS):
            wrapper = click.option(flag, field, envvar=ENV_PREFIX + field.upper(), default=None, show_envvar=True,
                                   metavar="FILE" if field.endswith("_file") else "TEXT", help=help_text)(wrapper)
        return click.option("--nats-url", envvar="LEDGER_NATS_URL", default=url_default,
                            show_default=url_default is not None, show_envvar=True, help=url_help)(wrapper)

    return decorate(f) if f is not None else decorate


nats_url_option = connection_options


def settings_from(nats_url: str | None, **overrides: Any) -> Settings:
    """Settings from the environment, the command's --nats-url and connection options, and `overrides`."""
    ctx = click.get_current_context(silent=True)
    security = ctx.meta.get(_META_KEY, {}) if ctx is not None else {}
    return Settings.from_env(nats_url=nats_url, **{**security, **overrides})


def embedded_settings(url: str, **overrides: Any) -> Settings:
    """Settings for the embedded server a command started itself: it has no users and no TLS, so credentials
    and TLS meant for another server (LEDGER_TLS_CA_FILE in the environment, say) do not apply to it."""
    return Settings.from_env(nats_url=url, **overrides).without_credentials()


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


class TimeParam(click.ParamType):
    """A time option (--as-of, --since, --until): the one grammar, `projections.timespec.parse_time`.

    A time it cannot read, or one out of the ledger's range, is a usage error (exit code 2: `ledger check`
    exits 1 for violations) in one line - "Error: Invalid value for '--as-of': ..." - without the usage
    lines click would add.
    """

    name = "TIME"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> object:
        if not isinstance(value, str):
            return value
        try:
            return parse_time(value)
        except InvalidQuery as e:
            hint = param.get_error_hint(ctx) if param is not None and ctx is not None else "the time"
            raise TimeUsageError(f"Invalid value for {hint}: {e}") from None


class TimeUsageError(click.ClickException):
    exit_code = 2


def to_json(value: object) -> str:
    return msgspec.json.encode(value).decode()


def producer_id_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--as", "producer_id", envvar="LEDGER_PRODUCER_ID", default="cli", show_default=True,
                        show_envvar=True, help="Producer id written on the events (the last subject token).")(f)
