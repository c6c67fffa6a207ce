"""The appender's publish and acknowledgements, and the replay's deliveries, cheaper than nats-py's: the HPUB frame
is built once per append and queued as nats-py queues its own; acknowledgements and replayed messages are handed
over as the parser reads them (below).

Why: `nc.publish(subject, payload, reply=..., headers=...)` validates both subjects with a regex, builds the
header block key by key (a regex, a strip and a translate per header) and goes through three coroutines, for
every message and again for every re-send - about as much as everything else an append costs. The appender's
frames are the same for each attempt (the reply subject carries the append's token, not the attempt), so they
are built once, and queued with what `Client._send_publish` and `Client._send_command` do once their checks
have passed: append to the pending list, count the bytes and the stats, flush early past the pending limit,
and kick the flusher when it is idle.

Only while the client is CONNECTED: when it is reconnecting, draining or closed, `nc.publish` decides (it
buffers, or raises OutboundBufferLimitError / ConnectionClosedError as before). A message nats-py would
normalise or refuse (an odd header key or value, a subject with white space, a payload over max_payload) gets
no frame and goes through `nc.publish` too, so its errors stay nats-py's.

This leans on private parts of nats-py 2.16.0 (the client's `_status`, `_pending`, `_pending_data_size`,
`_max_pending_size`, `_max_payload`, `_flush_queue`, `_flush_pending`, `_process_msg` and `_subs`, a
subscription's `_id`, `_max_msgs` and `_received`); tests/test_wire.py pins the version and those parts, so an
upgrade fails there loudly rather than here quietly.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NATS

log = logging.getLogger(__name__)

NATS_PY_VERSION = "2.16.0"
"""The nats-py release whose publish internals `enqueue` repeats (pyproject pins it)."""

_CONNECTED = NATS.CONNECTED
_WHITE = re.compile(r"[ \t\r\n]")
"""What nats-py refuses in a published subject or reply (`_validate_subject`, not strict)."""
_HEADER_KEY = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""nats-py's `_HEADER_KEY_RE`: the header keys it accepts."""


def subject_ok(subject: str) -> bool:
    """A subject or reply nats-py would publish as it is."""
    return bool(subject) and _WHITE.search(subject) is None


def header_block(headers: dict[str, str]) -> str | None:
    """What nats-py writes for `headers` (ASCII: as many bytes as characters), or None when it would change or
    refuse one of them.

    nats-py strips keys and values, skips empty keys, refuses keys outside RFC 7230's token characters and
    turns CR and LF in values into spaces: a header already in that form is written as it is, so building
    only those gives its bytes exactly; the others are left to it (and non-ASCII values, to keep the
    arithmetic of lengths simple).
    """
    block = "NATS/1.0\r\n"
    for key, value in headers.items():
        if key not in _GOOD_KEYS:
            if not isinstance(key, str) or _HEADER_KEY.fullmatch(key) is None:
                return None
            if len(_GOOD_KEYS) < 64:
                _GOOD_KEYS.add(key)
        if not isinstance(value, str) or not value.isascii() or value.strip() != value or "\r" in value \
                or "\n" in value:
            return None
        block += f"{key}: {value}\r\n"
    return block + "\r\n"


_GOOD_KEYS: set[str] = set()
"""Header keys seen to pass nats-py's key check (the appender's three, in practice)."""


def frame(subject: str, reply: str, headers: dict[str, str], payload: bytes) -> bytes | None:
    """The HPUB command nats-py's publish would send (`hpub_cmd`), or None where nats-py must decide.

    `reply` must have passed `subject_ok` (the appender's are its checked inbox prefix and a number).
    """
    if not subject or _WHITE.search(subject) is not None:
        return None
    hdr = header_block(headers)
    if hdr is None:
        return None
    size = len(hdr)
    return b"".join((f"HPUB {subject} {reply} {size} {size + len(payload)}\r\n{hdr}".encode(), payload, b"\r\n"))


HEADROOM = 2048
"""More than the appender's headers take beside a subject filter's length (an id of at most 200 characters, a
sequence, the header names): a payload this far below max_payload fits with them, and `message_size` need not be
asked."""


def message_size(headers: dict[str, str], payload: bytes) -> int:
    """What the server counts against max_payload: the header block and the payload (nats-py checks only the
    payload, and a message over the limit makes the server close the connection - which nats-py then closes for
    good)."""
    return len(payload) + 12 + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())


def enqueue(nc: NATS, cmd: bytes, payload_size: int) -> bool:
    """Queue a frame as nats-py's publish does once its checks pass; False (nothing queued) unless CONNECTED.

    The caller then awaits `kick(nc)` when `kick_due(nc)`, as nats-py's publish would.
    """
    if nc._status != _CONNECTED or nc._flush_queue is None or payload_size > nc._max_payload:
        return False
    nc._pending.append(cmd)  # not held across calls: the flusher swaps the list
    nc._pending_data_size += len(cmd)
    stats = nc.stats
    stats["out_msgs"] += 1
    stats["out_bytes"] += payload_size
    return True


