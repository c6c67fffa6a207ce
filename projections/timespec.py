"""Times as people type them, and the one rule for times without an offset.

The one time grammar: ISO-8601 or relative to now ("-5m", "-1h30m", "90s ago",
"now"). Every command's time option (`--as-of`, `--since`, `--until`) and the
query service read it here. A time without an offset is UTC - typed by a
person, or stored by a producer that left the offset out (`aware`).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from .errors import InvalidQuery

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_RELATIVE = re.compile(r"^(?:-\s*((?:\d+(?:\.\d+)?[smhdw])+)|((?:\d+(?:\.\d+)?[smhdw])+)\s+ago)$")

EXAMPLES = "ISO-8601 (2026-11-01T14:03:00Z, 2026-11-01 14:03) or relative (-5m, -1h30m, 90s ago, now)"

EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = EARLIEST + timedelta(microseconds=(2**63 - 1) // 1000)
"""The times the ledger can hold: stored times are nanoseconds since the epoch in a signed 64-bit integer."""


def aware(when: datetime) -> datetime:
    """`when`, read as UTC if it carries no offset (so arithmetic and comparisons never fail)."""
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """An aware datetime from ISO-8601 or a relative form; InvalidQuery (one line) says what is accepted."""
    now = now or datetime.now(UTC)
    value = text.strip().lower()
    if value == "now":
        return now
    m = _RELATIVE.match(value)
    if m:
        spec = m.group(1) or m.group(2)
        seconds = sum(float(n) * _UNITS[u] for n, u in _PART.findall(spec))
        try:
            return _in_range(text, now - timedelta(seconds=seconds))
        except (OverflowError, ValueError):  # further back than a datetime reaches
            raise _out_of_range(text) from None
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidQuery(f"{text!r} is not a time: use {EXAMPLES}") from None
    return _in_range(text, aware(parsed))


def _in_range(text: str, when: datetime) -> datetime:
    if not EARLIEST <= when <= LATEST:
        raise _out_of_range(text)
    return when


def _out_of_range(text: str) -> InvalidQuery:
    return InvalidQuery(f"{text!r} is out of range: the ledger's times run from {EARLIEST:%Y-%m-%d} "
                        f"to {LATEST:%Y-%m-%d}")


_DURATION = re.compile(r"^(?:\d+(?:\.\d+)?[smhdw])+$")


def parse_duration(text: str) -> float:
    """Seconds from "90", "90s", "1m30s", "2h" (the relative times' units); InvalidQuery says what is accepted."""
    value = text.strip().lower()
    try:
        return float(value)
    except ValueError:
        pass
    if not _DURATION.match(value):
        raise InvalidQuery(f"{text!r} is not a duration: use seconds (60) or units (60s, 1m30s, 2h)")
    return sum(float(n) * _UNITS[u] for n, u in _PART.findall(value))
