"""The agent handle: register, heartbeat, claim and own sessions, self-fence, say goodbye once.

    async with Agent(ledger, agent_id="a-1", pool="gpu", capacity=4, handle_signals=True) as agent:
        claim = await agent.claim("s-42")
        await agent.report_resource("s-42", "pod/abc")
        await agent.wait_stopped()          # until SIGTERM / SIGINT, or agent.stop()

* Every process start is a new incarnation: the stream sequence of its
  registration. A newer registration of the same agent id supersedes it.
* Heartbeats come from the agent's own task, so they keep flowing while the
  application's work loop is blocked (on a full queue, say).
* Lease: if no heartbeat is acknowledged within `ttl` seconds, the agent
  fences itself - it stops acting as owner (claims and owner writes raise
  Fenced, `owned` empties, `on_fenced` is called) - and registers again as a
  new incarnation as soon as the broker answers.
* Goodbye is written exactly once - on leaving the `async with`, on SIGTERM or
  SIGINT (with `handle_signals`), whichever comes first, even when they race.
* What the agent owns follows the fold, as its watch sees the log; holding more
  than `capacity` sessions (claims that raced), it releases the newest extra ones.

The parts, each with one job, composed by `Agent` (handle.py):

    sessions.py      one record per owned session (claim, folded state, judged sequence, activity, idle TTL)
    lease.py         heartbeats, the lease they renew, self-fencing when it runs out
    registration.py  the first registration, re-registering after a fence, the superseded check
    watch.py         judging the log's events about us and our sessions by the fold's rule
    drain.py         draining and `drained`, written (and rewritten) per incarnation
    signals.py       stop(), SIGTERM / SIGINT
    supervision.py   the tasks the agent starts: kept, their failures logged
"""

from .handle import Agent
from .lease import BEAT_SESSIONS_BYTES, AgentStats, beat_sessions
from .registration import GOODBYE_TIMEOUT
from .sessions import Activity, Claim, OwnedSessions, SessionRecord

__all__ = ["BEAT_SESSIONS_BYTES", "GOODBYE_TIMEOUT", "Activity", "Agent", "AgentStats", "Claim", "OwnedSessions",
           "SessionRecord", "beat_sessions"]
