"""The JetStream API as the store uses it: requests, their one error map, stream facts and message gets.

* `stream_facts` asks for `STREAM.INFO`: the range a stream holds, when it was made, its replicas.
* `get_first_after` / `get_last` / `stored_ns` ask the stream leader (`STREAM.MSG.GET`), so they see every
  acknowledged write; compare-and-set decisions use them.
* `direct_batch` uses batched Direct Get (one request, many replies): an entity's history in one round trip.
  Any replica may answer, so it can lag; `min_last_seq` asks for a replica that has at least that sequence.

Every error JetStream answers with is turned into the ledger's typed errors by `store_error`, and only there
(as nats.py's `APIError.from_error` does for its own types).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TypeVar

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import APIError

from . import cancellation, codec, imported
from .codec import Item
from .connection import GONE, watch_of
from .errors import StoreError, StreamMissing, Unavailable

T = TypeVar("T")


API_PREFIX = "$JS.API"
LEADER_ADVISORY = "$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.*"
"""Published by the server when a stream elects a leader; the last token is the stream's name."""

STREAM_SEALED = 10109
"""JSStreamSealedErr: a write, delete or purge on a sealed stream (an imported copy)."""
STREAM_NOT_FOUND = 10059
NO_MESSAGE = 404
"""A message get that found no message (with any error code but STREAM_NOT_FOUND)."""
SERVER_TROUBLE = 500
"""Codes from here up: the server cannot answer now (an election, a node catching up); asking again may work."""


# --- the one error map ---------------------------------------------------------------------------------------


class ApiError(msgspec.Struct):
    """The `error` member of a JetStream API answer."""

    code: int = 0
    err_code: int = 0
    description: str = ""


def missing_stream(stream: str) -> str:
    return f"stream {stream} does not exist: run `ledger init` (or `ledger server` / `ledger up`)"


def store_error(err: ApiError, stream: str, what: str) -> StoreError:
    """The ledger's error for JetStream's answer `err` to `what` (a request about `stream`)."""
    if err.err_code == STREAM_NOT_FOUND:
        return StreamMissing(missing_stream(stream))
    detail = f"{what}: {err.description} (error {err.err_code})"
    if err.err_code == STREAM_SEALED:
        return StoreError(f"{detail}: {stream} is sealed - an imported copy (`ledger import`) is read-only")
    if err.code >= SERVER_TROUBLE:  # "JetStream system temporarily unavailable" and the like
        return Unavailable(detail)
    return StoreError(detail)


def from_nats(e: APIError, stream: str, what: str) -> StoreError:
    """`store_error` for an answer nats-py already raised as its own APIError (its JetStream manager's calls)."""
    return store_error(ApiError(code=e.code or 0, err_code=e.err_code or 0, description=e.description or ""),
                       stream, what)


# --- requests --------------------------------------------------------------------------------------------------

_json = msgspec.json.Encoder()


async def request(nc: NATS, subject: str, body: dict[str, object] | None, timeout: float) -> bytes:
    """One API request; Unavailable when nobody answers, PermissionDenied (at once) when the server refuses it."""
    pending = nc.request(subject, _json.encode(body) if body is not None else b"", timeout=timeout)
    watch = watch_of(nc)
    try:
        # A refused request is never answered; only the error callback hears why, and the watch tells us at once.
        reply = await (watch.guard(pending, subject) if watch else pending)
    except NoRespondersError:
        raise Unavailable(f"JetStream did not answer {subject} (no responders)") from None
    except NatsTimeout:
        raise Unavailable(f"JetStream did not answer {subject} within {timeout:.1f} s") from None
    return reply.data


def parse_stamp(text: str) -> int:
    """RFC 3339 time with nanoseconds (as in Nats-Time-Stamp) -> nanoseconds since the epoch."""
    text = text.rstrip("Z")
    base, _, frac = text.partition(".")
    seconds = int(datetime.fromisoformat(base).replace(tzinfo=UTC).timestamp())
    return seconds * 1_000_000_000 + int((frac + "000000000")[:9])


# --- stream info ---------------------------------------------------------------------------------------------


class Peer(msgspec.Struct, frozen=True):
    """A replica of a stream other than its leader."""

    name: str
    current: bool = False
    offline: bool = False
    lag: int = 0


class StreamFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What a stream holds and where: its state and its replicas, as STREAM.INFO tells."""

    name: str
    created: str
    """When the stream was created: a stream deleted and made anew is another stream."""
    messages: int
    first_seq: int
    first_ns: int
    """When the oldest message still held was stored (0 when empty)."""
    last_seq: int
    replicas: int = 1
    leader: str | None = None
    """The leader's server name (None when a clustered stream has none; a single server names none either)."""
    clustered: bool = False
    """The server told about the stream's cluster (its leader and replicas)."""
    peers: tuple[Peer, ...] = ()
    subjects: dict[str, int] = {}
    """Messages per subject, only when asked for (`with_subjects`)."""
    imported: str | None = None
    """What an imported copy was loaded from (`ledger.imported`: its stored times are the original's); None for a
    stream of a live ledger."""


class _State(msgspec.Struct):
    messages: int = 0
    first_seq: int = 0
    first_ts: str = ""
    last_seq: int = 0
    subjects: dict[str, int] | None = None


class _Config(msgspec.Struct):
    num_replicas: int = 1
    metadata: dict[str, str] | None = None
    sealed: bool = False


class _Cluster(msgspec.Struct):
    leader: str | None = None
    replicas: list[Peer] | None = None


class _Info(msgspec.Struct):
    created: str = ""
    config: _Config = msgspec.field(default_factory=_Config)
    state: _State = msgspec.field(default_factory=_State)
    cluster: _Cluster | None = None
    error: ApiError | None = None


_info_decoder = msgspec.json.Decoder(_Info)


async def stream_facts(nc: NATS, stream: str, timeout: float, *, with_subjects: bool = False) -> StreamFacts:
    body: dict[str, object] | None = {"subjects_filter": ">"} if with_subjects else None
    info = _info_decoder.decode(await request(nc, f"{API_PREFIX}.STREAM.INFO.{stream}", body, timeout))
    if info.error is not None:
        raise store_error(info.error, stream, f"stream info {stream}")
    s, cluster = info.state, info.cluster
    first_ns = parse_stamp(s.first_ts) if s.messages and s.first_ts else 0
    mark = (info.config.metadata or {}).get(imported.MARK) if imported.is_imported(info.config.metadata,
                                                                                   info.config.sealed) else None
    if mark is not None and s.messages:  # the server's first_ts is when the copy was loaded
        first_ns = await stored_ns(nc, stream, s.first_seq, timeout, trusted=True) or first_ns
    return StreamFacts(name=stream, created=info.created, messages=s.messages, first_seq=s.first_seq,
                       first_ns=first_ns, last_seq=s.last_seq, imported=mark,
                       replicas=info.config.num_replicas or 1, leader=cluster.leader if cluster else None,
                       clustered=cluster is not None,
                       peers=tuple(cluster.replicas or ()) if cluster else (), subjects=s.subjects or {})


class AccountFacts(msgspec.Struct, frozen=True):
    """What JetStream keeps for the account connected as."""

    streams: int = 0
    storage: int = 0
    """Bytes on disk."""


class _Account(msgspec.Struct):
    streams: int = 0
    storage: int = 0
    error: ApiError | None = None


_account_decoder = msgspec.json.Decoder(_Account)


async def account_facts(nc: NATS, timeout: float) -> AccountFacts:
    answer = _account_decoder.decode(await request(nc, f"{API_PREFIX}.INFO", None, timeout))
    if answer.error is not None:
        raise store_error(answer.error, "", "account info")
    return AccountFacts(answer.streams, answer.storage)


# --- message gets ----------------------------------------------------------------------------------------------


class _StoredMsg(msgspec.Struct):
    subject: str
    seq: int
    time: str = ""
    hdrs: str | None = None
    data: str = ""


class _MsgGetResponse(msgspec.Struct):
    message: _StoredMsg | None = None
    error: ApiError | None = None


_msg_get_decoder = msgspec.json.Decoder(_MsgGetResponse)


