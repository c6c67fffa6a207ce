"""Session ledger: an event-sourced ledger of agents, sessions and routes on NATS JetStream."""

from .codec import Recorded, Unreadable
from .errors import (
    AppendTimeout,
    Conflict,
    DecodeFailed,
    InvalidInput,
    LedgerError,
    StoreError,
    StreamMismatch,
    StreamMissing,
    Unavailable,
)
from .events import *  # noqa: F403 - the event types are the package's vocabulary
from .events import __all__ as _event_names
from .settings import Settings
from .store import EventStore

__version__ = "0.1.0"

__all__ = [  # noqa: PLE0604 - _event_names is events.__all__, strings ruff cannot see through the import
    *_event_names,
    "AppendTimeout",
    "Conflict",
    "DecodeFailed",
    "EventStore",
    "InvalidInput",
    "LedgerError",
    "Recorded",
    "Settings",
    "StoreError",
    "StreamMismatch",
    "StreamMissing",
    "Unavailable",
    "Unreadable",
]
