"""Tables for people (rich): one renderer per view. Scripts use --json instead."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from projections.health import human
from projections.history import EntityHistory
from projections.views import Page, Position

HEALTH_STYLE = {
    "alive": "green", "healthy": "green", "assigned": "green", "RUNNING": "green",
    "suspect": "yellow", "draining": "yellow", "orphaned": "yellow", "PROVISIONING": "cyan", "pending": "cyan",
    "dead": "red", "fenced": "red", "unhealthy": "red", "FAILED_TO_START": "red",
    "gone": "dim", "drained": "dim", "released": "dim", "terminated": "dim", "TERMINATED": "dim", "unknown": "dim",
}


def console() -> Console:
    c = Console(highlight=False)
    if not c.is_terminal:
        c = Console(highlight=False, width=max(c.width, 160))
    return c


def styled(value: str | None) -> Text:
    return Text(value or "-", style=HEALTH_STYLE.get(value or "", ""))


def when(t: datetime | None, now: datetime) -> str:
    if t is None:
        return "-"
    return f"{t.strftime('%Y-%m-%d %H:%M:%S')} ({human(max(0.0, (now - t).total_seconds()))} ago)"


def header(p: Position) -> str:
    ledger = f"LEDGER #{p.ledger_seq}" + (f" ({p.ledger_time:%Y-%m-%d %H:%M:%S})" if p.ledger_time else "")
    beats = f"heartbeats #{p.heartbeat_seq}" + (f" ({p.heartbeat_time:%H:%M:%S})" if p.heartbeat_time else "")
    return f"as of {ledger}, {beats}; health judged at {p.now:%Y-%m-%d %H:%M:%S} UTC; from {p.source}"


def view(page: Page[Any], table: Table) -> Group:
    """A page for people: where it stands, its notes, its table (printed once, or redrawn by `--watch`)."""
    notes = [Text(f"note: {note}", style="yellow") for note in page.position.notes]
    return Group(Text(header(page.position), style="dim"), *notes, table)


def show(page: Page[Any], table: Table) -> None:
    console().print(view(page, table))


def agents(page: Page[Any]) -> Table:
    t = Table("AGENT", "POOL", "INC", "HEALTH", "WHY", "LAST BEAT", "LOAD/CAP", "SESSIONS", box=None)
    for a in page.items:
        t.add_row(a.agent_id, a.pool, str(a.incarnation), styled(a.health), a.rule,
                  when(a.last_heartbeat_at, page.position.now),
                  f"{a.load if a.load is not None else '-'}/{a.capacity}", str(a.sessions))
    t.caption = f"{len(page.items)} agents"
    return t


def sessions(page: Page[Any]) -> Table:
    t = Table("SESSION", "POOL", "STATE", "OWNER", "OWNER HEALTH", "TOKEN", "CLAIMS", "WHY", "RESOURCE", box=None)
    for s in page.items:
        owner = f"{s.owner} (inc {s.owner_incarnation})" if s.owner else "-"
        t.add_row(s.session_id, s.pool, styled(s.state), owner, styled(s.owner_health) if s.owner else "-",
                  str(s.token) if s.token is not None else "-", str(s.claims), s.reason or "-",
                  s.platform_resource_id or "-")
    t.caption = f"{len(page.items)} sessions"
    return t


def routes(page: Page[Any]) -> Table:
    t = Table("ROUTE", "SESSION", "STATUS", "SUB-STATUS", "TRAFFIC", "HEALTH", "CHECKED", "ENDPOINT", box=None)
    for r in page.items:
        health = styled(r.health)
        if r.health_stale:
            health.append(" (stale)", style="yellow")
        t.add_row(r.route_id, r.session_id, styled(r.status), r.sub_status or "-", r.traffic, health,
                  when(r.health_checked_at, page.position.now), r.endpoint)
    t.caption = f"{len(page.items)} routes"
    return t


def _counts(counts: dict[str, int]) -> Text:
    text = Text()
    for i, (k, n) in enumerate(counts.items()):
        if i:
            text.append(" ")
        text.append(f"{k} {n}", style=HEALTH_STYLE.get(k, ""))
    return text or Text("-")


def pools(page: Page[Any]) -> Table:
    t = Table("POOL", "AGENTS", "SESSIONS", "CAPACITY", "LOAD", "FREE", "BREAKER", box=None)
    for p in page.items:
        breaker = Text(f"OPEN: {p.breaker_reason}", style="red") if p.breaker_open else Text("closed", style="dim")
        t.add_row(p.pool, _counts(p.agents), _counts(p.sessions), str(p.capacity), str(p.load), str(p.free_capacity),
                  breaker)
    t.caption = f"{len(page.items)} pools"
    return t


def anomalies(page: Page[Any]) -> Table:
    t = Table("STREAM #SEQ", "STORED", "KIND", "ENTITY", "EVENT", "PRODUCER", "DETAIL", box=None)
    for a in page.items:
        t.add_row(f"{a.stream} #{a.seq}", f"{a.stored_at:%Y-%m-%d %H:%M:%S}", Text(a.kind, style="yellow"),
                  f"{a.entity_kind} {a.entity_id}", a.event_type, a.producer, a.detail)
    t.caption = f"{len(page.items)} anomalies (newest first)"
    return t


CREATED_FIELDS = ("status", "state", "pool", "session_id", "endpoint", "incarnation")


def _effect(changes: dict[str, list[Any]]) -> str:
    if changes and all(old is None for old, _ in changes.values()):  # the entity began here
        shown = [f"{k}={changes[k][1]}" for k in CREATED_FIELDS if k in changes]
        return "created" + (f" ({', '.join(shown)})" if shown else "")
    keep = {k: v for k, v in changes.items() if k not in ("last_seq", "status_seq", "state_seq")}
    return ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in keep.items()) or "no visible change"


def history(h: EntityHistory) -> None:
    out = console()
    t = Table("SEQ", "STORED", "EVENT", "PRODUCER", "CAUSATION", "EFFECT", box=None)
    for e in h.entries:
        if e.dead_letter is not None:
            effect = Text(f"dead letter: {e.dead_letter}", style="red")
        elif e.anomaly is not None:
            effect = Text(f"FLAGGED {e.anomaly.kind}: {e.anomaly.detail}", style="yellow")
        else:
            effect = Text(_effect(e.changes))
        t.add_row(str(e.seq), f"{e.stored_at:%Y-%m-%d %H:%M:%S.%f}"[:-3], e.type, e.producer or "-",
                  e.causation_id or "-", effect)
    t.caption = f"{h.kind} {h.id}: {len(h.entries)} events"
    out.print(t)
    for note in h.notes:
        out.print(f"note: {note}", style="dim")
