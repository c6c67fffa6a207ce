"""The projections' error hierarchy.

Every class derives from `ledger.errors.LedgerError`, so the `ledger` command
line turns each into a one-line message (never a traceback), exactly like the
ledger's own errors.
"""

from __future__ import annotations

from ledger.errors import InvalidInput, LedgerError


class ProjectionError(LedgerError):
    """Base of every error the projections raise on purpose."""


class DatabaseMissing(ProjectionError):
    """The projection's SQLite file does not exist (the projector has not run yet)."""


class DatabaseBusy(ProjectionError):
    """Another projector (or a rebuild) holds the projection's file."""


class StreamChanged(ProjectionError):
    """The projection was built from another stream than the one the server holds now."""


class InvalidQuery(ProjectionError, InvalidInput):
    """A query asked for something that cannot be answered: a bad filter, time or sequence."""


class UnknownEntity(ProjectionError, LookupError):
    """The ledger holds no event for the entity asked about."""


class NeedsEventStore(ProjectionError):
    """The query needs JetStream (time travel, history) but no event store was given."""


class NotCaughtUp(ProjectionError, TimeoutError):
    """The projector did not reach the streams' ends in the time it was given (`Projector.ready`)."""
