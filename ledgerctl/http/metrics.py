"""Prometheus /metrics: gauges computed from the current state at scrape time, counters fed by the follower.

The gauges (agents by health and pool, sessions by state, breakers, stream and
projection positions, dead letters, anomalies, consumer writes) are read when
Prometheus scrapes, from the process's one folded state and the projection
file, so they can never drift from what the API answers. What only a stream of
events can tell - items applied per stream, and failover latency (a session
claimed for failover after its owner's death or goodbye: the claim's stored
time minus the death's) - is counted by a follower listener.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ledger import events as ev
from ledger.codec import Item, Recorded
from ledger.events import utcnow
from ledger.lifecycle import S_ORPHANED
from ledger.subjects import HEARTBEAT_STREAM, LEDGER_STREAM
from projections.follow import Follower
from projections.health import AGENT_HEALTH, DEFAULT_POLICY, HealthPolicy, agent_health
from projections.state import Change

STREAMS = (LEDGER_STREAM, HEARTBEAT_STREAM)

FAILOVER_BUCKETS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)
"""Seconds: a failover waits out a ttl (seconds) and a grace; minutes means something is wrong."""


JUDGED = ("judged", "assessed", "looked")
"""The counter of entities judged, as each consumer names it (monitor, reclaimer, watchdog)."""


@dataclass
class ScrapeFacts:
    """What a scrape needs that is read asynchronously (NATS, SQLite) just before it."""

    stream_last: dict[str, int] = field(default_factory=dict)
    anomalies: dict[str, int] = field(default_factory=dict)


class FailoverClock:
    """A follower listener: applied items per stream, and the failover latency of each session moved."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.applied = PromCounter("ledger_events_applied", "Stored items this process's follower applied",
                                   ["stream"], registry=registry)
        self.latency = Histogram("ledger_failover_latency_seconds",
                                 "Owner's death or goodbye stored -> the failover claim stored",
                                 buckets=FAILOVER_BUCKETS, registry=registry)
        self._ended: dict[str, int] = {}
        """agent id -> stored ns of its newest death or goodbye."""
        self._owner: dict[str, str] = {}
        """session id -> the agent that claimed it last."""

    def heard(self, stream: str, items: list[Item], changes: list[Change]) -> None:
        if not changes:  # recalled: told before this process started
            return
        self.applied.labels(stream=stream).inc(len(items))
        if stream != LEDGER_STREAM:
            return
        for item, change in zip(items, changes, strict=True):
            if isinstance(item, Recorded) and change.applied:
                self._note(item)

    def _note(self, item: Recorded) -> None:
        e = item.event
        if isinstance(e, (ev.AgentDeclaredDead, ev.AgentGoodbye)):
            self._ended[e.agent_id] = item.timestamp_ns
        elif isinstance(e, ev.AgentRegistered):
            self._ended.pop(e.agent_id, None)
        elif isinstance(e, ev.SessionClaimed):
            previous = e.previous_owner or self._owner.get(e.session_id)
            self._owner[e.session_id] = e.agent_id
            ended = self._ended.get(previous) if previous else None
            if e.reason == "failover" and ended is not None and item.timestamp_ns >= ended:
                self.latency.observe((item.timestamp_ns - ended) / 1e9)


