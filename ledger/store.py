"""EventStore: append events and read them back, on a NATS connection.

    async with EventStore.connect(Settings.from_env()) as store:
        seq = await store.append(SessionCreated(...), expect=0)   # create-if-absent
        for rec in await store.history("session", "s-1"):
            print(rec.seq, rec.event)

`expect=N` makes the append a compare-and-set on the entity's whole history
(`ledger.<family>.<id>.>`): it lands only if the entity's last sequence is N
(0 = the entity has no events yet); otherwise Conflict is raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import APIError

from . import cancellation, codec, dlq, jsapi, lifecycle, subjects, wire
from . import events as ev
from .appender import Appender
from .codec import Item, Recorded, Unreadable
from .connection import GONE, open_connection, watch_of
from .errors import InvalidInput, PermissionDenied, StreamMissing, Unavailable
from .events import Event
from .ids import check_token
from .jsapi import AccountFacts, RawStored, StreamFacts
from .known_agents import KnownAgents
from .loader import Loader
from .replay import Replay
from .settings import Settings, redact_url
from .streams import CHANGE_REQUESTS, StreamReport, check_streams, ensure_streams, why_admin_is_needed

log = logging.getLogger(__name__)

CLAIMERS_AT_ONCE = 64
"""Claimers whose registrations a session read asks about in one request (`session_fold`)."""

T = TypeVar("T")

__all__ = ["AccountFacts", "EventStore", "Item", "Replay", "ServerInfo", "StreamFacts", "open_connection"]

DEAD_LETTER_PAUSE = 0.25
"""Seconds between tries at publishing a dead letter while the server does not answer."""


class ServerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What the server connected to says about itself (its INFO)."""

    version: tuple[int, int, int]
    host: str = ""
    port: int | None = None
    auth_required: bool = False
    tls_required: bool = False
    tls_verify: bool = False
    """The server asks every client for a certificate (mutual TLS)."""

    @classmethod
    def from_info(cls, info: dict[str, Any], version: tuple[int, int, int] = (0, 0, 0)) -> ServerInfo:
        return cls(version=version, host=str(info.get("host", "")), port=info.get("port"),
                   auth_required=bool(info.get("auth_required")), tls_required=bool(info.get("tls_required")),
                   tls_verify=bool(info.get("tls_verify")))


