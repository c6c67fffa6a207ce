"""Where `Replay` used to live: the JetStream requests are now `ledger.jsapi`, the replay `ledger.replay`.

Kept only for the importers not yet moved (`ledger/agent.py`, `consumers/follow.py`): import `ledger.replay`.
"""

from .replay import Replay

__all__ = ["Replay"]
