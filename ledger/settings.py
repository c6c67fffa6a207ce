"""Settings: one frozen object, built from defaults, the environment and flags (in that order)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec

from .errors import ConfigError

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
ENV_PREFIX = "LEDGER_"
MIN_PING_INTERVAL = 0.5
MIN_CONNECT_TIMEOUT = 1.0
MIN_REQUEST_TIMEOUT = 1.0
"""Floors of `Settings.for_lease`: below them a busy machine looks like a dead server."""
SECRET_FIELDS = ("password", "token")
CONNECTION_FIELDS = ("creds_file", "nkey_seed_file", "user", "password", "token", "tls_ca_file", "tls_cert_file",
                     "tls_key_file")
"""How a connection proves who it is and whom it trusts: meant for one server, never carried to another."""
CREDENTIAL_KINDS = {"creds_file": "a creds file", "nkey_seed_file": "an nkey seed", "user": "a user and password",
                    "token": "a token"}

# scheme://userinfo@ - greedy up to the last @ of the URL, so a password holding an @ or a / (typed unencoded) is
# hidden whole; a NATS URL has no path, and hiding too much of a malformed one is the safe mistake.
_USERINFO = re.compile(r"^(\s*(?:[A-Za-z][A-Za-z0-9+.-]*://)?)(.*)@", re.DOTALL)


def redact_url(url: str) -> str:
    """The URL (or comma-separated URLs) with passwords and tokens replaced by ***: safe to print.

    nats://user:pass@host -> nats://user:***@host; nats://token@host -> nats://***@host.
    """
    def one(part: str) -> str:
        def hide(m: re.Match[str]) -> str:
            user, sep, _ = m[2].partition(":")
            return f"{m[1]}{user}:***@" if sep else f"{m[1]}***@"

        return _USERINFO.sub(hide, part, count=1)

    return ",".join(one(part) for part in url.split(","))



S = TypeVar("S", bound=msgspec.Struct)


def settings_from_env(cls: type[S], prefix: str, env: Mapping[str, str] | None, overrides: Mapping[str, Any],
                      *, extra: Mapping[str, Any] | None = None, what: str = "setting") -> S:
    """The one way settings come from the environment: `cls`'s defaults, then `extra` (values other variables
    gave), then <prefix><FIELD> variables (empty ones ignored), then `overrides` (None values ignored).

    A value that does not convert, or that `cls` refuses, is a ConfigError naming it (one line, no traceback).
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = dict(extra or {})
    for name in cls.__struct_fields__:
        raw = env.get(prefix + name.upper())
        if raw is not None and raw != "":
            values[name] = raw
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        # strict=False converts "3" -> 3 and "1.5" -> 1.5 from the environment.
        return msgspec.convert(values, cls, strict=False)
    except msgspec.ValidationError as e:
        raise ConfigError(f"invalid {what}: {e}") from None


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """How to reach JetStream and how the ledger's streams are shaped.

    Every field can be set from the environment as LEDGER_<FIELD> (for example
    LEDGER_NATS_URL, LEDGER_REPLICAS); explicit keyword arguments win.
    """

    nats_url: str = DEFAULT_NATS_URL
    replicas: int | None = None
    """Stream replicas: 1 on the embedded server, 3 on a cluster. None: 1 for a new stream, and an existing
    one keeps what it has (so a command run without it never shrinks a cluster's R3 streams)."""
    duplicate_window: float = 120.0
    """Seconds inside which a retried event id is recognised as the same fact."""
    heartbeat_max_age: float = 24 * 3600.0
    """Heartbeats older than this leave the heartbeat stream."""
    heartbeat_per_agent: int = 17_280
    """At most this many heartbeats are kept per agent (24 h at the 5 s default)."""
    dlq_max_age: float = 7 * 24 * 3600.0
    request_timeout: float = 5.0
    """Seconds to wait for one JetStream acknowledgement or API reply."""
    append_deadline: float = 15.0
    """Seconds an append keeps retrying (same event id) before giving up as ambiguous."""
    connect_timeout: float = 2.0
    """Seconds one connection attempt to one server may take (a frozen server accepts and never answers)."""
    ping_interval: float = 2.0
    """Seconds between the client's pings. A server that leaves `max_outstanding_pings` of them unanswered
    is given up for another node of the cluster: a frozen node costs (1 + max) pings, not the 4-6 minutes
    of nats-py's defaults."""
    max_outstanding_pings: int = 2
    reconnect_time_wait: float = 0.5
    """Seconds before trying a server again that has just failed (the others are tried meanwhile)."""
    randomize_servers: bool = True
    """Connect to the cluster's URLs in random order (spreads clients); False: in the order given."""
    creds_file: str | None = None
    """A NATS .creds file (user JWT and nkey seed)."""
    nkey_seed_file: str | None = None
    """A file holding an nkey user seed (SU...): the server knows the user by its public key."""
    user: str | None = None
    password: str | None = None
    """Prefer LEDGER_PASSWORD to a flag: a command line is visible to every user of the machine."""
    token: str | None = None
    tls_ca_file: str | None = None
    """The CA that signed the server's certificate (default: the system's CAs)."""
    tls_cert_file: str | None = None
    """A client certificate, for servers that verify clients (mutual TLS); needs tls_key_file."""
    tls_key_file: str | None = None
    inbox_prefix: str = "_INBOX"
    """Prefix of this client's reply subjects: one per user lets server permissions keep users out of each
    other's replies (allow that user to subscribe only to <prefix>.>)."""

    def __post_init__(self) -> None:
        if self.replicas not in (None, 1, 3, 5):
            raise ConfigError(f"replicas must be 1, 3 or 5, got {self.replicas}")
        for name in ("duplicate_window", "heartbeat_max_age", "dlq_max_age", "request_timeout",
                     "append_deadline", "connect_timeout", "ping_interval", "reconnect_time_wait"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_outstanding_pings < 1:
            raise ConfigError(f"max_outstanding_pings must be at least 1, got {self.max_outstanding_pings}")
        if self.heartbeat_per_agent < 1:
            raise ConfigError(f"heartbeat_per_agent must be at least 1, got {self.heartbeat_per_agent}")
        if self.duplicate_window > self.heartbeat_max_age:
            raise ConfigError("duplicate_window cannot exceed heartbeat_max_age")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError("a TLS client certificate needs its key, and a key its certificate "
                              "(--tls-cert with --tls-key)")
        kinds = [what for name, what in CREDENTIAL_KINDS.items() if getattr(self, name)]
        if len(kinds) > 1:
            raise ConfigError(f"give one kind of NATS credentials, not {' and '.join(kinds)}")
        if self.password is not None and not self.user:
            raise ConfigError("a password needs a user (--user)")
        if not self.inbox_prefix or any(c in self.inbox_prefix for c in " *>\t") or self.inbox_prefix.endswith("."):
            raise ConfigError(f"inbox_prefix must be a subject prefix without wildcards, got {self.inbox_prefix!r}")

    def _shown(self) -> list[tuple[str, Any]]:
        """Every field as it may be printed: secrets as ***, the URL redacted."""
        shown = []
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if name in SECRET_FIELDS and value is not None:
                value = "***"
            elif name == "nats_url":
                value = redact_url(value)
            shown.append((name, value))
        return shown

    def __repr__(self) -> str:
        return f"Settings({', '.join(f'{name}={value!r}' for name, value in self._shown())})"

    __str__ = __repr__

    def __rich_repr__(self) -> Any:  # msgspec's own would show the password to rich's pretty printer
        yield from self._shown()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then LEDGER_* variables, then `overrides` (None values are ignored)."""
        return settings_from_env(cls, ENV_PREFIX, env, overrides)

    def for_lease(self, ttl: float) -> Settings:
        """These settings, tightened for a process that must renew a lease of `ttl` seconds.

        A silent server must be noticed, and another node reached, well within the lease: pings every
        ttl/12 (given up after 2-3 of them, ttl/4), a connection attempt at most ttl/8, and no JetStream
        request waiting longer than ttl/4 before it is sent again. Floors keep a loaded machine from
        mistaking its own slowness for a dead server. Never loosens what is already tighter.
        """
        return self.replace(
            ping_interval=min(self.ping_interval, max(ttl / 12, MIN_PING_INTERVAL)),
            max_outstanding_pings=min(self.max_outstanding_pings, 2),
            connect_timeout=min(self.connect_timeout, max(ttl / 8, MIN_CONNECT_TIMEOUT)),
            reconnect_time_wait=min(self.reconnect_time_wait, max(ttl / 12, MIN_PING_INTERVAL)),
            request_timeout=min(self.request_timeout, max(ttl / 4, MIN_REQUEST_TIMEOUT)),
        )

    def without_credentials(self) -> Settings:
        """These settings for a server with no users and no TLS (an embedded one a command started itself):
        credentials meant for another server (LEDGER_TLS_CA_FILE in the environment, say) do not apply."""
        return self.replace(**dict.fromkeys(CONNECTION_FIELDS))

    def replace(self, **changes: Any) -> Settings:
        return msgspec.structs.replace(self, **changes)
