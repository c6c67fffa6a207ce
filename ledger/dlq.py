"""The dead-letter format: a stored message that is not an event, kept in LEDGER_DLQ with where it came from.

The dead letter carries the original bytes and, in headers, where it came from and why it was refused. Its
`Nats-Msg-Id` is derived from the original's position, so publishing it again after a crash (before a reader's
checkpoint moved past it) is recognised by JetStream as the same message within the DLQ stream's duplicate
window. Pure: `EventStore.dead_letter` publishes.
"""

from __future__ import annotations

from .codec import MSG_ID, Unreadable

H_STREAM = "Ledger-Dlq-Stream"
H_SUBJECT = "Ledger-Dlq-Subject"
H_SEQ = "Ledger-Dlq-Seq"
H_STORED_NS = "Ledger-Dlq-Stored-Ns"
H_REASON = "Ledger-Dlq-Reason"
H_CONSUMER = "Ledger-Dlq-Consumer"
H_TRUNCATED = "Ledger-Dlq-Truncated"

MAX_REASON = 1000
HEADER_ROOM = 2048
"""Bytes of a message kept for the headers above: generous."""


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


def letter(item: Unreadable, consumer: str, max_payload: int) -> tuple[dict[str, str], bytes]:
    """(headers, payload) of the dead letter for `item`: what fits of the original rather than nothing."""
    headers = headers_for(item, consumer)
    payload = item.data
    room = max_payload - HEADER_ROOM
    if len(payload) > room:
        headers[H_TRUNCATED] = str(len(payload))
        payload = payload[:room]
    return headers, payload
