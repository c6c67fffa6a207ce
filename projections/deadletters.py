"""Dead letters: a stored message that is not an event goes to `ledger.dlq.<stream>.<reason>`.

The dead letter carries the original bytes and, in headers, where it came from
and why it was refused. Its `Nats-Msg-Id` is derived from the original's
position, so publishing it again after a crash (before the checkpoint moved
past it) is recognised by JetStream as the same message within the DLQ
stream's duplicate window.
"""

from __future__ import annotations

import asyncio
import time

from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError, TimeoutError as NatsTimeout
from nats.js.errors import APIError

from ledger.codec import MSG_ID, Unreadable
from ledger.subjects import DLQ_STREAM, dlq_subject

from .errors import ProjectionError
from .state import dead_letter_code

H_STREAM = "Ledger-Dlq-Stream"
H_SUBJECT = "Ledger-Dlq-Subject"
H_SEQ = "Ledger-Dlq-Seq"
H_STORED_NS = "Ledger-Dlq-Stored-Ns"
H_REASON = "Ledger-Dlq-Reason"
H_CONSUMER = "Ledger-Dlq-Consumer"
H_TRUNCATED = "Ledger-Dlq-Truncated"

MAX_REASON = 1000
_HEADER_OVERHEAD = 2048  # generous room for the headers above


def headers_for(item: Unreadable, consumer: str) -> dict[str, str]:
    reason = " ".join(item.reason.split())[:MAX_REASON]  # a header value is one line
    return {
        MSG_ID: f"dlq:{item.stream}:{item.seq}",
        H_STREAM: item.stream,
        H_SUBJECT: item.subject,
        H_SEQ: str(item.seq),
        H_STORED_NS: str(item.timestamp_ns),
        H_REASON: reason,
        H_CONSUMER: consumer,
    }


async def publish(nc: NATS, item: Unreadable, *, consumer: str, timeout: float, deadline: float) -> None:
    """Publish one dead letter, retrying while the server does not answer (until `deadline` seconds)."""
    headers = headers_for(item, consumer)
    payload = item.data
    room = nc.max_payload - _HEADER_OVERHEAD
    if len(payload) > room:  # keep what fits rather than lose the whole letter
        headers[H_TRUNCATED] = str(len(payload))
        payload = payload[:room]
    js = nc.jetstream(timeout=timeout)
    subject = dlq_subject(item.stream, dead_letter_code(item.reason))
    give_up = time.monotonic() + deadline
    while True:
        try:
            await js.publish(subject, payload, headers=headers, stream=DLQ_STREAM)
            return
        except (NatsTimeout, NoRespondersError, asyncio.TimeoutError) as e:
            if time.monotonic() > give_up:
                raise ProjectionError(
                    f"cannot dead-letter {item.stream} #{item.seq} to {subject}: {type(e).__name__} "
                    f"(does the {DLQ_STREAM} stream exist? `ledger init` creates it)") from None
            await asyncio.sleep(0.25)
        except APIError as e:
            raise ProjectionError(f"cannot dead-letter {item.stream} #{item.seq} to {subject}: {e.description}") from None
