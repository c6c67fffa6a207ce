"""The consumers' Follower: the process's one fold of both streams (`projections.follow`), plus the server's clock.

Every consumer judges ages against `clock`, learnt from the stored times of
what arrives. In `ledger up` the same follower feeds the projector, so the
consumers act on the state the projection commits and resume from it.
"""

from __future__ import annotations

from ledger.codec import Item
from ledger.store import EventStore
from projections.follow import Follower as StateFollower
from projections.follow import Listener
from projections.state import LedgerState

from .server_clock import ServerClock

__all__ = ["Follower", "Item", "Listener"]


class Follower(StateFollower):
    """As `projections.follow.Follower`; by default the heartbeat stream starts at each agent's newest beat
    (judging liveness needs no history), which a follower that also feeds a projection must not do."""

    def __init__(self, store: EventStore, state: LedgerState | None = None, *, heartbeats: bool = True,
                 heartbeats_of: str | None = None, newest_beats: bool = True, batch: int = 2000,
                 recall: float = 0.0) -> None:
        super().__init__(store, state, heartbeats=heartbeats, heartbeats_of=heartbeats_of,
                         newest_beats=newest_beats, batch=batch, recall=recall)
        self.clock = ServerClock()
        """The server's time, learnt from what arrives: what every consumer judges ages against."""

    def _received(self, batch: list[Item]) -> None:
        self.clock.observe(batch[-1].timestamp_ns)  # the newest: the smallest offset
