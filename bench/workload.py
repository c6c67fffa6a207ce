"""A realistic, fixed-population ledger workload for the projection benchmark.

1,000 agents in 10 pools, 20,000 sessions and 5,000 routes are created first;
then the same population keeps living: heartbeats (on LEDGER_HB), claims,
resource reports, releases, orphanings after agent restarts (goodbye + a new
incarnation), suspicions, route provisioning, traffic flips and health
probes, plus a few raw illegal writes that the projection must flag. The
population does not grow with the number of events, which is what keeps a
projector's memory flat.

Claim tokens and incarnations are stream sequences. The generator predicts
them (it is the only writer and appends in order), so it can pipeline every
append instead of waiting for each acknowledgement.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from ledger import events as ev
from ledger.lifecycle import PENDING, RUNNING, STARTING, WARMING_UP

CLI = ev.Producer(id="operator-bench", instance="bench")
MONITOR = ev.Producer(id="monitor-bench", instance="bench")
RECLAIMER = ev.Producer(id="reclaimer-bench", instance="bench")


class Workload:
    def __init__(self, *, agents: int = 1000, sessions: int = 20_000, routes: int = 5000, pools: int = 10,
                 first_seq: int = 1, seed: int = 7) -> None:
        self.rng = random.Random(seed)
        self.n_agents, self.n_sessions, self.n_routes, self.n_pools = agents, sessions, routes, pools
        self.seq = first_seq  # the LEDGER sequence the next lifecycle event will get
        self.incarnation: dict[str, int] = {}
        self.instance: dict[str, str] = {}
        self.beats: dict[str, int] = {}
        self.owner: dict[str, tuple[str, int] | None] = {}  # session -> (agent, token)
        self.owned: dict[str, set[str]] = {}
        self.route_state: dict[str, str] = {}
        self.route_session: dict[str, str] = {}
        self.time = datetime(2026, 11, 1, tzinfo=UTC)
        self.ledger_events = 0
        self.heartbeats = 0
        self._restarts: list[str] = []

    def pool_of(self, i: int) -> str:
        return f"pool-{i % self.n_pools}"

    def agents_of_pool(self, pool: int) -> list[str]:
        return [f"agent-{i}" for i in range(pool, self.n_agents, self.n_pools)]

    def _next(self, event: ev.Event) -> ev.Event:
        if type(event).family == "hb":
            self.heartbeats += 1
        else:
            self.seq += 1
            self.ledger_events += 1
        return event

    def _tick(self) -> datetime:
        self.time += timedelta(milliseconds=5)
        return self.time

    def register(self, agent: str, pool: str) -> ev.Event:
        instance = f"{agent}-{self.rng.getrandbits(32):08x}"
        self.incarnation[agent], self.instance[agent] = self.seq, instance
        self.owned.setdefault(agent, set())
        return self._next(ev.AgentRegistered(producer=ev.Producer(id=agent, instance=instance), agent_id=agent,
                                             instance_id=instance, pool=pool, platform="k8s", region="eu-1",
                                             capacity=40, labels={"zone": "a"}, time=self._tick()))

    def events(self, total: int) -> Iterator[ev.Event]:
        """`total` events (lifecycle and heartbeats together)."""
        emitted = 0
        for i in range(self.n_agents):
            yield self.register(f"agent-{i}", self.pool_of(i))
        for i in range(self.n_sessions):
            sid = f"session-{i}"
            self.owner[sid] = None
            yield self._next(ev.SessionCreated(producer=CLI, session_id=sid, pool=self.pool_of(i), platform="k8s",
                                               region="eu-1", time=self._tick()))
        for i in range(self.n_routes):
            rid, sid = f"route-{i}", f"session-{i}"
            self.route_state[rid], self.route_session[rid] = PENDING, sid
            yield self._next(ev.RouteCreated(producer=CLI, route_id=rid, session_id=sid, endpoint=f"model-{i % 50}",
                                             deployment="d1", probe=ev.Probe(initial_delay=30.0),
                                             time=self._tick()))
        emitted = self.n_agents + self.n_sessions + self.n_routes
        while emitted < total:
            yield self.step()
            emitted += 1
            while self._restarts and emitted < total:
                for follow_up in self._restart(self._restarts.pop()):  # each sequence predicted as it is made
                    yield follow_up
                    emitted += 1

    def step(self) -> ev.Event:
        r = self.rng.random()
        if r < 0.40:
            return self.heartbeat()
        if r < 0.62:
            return self.claim_or_release()
        if r < 0.70:
            return self.resource()
        if r < 0.88:
            return self.route()
        if r < 0.996:
            return self.health()
        if r < 0.998:
            return self.suspect_or_leave()
        return self.illegal()

    def heartbeat(self) -> ev.Event:
        agent = f"agent-{self.rng.randrange(self.n_agents)}"
        self.beats[agent] = self.beats.get(agent, 0) + 1
        return self._next(ev.AgentHeartbeat(
            producer=ev.Producer(id=agent, instance=self.instance[agent]), agent_id=agent,
            instance_id=self.instance[agent], incarnation=self.incarnation[agent], beat=self.beats[agent],
            load=len(self.owned[agent]), capacity=40, sessions=tuple(sorted(self.owned[agent])[:8]),
            time=self._tick()))

    def _producer(self, agent: str) -> ev.Producer:
        return ev.Producer(id=agent, instance=self.instance[agent])

    def claim_or_release(self) -> ev.Event:
        i = self.rng.randrange(self.n_sessions)
        sid = f"session-{i}"
        current = self.owner[sid]
        if current is None:
            agent = self.rng.choice(self.agents_of_pool(i % self.n_pools))
            self.owner[sid] = (agent, self.seq)  # the claim's own sequence is the token
            self.owned[agent].add(sid)
            return self._next(ev.SessionClaimed(
                producer=self._producer(agent), session_id=sid, agent_id=agent, instance_id=self.instance[agent],
                incarnation=self.incarnation[agent], reason="initial", time=self._tick()))
        agent, token = current
        self.owner[sid] = None
        self.owned[agent].discard(sid)
        return self._next(ev.SessionReleased(producer=self._producer(agent), session_id=sid, agent_id=agent,
                                             incarnation=self.incarnation[agent], token=token, reason="idle",
                                             time=self._tick()))

    def resource(self) -> ev.Event:
        sid = f"session-{self.rng.randrange(self.n_sessions)}"
        current = self.owner[sid]
        if current is None:
            return self.claim_or_release()
        agent, token = current
        return self._next(ev.SessionResourceReported(
            producer=self._producer(agent), session_id=sid, agent_id=agent, incarnation=self.incarnation[agent],
            token=token, platform_resource_id=f"pod/{sid}-{token}", time=self._tick()))

    def route(self) -> ev.Event:
        rid = f"route-{self.rng.randrange(self.n_routes)}"
        state = self.route_state[rid]
        to = {PENDING: STARTING, STARTING: WARMING_UP, WARMING_UP: RUNNING}.get(state, RUNNING)
        traffic = self.rng.choice(("ACTIVE", "INACTIVE")) if state == RUNNING else None
        self.route_state[rid] = to
        return self._next(ev.RouteTransitioned(producer=CLI, route_id=rid, from_state=state, to_state=to,
                                               traffic=traffic, address="10.0.0.1:8080" if to == WARMING_UP else None,
                                               reason="probe", time=self._tick()))

    def health(self) -> ev.Event:
        rid = f"route-{self.rng.randrange(self.n_routes)}"
        return self._next(ev.RouteHealthReported(producer=CLI, route_id=rid, healthy=self.rng.random() < 0.95,
                                                 checked_at=self.time, detail="GET /healthz", time=self._tick()))

    def suspect_or_leave(self) -> ev.Event:
        """A suspicion; or an agent that says goodbye, has its sessions orphaned and comes back as a new incarnation."""
        agent = f"agent-{self.rng.randrange(self.n_agents)}"
        if self.rng.random() < 0.5:
            return self._next(ev.AgentSuspected(producer=MONITOR, agent_id=agent,
                                                incarnation=self.incarnation[agent], reason="missed_heartbeats",
                                                evidence=ev.Evidence(heartbeat_interval=5.0, suspect_after_missed=3),
                                                time=self._tick()))
        self._restarts.append(agent)
        return self._next(ev.AgentGoodbye(producer=self._producer(agent), agent_id=agent,
                                          instance_id=self.instance[agent], incarnation=self.incarnation[agent],
                                          time=self._tick()))

    def _restart(self, agent: str) -> Iterator[ev.Event]:
        for sid in sorted(self.owned[agent]):
            _, token = self.owner[sid]  # type: ignore[misc]
            self.owner[sid] = None
            yield self._next(ev.SessionOrphaned(producer=RECLAIMER, session_id=sid, reason="owner_goodbye",
                                                previous_owner=agent, previous_incarnation=self.incarnation[agent],
                                                previous_token=token, time=self._tick()))
        self.owned[agent] = set()
        yield self.register(agent, self.pool_of(int(agent.split("-")[1])))

    def illegal(self) -> ev.Event:
        """A raw write the SDK would refuse: an impossible route transition (flagged, never applied)."""
        rid = f"route-{self.rng.randrange(self.n_routes)}"
        return self._next(ev.RouteTransitioned(producer=CLI, route_id=rid, from_state="TERMINATED",
                                               to_state=RUNNING, reason="raw publisher", time=self._tick()))
