"""Fast replay of a stream: an ephemeral pull consumer read through a plain callback, handed out in batches.

nats-py's `fetch()` and `async for` create a task per message; a callback does not, and is about six times
faster. The JetStream requests the replay needs besides its consumer (stream info) are in `ledger.jsapi`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import api
from nats.js.errors import APIError

from . import cancellation, codec, imported, jsapi, wire
from .codec import Item
from .connection import GONE, watch_of
from .errors import StoreError, Unavailable

log = logging.getLogger(__name__)


CONSUMER_DELETE = f"{jsapi.API_PREFIX}.CONSUMER.DELETE."
PULL_EXPIRES = 30.0
"""Seconds a following replay's pull request waits for new messages before it is renewed."""
PULL_HEARTBEAT = 2.0
"""Seconds between the server's idle heartbeats on a waiting pull request."""
CONSUMER_CREATE_PATIENCE = 30.0
"""Seconds a one-shot replay keeps retrying consumer creation through a (meta) leader election."""
CREATE_BACKOFF = 0.25
CREATE_BACKOFF_MAX = 2.0
"""Pauses between consumer-creation attempts: doubling from the first to the second. Kept short: after a
node is killed, about one creation in four timed out for the 25 s we watched (the server still places
some R1 consumers on the dead peer), and each failure already costs a whole request timeout."""
CREATE_LOG_EVERY = 10.0
"""A following replay that cannot create its consumer says so this often (seconds)."""

_json = msgspec.json.Encoder()


def _describe(e: Exception) -> str:
    if isinstance(e, APIError):
        return f"{e.description} (error {e.err_code})"
    return str(e) or type(e).__name__


def retry_delay(attempts: int) -> float:
    """Seconds before the next try at starting a replay: doubling from CREATE_BACKOFF up to CREATE_BACKOFF_MAX."""
    return float(min(CREATE_BACKOFF * 2 ** min(attempts - 1, 8), CREATE_BACKOFF_MAX))


