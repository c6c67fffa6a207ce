"""The consumers' error hierarchy.

Every class derives from `ledger.errors.LedgerError`, so the `ledger` command line turns each into one line.
A consumer decides on its in-memory view of the log; when the entity is no longer as it judged it (a replica,
a self-claiming agent or the owner moved it first) the decision no longer applies. That is `Moved`, the
consumers' own word: the store's `Conflict` (a compare-and-set append that lost) is translated into it where
a consumer calls the store, so nothing above mistakes one consumer's judgement for a store failure.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ledger.errors import Conflict, LedgerError


class ConsumerError(LedgerError):
    """Base of every error the consumers raise on purpose."""


class Moved(ConsumerError):
    """The entity moved on since the consumer judged it: nothing was written, and nothing needs to be."""

    def __init__(self, kind: str, entity_id: str, why: str) -> None:
        self.kind = kind
        self.entity_id = entity_id
        super().__init__(f"{kind} {entity_id} moved on: {why}")


@contextlib.contextmanager
def moved_on_conflict(kind: str, entity_id: str) -> Iterator[None]:
    """The boundary: a compare-and-set that kept losing while the consumer decided again means `Moved`."""
    try:
        yield
    except Conflict as e:
        raise Moved(kind, entity_id, str(e)) from e