class LedgerCollector(Collector):
    """Gauges from the follower's state (and the facts read before the scrape), computed at collect time."""

    def __init__(self, follower: Follower, committed: Callable[[], Mapping[str, int]], consumers: Mapping[str, object],
                 policy: HealthPolicy = DEFAULT_POLICY) -> None:
        self.follower = follower
        self.committed = committed
        """The projector's committed position per stream (it replaces its mapping at each commit)."""
        self.consumers = consumers
        self.policy = policy
        self.facts = ScrapeFacts()

    def collect(self, now: datetime | None = None) -> Iterator[Metric]:
        now = now or utcnow()
        state = self.follower.state
        led, hb = state.ledger, state.heartbeats

        last = GaugeMetricFamily("ledger_stream_last_seq", "The stream's last sequence on the server",
                                 labels=["stream"])
        applied = GaugeMetricFamily("ledger_stream_applied_seq", "The last sequence the follower applied",
                                    labels=["stream"])
        projected = GaugeMetricFamily("ledger_projected_seq", "The last sequence the projection file committed",
                                      labels=["stream"])
        lag = GaugeMetricFamily("ledger_projection_lag", "Messages stored but not yet committed to the projection",
                                labels=["stream"])
        for stream in STREAMS:
            committed = self.committed().get(stream, 0)
            applied.add_metric([stream], state.position(stream))
            projected.add_metric([stream], committed)
            if stream in self.facts.stream_last:
                end = self.facts.stream_last[stream]
                last.add_metric([stream], end)
                lag.add_metric([stream], max(0, end - committed))
        yield from (last, applied, projected, lag)

        dead = CounterMetricFamily("ledger_dead_letters", "Stored messages that are not valid events",
                                   labels=["stream", "reason"])
        for stream, counts in ((LEDGER_STREAM, led.dead_letters), (HEARTBEAT_STREAM, hb.dead_letters)):
            for reason, n in sorted(counts.items()):
                dead.add_metric([stream, reason], n)
        yield dead

        anomalies = GaugeMetricFamily("ledger_anomalies", "Events flagged and not applied (projection file)",
                                      labels=["kind"])
        for kind, n in sorted(self.facts.anomalies.items()):
            anomalies.add_metric([kind], n)
        yield anomalies

        health: Counter[tuple[str, str]] = Counter()
        for agent in led.agents.values():
            health[(agent.pool, agent_health(agent, hb.beats.get(agent.agent_id), now, self.policy)[0])] += 1
        agents = GaugeMetricFamily("ledger_agents", "Agents by pool and health", labels=["pool", "health"])
        for pool in sorted({p for p, _ in health}):
            for h in AGENT_HEALTH:
                agents.add_metric([pool, h], health.get((pool, h), 0))
        yield agents

        by_state = Counter((s.pool, s.status) for s in led.sessions.values())
        sessions = GaugeMetricFamily("ledger_sessions", "Sessions by pool and state", labels=["pool", "state"])
        for (pool, status), n in sorted(by_state.items()):
            sessions.add_metric([pool, status], n)
        yield sessions
        yield GaugeMetricFamily("ledger_orphaned_sessions", "Sessions waiting for a new owner",
                                value=sum(n for (_, st), n in by_state.items() if st == S_ORPHANED))

        breaker = GaugeMetricFamily("ledger_pool_breaker_open", "1 while the pool's mass-failure breaker is open",
                                    labels=["pool"])
        trips = CounterMetricFamily("ledger_pool_breaker_trips", "Times the pool's breaker tripped", labels=["pool"])
        known = set(led.pools) | {a.pool for a in led.agents.values()} | {s.pool for s in led.sessions.values()}
        for name in sorted(known):
            pool_state = led.pools.get(name)  # none until a breaker first trips
            breaker.add_metric([name], 1 if pool_state is not None and pool_state.breaker_open else 0)
            trips.add_metric([name], pool_state.trips if pool_state is not None else 0)
        yield breaker
        yield trips

        writes = CounterMetricFamily("ledger_consumer_writes", "Events each consumer of this process wrote",
                                     labels=["consumer"])
        for role, part in sorted(self.consumers.items()):
            count = getattr(part, "writes", None)
            if isinstance(count, int):
                writes.add_metric([role], count)
        yield writes

        # What each consumer looked at: it grows with change, not with the fleet (a quiet fleet adds nothing).
        judged = CounterMetricFamily("ledger_consumer_judged", "Entities each consumer of this process judged "
                                     "(the monitor's agents, the reclaimer's agents, the watchdog's routes)",
                                     labels=["consumer"])
        for role, part in sorted(self.consumers.items()):
            count = next((c for c in (getattr(part, name, None) for name in JUDGED) if isinstance(c, int)), None)
            if count is not None:
                judged.add_metric([role], count)
        yield judged
