"""Dead letters: a stored message that is not an event goes to `ledger.dlq.<stream>.<reason>`.

The letter's format is `ledger.dlq`'s and the store publishes it (`EventStore.dead_letter`); what the projections
add is the reason's short code in the subject (`state.dead_letter_code`, the same the anomaly counts use).
"""

from __future__ import annotations

from ledger.codec import Unreadable
from ledger.errors import StoreError
from ledger.store import EventStore

from .errors import ProjectionError
from .state import dead_letter_code


async def publish(store: EventStore, item: Unreadable, *, consumer: str) -> None:
    """Publish one dead letter, retrying while the server does not answer (for the store's append deadline)."""
    try:
        await store.dead_letter(item, reason=dead_letter_code(item.reason), consumer=consumer)
    except StoreError as e:
        raise ProjectionError(str(e)) from None
