"""Tables for people: one renderer per view. Scripts use --json instead.

A table is a `Grid` of plain strings (a cell may carry a style), laid out in fixed-width columns measured in
one pass and written line by line: linear in its cells, so 20,000 rows print in well under a second (rich's
Table measures and wraps every cell as a renderable: ~25 s for 20,000 sessions). Colours are ANSI codes rich
renders once per (text, style), and only where rich's console would colour (a terminal, no NO_COLOR).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import click
from rich.cells import cell_len
from rich.color import ColorSystem
from rich.console import Console
from rich.style import Style
from rich.text import Text

from projections.health import human
from projections.history import EntityHistory, checkpoint_size
from projections.text import printable
from projections.views import Page, Position

HEALTH_STYLE = {
    "alive": "green", "healthy": "green", "assigned": "green", "RUNNING": "green",
    "suspect": "yellow", "draining": "yellow", "orphaned": "yellow", "PROVISIONING": "cyan", "pending": "cyan",
    "dead": "red", "fenced": "red", "unhealthy": "red", "FAILED_TO_START": "red",
    "gone": "dim", "drained": "dim", "released": "dim", "terminated": "dim", "TERMINATED": "dim", "unknown": "dim",
}

Span = tuple[str, str]
"""(text, style): a piece of a cell; "" is no style."""
Cell = str | tuple[Span, ...]
GAP = "  "
WRITE_LINES = 1000
"""Lines per write: output streams out in pieces, never as one string of the whole table."""


def console() -> Console:
    c = Console(highlight=False)
    if not c.is_terminal:
        c = Console(highlight=False, width=max(c.width, 160))
    return c


def styled(value: str | None) -> tuple[Span, ...]:
    return ((value or "-", HEALTH_STYLE.get(value or "", "")),)


def text_of(cell: Cell) -> str:
    return cell if isinstance(cell, str) else "".join(text for text, _ in cell)


class Painter:
    """Styles as ANSI codes for this console, each (text, style) rendered once; none where rich would not colour."""

    def __init__(self, system: ColorSystem | None) -> None:
        self.system = system
        self._done: dict[Span, str] = {}

    @classmethod
    def of(cls, out: Console) -> Painter:
        return cls(out._color_system if out.is_terminal and not out.no_color else None)  # rich's own choice

    def paint(self, text: str, style: str) -> str:
        if self.system is None or not style or not text:
            return text
        found = self._done.get((text, style))
        if found is None:
            found = self._done[(text, style)] = Style.parse(style).render(text, color_system=self.system)
        return found

    def cell(self, cell: Cell) -> str:
        return cell if isinstance(cell, str) else "".join(self.paint(text, style) for text, style in cell)


@dataclass(frozen=True)
class Paging:
    """Which page was asked for, so the footer can say where it stands and how to ask for the next one."""

    offset: int = 0
    after: str | None = None
    keyset: bool = True
    """Whether --after applies (items sorted by their id, the first column)."""


FROM_START = Paging()
"""The page from the first row (what an unpaged answer is)."""


class Grid:
    """Rows of cells under column names, laid out in columns as wide as their widest cell."""

    def __init__(self, columns: Sequence[str], noun: str) -> None:
        self.columns = tuple(columns)
        self.noun = noun
        self.rows: list[tuple[Cell, ...]] = []
        self.texts: list[tuple[str, ...]] = []
        """Each row's cells as plain text (what widths are measured on)."""
        self.ascii = True

    def add(self, *cells: Cell) -> None:
        # every cell may hold text any client wrote (a reason, a label, an anomaly's detail): escaped here, once
        cells = tuple(printable(c) if isinstance(c, str) else tuple((printable(t), s) for t, s in c) for c in cells)
        texts = tuple(c if isinstance(c, str) else text_of(c) for c in cells)
        self.rows.append(cells)
        self.texts.append(texts)
        if self.ascii and not all(t.isascii() for t in texts):
            self.ascii = False

    def widths(self) -> list[int]:
        width = len if self.ascii else cell_len
        return [max(len(name), max((width(t) for t in column), default=0))
                for name, column in zip(self.columns, zip(*self.texts, strict=True) if self.texts else
                                        [()] * len(self.columns), strict=True)]

    def lines(self, painter: Painter) -> Iterator[str]:
        widths = self.widths()
        last = len(widths) - 1
        yield " " + GAP.join(painter.paint(c.ljust(w) if i < last else c, "bold")
                             for i, (c, w) in enumerate(zip(self.columns, widths, strict=True)))
        if self.ascii and painter.system is None:  # plain text: one format per row, in C
            form = " " + GAP.join([f"{{:<{w}}}" for w in widths[:-1]] + ["{}"])
            for texts in self.texts:
                yield form.format(*texts)
            return
        width = len if self.ascii else cell_len
        for texts, row in zip(self.texts, self.rows, strict=True):
            yield " " + GAP.join([painter.cell(cell) + " " * (widths[i] - width(texts[i]))
                                  for i, cell in enumerate(row[:-1])] + [painter.cell(row[-1])])


