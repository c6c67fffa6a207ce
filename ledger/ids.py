"""Identifiers: what a valid agent, session, route, pool or producer id looks like."""

from __future__ import annotations

import re
import uuid
from typing import Annotated

import msgspec

from .errors import InvalidInput

# Every id becomes one token of a NATS subject, so it may not contain '.', '*',
# '>' or whitespace. We allow a conservative alphabet that also reads well in
# URLs and file names, and bound the length so subjects stay short.
TOKEN_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_\-:@=+~]{0,127}\Z"  # \Z: "$" would accept a trailing newline
_TOKEN_RE = re.compile(TOKEN_PATTERN)

Token = Annotated[str, msgspec.Meta(pattern=TOKEN_PATTERN)]
"""A string that is a valid id (checked whenever an event is decoded)."""


def check_token(value: object, what: str = "id") -> str:
    """Return `value` if it is a valid id, else raise InvalidInput saying why."""
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string, got {type(value).__name__}")
    if not _TOKEN_RE.match(value):
        raise InvalidInput(
            f"invalid {what} {value!r}: use 1-128 characters from A-Z a-z 0-9 _ - : @ = + ~, "
            "starting with a letter or digit (no dots, spaces or wildcards)"
        )
    return value


def new_id() -> str:
    """A fresh random id (32 hex characters) for events and process instances."""
    return uuid.uuid4().hex
