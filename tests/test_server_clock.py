"""ServerClock: the server's time learnt from stored timestamps - never ahead of it, whatever the skew."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from consumers.server_clock import ServerClock

S = 1_000_000_000


class Fake:
    """A monotonic clock we move by hand; the server's clock is it plus a skew."""

    def __init__(self, skew_ns: int) -> None:
        self.mono = 10 * S
        self.skew = skew_ns

    def __call__(self) -> int:
        return self.mono

    def server_now(self) -> int:
        return self.mono + self.skew


@given(skew=st.integers(-3600 * S, 3600 * S),
       latencies=st.lists(st.integers(0, 5 * S), min_size=1, max_size=40),
       gap=st.integers(0, 2 * S))
def test_never_ahead_of_the_server_and_behind_by_at_most_the_fastest_delivery(skew: int, latencies: list[int],
                                                                              gap: int):
    fake = Fake(skew)
    clock = ServerClock(window=3600.0, monotonic_ns=fake)
    for latency in latencies:
        stored = fake.server_now()
        fake.mono += latency
        clock.observe(stored)
        fake.mono += gap
        estimate = clock.now_ns()
        assert estimate is not None
        assert 0 <= fake.server_now() - estimate <= min(latencies[: latencies.index(latency) + 1])


def test_a_stepped_server_clock_is_followed_within_the_window():
    fake = Fake(0)
    clock = ServerClock(window=30.0, buckets=3, monotonic_ns=fake)
    for _ in range(5):
        clock.observe(fake.server_now())
        fake.mono += S
    fake.skew -= 5 * S  # the server's clock is stepped back five seconds
    behind = []
    for _ in range(40):
        clock.observe(fake.server_now())
        behind.append(fake.server_now() - clock.now_ns())  # type: ignore[operator]
        fake.mono += S
    assert behind[0] < 0  # right after the step the old offset still counts: ahead of the stepped-back server
    assert behind[-1] == 0  # one window later only the new offset is left


def test_a_quiet_stream_keeps_the_last_estimate_and_nothing_means_the_fallback():
    fake = Fake(7 * S)
    clock = ServerClock(window=30.0, monotonic_ns=fake)
    local = datetime(2026, 1, 1, tzinfo=UTC)
    assert clock.now_ns() is None and clock.now(lambda: local) == local
    clock.observe(fake.server_now())
    fake.mono += 3600 * S  # an hour without a message
    assert clock.now_ns() == fake.server_now()