def when(t: datetime | None, now: datetime) -> str:
    if t is None:
        return "-"
    return f"{t.strftime('%Y-%m-%d %H:%M:%S')} ({human(max(0.0, (now - t).total_seconds()))} ago)"


def header(p: Position) -> str:
    ledger = f"LEDGER #{p.ledger_seq}" + (f" ({p.ledger_time:%Y-%m-%d %H:%M:%S})" if p.ledger_time else "")
    beats = f"heartbeats #{p.heartbeat_seq}" + (f" ({p.heartbeat_time:%H:%M:%S})" if p.heartbeat_time else "")
    return f"as of {ledger}, {beats}; health judged at {p.now:%Y-%m-%d %H:%M:%S} UTC; from {p.source}"


def footer(page: Page[Any], grid: Grid, paging: Paging) -> str:
    """How many rows, of how many, and how to see the others."""
    shown, total = len(grid.rows), page.total
    if total is None or (shown == total and not paging.offset and paging.after is None):
        return f"{total if total is not None else shown:,} {grid.noun}"
    where = f"{paging.offset + 1:,}-{paging.offset + shown:,}" if shown else "none"
    if paging.after is not None:
        where = f"{shown:,} after {paging.after}" + (f" (skipping {paging.offset:,})" if paging.offset else "")
    more = f"--offset {paging.offset + shown}"
    if paging.keyset and grid.rows:
        more += f" or --after {text_of(grid.rows[-1][0])}"
    return f"showing {where} of {total:,} {grid.noun} (next: {more}; --limit N, --all)"


def view_lines(page: Page[Any], grid: Grid, paging: Paging, painter: Painter) -> Iterator[str]:
    """A page for people: where it stands, its notes, its rows, and the footer saying which rows of how many."""
    yield painter.paint(header(page.position), "dim")
    for note in page.position.notes:
        yield painter.paint(f"note: {note}", "yellow")
    yield from grid.lines(painter)
    yield painter.paint(footer(page, grid, paging), "dim")


def view(page: Page[Any], grid: Grid, paging: Paging = FROM_START) -> Text:
    """The page as one renderable (what `--watch` redraws in place: a page, so small)."""
    return Text.from_ansi("\n".join(view_lines(page, grid, paging, Painter.of(console()))))


def write(lines: Iterable[str]) -> None:
    """Lines to stdout, WRITE_LINES at a time."""
    chunk: list[str] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) >= WRITE_LINES:
            click.echo("\n".join(chunk))
            chunk.clear()
    if chunk:
        click.echo("\n".join(chunk))
    sys.stdout.flush()


def show(page: Page[Any], grid: Grid, paging: Paging = FROM_START) -> None:
    write(view_lines(page, grid, paging, Painter.of(console())))


def agents(page: Page[Any]) -> Grid:
    t = Grid(("AGENT", "POOL", "INC", "HEALTH", "WHY", "LAST BEAT", "LOAD/CAP", "SESSIONS"), "agents")
    for a in page.items:
        t.add(a.agent_id, a.pool, str(a.incarnation), styled(a.health), a.rule,
              when(a.last_heartbeat_at, page.position.now),
              f"{a.load if a.load is not None else '-'}/{a.capacity}", str(a.sessions))
    return t


