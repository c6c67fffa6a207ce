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
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import APIError

from . import cancellation, codec
from .codec import Item
from .connection import GONE, watch_of
from .errors import StoreError, StreamMissing, Unavailable

T = TypeVar("T")


API_PREFIX = "$JS.API"
LEADER_ADVISORY = "$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.*"
"""Published by the server when a stream elects a leader; the last token is the stream's name."""

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


class _State(msgspec.Struct):
    messages: int = 0
    first_seq: int = 0
    first_ts: str = ""
    last_seq: int = 0
    subjects: dict[str, int] | None = None


class _Config(msgspec.Struct):
    num_replicas: int = 1


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
    return StreamFacts(name=stream, created=info.created, messages=s.messages, first_seq=s.first_seq,
                       first_ns=parse_stamp(s.first_ts) if s.messages and s.first_ts else 0, last_seq=s.last_seq,
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


def _msg_id_from_headers(raw: str | None) -> str | None:
    if not raw:
        return None
    for line in base64.b64decode(raw).decode(errors="replace").split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() == codec.MSG_ID.lower():
            return value.strip()
    return None


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


async def stored_ns(nc: NATS, stream: str, seq: int, timeout: float) -> int | None:
    """When the leader stored message `seq` (ns since the epoch), or None if there is no such message."""
    m = await _msg_get(nc, stream, {"seq": seq}, timeout)
    return None if m is None or not m.time else parse_stamp(m.time)


async def get_last(nc: NATS, stream: str, subject_filter: str, timeout: float) -> Item | None:
    """The newest message on the filter, from the leader."""
    m = await _msg_get(nc, stream, {"last_by_subj": subject_filter}, timeout)
    if m is None:
        return None
    return codec.read(stream, m.seq, m.subject, parse_stamp(m.time) if m.time else 0, base64.b64decode(m.data))


async def direct_batch(nc: NATS, stream: str, subject_filter: str, start_seq: int, *, batch: int = 1000,
                       min_last_seq: int | None = None, timeout: float = 5.0,
                       make: Callable[[str, int, str, int, bytes], T] = codec.read,  # type: ignore[assignment]
                       ) -> tuple[list[T], int]:
    """Up to `batch` messages on the filter from `start_seq`; returns (items, number still pending).

    `make(stream, seq, subject, stored_ns, data)` turns each message into an item: the codec's read by
    default, or anything that keeps the raw bytes (`ledger check` must see what the codec would refuse).
    """
    req: dict[str, object] = {"seq": max(start_seq, 1), "next_by_subj": subject_filter, "batch": batch}
    if min_last_seq:
        req["min_last_seq"] = min_last_seq
    items: list[T] = []
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
        items.append(make(stream, int(h["Nats-Sequence"]), h["Nats-Subject"], parse_stamp(h["Nats-Time-Stamp"]),
                          msg.data))

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
    return items, pending


async def history(nc: NATS, stream: str, subject_filter: str, *, after: int = 0,
                  min_last_seq: int | None = None, timeout: float = 5.0) -> list[Item]:
    """Every message on the filter with a sequence above `after`, oldest first."""
    out: list[Item] = []
    start = after + 1
    while True:
        items: list[Item]
        items, pending = await direct_batch(nc, stream, subject_filter, start,
                                            min_last_seq=min_last_seq, timeout=timeout)
        out.extend(items)
        if not items or pending == 0:
            return out
        start = items[-1].seq + 1
