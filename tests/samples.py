"""One valid instance of every event type, for round-trip and recorded-payload tests."""

from __future__ import annotations

from datetime import UTC, datetime

from ledger import events as ev

T0 = datetime(2026, 11, 1, 12, 0, 0, tzinfo=UTC)
AGENT = ev.Producer(id="agent-1", instance="inst-1")
CLI = ev.Producer(id="cli", instance="inst-cli")
MONITOR = ev.Producer(id="monitor", instance="inst-mon")


def sample(cls: type[ev.Event], **over: object) -> ev.Event:
    base: dict[str, object] = {"event_id": f"evt-{cls.type_tag()}", "time": T0}
    fields: dict[type[ev.Event], dict[str, object]] = {
        ev.AgentRegistered: dict(producer=AGENT, agent_id="agent-1", instance_id="inst-1", pool="gpu",
                                 platform="k8s", region="eu-1", labels={"zone": "a"}, capacity=4),
        ev.AgentHeartbeat: dict(producer=AGENT, agent_id="agent-1", instance_id="inst-1", incarnation=7, beat=3,
                                load=2, capacity=4, sessions=("s-1", "s-2")),
        ev.AgentDraining: dict(producer=AGENT, agent_id="agent-1", incarnation=7, deadline=T0, reason="upgrade"),
        ev.AgentDrained: dict(producer=AGENT, agent_id="agent-1", incarnation=7),
        ev.AgentGoodbye: dict(producer=AGENT, agent_id="agent-1", instance_id="inst-1", incarnation=7),
        ev.AgentSuspected: dict(producer=MONITOR, agent_id="agent-1", incarnation=7, reason="missed_heartbeats",
                                evidence=ev.Evidence(last_heartbeat_at=T0, last_heartbeat_seq=40,
                                                     heartbeat_interval=5.0, suspect_after_missed=3)),
        ev.AgentDeclaredDead: dict(producer=MONITOR, agent_id="agent-1", incarnation=7, reason="missed_heartbeats",
                                   evidence=ev.Evidence(last_heartbeat_at=T0, dead_after=30.0)),
        ev.AgentUnreachableReported: dict(producer=CLI, agent_id="agent-1", incarnation=7, error="connect refused"),
        ev.SessionCreated: dict(producer=CLI, session_id="s-1", pool="gpu", platform="k8s", region="eu-1"),
        ev.SessionClaimed: dict(producer=AGENT, session_id="s-1", agent_id="agent-1", instance_id="inst-1",
                                incarnation=7, reason="failover", previous_owner="agent-2", previous_token=11),
        ev.SessionReleased: dict(producer=AGENT, session_id="s-1", agent_id="agent-1", incarnation=7, token=12),
        ev.SessionResourceReported: dict(producer=AGENT, session_id="s-1", agent_id="agent-1", incarnation=7,
                                         token=12, platform_resource_id="pod/abc", address="10.0.0.5:8000"),
        ev.SessionOrphaned: dict(producer=MONITOR, session_id="s-1", reason="owner_dead", previous_owner="agent-1",
                                 previous_incarnation=7, previous_token=12),
        ev.SessionTerminated: dict(producer=CLI, session_id="s-1", reason="done"),
        ev.RouteCreated: dict(producer=CLI, route_id="r-1", session_id="s-1", endpoint="chat",
                              probe=ev.Probe(initial_delay=30.0)),
        ev.RouteTransitioned: dict(producer=AGENT, route_id="r-1", from_state="PENDING", to_state="STARTING",
                                   token=12),
        ev.RouteHealthReported: dict(producer=AGENT, route_id="r-1", healthy=True, checked_at=T0),
        ev.AgentFenced: dict(producer=AGENT, agent_id="agent-1", incarnation=7, reason="lease expired",
                             fenced_at=T0, ttl=30.0),
        ev.PoolBreakerTripped: dict(producer=MONITOR, pool="gpu", reason="3 of 4 agents died within 60s",
                                    dead=("agent-1", "agent-2", "agent-3"), agents=4, window=60.0, threshold=0.5),
        ev.PoolBreakerReset: dict(producer=CLI, pool="gpu", reason="operator"),
        ev.AgentDrainRequested: dict(producer=CLI, agent_id="agent-1", incarnation=7, deadline=T0,
                                     reason="kernel upgrade"),
        ev.SessionCheckpointed: dict(producer=AGENT, session_id="s-1", agent_id="agent-1", incarnation=7, token=12,
                                     data=b"step=41\n\x00\xff", note="after step 41"),
    }
    return cls(**{**base, **fields[cls], **over})  # type: ignore[arg-type]


def all_samples() -> list[ev.Event]:
    return [sample(cls) for cls in ev.EVENT_TYPES]
