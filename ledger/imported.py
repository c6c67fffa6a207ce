"""What makes a stream an imported copy of another ledger's, and how its stored messages are read back as the
original's. Pure: the store (`ledger.jsapi`) applies it where it reads stored times and headers.

A JetStream server stamps its own time on every message it stores, so a copy loaded by `ledger import` would
carry the times of the import. The import therefore writes each message with `Ledger-Stored-Ns` (the original
stored time) and marks the streams it creates with `MARK` in their config metadata; the store believes the
header only on a stream so marked. A production stream has no such metadata (only stream admin could add it,
and admin can rewrite the log anyway), so a forger who adds the header to a message on a live ledger changes
nothing. An imported stream is also sealed: the server refuses any write, deletion or ageing on it.

Headers the server would act on when the message is published again (`Nats-Expected-*` refuse it, a repeated
`Nats-Msg-Id` dedupes it, `Nats-TTL` ages it) are kept under `ESCAPE` + their name, and so is any original
header the import's own names would collide with; `restored_headers` undoes exactly that.
"""

from __future__ import annotations

from collections.abc import Mapping

MARK = "ledger.imported"
"""Config metadata of an imported stream: the value says from what (the export's source and time)."""
LOADING = "ledger.importing"
"""Config metadata of a stream an import is still loading (the value as MARK's): one that stays so was cut off
half-way (kill -9, a crash), and is never taken for a copy."""
STORED_NS = "Ledger-Stored-Ns"
"""The original stored time (ns since the epoch) of a message of an imported stream."""
ESCAPE = "Ledger-Imported-"
MSG_ID = "Nats-Msg-Id"


def is_imported(metadata: Mapping[str, str] | None, sealed: bool | None) -> bool:
    """Whether a stream so configured is an imported copy: marked, and sealed. The import seals what it marks, and
    a live stream cannot be sealed (it would take no more events): a mark on one is someone else's, believed by
    nothing (its stored times stay the server's, its consumers run)."""
    return bool(sealed) and bool(metadata) and MARK in metadata  # type: ignore[operator]


def _reserved(name: str) -> bool:
    lower = name.lower()
    return ((lower.startswith("nats-") and lower != MSG_ID.lower()) or lower == STORED_NS.lower()
            or lower.startswith(ESCAPE.lower()))


def publish_headers(headers: Mapping[str, str], stored_ns: int, *, escape_msg_id: bool = False) -> dict[str, str]:
    """The headers to publish an original message with into an imported stream: its own, those the server would
    act on escaped (its `Nats-Msg-Id` too when `escape_msg_id`: the server took it for a duplicate), plus its
    original stored time."""
    out = {}
    for name, value in headers.items():
        escape = _reserved(name) or (escape_msg_id and name.lower() == MSG_ID.lower())
        out[ESCAPE + name if escape else name] = value
    out[STORED_NS] = str(stored_ns)
    return out


def restored_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The original headers of a message read from an imported stream (the inverse of `publish_headers`): every
    reserved name not escaped is the import's own (its stored time, its sequence guard) and goes."""
    out = {}
    for name, value in headers.items():
        if name.lower().startswith(ESCAPE.lower()):
            out[name[len(ESCAPE):]] = value
        elif not _reserved(name):
            out[name] = value
    return out


def stored_ns(headers: Mapping[str, str] | None, server_ns: int) -> int:
    """The stored time of a message of an imported stream: its original one, or the server's when it has none
    (or an unreadable one)."""
    value = headers.get(STORED_NS) if headers else None
    if value is None or not value.isdigit() or len(value) > 19:
        return server_ns
    return int(value)
