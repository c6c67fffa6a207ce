"""What every `ledger` command shares: the NATS URL and credential options, settings, async running, clean errors."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import sqlite3
import ssl
import sys
import tempfile
import traceback
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import click
import msgspec

from ledger.connection import is_client_error
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
    """Run a command's coroutine (its failures reach `LedgerGroup`, the one boundary); Ctrl-C exits 130."""
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except KeyboardInterrupt:
        sys.exit(130)


def async_command(f: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return run(f(*args, **kwargs))

    return wrapper


# --- the error boundary: every failure of every command becomes one line ------------------------------------------

BUG_EXIT = 70
"""Exit code of a failure nobody expected (EX_SOFTWARE): a bug, whatever the input."""


class LedgerGroup(click.Group):
    """The `ledger` group, and the command line's one error boundary.

    Every failure a user can cause - a refused connection, a path that cannot be used, a file that is not what
    it should be - leaves a command as an exception of a known class; here each becomes one `Error:` line and
    exit code 1. Anything else is a bug: one line saying so, and where its traceback was saved. With -v the
    traceback is shown on stderr as well, for either.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except BrokenPipeError:
            raise  # click's main exits quietly when the reader of our output goes away
        except Exception as e:  # noqa: BLE001 - the CLI's last line: a known failure as one line, else a bug report
            verbose = int(ctx.params.get("verbose") or 0)
            if verbose:
                show_traceback(e)
            message = failure_message(e)
            if message is not None:
                raise click.ClickException(_one_line(message) if "\n" in message else message) from None
            raise BugReport(bug_message(e, "traceback above" if verbose else save_traceback(e))) from None


class BugReport(click.ClickException):
    exit_code = BUG_EXIT


def failure_message(e: BaseException) -> str | None:
    """The one line for a failure of a known class; None when it is not one (a bug)."""
    if isinstance(e, BaseExceptionGroup):  # a task group: every part expected, else it is a bug
        messages = [failure_message(part) for part in _leaves(e)]
        return None if any(m is None for m in messages) else "; ".join(dict.fromkeys(m for m in messages if m))
    if isinstance(e, LedgerError):
        return str(e) or type(e).__name__
    if isinstance(e, ssl.SSLError):  # before OSError, of which it is one
        return f"TLS: {e.reason or e}"
    if is_client_error(e):  # one nats-py error that nothing below mapped
        return _one_line(str(e) or type(e).__name__)
    if isinstance(e, OSError):
        return _os_error(e)
    if isinstance(e, sqlite3.OperationalError) or type(e) is sqlite3.DatabaseError:  # the file, not our SQL
        return f"SQLite: {_one_line(str(e))}"
    return None


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    return [leaf for part in group.exceptions
            for leaf in (_leaves(part) if isinstance(part, BaseExceptionGroup) else [part])]


def _os_error(e: OSError) -> str:
    """'PATH: what is wrong with it' - a missing parent, a file where a directory should be, no permission."""
    if e.filename is None:  # a refused connection, a timeout (TimeoutError is an OSError)
        return _one_line(e.strerror or str(e)) or type(e).__name__
    given = os.fsdecode(e.filename)
    path = given if os.path.isabs(given) else f"{given} (in {os.getcwd()})"
    if isinstance(e, FileExistsError) and os.path.isfile(given):  # mkdir of a directory whose place a file holds
        return f"{path} is a file, where a directory should be"
    return f"{path}: {e.strerror or e}" + (f" ({os.fsdecode(e.filename2)})" if e.filename2 else "")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def save_traceback(e: BaseException) -> str | None:
    """Write the traceback to a file of its own for the bug report: "traceback in PATH", or None if that failed."""
    try:
        fd, path = tempfile.mkstemp(prefix="ledger-traceback-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            traceback.print_exception(e, file=f)
    except OSError:
        return None
    return f"traceback in {path}"


def bug_message(e: BaseException, traceback_at: str | None) -> str:
    """`traceback_at`: where the traceback is ("traceback above", "traceback in PATH"), None when nowhere."""
    where = traceback_at or "run with -v to see the traceback"
    return f"internal error (a bug in ledger): {type(e).__name__}: {_one_line(str(e))[:160]}; {where}"


def stop_signals() -> asyncio.Event:
    """An event set by the first SIGINT or SIGTERM (the loop keeps running to shut down cleanly)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


LOG_FORMATS = ("text", "json")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per record and line (for log shippers): time, level, logger, message, and the exception's
    traceback (`exc_info`) or the stack (`stack_info`) when the record has one."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return msgspec.json.encode(doc).decode()  # one line: newlines inside strings are escaped


_json_logs = False
"""Whether stderr carries JSON log records (`setup_logging`): a traceback then goes there as one, not as text."""


def show_traceback(e: BaseException) -> None:
    """A failure's traceback on stderr (with -v): as text, or as one JSON log record with --log-format json."""
    if _json_logs:
        logging.getLogger("ledgerctl.cli").error("%s: %s", type(e).__name__, e, exc_info=e)
    else:
        traceback.print_exception(e, file=sys.stderr)


def setup_logging(verbose: int, log_format: str = "text") -> None:
    global _json_logs  # noqa: PLW0603 - one process, one log format, set once by the `ledger` group
    _json_logs = log_format == "json"
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if log_format == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


def echo(msg: str) -> None:
    click.echo(msg)


def warn(msg: str) -> None:
    """A line on stderr for a setting that works but is likely not what was meant."""
    click.echo(f"warning: {msg}", err=True)


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