def _header_map(raw: str | None) -> dict[str, str]:
    """A stored message's header block (base64, as STREAM.MSG.GET answers) as a dict (the last of repeated names)."""
    out: dict[str, str] = {}
    if raw:
        for line in base64.b64decode(raw).decode(errors="replace").split("\r\n")[1:]:
            name, sep, value = line.partition(":")
            if sep:
                out[name.strip()] = value.strip()
    return out


def _msg_id_from_headers(raw: str | None) -> str | None:
    return next((v for k, v in _header_map(raw).items() if k.lower() == codec.MSG_ID.lower()), None)


def _stored_ns_of(m: _StoredMsg, trusted: bool) -> int:
    """When `m` was stored: the server's time, or on an imported stream (`trusted`) the original's."""
    ns = parse_stamp(m.time) if m.time else 0
    return imported.stored_ns(_header_map(m.hdrs), ns) if trusted else ns


async def _msg_get(nc: NATS, stream: str, body: dict[str, object], timeout: float) -> _StoredMsg | None:
    resp = _msg_get_decoder.decode(await request(nc, f"{API_PREFIX}.STREAM.MSG.GET.{stream}", body, timeout))
    if resp.error is not None:
        if resp.error.code == NO_MESSAGE and resp.error.err_code != STREAM_NOT_FOUND:
            return None
        raise store_error(resp.error, stream, f"message get on {stream}")
    return resp.message


async def get_first_after(nc: NATS, stream: str, subject_filter: str, seq: int,
                          timeout: float) -> tuple[int, str | None, str] | None:
    """(seq, Nats-Msg-Id, subject) of the first message on the filter after `seq`, from the leader."""
    m = await _msg_get(nc, stream, {"seq": seq + 1, "next_by_subj": subject_filter}, timeout)
    return None if m is None else (m.seq, _msg_id_from_headers(m.hdrs), m.subject)


async def stored_ns(nc: NATS, stream: str, seq: int, timeout: float, *, trusted: bool = False) -> int | None:
    """When the leader stored message `seq` (ns since the epoch), or None if there is no such message.
    `trusted`: the stream is an imported copy, whose messages carry their original stored times."""
    m = await _msg_get(nc, stream, {"seq": seq}, timeout)
    return None if m is None or not m.time else _stored_ns_of(m, trusted)


async def last_stored_by(nc: NATS, stream: str, time_ns: int, first: int, last: int, timeout: float, *,
                         trusted: bool = False) -> tuple[int, int]:
    """(seq, stored_ns) of the last message of `stream` in first..last stored at or before `time_ns`; (first - 1,
    0) if none. Bisection on the leader's stored times, which rise with the sequence: where a replay with
    `end_time` stops, and one with a start time starts (after it). A few gets (log2 of the range)."""
    lo, lo_ns, hi = first - 1, 0, last + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ns = await stored_ns(nc, stream, mid, timeout, trusted=trusted)
        if ns is None or ns <= time_ns:  # None: gone since (retention takes the oldest first)
            lo, lo_ns = mid, ns or 0
        else:
            hi = mid
    return lo, lo_ns


async def get_last(nc: NATS, stream: str, subject_filter: str, timeout: float, *,
                   trusted: bool = False) -> Item | None:
    """The newest message on the filter, from the leader."""
    m = await _msg_get(nc, stream, {"last_by_subj": subject_filter}, timeout)
    if m is None:
        return None
    return codec.read(stream, m.seq, m.subject, _stored_ns_of(m, trusted), base64.b64decode(m.data))


async def direct_batch(nc: NATS, stream: str, subject_filter: str, start_seq: int, *, batch: int = 1000,
                       min_last_seq: int | None = None, timeout: float = 5.0,
                       make: Callable[[str, int, str, int, bytes], T] = codec.read,  # type: ignore[assignment]
                       trusted: bool = False) -> tuple[list[T], int]:
    """Up to `batch` messages on the filter from `start_seq`; returns (items, number still pending).

    `make(stream, seq, subject, stored_ns, data)` turns each message into an item: the codec's read by
    default, or anything that keeps the raw bytes (`ledger check` must see what the codec would refuse).
    `trusted`: the stream is an imported copy, whose messages carry their original stored times.
    """
    items, on_item = _collector(stream, make, trusted)
    pending = await _direct(nc, stream, subject_filter, start_seq, batch, min_last_seq, timeout, on_item)
    return items, pending