def sessions(page: Page[Any]) -> Grid:
    t = Grid(("SESSION", "POOL", "STATE", "OWNER", "OWNER HEALTH", "TOKEN", "CLAIMS", "WHY", "RESOURCE"), "sessions")
    for s in page.items:
        owner = f"{s.owner} (inc {s.owner_incarnation})" if s.owner else "-"
        t.add(s.session_id, s.pool, styled(s.state), owner, styled(s.owner_health) if s.owner else "-",
              str(s.token) if s.token is not None else "-", str(s.claims), s.reason or "-",
              s.platform_resource_id or "-")
    return t


def routes(page: Page[Any]) -> Grid:
    t = Grid(("ROUTE", "SESSION", "STATUS", "SUB-STATUS", "TRAFFIC", "HEALTH", "CHECKED", "ENDPOINT"), "routes")
    for r in page.items:
        health = styled(r.health) + (((" (stale)", "yellow"),) if r.health_stale else ())
        t.add(r.route_id, r.session_id, styled(r.status), r.sub_status or "-", r.traffic, health,
              when(r.health_checked_at, page.position.now), r.endpoint)
    return t


def _counts(counts: dict[str, int]) -> Cell:
    spans: list[Span] = []
    for i, (k, n) in enumerate(counts.items()):
        spans += [(" ", "")] if i else []
        spans.append((f"{k} {n}", HEALTH_STYLE.get(k, "")))
    return tuple(spans) or "-"


def pools(page: Page[Any]) -> Grid:
    t = Grid(("POOL", "AGENTS", "SESSIONS", "CAPACITY", "LOAD", "FREE", "BREAKER"), "pools")
    for p in page.items:
        breaker = ((f"OPEN: {p.breaker_reason}", "red"),) if p.breaker_open else (("closed", "dim"),)
        t.add(p.pool, _counts(p.agents), _counts(p.sessions), str(p.capacity), str(p.load), str(p.free_capacity),
              breaker)
    return t


def anomalies(page: Page[Any]) -> Grid:
    t = Grid(("STREAM #SEQ", "STORED", "KIND", "ENTITY", "EVENT", "PRODUCER", "DETAIL"), "anomalies (newest first)")
    for a in page.items:
        t.add(f"{a.stream} #{a.seq}", f"{a.stored_at:%Y-%m-%d %H:%M:%S}", ((a.kind, "yellow"),),
              f"{a.entity_kind} {a.entity_id}", a.event_type, a.producer, a.detail)
    return t


CREATED_FIELDS = ("status", "state", "pool", "session_id", "endpoint", "incarnation")


def _effect(changes: dict[str, list[Any]]) -> str:
    if changes and all(old is None for old, _ in changes.values()):  # the entity began here
        shown = [f"{k}={changes[k][1]}" for k in CREATED_FIELDS if k in changes]
        return "created" + (f" ({', '.join(shown)})" if shown else "")
    keep = {k: v for k, v in changes.items() if k not in ("last_seq", "status_seq", "state_seq")}
    return ", ".join(f"{k}: {_checkpoint(old)} -> {_checkpoint(new)}" if k == "checkpoint" else f"{k}: {old} -> {new}"
                     for k, (old, new) in keep.items()) or "no visible change"


def _checkpoint(value: Any) -> str:
    """A checkpoint in a history's effect: where and how large, not its (up to 16 KiB of) data."""
    if not isinstance(value, dict):
        return str(value)
    return f"#{value.get('seq')} ({checkpoint_size(value)} bytes)"


def history(h: EntityHistory) -> None:
    t = Grid(("SEQ", "STORED", "EVENT", "PRODUCER", "CAUSATION", "EFFECT"), "events")
    for e in h.entries:
        if e.dead_letter is not None:
            effect: Cell = ((f"dead letter: {e.dead_letter}", "red"),)
        elif e.anomaly is not None:
            effect = ((f"FLAGGED {e.anomaly.kind}: {e.anomaly.detail}", "yellow"),)
        else:
            effect = _effect(e.changes)
        t.add(str(e.seq), f"{e.stored_at:%Y-%m-%d %H:%M:%S.%f}"[:-3], e.type, e.producer or "-",
              e.causation_id or "-", effect)
    painter = Painter.of(console())
    write([*t.lines(painter), f"{h.kind} {h.id}: {len(h.entries)} events",
           *(painter.paint(f"note: {note}", "dim") for note in h.notes)])