class EventStore:
    """Appends and reads of ledger events over one NATS connection."""

    def __init__(self, nc: NATS, settings: Settings, *, owns_connection: bool = False,
                 max_pending: int = 4096) -> None:
        self.nc = nc
        self.settings = settings
        self._owns = owns_connection
        self._appender = Appender(nc, read_back=self._first_after, ack_timeout=settings.request_timeout,
                                  deadline=settings.append_deadline, max_pending=max_pending)
        self._started = False
        self._listeners: list[Callable[[str], None]] = []
        self._imported: dict[str, bool] = {}
        """Per stream, whether it is an imported copy (`ledger.imported`), as its STREAM.INFO said."""
        self.known_agents = KnownAgents(self)
        """What session reads learnt of agents (registrations, histories), kept for the next read."""

    def add_connection_listener(self, listener: Callable[[str], None]) -> None:
        """Call `listener("disconnected" | "reconnected")` when the connection drops or comes back."""
        self._listeners.append(listener)

    def remove_connection_listener(self, listener: Callable[[str], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def connection_event(self, kind: str) -> None:
        if kind == "reconnected":
            # The server may have been restored from another log meanwhile: what was known of its agents is read
            # again rather than trusted (a wrong prefix would decide claims).
            self.known_agents.forget()
        for listener in self._listeners:
            listener(kind)

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, settings: Settings | None = None, *, name: str = "session-ledger",
                      ensure: bool = False, check: bool = True) -> AsyncIterator[EventStore]:
        """Open a connection and close it all on exit.

        `ensure` creates or upgrades the streams (needs stream admin rights);
        otherwise `check` makes sure they exist, so a missing stream is a clear
        StreamMissing now rather than appends that nobody answers.
        """
        settings = settings or Settings.from_env()
        stores: list[EventStore] = []

        def on_event(kind: str) -> None:
            for s in stores:
                s.connection_event(kind)

        nc = await open_connection(settings, name, on_event=on_event)
        store = cls(nc, settings, owns_connection=True)
        stores.append(store)
        try:
            await store.start()
            if ensure:
                await store.ensure_streams()
            elif check:
                for stream in (subjects.LEDGER_STREAM, subjects.HEARTBEAT_STREAM):
                    await store.stream_facts(stream)
            yield store
        finally:
            await store.close()

    async def start(self) -> None:
        if not self._started:
            await self._appender.start()
            self._started = True

    async def close(self) -> None:
        if self._started:
            with contextlib.suppress(asyncio.TimeoutError):
                await cancellation.wait_for(self._appender.drain(), self.settings.request_timeout)
            await self._appender.close()
            self._started = False
        if self._owns and not self.nc.is_closed:
            # Not drain(): it waits up to 30 s for every subscription to empty. Our appends are
            # settled above, so flushing what is buffered and closing is all that is left.
            with contextlib.suppress(*GONE):
                await self.nc.flush(timeout=2)
            if dropped := wire.drop_unsendable(self.nc):
                log.info("closing while disconnected: %d bytes of unsent messages dropped", dropped)
            try:
                with contextlib.suppress(*GONE):
                    await self.nc.close()
            except asyncio.CancelledError:
                # nats-py awaits the old socket's close, whose waiter asyncio cancels when the socket dies with
                # bytes still unsent (a server frozen, then gone): the client is closed all the same. Only a
                # cancellation of this task itself is passed on.
                cancellation.raise_if_cancelled()

    async def __aenter__(self) -> EventStore:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def ensure_streams(self) -> list[StreamReport]:
        """Create or upgrade the streams. A user who may only read them (all but admin, in a secured deployment)
        gets them as they are, or is told which stream is missing or differs and to run `ledger init` as admin."""
        replicas = self.settings.replicas or 1
        if replicas > 1 and not self.nc._server_info.get("cluster"):
            # A single nats-server stores num_replicas as asked and keeps one copy: the setting would be a lie.
            raise InvalidInput(f"{replicas} replicas need a cluster: the server at "
                               f"{redact_url(self.settings.nats_url)} is a single node, where a stream has one copy "
                               "whatever its setting (use --replicas 1)")
        jsm = self.nc.jsm(timeout=self.settings.request_timeout)
        watch = watch_of(self.nc)
        if watch is None:
            return await ensure_streams(jsm, self.settings)
        # A user without stream rights is refused by the server, and nats-py only says so to the error callback.
        try:
            return await watch.guard(ensure_streams(jsm, self.settings), prefix=jsapi.API_PREFIX + ".")
        except PermissionDenied as e:
            if not e.subject.upper().startswith(CHANGE_REQUESTS):
                raise
            why = await watch.guard(why_admin_is_needed(jsm, self.settings), prefix=jsapi.API_PREFIX + ".")
            raise why or e from None

    # --- appends ----------------------------------------------------------------

    async def submit(self, event: Event, *, expect: int | None = None,
                     expect_filter: str | None = None) -> asyncio.Future[int]:
        """Send an append without waiting for it; the future gives its stream sequence.

        Use this to pipeline many appends (up to `max_pending` in flight). `expect` guards the entity's
        whole history, or only what `expect_filter` (a filter inside it) selects.
        """
        out = codec.encode(event)
        if expect is not None:
            if expect < 0:
                raise InvalidInput(f"expected sequence must be >= 0, got {expect}")
            family = type(event).family
            if family == subjects.HEARTBEAT_FAMILY:
                raise InvalidInput("heartbeats are not compare-and-set guarded")
            return await self._appender.submit(out, expect,
                                               expect_filter or subjects.entity_filter(family, event.entity_id))
        return await self._appender.submit(out)

    async def append(self, event: Event, *, expect: int | None = None) -> int:
        """Append one event and return its stream sequence.

        Raises Conflict when `expect` is given and the entity's last sequence
        differs, AppendTimeout when no acknowledgement came after every retry.
        """
        return await (await self.submit(event, expect=expect))

    async def flush(self) -> None:
        """Wait until every submitted append has been acknowledged or has failed."""
        await self._appender.drain()

    @property
    def appends_in_flight(self) -> int:
        return self._appender.in_flight

    def drop_replies(self, reply_filter: Callable[[Msg], bool] | None) -> None:
        """A fault-injection seam: acknowledgements for which `reply_filter` says False are dropped on arrival,
        as if lost on the way back (None: none dropped)."""
        self._appender.reply_filter = reply_filter

    async def _first_after(self, subject_filter: str, seq: int) -> tuple[int, str | None, str] | None:
        return await jsapi.get_first_after(self.nc, subjects.stream_for_filter(subject_filter), subject_filter,
                                           seq, self.settings.request_timeout)

    # --- reads ------------------------------------------------------------------

    async def history(self, family: str, entity_id: str, *, after: int = 0,
                      min_last_seq: int | None = None) -> list[Item]:
        """One entity's events after sequence `after`, oldest first (one round trip for most entities)."""
        check_token(entity_id, f"{family} id")
        stream = subjects.stream_for_family(family)
        return await jsapi.history(self.nc, stream, subjects.entity_filter(family, entity_id), after=after,
                                   min_last_seq=min_last_seq, timeout=self.settings.request_timeout,
                                   trusted=await self.is_imported(stream))

    async def read(self, subject_filter: str, *, after: int = 0, min_last_seq: int | None = None) -> list[Item]:
        """Every message on a subject filter after sequence `after` (for short filtered histories)."""
        stream = subjects.stream_for_filter(subject_filter)
        return await jsapi.history(self.nc, stream, subject_filter, after=after, min_last_seq=min_last_seq,
                                   timeout=self.settings.request_timeout, trusted=await self.is_imported(stream))

    async def last(self, family: str, entity_id: str) -> Item | None:
        """The entity's newest event, read from the stream leader (never stale)."""
        check_token(entity_id, f"{family} id")
        stream = subjects.stream_for_family(family)
        return await jsapi.get_last(self.nc, stream, subjects.entity_filter(family, entity_id),
                                    self.settings.request_timeout, trusted=await self.is_imported(stream))

    async def last_seq(self, stream: str = subjects.LEDGER_STREAM) -> int:
        """The stream's last sequence (0 when empty)."""
        return (await self.stream_facts(stream)).last_seq

    async def read_batch(self, stream: str, subject_filter: str, start_seq: int, *, batch: int = 1000,
                         min_last_seq: int | None = None,
                         make: Callable[[str, int, str, int, bytes], T] = codec.read,  # type: ignore[assignment]
                         ) -> tuple[list[T], int]:
        """Up to `batch` stored messages on the filter from `start_seq`, made into items by `make(stream, seq,
        subject, stored_ns, data)` (the codec's read by default; `ledger check` keeps the raw bytes), and how many
        are still pending after them. Any replica may answer: `min_last_seq` asks for one holding at least that."""
        return await jsapi.direct_batch(self.nc, stream, subject_filter, start_seq, batch=batch,
                                        min_last_seq=min_last_seq, timeout=self.settings.request_timeout, make=make,
                                        trusted=await self.is_imported(stream))

    def replay(self, filters: str | Sequence[str] = subjects.family_filter("*"), *, stream: str | None = None,
               start_seq: int | None = None, start_time: datetime | None = None, end_seq: int | None = None,
               end_time: datetime | None = None, follow: bool = False, last_per_subject: bool = False,
               batch: int = 2000, patience: float | None = None) -> Replay:
        """Batches of stored messages matching the filters, oldest first: `async for batch in ...`.

        Ends at the stream's current end (or `end_seq` / `end_time`) unless
        `follow` is set, in which case it goes on delivering new messages.
        `last_per_subject` starts with only the newest message of each subject
        (e.g. each agent's latest heartbeat) instead of the whole history.
        Starting a replay waits through leader elections: a following one for as
        long as it takes, a one-shot one `patience` seconds (default 30).
        """
        filters = [filters] if isinstance(filters, str) else list(filters)
        if not filters:
            raise InvalidInput("replay needs at least one subject filter")
        streams = {subjects.stream_for_filter(f) for f in filters}
        if stream is None:
            if len(streams) != 1:
                raise InvalidInput(f"filters {filters} span several streams; replay one stream at a time")
            stream = streams.pop()
        return Replay(self.nc, stream, filters, start_seq=start_seq, start_time=start_time,
                      end_seq=end_seq, end_time=end_time, follow=follow, last_per_subject=last_per_subject,
                      batch=batch, timeout=self.settings.request_timeout, patience=patience,
                      imported=self.is_imported)

    # --- what the stream holds --------------------------------------------------

    async def stream_facts(self, stream: str = subjects.LEDGER_STREAM, *, with_subjects: bool = False) -> StreamFacts:
        """The stream's range (first and last sequence, count, when its oldest message was stored), its identity
        (when it was created) and replicas; `with_subjects` adds the count of messages per subject."""
        facts = await jsapi.stream_facts(self.nc, stream, self.settings.request_timeout, with_subjects=with_subjects)
        self._imported[stream] = facts.imported is not None
        return facts

    async def is_imported(self, stream: str) -> bool:
        """Whether `stream` is an imported copy of another ledger's (`ledger import`): sealed, and read with the
        original stored times its messages carry (`ledger.imported`). Asked once per stream and connection."""
        known = self._imported.get(stream)
        if known is None:
            try:
                await self.stream_facts(stream)
            except (PermissionDenied, StreamMissing):  # a user who may not ask reads no copy: none is made for one
                return False
            known = self._imported[stream]
        return known

    async def stored_ns(self, seq: int, stream: str = subjects.LEDGER_STREAM) -> int | None:
        """When the stream leader stored message `seq` (ns since the epoch); None when there is no such message."""
        return await jsapi.stored_ns(self.nc, stream, seq, self.settings.request_timeout,
                                     trusted=await self.is_imported(stream))

    async def last_stored_by(self, stream: str, time_ns: int, first: int, last: int) -> tuple[int, int]:
        """(seq, stored_ns) of the last message of `stream` in first..last stored at or before `time_ns`; (first - 1,
        0) if none (bisection on stored times: `jsapi.last_stored_by`)."""
        return await jsapi.last_stored_by(self.nc, stream, time_ns, first, last, self.settings.request_timeout,
                                          trusted=await self.is_imported(stream))

    async def raw_batch(self, stream: str, start_seq: int, *, batch: int = 1000,
                        min_last_seq: int | None = None) -> tuple[list[RawStored], int]:
        """Up to `batch` stored messages of `stream` from `start_seq` as the server keeps them (subject, headers,
        bytes, stored time; an imported copy's as the original had them), and how many are still pending."""
        return await jsapi.raw_batch(self.nc, stream, start_seq, batch=batch, timeout=self.settings.request_timeout,
                                     min_last_seq=min_last_seq, trusted=await self.is_imported(stream))

    async def stream_config(self, stream: str) -> dict[str, Any]:
        """The stream's whole configuration as the server answers it."""
        return await jsapi.stream_config(self.nc, stream, self.settings.request_timeout)

    def loader(self) -> Loader:
        """What loads an exported log into this (fresh) server's streams: `ledger import`."""
        return Loader(self.nc, self.settings.request_timeout)

    # --- registrations: which incarnation of an agent an event belongs to -------------

    async def registered(self, agent_id: str, *, min_last_seq: int | None = None) -> list[Recorded]:
        """Every registration of `agent_id` the folds take (its own producer token: its own subject), oldest
        first: its incarnations, and where each registered (pool, platform, region)."""
        check_token(agent_id, "agent id")
        items = await self.read(subjects.event_subject("agent", agent_id, "registered", agent_id),
                                min_last_seq=min_last_seq)
        return [i for i in items if isinstance(i, Recorded)]

    async def ever_registered(self, agent_ids: Sequence[str], *, up_to_seq: int,
                              min_last_seq: int | None = None) -> set[str]:
        """Which of `agent_ids` have anything on their registration subject at or before `up_to_seq` (in requests of
        up to 1,024 ids): an agent left out has no registration to read there."""
        # An id that is no token (`*`, `>`, a dot) would be a filter matching other agents' subjects.
        subject_of = {subjects.event_subject("agent", check_token(a, "agent id"), "registered", a): a
                      for a in agent_ids}
        names = list(subject_of)
        found: set[str] = set()
        for i in range(0, len(names), jsapi.MULTI_LAST_SUBJECTS):
            stored: list[Item] = await jsapi.direct_last(
                self.nc, subjects.LEDGER_STREAM, names[i:i + jsapi.MULTI_LAST_SUBJECTS], up_to_seq,
                min_last_seq=min_last_seq, timeout=self.settings.request_timeout,
                trusted=await self.is_imported(subjects.LEDGER_STREAM))
            found.update(subject_of[item.subject] for item in stored if item.subject in subject_of)
        return found

    async def registrations(self, agent_id: str, *, min_last_seq: int | None = None) -> list[int]:
        """Stream sequences of every registration of `agent_id` (its incarnations), oldest first.

        Only those the agent wrote itself (its id as producer token): the folds flag any other.
        """
        return [r.seq for r in await self.registered(agent_id, min_last_seq=min_last_seq)]

    async def session_fold(self, records: list[Recorded], *,
                           min_last_seq: int | None = None) -> lifecycle.SessionFold:
        """A session history folded with the lookups the whole-log fold has at each event, reading an agent's
        registrations or history only when the fold asks for them (`lifecycle.SessionFold`): claims for made-up
        agents, or take-overs the fold flags whatever their claimer, cost no read. What was read is kept
        (`known_agents`): the next fold reads only what follows. `min_last_seq`: at least the history's last
        event - a replica lagging behind the one that served the history would miss an agent's death before a
        take-over. Every read is made at least at the history's end (without min_last_seq too), and what it
        taught is kept as known up to that end only: the lookups ask nothing later, and a floor past the
        stream's end (a single node answers at once) must not count as read."""
        end = records[-1].seq if records else 0
        floor = max(end, min_last_seq or 0)
        claimers = [r.event.agent_id for r in records if isinstance(r.event, ev.SessionClaimed)]
        folded = lifecycle.SessionFold(records, registrations=self.known_agents.registrations_known(claimers, end),
                                       timelines=self.known_agents.timelines)
        registered: set[str] = set()  # claimers an ask found registered: read next, not asked about again
        while (need := folded.advance()) is not None:
            what, agent_id = need
            if what == lifecycle.REGISTRATIONS and agent_id not in registered:
                asked = folded.next_claimers(CLAIMERS_AT_ONCE)
                if len(asked) > 1:
                    # Claims for made-up agents would each cost a read, one after the other: one request tells
                    # which of the next claimers registered at all before the history's end; the others have
                    # nothing to read (and a later registration answers no question about these records).
                    registered |= await self.ever_registered(asked, up_to_seq=end, min_last_seq=floor)
                    unregistered = [a for a in asked if a not in registered]
                    self.known_agents.none_registered(unregistered, end)
                    for claimer in unregistered:
                        folded.learn(what, claimer, [])
                    if agent_id in asked and agent_id not in registered:
                        continue  # learnt above (an agent named by no claim is read, or it would be asked forever)
            if what == lifecycle.REGISTRATIONS:
                folded.registrations[agent_id] = await self.known_agents.registrations(
                    agent_id, end, min_last_seq=floor)
            else:
                await self.known_agents.read_history(agent_id, end, min_last_seq=floor)
        return folded

    async def session_lookups(self, records: list[Recorded], *, min_last_seq: int | None = None,
                              ) -> tuple[lifecycle.IncarnationAt, lifecycle.AgentAt, lifecycle.RegisteredAt]:
        """The lookups a session history's fold takes (incarnation_at, agent_at, registered_at), as the whole-log
        fold has them at each event: read as `session_fold` reads them, for folding these records again."""
        return (await self.session_fold(records, min_last_seq=min_last_seq)).lookups()

    # --- dead letters -------------------------------------------------------------

    async def dead_letter(self, item: Unreadable, *, reason: str, consumer: str) -> None:
        """Keep a stored message that is not an event in LEDGER_DLQ, at `ledger.dlq.<stream>.<reason>`.

        Retried while the server does not answer, for the append deadline; publishing the same letter again is
        harmless (its id is the original's position). Unavailable when it could not be kept, StoreError when
        JetStream refused it.
        """
        if await self.is_imported(item.stream):  # a sealed copy: its own dead letters came with it, if it had any
            log.debug("not dead-lettering %s #%d of an imported copy", item.stream, item.seq)
            return
        headers, payload = dlq.letter(item, consumer, self.nc.max_payload)
        subject = subjects.dlq_subject(item.stream, reason)
        what = f"cannot dead-letter {item.stream} #{item.seq} to {subject}"
        js = self.nc.jetstream(timeout=self.settings.request_timeout)
        give_up = time.monotonic() + self.settings.append_deadline
        while True:
            try:
                await js.publish(subject, payload, headers=headers, stream=subjects.DLQ_STREAM)
                return
            except (TimeoutError, NatsTimeout, NoRespondersError) as e:
                if time.monotonic() > give_up:
                    raise Unavailable(f"{what}: {type(e).__name__} (does the {subjects.DLQ_STREAM} stream exist? "
                                      "`ledger init` creates it)") from None
                await asyncio.sleep(DEAD_LETTER_PAUSE)
            except APIError as e:
                raise jsapi.from_nats(e, subjects.DLQ_STREAM, what) from None

    # --- the server -----------------------------------------------------------------

    def server_info(self) -> ServerInfo:
        """What the server connected to announced: its version, where it listens, whether it wants credentials."""
        v = self.nc.connected_server_version
        return ServerInfo.from_info(self.nc._server_info, (v.major, v.minor, v.patch))

    async def account_facts(self) -> AccountFacts:
        """How many streams and bytes JetStream keeps for this account; Unavailable when JetStream does not answer."""
        return await jsapi.account_facts(self.nc, self.settings.request_timeout)

    async def check_streams(self) -> dict[str, dict[str, tuple[Any, Any]] | None]:
        """Read-only check of the ledger's streams: name -> settings that differ (new, old), or None when missing."""
        jsm = self.nc.jsm(timeout=self.settings.request_timeout)
        watch = watch_of(self.nc)
        try:
            if watch is None:
                return await check_streams(jsm, self.settings)
            return await watch.guard(check_streams(jsm, self.settings), prefix=jsapi.API_PREFIX + ".")
        except APIError as e:
            raise jsapi.from_nats(e, "", "stream check") from None

    @contextlib.asynccontextmanager
    async def leader_changes(self, on_change: Callable[[str], None]) -> AsyncIterator[None]:
        """While inside, call `on_change(stream)` whenever a stream elects a leader (the server's advisory).

        Only users allowed to subscribe to the advisory hear it (in the generated permissions: the service user).
        """
        async def on_advisory(msg: Msg) -> None:
            on_change(msg.subject.rsplit(".", 1)[-1])

        sub = await self.nc.subscribe(jsapi.LEADER_ADVISORY, cb=on_advisory)
        try:
            yield
        finally:
            with contextlib.suppress(*GONE):
                await sub.unsubscribe()