def _collector(stream: str, make: Callable[[str, int, str, int, bytes], T],
               trusted: bool) -> tuple[list[T], Callable[[dict[str, str], bytes], None]]:
    """A list, and the Direct Get callback that appends each message to it as `make` makes it."""
    items: list[T] = []

    def on_item(h: dict[str, str], data: bytes) -> None:
        ns = parse_stamp(h["Nats-Time-Stamp"])
        items.append(make(stream, int(h["Nats-Sequence"]), h["Nats-Subject"],
                          imported.stored_ns(h, ns) if trusted else ns, data))

    return items, on_item


class RawStored(msgspec.Struct, frozen=True):
    """A stored message as the server keeps it: what `ledger export` writes."""

    seq: int
    subject: str
    stored_ns: int
    headers: dict[str, str]
    data: bytes


DIRECT_GET_HEADERS = frozenset(h.lower() for h in ("Nats-Stream", "Nats-Subject", "Nats-Sequence", "Nats-Time-Stamp",
                                                    "Nats-Num-Pending", "Nats-Last-Sequence", "Nats-UpTo-Sequence"))
"""What Direct Get adds to a message's own headers."""


async def raw_batch(nc: NATS, stream: str, start_seq: int, *, batch: int = 1000, timeout: float = 5.0,
                    min_last_seq: int | None = None, trusted: bool = False) -> tuple[list[RawStored], int]:
    """Up to `batch` stored messages of the stream from `start_seq`, with their own headers (those of the import
    taken off again on an imported copy, `trusted`); returns (messages, number still pending)."""
    items: list[RawStored] = []

    def on_item(h: dict[str, str], data: bytes) -> None:
        own = {k: v for k, v in h.items() if k.lower() not in DIRECT_GET_HEADERS}
        ns = parse_stamp(h["Nats-Time-Stamp"])
        if trusted:
            ns, own = imported.stored_ns(own, ns), imported.restored_headers(own)
        items.append(RawStored(int(h["Nats-Sequence"]), h["Nats-Subject"], ns, own, data))

    pending = await _direct(nc, stream, ">", start_seq, batch, min_last_seq, timeout, on_item)
    return items, pending


MULTI_LAST_SUBJECTS = 1024
"""The most subjects one `multi_last` Direct Get may name (nats-server's limit)."""


async def direct_last(nc: NATS, stream: str, subjects: Sequence[str], up_to_seq: int, *,
                      min_last_seq: int | None = None, timeout: float = 5.0,
                      make: Callable[[str, int, str, int, bytes], T] = codec.read,  # type: ignore[assignment]
                      trusted: bool = False) -> list[T]:
    """The newest message at or before `up_to_seq` on each of `subjects` (at most MULTI_LAST_SUBJECTS) that has
    one, in one request (a batched Direct Get with `multi_last`); a subject with none is left out."""
    if not 0 < len(subjects) <= MULTI_LAST_SUBJECTS:
        raise ValueError(f"direct_last takes 1 to {MULTI_LAST_SUBJECTS} subjects, got {len(subjects)}")
    items, on_item = _collector(stream, make, trusted)
    req: dict[str, object] = {"multi_last": list(subjects), "up_to_seq": max(up_to_seq, 1), "batch": len(subjects)}
    await _request_direct(nc, stream, req, min_last_seq, timeout, on_item)
    return items


async def _direct(nc: NATS, stream: str, subject_filter: str, start_seq: int, batch: int, min_last_seq: int | None,
                  timeout: float, on_item: Callable[[dict[str, str], bytes], None]) -> int:
    """One batched Direct Get: `on_item(headers, data)` for each message; returns how many are still pending."""
    req: dict[str, object] = {"seq": max(start_seq, 1), "next_by_subj": subject_filter, "batch": batch}
    return await _request_direct(nc, stream, req, min_last_seq, timeout, on_item)


