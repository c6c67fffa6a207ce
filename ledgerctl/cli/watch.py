"""`--watch`: show a view again each time the LEDGER stream grows, as `kubectl get -w` does.

Nothing polls the projection file: an ordered pull consumer (EventStore.replay, follow=True) follows the LEDGER
stream from its end, and each batch it delivers asks the view again - at most every REFRESH seconds, so a burst
of events is one redraw. The projection lags the stream by a moment, so an answer that stands before the last
event seen is asked again (at most CATCH_UP times) until it covers it. A terminal gets the table redrawn in place
(rich.live); anything else, or --json, gets one rendering (one JSON document, one line) per change.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from rich.console import RenderableType
from rich.live import Live

from ledger.store import EventStore
from ledger.subjects import LEDGER_STREAM, family_filter
from projections.views import Page

from . import tables
from .common import echo, to_json

REFRESH = 0.5
"""Seconds between two renderings at most (a burst of events is one redraw)."""
CATCH_UP = 20
"""How many times an answer behind the stream is asked again before waiting for the next event."""


async def follow(store: EventStore, start_seq: int, seen: Callable[[int], None]) -> None:
    """Tell `seen` the last LEDGER sequence of each batch appended from `start_seq` on (until cancelled)."""
    replay = store.replay(family_filter("*"), stream=LEDGER_STREAM, start_seq=start_seq, follow=True, batch=500)
    try:
        async for batch in replay:
            if batch:
                seen(max(item.seq for item in batch))
    finally:
        await replay.close()


def behind(result: Any, seq: int) -> bool:
    return isinstance(result, Page) and result.position.ledger_seq < seq


async def watch(store: EventStore, fetch: Callable[[], Awaitable[Any]], show: Callable[[Any], None],
                stop: asyncio.Event, *, refresh: float = REFRESH) -> None:
    """`show(await fetch())` now and after each change of the LEDGER stream, until `stop` is set."""
    last = [await store.last_seq(LEDGER_STREAM)]
    changed = asyncio.Event()

    def seen(seq: int) -> None:
        last[0] = max(last[0], seq)
        changed.set()

    follower = asyncio.create_task(follow(store, last[0] + 1, seen))  # before the first answer: nothing missed
    stopping = asyncio.create_task(stop.wait())
    try:
        show(await fetch())
        retries = 0
        while not stop.is_set():
            waiting = asyncio.create_task(changed.wait())
            done, _ = await asyncio.wait({waiting, stopping, follower}, return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            if follower in done:
                follower.result()  # its error, if it failed
                return
            if stop.is_set():
                return
            changed.clear()
            result = await fetch()
            show(result)
            if behind(result, last[0]) and retries < CATCH_UP:
                retries += 1
                changed.set()  # the projection has not reached the last event yet: ask again after `refresh`
            else:
                retries = 0
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(stopping), refresh)
    finally:
        for task in (follower, stopping):
            task.cancel()
        await asyncio.gather(follower, stopping, return_exceptions=True)


@contextlib.contextmanager
def shower(as_json: bool, render: Callable[[Any], Any], paging: tables.Paging = tables.FROM_START) -> Any:
    """A `show` for `watch`: a JSON line per change, a table redrawn in place on a terminal, else one per change."""
    out = tables.console()
    if as_json:
        yield lambda result: echo(to_json(result))
    elif not out.is_terminal:
        yield lambda result: tables.show(result, render(result), paging)
    else:
        with Live(console=out, auto_refresh=False, transient=False) as live:
            def redraw(result: Any) -> None:
                view: RenderableType = tables.view(result, render(result), paging)
                live.update(view, refresh=True)
            yield redraw
