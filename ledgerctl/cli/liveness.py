"""The liveness policy's options, for every command that judges agents by time.

`ledger consumers`, `ledger up`, `ledger agent`, `ledger agents` and `ledger pools` take the same
`--suspect-after` and `--dead-after`, and fall back on the same variables
(LEDGER_SUSPECT_AFTER_MISSED, LEDGER_DEAD_AFTER): one
policy, so the views show what the monitor declares and the claimers act on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from ledger.errors import LedgerError
from projections.errors import InvalidQuery
from projections.health import HealthPolicy
from projections.timespec import parse_duration


class Duration(click.ParamType):
    """Seconds, as a number (60) or with units (60s, 1m30s); positive."""

    name = "DURATION"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> object:
        if not isinstance(value, str):
            return value
        try:
            seconds = parse_duration(value)
        except InvalidQuery as e:
            self.fail(str(e), param, ctx)
        if not seconds > 0:
            self.fail(f"{value!r} must be more than 0 seconds", param, ctx)
        return seconds


Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def dead_after_option(default: str = "LEDGER_DEAD_AFTER, else each agent's ttl") -> Decorator:
    """--dead-after (a Duration, None when not given); `default` says in the help what applies then."""
    return click.option("--dead-after", type=Duration(), default=None,
                        help=f"Seconds without a heartbeat before an agent is dead (60, 60s, 2m) [default: {default}].")


def suspect_after_option(default: str = "LEDGER_SUSPECT_AFTER_MISSED, else 3") -> Decorator:
    """--suspect-after (None when not given); `default` says in the help what applies then."""
    return click.option("--suspect-after", type=click.IntRange(1), default=None,
                        help=f"Missed heartbeat intervals before an agent is suspect [default: {default}].")


def policy_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--suspect-after and --dead-after; the command receives `policy`, a HealthPolicy (place above the
    command's own function, under @click.command)."""
    @functools.wraps(f)
    def wrapper(*args: Any, suspect_after: int | None, dead_after: float | None, **kwargs: Any) -> Any:
        return f(*args, policy=policy_from(suspect_after, dead_after), **kwargs)

    return suspect_after_option()(dead_after_option()(wrapper))


def policy_from(suspect_after: int | None, dead_after: float | None) -> HealthPolicy:
    """The policy from the environment, then the flags given (a bad variable is a one-line error)."""
    try:
        return HealthPolicy.from_env(suspect_after_missed=suspect_after, dead_after=dead_after)
    except LedgerError as e:
        raise click.ClickException(str(e)) from None
