"""How connections notice a silent server: ping and reconnect settings, and their tightening for a lease."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ledger.settings import Settings
from ledger.store import EventStore

ttls = st.floats(min_value=6.0, max_value=3600.0, allow_nan=False)


@given(ttls)
def test_a_lease_holder_notices_a_silent_server_and_reaches_another_within_half_its_ttl(ttl: float):
    s = Settings().for_lease(ttl)
    # nats-py gives a server up when a ping finds `max_outstanding_pings` still unanswered.
    noticed = (s.max_outstanding_pings + 1) * s.ping_interval
    assert noticed <= ttl / 4 + 1.0
    # The next server may be the frozen one again (it accepts, never answers): one connect timeout lost.
    assert noticed + s.connect_timeout + s.reconnect_time_wait <= ttl / 2
    assert s.request_timeout <= max(ttl / 4, 1.0)


@given(ttls, st.floats(min_value=0.5, max_value=60.0), st.floats(min_value=1.0, max_value=60.0))
def test_tightening_for_a_lease_never_loosens(ttl: float, ping: float, timeout: float):
    s = Settings(ping_interval=ping, request_timeout=timeout, connect_timeout=timeout)
    tight = s.for_lease(ttl)
    assert tight.ping_interval <= s.ping_interval and tight.request_timeout <= s.request_timeout
    assert tight.connect_timeout <= s.connect_timeout and tight.reconnect_time_wait <= s.reconnect_time_wait
    assert tight.for_lease(ttl) == tight


def test_connection_settings_come_from_the_environment():
    s = Settings.from_env({"LEDGER_PING_INTERVAL": "1.5", "LEDGER_MAX_OUTSTANDING_PINGS": "3",
                           "LEDGER_RANDOMIZE_SERVERS": "false"})
    assert (s.ping_interval, s.max_outstanding_pings, s.randomize_servers) == (1.5, 3, False)


async def test_the_connection_uses_them(settings: Settings):
    tuned = settings.replace(ping_interval=0.7, max_outstanding_pings=3, reconnect_time_wait=0.3,
                             randomize_servers=False)
    async with EventStore.connect(tuned) as store:
        options = store.nc.options
        assert (options["ping_interval"], options["max_outstanding_pings"]) == (0.7, 3)
        assert (options["reconnect_time_wait"], options["dont_randomize"]) == (0.3, True)
        assert options["max_reconnect_attempts"] == -1  # after the first connect: forever
