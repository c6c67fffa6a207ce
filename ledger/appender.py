"""Pipelined, idempotent, compare-and-set appends to JetStream.

Why not `js.publish_async`: it has no timeout (a lost ack leaves its future
pending forever) and no retry. Here every append

* carries `Nats-Msg-Id` = the event id, so a retry is never a second fact;
* may carry an expectation on the entity's last sequence (one CAS over the
  entity's whole subject filter);
* is re-sent with the same id when its ack does not come in time, when
  nobody answers (503, e.g. during a leader election), or when the server
  says the same id is still in flight (10158);
* is resolved by reading back when a CAS retry is refused as "wrong last
  sequence" after an ambiguous attempt: on a single node the expectation is
  checked before de-duplication (research: R1 answers 10071, R3 a duplicate
  ack), so the first message after the expected sequence tells whether our
  event won.

Up to `max_pending` appends are in flight at once; `submit` waits for room.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import re
import time
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import ConnectionClosedError, ConnectionDrainingError, MaxPayloadError, OutboundBufferLimitError
from nats.errors import Error as NatsError

from . import authority, wire
from .codec import MSG_ID, Outgoing
from .connection import GONE, INBOX_HINT, watch_of
from .errors import (
    AppendTimeout,
    Conflict,
    EventIdTaken,
    InvalidInput,
    LedgerError,
    PermissionDenied,
    StoreError,
    Unavailable,
)
from .jsapi import ApiError, store_error

log = logging.getLogger(__name__)

EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
EXPECTED_LAST_SUBJECT_SEQ_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"

WRONG_LAST_SEQUENCE = (10071, 10164)  # 10164: another write to the subject was in flight (clustered)
RETRY_LATER = (10158, 10163)  # duplicate id still in process; expected-seq check not ready
_LAST_SEQ_RE = re.compile(r"wrong last sequence: (\d+)")

SWEEP_INTERVAL = 0.1
RETRY_BACKOFF = 0.25


class _PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: ApiError | None = None


_ack_decoder = msgspec.json.Decoder(_PubAck)

ReadBack = Callable[[str, int], Awaitable[tuple[int, str | None, str] | None]]
"""(entity filter, expected seq) -> (seq, msg id, subject) of the first message after it, or None."""

_READ_BACK_FAILED = (LedgerError, NatsError, TimeoutError, OSError, msgspec.DecodeError)
"""How a read-back can fail: unanswered or refused (translated), the connection's own errors, a timeout or a reset
socket not yet translated, a garbled answer."""


class _Pending(msgspec.Struct, gc=False):
    """One append in flight (a Struct: built per append, in C).

    gc=False: up to max_pending of them live long enough to be promoted through every generation, so untracked
    they spare the collector its longest walks. It would miss a cycle through one (its future's awaiter may hold
    the store), but none becomes garbage: a _Pending is held only by `_pending` while its future is unresolved,
    the appender is held by its sweeper task until close(), and close() settles and drops every one.
    """

    out: Outgoing
    headers: dict[str, str]
    frame: bytes | None
    """The HPUB command of every attempt (ledger.wire), or None: nc.publish decides."""
    expect: int | None
    expect_filter: str | None
    future: asyncio.Future[int]
    due: float
    deadline: float
    attempts: int = 1


class _Window:
    """At most `size` appends in flight: asyncio.Semaphore's rules (first come, first served; a cancelled waiter
    gives its turn on), with no coroutine to enter while there is room - `submit` asks per append."""

    def __init__(self, size: int) -> None:
        self.room = size
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def free(self) -> bool:
        """Take a place now if one is free and nobody waits for one."""
        if self.room > 0 and not self._waiters:
            self.room -= 1
            return True
        return False

    async def wait(self) -> None:
        """Take a place, waiting for it (after `free` said no)."""
        if self.free():
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            await turn  # release() hands its place over by resolving it
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.release()  # handed a place, then cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(turn)
            raise

    def release(self) -> None:
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.room += 1


class Appender:
    def __init__(self, nc: NATS, *, read_back: ReadBack, ack_timeout: float, deadline: float,
                 max_pending: int = 4096) -> None:
        self._nc = nc
        self._read_back = read_back
        self._ack_timeout = ack_timeout
        self._deadline = deadline
        self._window = _Window(max_pending)
        self._pending: dict[str, _Pending] = {}
        self._tokens = itertools.count(1)
        self._prefix = ""
        self._prefix_size = 0
        self._framed = False
        """Appends are sent as frames built once (ledger.wire), rather than through nc.publish each attempt."""
        self._sub: Subscription | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._watch = watch_of(nc)
        self._denied: PermissionDenied | None = None
        """Set when the server refused our reply subscription: no acknowledgement can ever reach us."""
        self.reply_filter: Callable[[Msg], bool] | None = None
        """A seam for fault injection: sees each acknowledgement first; False drops it, as a lossy network would."""

    async def start(self) -> None:
        self._prefix = self._nc.new_inbox() + "."
        self._framed = wire.subject_ok(self._prefix)  # a token is digits: every reply is then publishable as it is
        if self._watch is not None:
            self._watch.add_listener(self._on_violation)
        self._prefix_size = len(self._prefix.encode())
        self._sub = await self._nc.subscribe(self._prefix + "*", cb=self._on_reply)
        wire.deliver_directly(self._nc, self._sub._id, self._on_direct)
        self._sweeper = asyncio.create_task(self._sweep(), name="ledger-append-sweeper")

    def _on_violation(self, operation: str, subject: str) -> None:
        """The server refused a publish (nats-py lower-cases the subject) or our reply subscription.

        A refused append never lands, so it fails now with PermissionDenied - not, after every retry, as
        an append that "may have landed".
        """
        if operation == "subscription" and subject == (self._prefix + "*").lower():
            self._denied = PermissionDenied(operation, self._prefix + "*", INBOX_HINT)
            for token in list(self._pending):
                self._settle(token, error=self._denied)
            return
        if operation != "publish":
            return
        for token, p in list(self._pending.items()):
            if p.out.subject.lower() == subject:
                self._settle(token, error=PermissionDenied(operation, p.out.subject))

    async def close(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for task in list(self._background):
            task.cancel()
        for token in list(self._pending):
            self._settle(token, error=Unavailable("the event store was closed before the append was acknowledged"))
        if self._watch is not None:
            self._watch.remove_listener(self._on_violation)
        if self._sub is not None:
            wire.stop_delivering(self._nc, self._sub._id)
            with contextlib.suppress(*GONE):
                await self._sub.unsubscribe()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def drain(self) -> None:
        """Wait until every submitted append is settled."""
        await self._idle.wait()

    async def submit(self, out: Outgoing, expect: int | None = None,
                     expect_filter: str | None = None) -> asyncio.Future[int]:
        """Send one append; the returned future gives its stream sequence (or raises)."""
        if self._denied is not None:
            raise self._denied
        if self._sweeper is None or self._sweeper.done():  # not started, or closed: nothing would ever settle it
            raise Unavailable("the event store is not open: start it before appending (it was closed, or never "
                              "started)")
        if not self._window.free():
            await self._window.wait()
        headers = out.headers
        if expect is not None:
            headers = {
                **headers,
                EXPECTED_LAST_SUBJECT_SEQ: str(expect),
                EXPECTED_LAST_SUBJECT_SEQ_SUBJECT: expect_filter or out.subject,
            }
        nc = self._nc
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if len(out.payload) + wire.HEADROOM + (len(expect_filter) if expect_filter else 0) > nc.max_payload and \
                (size := wire.message_size(headers, out.payload)) > nc.max_payload:
            self._window.release()  # never sent: the server would close the connection over it
            future.set_exception(InvalidInput(f"{out.subject}: the event and its headers are {size} bytes, over the "
                                              f"server's max_payload ({nc.max_payload})"))
            return future
        now = time.monotonic()
        token = str(next(self._tokens))
        frame = wire.frame(out.subject, self._prefix + token, headers, out.payload) if self._framed else None
        p = _Pending(out, headers, frame, expect, expect_filter or out.subject, future, now + self._ack_timeout,
                     now + self._deadline)
        self._pending[token] = p
        self._idle.clear()
        if frame is not None and wire.enqueue(nc, frame, len(out.payload)):  # _send's fast path, inline
            if wire.kick_due(nc):
                await wire.kick(nc)
        else:
            await self._send(token, p)
        return future

    async def _send(self, token: str, p: _Pending) -> None:
        nc = self._nc
        if p.frame is not None and wire.enqueue(nc, p.frame, len(p.out.payload)):
            if wire.kick_due(nc):
                await wire.kick(nc)
            return
        try:
            await nc.publish(p.out.subject, p.out.payload, reply=self._prefix + token, headers=p.headers)
        except OutboundBufferLimitError:
            p.due = time.monotonic() + RETRY_BACKOFF  # disconnected and the buffer is full: try again soon
        except ConnectionClosedError:
            self._settle(token, error=Unavailable("the NATS connection is closed"))
        # These two would otherwise escape: from submit, leaving the append in flight, and from the sweeper's
        # re-send, killing it (no append re-sent or timed out after that).
        except ConnectionDrainingError:
            self._settle(token, error=Unavailable("the NATS connection is draining: it sends no more appends"))
        except MaxPayloadError:
            self._settle(token, error=InvalidInput(
                f"{p.out.subject}: the event is {len(p.out.payload)} bytes, over the server's max_payload "
                f"({nc.max_payload})"))

    def _settle(self, token: str, *, seq: int | None = None, error: BaseException | None = None) -> None:
        p = self._pending.pop(token, None)
        if p is None:
            return
        self._window.release()
        if not self._pending:
            self._idle.set()
        if p.future.done():
            return
        if error is not None:
            p.future.set_exception(error)
        else:
            p.future.set_result(seq)  # type: ignore[arg-type]

    async def _on_reply(self, msg: Msg) -> None:
        """nats-py's callback: the replies that come with headers (status messages), and every reply while a
        reply_filter is set."""
        if self.reply_filter is not None and not self.reply_filter(msg):
            return
        self._on_ack(msg.subject[len(self._prefix):], msg.data, msg.headers)

    def _on_direct(self, subject: bytes, data: bytes) -> bool:
        """A reply without headers, straight from the parser (ledger.wire); False: let nats-py deliver it."""
        if self.reply_filter is not None:
            return False  # the seam sees a Msg, as it always did
        self._on_ack(subject[self._prefix_size:].decode(), data, None)
        return True

    def _on_ack(self, token: str, data: bytes, headers: dict[str, str] | None) -> None:
        p = self._pending.get(token)
        if p is None:
            return  # a late reply to an attempt already settled
        if not data:
            if headers and headers.get("Status") == "503":
                p.due = time.monotonic() + RETRY_BACKOFF  # no responders: stream leader not there yet
            return
        try:
            ack = _ack_decoder.decode(data)
        except msgspec.DecodeError:
            self._settle(token, error=StoreError(f"unreadable acknowledgement: {data[:200]!r}"))
            return
        err = ack.error
        if err is None and ack.duplicate:
            self._spawn(self._check_duplicate(token, p, ack.seq))
        elif err is None:
            self._settle(token, seq=ack.seq)
        elif err.err_code in WRONG_LAST_SEQUENCE and p.expect is not None:
            if p.attempts > 1:
                self._spawn(self._resolve_ambiguous(token, p))
            else:
                m = _LAST_SEQ_RE.search(err.description)
                self._settle(token, error=Conflict(p.expect_filter or p.out.subject, p.expect,
                                                         int(m[1]) if m else None))
        elif err.err_code in RETRY_LATER or err.code == 503:
            p.due = time.monotonic() + RETRY_BACKOFF
        else:
            self._settle(token, error=store_error(err, ack.stream, f"JetStream refused {p.out.subject}"))

    async def _resolve_ambiguous(self, token: str, p: _Pending) -> None:
        """A CAS retry was refused: did an earlier attempt of ours win?"""
        log.debug("resolving %s by reading back", p.out.subject)
        assert p.expect is not None and p.expect_filter is not None
        try:
            found = await self._read_back(p.expect_filter, p.expect)
        except _READ_BACK_FAILED as e:  # keep retrying through the sweeper until the deadline
            log.debug("read-back for %s failed: %s", p.out.subject, e)
            p.due = time.monotonic() + RETRY_BACKOFF
            return
        if found is not None and found[1] == p.out.headers[MSG_ID]:
            self._settle(token, seq=found[0])
        else:
            self._settle(token, error=Conflict(p.expect_filter, p.expect, found[0] if found else None))

    async def _check_duplicate(self, token: str, p: _Pending, seq: int) -> None:
        """JetStream says our event id is already stored (#seq): ours, from an earlier attempt - or another
        writer's, who used the id first (ids the monitor derives from the log can be guessed)?

        It is ours when #seq is an event of the same type on the same entity by a producer of the same role
        (the monitor and its replicas de-duplicate each other on purpose; an agent only itself): what the
        server lets only such writers publish. Anything else is refused as EventIdTaken - never reported as
        written.
        """
        same_type = p.out.subject.rsplit(".", 1)[0] + ".*"
        try:
            found = await self._read_back(same_type, seq - 1)
        except _READ_BACK_FAILED as e:  # keep trying through the sweeper until the deadline
            log.debug("read-back of duplicate %s failed: %s", p.out.subject, e)
            p.due = time.monotonic() + RETRY_BACKOFF
            return
        if (found is not None and found[0] == seq and found[1] == p.out.headers[MSG_ID]
                and authority.same_writer(found[2].rsplit(".", 1)[1], p.out.subject.rsplit(".", 1)[1])):
            self._settle(token, seq=seq)
        else:
            self._settle(token, error=EventIdTaken(
                f"{p.out.subject}: event id {p.out.headers[MSG_ID]} is already taken by message #{seq}, which is "
                "not this event (another writer used the id first): write it again under a new id"))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Future[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and (e := task.exception()) is not None:
            # A bug in a read-back's handling: said at once, and the sweeper still settles that append at its
            # deadline (an AppendTimeout), so no caller waits for ever.
            log.error("appender background task failed", exc_info=e)

    async def _sweep(self) -> None:
        """Re-send appends whose ack is overdue; give up on those past their deadline."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = time.monotonic()
            for token, p in list(self._pending.items()):
                if p.future.done():  # the caller gave up waiting (cancelled): stop re-sending it
                    self._settle(token)
                    continue
                if p.due > now:
                    continue
                if now >= p.deadline:
                    self._settle(token, error=AppendTimeout(
                        f"{p.out.subject}: no acknowledgement after {p.attempts} attempts in "
                        f"{self._deadline:.0f} s; it may have landed - retrying the same event is safe"))
                    continue
                p.attempts += 1
                p.due = now + self._ack_timeout
                log.debug("re-sending %s (attempt %d)", p.out.subject, p.attempts)
                await self._send(token, p)
