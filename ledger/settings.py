"""Settings: one frozen object, built from defaults, the environment and flags (in that order)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import msgspec

from .errors import ConfigError

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
ENV_PREFIX = "LEDGER_"


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
    connect_timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.replicas not in (None, 1, 3, 5):
            raise ConfigError(f"replicas must be 1, 3 or 5, got {self.replicas}")
        for name in ("duplicate_window", "heartbeat_max_age", "dlq_max_age", "request_timeout",
                     "append_deadline", "connect_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.heartbeat_per_agent < 1:
            raise ConfigError(f"heartbeat_per_agent must be at least 1, got {self.heartbeat_per_agent}")
        if self.duplicate_window > self.heartbeat_max_age:
            raise ConfigError("duplicate_window cannot exceed heartbeat_max_age")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then LEDGER_* variables, then `overrides` (None values are ignored)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name in cls.__struct_fields__:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None and raw != "":
                values[name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            # strict=False converts "3" -> 3 and "1.5" -> 1.5 from the environment.
            return msgspec.convert(values, cls, strict=False)
        except msgspec.ValidationError as e:
            raise ConfigError(f"invalid setting: {e}") from None

    def replace(self, **changes: Any) -> Settings:
        return msgspec.structs.replace(self, **changes)
