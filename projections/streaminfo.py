"""What the projections need to know about a stream: its identity and the range it still holds."""

from __future__ import annotations

import msgspec
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError, TimeoutError as NatsTimeout

from ledger.errors import StoreError, StreamMissing, Unavailable
from ledger.reader import parse_stamp

STREAM_NOT_FOUND = 10059


class _State(msgspec.Struct):
    messages: int = 0
    first_seq: int = 0
    first_ts: str = ""
    last_seq: int = 0


class _Error(msgspec.Struct):
    err_code: int = 0
    description: str = ""


class _Info(msgspec.Struct):
    created: str = ""
    state: _State = msgspec.field(default_factory=_State)
    error: _Error | None = None


class StreamFacts(msgspec.Struct, frozen=True):
    name: str
    created: str
    """When the stream was created: a stream deleted and made anew is another stream."""
    messages: int
    first_seq: int
    first_ns: int
    """When the oldest message still held was stored (0 when empty)."""
    last_seq: int


_decode = msgspec.json.Decoder(_Info).decode


async def stream_facts(nc: NATS, stream: str, timeout: float) -> StreamFacts:
    try:
        reply = await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=timeout)
    except NoRespondersError:
        raise Unavailable(f"JetStream did not answer stream info for {stream} (no responders)") from None
    except NatsTimeout:
        raise Unavailable(f"JetStream did not answer stream info for {stream} within {timeout:.1f} s") from None
    info = _decode(reply.data)
    if info.error is not None:
        if info.error.err_code == STREAM_NOT_FOUND:
            raise StreamMissing(f"stream {stream} does not exist: run `ledger init` (or `ledger server`)")
        raise StoreError(f"stream info {stream}: {info.error.description}")
    s = info.state
    first_ns = parse_stamp(s.first_ts) if s.messages and s.first_ts else 0
    return StreamFacts(stream, info.created, s.messages, s.first_seq, first_ns, s.last_seq)
