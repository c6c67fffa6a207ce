from __future__ import annotations

import pytest

from ledger.errors import ConfigError
from ledger.settings import DEFAULT_NATS_URL, Settings


def test_defaults():
    s = Settings.from_env({})
    assert s.nats_url == DEFAULT_NATS_URL and s.replicas is None and s.duplicate_window == 120.0


def test_environment_then_overrides():
    env = {"LEDGER_NATS_URL": "nats://a:1", "LEDGER_REPLICAS": "3", "LEDGER_HEARTBEAT_MAX_AGE": "600"}
    s = Settings.from_env(env)
    assert (s.nats_url, s.replicas, s.heartbeat_max_age) == ("nats://a:1", 3, 600.0)
    s = Settings.from_env(env, nats_url="nats://b:2", replicas=None)
    assert (s.nats_url, s.replicas) == ("nats://b:2", 3)


@pytest.mark.parametrize("env, message", [
    ({"LEDGER_REPLICAS": "two"}, "replicas"),
    ({"LEDGER_REPLICAS": "2"}, "replicas must be 1, 3 or 5"),
    ({"LEDGER_REQUEST_TIMEOUT": "-1"}, "request_timeout must be positive"),
    ({"LEDGER_HEARTBEAT_MAX_AGE": "10"}, "duplicate_window cannot exceed"),
])
def test_bad_settings_say_what_is_wrong(env: dict[str, str], message: str):
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_settings_are_frozen():
    with pytest.raises(AttributeError):
        Settings().replicas = 3  # type: ignore[misc]