class Replay:
    """Batches of decoded messages from an ephemeral pull consumer.

    Iterate with `async for batch in replay`. Without `follow` it ends at the
    stream's last sequence as of the start (or `end_seq` / `end_time`); with
    `follow` it keeps delivering new messages.

    Why a pull consumer read through a plain subscription callback: nats-py's
    `fetch()` and `async for` create a task per message; its push consumers do
    per-message bookkeeping, and their flow control lets a slow reader be sent
    window after window. Here nothing arrives that was not asked for: at most
    `batch` messages are requested ahead, and only while fewer than two
    batches wait to be handed out - memory stays bounded however slow the
    reader is. Deliveries are numbered by the server; a gap, a lost consumer
    (server restart, leader change) or a silent one (no idle heartbeat) makes
    the replay create a new consumer from the message after the last one it
    received, so nothing is skipped or repeated. A connection closed for good ends
    the iteration with Unavailable (no consumer can be created on it again).
    """

    def __init__(self, nc: NATS, stream: str, filters: Sequence[str], *, start_seq: int | None = None,
                 start_time: datetime | None = None, end_seq: int | None = None, end_time: datetime | None = None,
                 follow: bool = False, last_per_subject: bool = False, batch: int = 2000,
                 timeout: float = 5.0, patience: float | None = None,
                 imported: Callable[[str], Awaitable[bool]] | None = None) -> None:
        self._nc = nc
        self._stream = stream
        self._filters = list(filters)
        self._start_seq = start_seq
        self._start_time = start_time
        self._end_seq = end_seq
        # datetimes stop at microseconds, stream times do not: end_time covers its whole microsecond.
        self._end_ns = codec.to_ns(end_time) + 999 if end_time else None
        self._follow = follow
        self._last_per_subject = last_per_subject
        self._batch = batch
        self._timeout = timeout
        self._patience = CONSUMER_CREATE_PATIENCE if patience is None else patience
        """Seconds a one-shot replay tries to create its consumer (a following one never gives up)."""
        self._buf: list[Item] = []
        self._ready = asyncio.Event()
        self._finished = False
        self._error: StoreError | None = None
        self._delivery = 0
        self._outstanding = 0
        self._consumer: str | None = None
        self._recreating: asyncio.Task[None] | None = None
        self._asking: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._watchdog: asyncio.Task[None] | None = None
        self._last_heard = time.monotonic()
        self._inbox = ""
        self._empty_at_start = False
        self._sub: Subscription | None = None
        self._is_imported = imported
        self._trusted = False
        """The stream is an imported copy: its messages' stored times are the original ones they carry."""
        self.last_seq = 0
        """Sequence of the newest message received so far (handed out, or waiting in the buffer)."""
        self.remaining: int | None = None
        """Messages on the filters after the newest one received (0: at the end; None: none received yet)."""

    def _config(self) -> api.ConsumerConfig:
        cfg = api.ConsumerConfig(ack_policy=api.AckPolicy.NONE, inactive_threshold=30.0, mem_storage=True,
                                 num_replicas=1)
        if len(self._filters) == 1:
            cfg.filter_subject = self._filters[0]
        else:
            cfg.filter_subjects = self._filters
        if self.last_seq:
            cfg.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE  # a new consumer, after the last one
            cfg.opt_start_seq = self.last_seq + 1
        elif self._last_per_subject:
            cfg.deliver_policy = api.DeliverPolicy.LAST_PER_SUBJECT
        elif self._start_seq and self._start_seq > 1:
            cfg.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
            cfg.opt_start_seq = self._start_seq
        elif self._start_time is not None:
            cfg.deliver_policy = api.DeliverPolicy.BY_START_TIME
            cfg.opt_start_time = self._start_time.astimezone(UTC).isoformat()  # type: ignore[assignment]
        else:
            cfg.deliver_policy = api.DeliverPolicy.ALL
        return cfg

    # --- receiving ------------------------------------------------------------------------

    async def _on_msg(self, msg: Msg) -> None:
        """nats-py's delivery: statuses, and every message of an imported copy (whose headers carry its times)."""
        self._last_heard = time.monotonic()
        if self._finished:
            return
        if not msg.reply:  # a status: heartbeat, request over, or trouble
            self._on_status(msg.headers or {})
            return
        if self._receive(msg.subject, msg.reply, msg.data, msg.headers):
            await self._top_up()

    def _on_direct(self, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> bool:
        """A message straight from the parser (ledger.wire): no Msg, no parsed headers, no queue, no task switch -
        about half of what reading a message through nats-py costs. False: statuses (no reply) and an imported
        copy's messages go through `_on_msg`. Statuses may so be handled after messages that followed them:
        each only counts what is outstanding down, starts over or notes a heartbeat, in any order."""
        if not reply or self._trusted:
            return False
        self._last_heard = time.monotonic()
        bad: str | None = None
        try:
            text = subject.decode()
        except UnicodeDecodeError:
            # Any client may publish any bytes as a subject token: dead-lettered like any unreadable message - were
            # it to raise here, it would be lost, the next delivery a gap, and the new consumer would deliver it
            # again, for ever (every replay of the stream stuck at it).
            text, bad = subject.decode(errors="backslashreplace"), f"subject is not UTF-8: {subject[:200]!r}"
        if not self._finished and self._receive(text, reply.decode(), data, None, unreadable=bad) and (
                self._asking is None or self._asking.done()):  # one request on its way is enough
            self._asking = self._in_background(self._top_up())
        return True

    def _receive(self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None, *,
                 unreadable: str | None = None) -> bool:
        """One delivered message (`headers` parsed only for an imported copy); True when more should be asked for.
        `unreadable`: why the message cannot be read at all (it is handed out as such)."""
        info = codec.parse_ack_subject(reply)
        if self._trusted:
            info = info._replace(timestamp_ns=imported.stored_ns(headers, info.timestamp_ns))
        if info.consumer != self._consumer:
            return False  # a late delivery of a consumer we replaced
        if info.delivery != self._delivery + 1:
            # Deliveries of one consumer are numbered without gaps: a gap means a lost message.
            self._recreate(f"delivery {self._delivery} -> {info.delivery}")
            return False
        self._delivery = info.delivery
        self._outstanding -= 1
        if (self._end_seq is not None and info.seq > self._end_seq) or (
            self._end_ns is not None and info.timestamp_ns > self._end_ns
        ):
            self._finish()
            return False
        try:
            item = codec.read(info.stream, info.seq, subject, info.timestamp_ns, data) if unreadable is None \
                else codec.Unreadable(info.stream, info.seq, subject, info.timestamp_ns, data, unreadable)
        except Exception as e:  # noqa: BLE001 - read() is total; if not, nats-py would swallow this and lose it
            log.error("replay of %s: cannot read #%d (%s); reading again from it", self._stream, info.seq, e)
            self._recreate(f"read of #{info.seq} failed")
            return False
        self._buf.append(item)
        self.last_seq = info.seq
        self.remaining = info.pending
        more = False
        if (self._end_seq is not None and info.seq >= self._end_seq) or (not self._follow and info.pending == 0):
            self._finish()
        elif self._outstanding <= self._batch // 2:  # checked here too: most messages need no request
            more = True
        self._ready.set()
        return more

    def _on_status(self, headers: dict[str, str]) -> None:
        status = headers.get("Status")
        if status == "100":
            return  # idle heartbeat: the consumer is alive
        if status in ("404", "408"):  # no messages / request expired: what it did not deliver is not coming
            left = int(headers.get("Nats-Pending-Messages", "0") or 0)
            self._outstanding = max(0, self._outstanding - left) if left else 0
            self._in_background(self._top_up())
            return
        # 409 (consumer deleted, leadership change, max waiting ...) or 503 (no consumer): start over.
        self._recreate(f"status {status} {headers.get('Description', '')}".strip())

    def _in_background(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A task the replay holds on to until it ends (the loop keeps only weak references)."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # --- asking -----------------------------------------------------------------------------

    async def _pull(self, count: int) -> None:
        expires = PULL_EXPIRES if self._follow else max(self._timeout, PULL_HEARTBEAT * 2)
        body = {"batch": count, "expires": int(expires * 1e9), "idle_heartbeat": int(PULL_HEARTBEAT * 1e9)}
        self._outstanding += count
        await self._nc.publish(f"{jsapi.API_PREFIX}.CONSUMER.MSG.NEXT.{self._stream}.{self._consumer}",
                               _json.encode(body), reply=self._inbox)

    async def _top_up(self) -> None:
        """Ask for more while fewer than two batches wait and less than half a batch is on its way."""
        if (self._finished or self._consumer is None or self._outstanding > self._batch // 2
                or len(self._buf) >= 2 * self._batch):
            return
        try:
            await self._pull(self._batch)
        except Exception as e:  # noqa: BLE001 - disconnected (any way): the follower starts again on reconnect
            log.debug("pull on %s failed: %s", self._stream, e)

    # --- the consumer ----------------------------------------------------------------------

    def _out_of_patience(self, waited: float) -> bool:
        """Whether a one-shot replay has tried to start for long enough."""
        return waited > max(self._patience, self._timeout)

    async def _stream_facts(self) -> jsapi.StreamFacts:
        """The stream's state, retried like a consumer's creation while JetStream is briefly unavailable
        (a node that was frozen or restarted answers 503 until it has caught up)."""
        started, attempts = time.monotonic(), 0
        while True:
            try:
                return await jsapi.stream_facts(self._nc, self._stream, self._timeout)
            except Unavailable as e:
                attempts += 1
                waited = time.monotonic() - started
                if self._out_of_patience(waited):
                    raise Unavailable(f"cannot start reading {self._stream}: {e} for {waited:.0f} s; is a node "
                                      "of the cluster down or a leader being elected? try again") from None
                await asyncio.sleep(retry_delay(attempts))

    async def _create(self) -> None:
        """A new consumer from where we are, and the first request; retried through leader elections.

        A following replay (projector, follower, agent watch) keeps trying for as long as it takes - a
        cluster electing leaders under load can take longer than any patience we would pick - and says so
        in the log; a one-shot replay gives up after `patience` with a one-line reason.
        """
        jsm = self._nc.jsm(timeout=self._timeout)
        watch = watch_of(self._nc)
        started = time.monotonic()
        attempts, told = 0, 0.0
        while True:
            if self._finished:
                return  # closed or interrupted while we were trying
            try:
                create = jsm.add_consumer(self._stream, config=self._config())
                info = await (watch.guard(create, prefix=f"{jsapi.API_PREFIX}.CONSUMER.") if watch else create)
                break
            except (NatsTimeout, NoRespondersError, APIError) as e:
                if isinstance(e, APIError):
                    error = jsapi.from_nats(e, self._stream, f"cannot read {self._stream}")
                    if not isinstance(error, Unavailable):  # a missing stream, a refusal: asking again is no use
                        raise error from None
                attempts += 1
                waited = time.monotonic() - started
                why = _describe(e)
                if not self._follow and self._out_of_patience(waited):
                    raise Unavailable(f"cannot start reading {self._stream}: no consumer after {waited:.0f} s "
                                      f"of trying ({why}); is a node of the cluster down or a leader being "
                                      "elected? try again") from None
                if self._follow and waited - told >= CREATE_LOG_EVERY:
                    told = waited
                    log.warning("replay of %s: no consumer yet after %.0f s (%s); the cluster may be electing a "
                                "leader - still trying", self._stream, waited, why)
                await asyncio.sleep(retry_delay(attempts))
        if told:
            log.warning("replay of %s: consumer created after %.0f s (%d attempts)", self._stream,
                        time.monotonic() - started, attempts + 1)
        self._delivery = 0
        self._outstanding = 0
        self._consumer = info.name
        self._last_heard = time.monotonic()
        self._empty_at_start = info.num_pending == 0 and (info.delivered is None or info.delivered.consumer_seq == 0)
        await self._pull(self._batch)

    def _recreate(self, why: str) -> None:
        if self._recreating is None and not self._finished:
            log.debug("replay of %s: new consumer after #%d (%s)", self._stream, self.last_seq, why)
            self._recreating = self._in_background(self._do_recreate())

    async def _do_recreate(self) -> None:
        old, self._consumer = self._consumer, None  # from now on, deliveries of the old one are ignored
        try:
            if old:
                await self._forget(old)
            await self._create()
        except StoreError as e:
            self._error = e
            self._finish()
        except GONE as e:
            if not self._nc.is_closed:
                raise  # reconnecting: the watchdog starts over again
            # Closed for good (shut down, or out of reconnects): no consumer ever again, so end the iteration
            # rather than wait for ever, retrying every heartbeat.
            self._error = Unavailable(f"cannot read {self._stream}: the connection is closed ({_describe(e)})")
            self._finish()
        finally:
            self._recreating = None

    async def _watch(self) -> None:
        """A following replay whose consumer went silent (no message, no idle heartbeat) starts over."""
        while not self._finished:
            await asyncio.sleep(PULL_HEARTBEAT)
            if time.monotonic() - self._last_heard > 3 * PULL_HEARTBEAT:
                self._recreate("no idle heartbeat")

    @property
    def buffered(self) -> int:
        """Messages received and not handed out yet, plus those asked for (never more than 3 batches)."""
        return len(self._buf) + max(self._outstanding, 0)

    def _finish(self) -> None:
        self._finished = True
        self._ready.set()

    def interrupt(self) -> None:
        """End the iteration after what was already delivered (a follower then starts a new one)."""
        self._finish()

    async def _learn_clock(self) -> None:
        """Whether the stream is an imported copy, whose stored times its messages carry: then a start time is
        found by bisection on those (the server's own times are when the copy was loaded)."""
        if self._is_imported is None:
            return
        started, attempts, told = time.monotonic(), 0, 0.0
        while True:
            if self._finished:
                return  # closed or interrupted while we were trying
            try:
                self._trusted = await self._is_imported(self._stream)
                break
            except Unavailable as e:
                attempts += 1
                waited = time.monotonic() - started
                if not self._follow and self._out_of_patience(waited):
                    raise
                if self._follow and waited - told >= CREATE_LOG_EVERY:  # as `_create` says it while it waits
                    told = waited
                    log.warning("replay of %s: no answer about the stream yet after %.0f s (%s); the cluster may "
                                "be electing a leader - still trying", self._stream, waited, e)
                await asyncio.sleep(retry_delay(attempts))
        if self._trusted and self._start_time is not None and not (self._start_seq and self._start_seq > 1):
            facts = await self._stream_facts()
            at, _ = await jsapi.last_stored_by(self._nc, self._stream, codec.to_ns(self._start_time) - 1,
                                               facts.first_seq, facts.last_seq, self._timeout, trusted=True)
            self._start_seq, self._start_time = at + 1, None

    async def _start(self) -> bool:
        """Create the consumer and ask for the first batch; False when there is nothing to deliver."""
        await self._learn_clock()
        if not self._follow:
            state = await self._stream_facts()
            end = state.last_seq if self._end_seq is None else min(self._end_seq, state.last_seq)
            if end == 0 or (self._start_seq or 0) > end:
                return False
            self._end_seq = end
        self._inbox = self._nc.new_inbox()
        # No client-side limits: what arrives was asked for, at most `batch` ahead.
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg, pending_msgs_limit=0,
                                             pending_bytes_limit=0)
        wire.deliver_messages_directly(self._nc, self._sub._id, self._on_direct)
        await self._create()
        # consumer_seq counts deliveries; stream_seq may jump ahead past non-matching messages.
        if not self._follow and self._empty_at_start:
            return False
        self._watchdog = asyncio.ensure_future(self._watch())
        return True

    async def __aiter__(self) -> AsyncIterator[list[Item]]:
        try:
            started = await self._start()
            cancellation.raise_if_cancelled()  # nats-py's wait_for may have swallowed our cancellation
            if not started:
                return
            while True:
                await self._ready.wait()
                self._ready.clear()
                batch, self._buf = self._buf, []
                if batch:
                    await self._top_up()
                    yield batch
                if self._error is not None:
                    raise self._error
                if self._finished and not self._buf:
                    return
        finally:
            await self.close()

    async def close(self) -> None:
        self._finished = True
        for task in (self._watchdog, *self._background):
            if task is not None:
                task.cancel()
        await self.close_subscription()
        consumer, self._consumer = self._consumer, None
        if consumer:
            await self._forget(consumer)

    async def _forget(self, consumer: str) -> None:
        """Ask the server to delete a consumer we no longer read, without waiting for its answer.

        Unused, it goes by itself after inactive_threshold anyway; and a user whose permissions do not
        include deleting consumers (every role but admin, in the generated ones) would otherwise wait a
        whole request timeout for an answer that never comes, at every close.
        """
        watch = watch_of(self._nc)
        if self._nc.is_closed or (watch is not None and watch.refused_under(CONSUMER_DELETE)):
            return  # refused once on this connection: it would only be refused (and logged) again
        with contextlib.suppress(*GONE):
            await self._nc.publish(f"{CONSUMER_DELETE}{self._stream}.{consumer}", b"",
                                   reply=self._nc.new_inbox())

    async def close_subscription(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            wire.stop_delivering(self._nc, sub._id)
            with contextlib.suppress(*GONE):
                await sub.unsubscribe()