def kick_due(nc: NATS) -> bool:
    """After `enqueue`: past the pending limit (flush now), or the flusher idle (wake it)."""
    queue = nc._flush_queue
    return (0 < nc._max_pending_size < nc._pending_data_size) or (queue is not None and queue.empty())


def drop_unsendable(nc: NATS) -> int:
    """Before `nc.close()` on a connection that is not CONNECTED: forget the pending frames, and say how many bytes.

    nats-py's close writes what is pending to the transport it last had; while reconnecting that one is
    already closed and asyncio fails inside the write (AttributeError from the closed socket), leaving the
    client half-closed. Nothing pending could reach a server then: the appends it held are settled (timed
    out) by the appender, so dropping them loses nothing that was promised."""
    if nc._status == _CONNECTED:
        return 0
    dropped, nc._pending, nc._pending_data_size = nc._pending_data_size, [], 0
    return dropped


async def kick(nc: NATS) -> None:
    """What `_send_command` and `_send_publish` do after queueing a command."""
    if 0 < nc._max_pending_size < nc._pending_data_size:
        await nc._flush_pending(force_flush=True)
    if nc._flush_queue is not None and nc._flush_queue.empty():
        await nc._flush_pending()


# --- acknowledgements, straight from the parser ---------------------------------------------------------------
# nats-py hands every message to `Client._process_msg`, which builds a Msg, queues it on the subscription and
# wakes the subscription's task, which awaits the callback: about as much per acknowledgement as the rest of an
# append. The appender's acknowledgements need none of it (they are settled synchronously, never slow), so for
# its subscription the connection's `_process_msg` is wrapped: a message without headers on a registered sid
# goes to the appender's handler at once; anything else (a status message, another subscription's message, a
# handler that declines) goes the usual way. A replay's deliveries likewise (`deliver_messages_directly`): their
# reply subject says all it needs, so their headers are never parsed.

DirectHandler = Callable[[bytes, bytes], bool]
"""(subject, payload) of a message without headers -> True when handled (False: deliver it as nats-py does)."""

MessageHandler = Callable[[bytes, bytes, bytes, "bytes | None"], bool]
"""(subject, reply, payload, the raw header block or None) -> True when handled (False: as nats-py does)."""


class _Direct:
    """Stands in for one connection's `_process_msg` (the parser looks it up on the instance each message)."""

    def __init__(self, nc: NATS, original: Callable[..., Awaitable[None]]) -> None:
        self.nc = nc
        self.original = original
        self.own = nc.__dict__.get("_process_msg")
        """What the instance itself had in place of the class's method (put back when the last handler goes)."""
        self.handlers: dict[int, MessageHandler] = {}

    async def __call__(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        handler = self.handlers.get(sid)
        if handler is not None:
            nc = self.nc
            sub = nc._subs.get(sid)
            if sub is not None and sub._max_msgs == 0:  # still subscribed (and no auto-unsubscribe to count)
                try:
                    handled = handler(subject, reply, data, headers)
                except Exception:  # never into the parser: nats-py reports a failing callback, so do we
                    log.exception("handling a message on %s failed", subject[:200])
                    handled = True
                if handled:
                    stats = nc.stats
                    stats["in_msgs"] += 1
                    stats["in_bytes"] += len(data)
                    sub._received += 1
                    return
        await self.original(sid, subject, reply, data, headers)


def deliver_directly(nc: NATS, sid: int, handler: DirectHandler) -> None:
    """Hand the header-less messages of subscription `sid` to `handler` as the parser reads them."""

    def headerless(subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> bool:
        return headers is None and handler(subject, data)

    deliver_messages_directly(nc, sid, headerless)


def deliver_messages_directly(nc: NATS, sid: int, handler: MessageHandler) -> None:
    """Hand every message of subscription `sid` to `handler` as the parser reads them (its headers unparsed)."""
    direct = nc.__dict__.get("_process_msg")
    if not isinstance(direct, _Direct):
        direct = _Direct(nc, nc._process_msg)
        nc._process_msg = direct  # type: ignore[method-assign] # looked up per message on the instance
    direct.handlers[sid] = handler


def stop_delivering(nc: NATS, sid: int) -> None:
    """Undo `deliver_directly` for `sid`; the last one gone, the connection's own `_process_msg` is back."""
    direct = nc.__dict__.get("_process_msg")
    if isinstance(direct, _Direct):
        direct.handlers.pop(sid, None)
        if not direct.handlers:
            if direct.own is None:
                del nc._process_msg  # the class's method again
            else:
                nc._process_msg = direct.own  # type: ignore[method-assign]
