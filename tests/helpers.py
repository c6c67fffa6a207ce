"""Small test helpers: polling with a deadline (never sleeping as synchronisation)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(check: Callable[[], Awaitable[T] | T], *, timeout: float = 10.0, interval: float = 0.02,
                     what: str = "condition") -> T:
    """Poll `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s (last: {result!r})")
        await asyncio.sleep(interval)


def authorized(event, name: str = "mallory"):  # type: ignore[no-untyped-def]
    """The same forged event, written by a holder of credentials that may write it (`ledger.authority`).

    The forgeries of the earlier issues test what a writer the folds accept can do; since the folds flag a
    producer that may not write an event, such a forger holds the role's credentials: the agent's own for its
    lifecycle and owner writes, the monitor's for verdicts, the reclaimer's for claims for others and
    orphanings, an operator's for the rest.
    """
    import msgspec

    from ledger import authority
    from ledger import events as ev

    writers = authority.WRITERS[event.type_tag()]
    agent_id = getattr(event, "agent_id", None)
    if authority.SELF in writers and agent_id is not None and not (writers & {authority.RECLAIMER}):
        producer = agent_id
    else:
        role = next(r for r in (authority.OPERATOR, authority.MONITOR, authority.RECLAIMER, authority.WATCHDOG,
                                authority.AGENT) if r in writers)
        producer = f"{role}-{name}" if role != authority.AGENT else name
    return msgspec.structs.replace(event, producer=ev.Producer(id=producer, instance=name))