async def _request_direct(nc: NATS, stream: str, req: dict[str, object], min_last_seq: int | None, timeout: float,
                          on_item: Callable[[dict[str, str], bytes], None]) -> int:
    if min_last_seq:
        req["min_last_seq"] = min_last_seq
    done: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def on_msg(msg: Msg) -> None:
        h = msg.headers or {}
        status = h.get("Status")
        if status is not None:
            if done.done():
                return
            if status == "204":  # end of batch
                done.set_result(int(h.get("Nats-Num-Pending", "0")))
            elif status == "404":
                done.set_result(0)
            elif status == "503":
                done.set_exception(Unavailable(f"direct get on {stream}: no responders"))
            else:
                done.set_exception(StoreError(f"direct get on {stream}: {status} {h.get('Description', '')}"))
            return
        on_item(h, msg.data)

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_msg)
    try:
        await nc.publish(f"{API_PREFIX}.DIRECT.GET.{stream}", _json.encode(req), reply=inbox)
        try:
            pending = await cancellation.wait_for(done, timeout)
        except TimeoutError:
            raise Unavailable(f"direct get on {stream} timed out after {timeout:.1f} s") from None
    finally:
        with contextlib.suppress(*GONE):
            await sub.unsubscribe()
    return pending


async def history(nc: NATS, stream: str, subject_filter: str, *, after: int = 0,
                  min_last_seq: int | None = None, timeout: float = 5.0, trusted: bool = False) -> list[Item]:
    """Every message on the filter with a sequence above `after`, oldest first."""
    out: list[Item] = []
    start = after + 1
    while True:
        items: list[Item]
        items, pending = await direct_batch(nc, stream, subject_filter, start,
                                            min_last_seq=min_last_seq, timeout=timeout, trusted=trusted)
        out.extend(items)
        if not items or pending == 0:
            return out
        start = items[-1].seq + 1


# --- loading a copy (`ledger import`) ------------------------------------------------------------------------------

_config_answer = msgspec.json.Decoder(dict[str, object])


async def _stream_request(nc: NATS, verb: str, stream: str, body: dict[str, object] | None,
                          timeout: float) -> dict[str, object]:
    answer = _config_answer.decode(await request(nc, f"{API_PREFIX}.STREAM.{verb}.{stream}", body, timeout))
    error = answer.get("error")
    if isinstance(error, dict):
        raise store_error(msgspec.convert(error, ApiError), stream, f"stream {verb.lower()} {stream}")
    return answer


async def stream_config(nc: NATS, stream: str, timeout: float) -> dict[str, object]:
    """The stream's configuration, as the server answers it (every field, for a copy to be made from)."""
    config = (await _stream_request(nc, "INFO", stream, None, timeout)).get("config")
    return config if isinstance(config, dict) else {}


async def create_stream(nc: NATS, config: dict[str, object], timeout: float) -> None:
    await _stream_request(nc, "CREATE", str(config["name"]), config, timeout)


async def update_stream(nc: NATS, config: dict[str, object], timeout: float) -> None:
    await _stream_request(nc, "UPDATE", str(config["name"]), config, timeout)


async def delete_stream(nc: NATS, stream: str, timeout: float) -> None:
    await _stream_request(nc, "DELETE", stream, None, timeout)


async def purge_subject(nc: NATS, stream: str, subject: str, timeout: float) -> None:
    """Remove every message on `subject` (the stream's sequences stay as they are)."""
    await _stream_request(nc, "PURGE", stream, {"filter": subject}, timeout)


class Stored(msgspec.Struct, frozen=True):
    """The server's answer to one publish: where it stored it, or why not."""

    seq: int = 0
    duplicate: bool = False
    error: ApiError | None = None


_ack_decoder = msgspec.json.Decoder(Stored)


async def publish_each(nc: NATS, messages: list[tuple[str, dict[str, str], bytes]], timeout: float) -> list[Stored]:
    """Publish every (subject, headers, data) at once, in order, and the server's answer to each."""
    async def one(subject: str, headers: dict[str, str], data: bytes) -> Stored:
        try:
            return _ack_decoder.decode((await nc.request(subject, data, timeout=timeout, headers=headers)).data)
        except NoRespondersError:
            raise Unavailable(f"no stream stores {subject} (no responders)") from None
        except NatsTimeout:
            raise Unavailable(f"the server did not acknowledge {subject} within {timeout:.1f} s") from None
        except msgspec.DecodeError:
            raise StoreError(f"publish to {subject}: not an acknowledgement") from None

    return list(await asyncio.gather(*(one(*m) for m in messages)))
