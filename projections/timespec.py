"""Times as people type them: ISO-8601 or relative to now ("-5m", "90s ago", "now").

Shared by the CLI, and by the query service and HTTP API that take the same
strings. A time without an offset is UTC.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

from .errors import InvalidQuery

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_RELATIVE = re.compile(r"^(?:-\s*((?:\d+(?:\.\d+)?[smhdw])+)|((?:\d+(?:\.\d+)?[smhdw])+)\s+ago)$")

EXAMPLES = "ISO-8601 (2026-11-01T14:03:00Z, 2026-11-01 14:03) or relative (-5m, -1h30m, 90s ago, now)"


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """An aware datetime from ISO-8601 or a relative form; InvalidQuery says what is accepted."""
    now = now or datetime.now(timezone.utc)
    value = text.strip().lower()
    if value == "now":
        return now
    m = _RELATIVE.match(value)
    if m:
        spec = m.group(1) or m.group(2)
        seconds = sum(float(n) * _UNITS[u] for n, u in _PART.findall(spec))
        return now - timedelta(seconds=seconds)
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidQuery(f"cannot read {text!r} as a time: use {EXAMPLES}") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=timezone.utc)
