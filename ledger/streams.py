"""The ledger's three streams: what they must look like, and making them so.

* LEDGER      - every lifecycle event; file storage, never deleted or purged.
* LEDGER_HB   - heartbeats; kept for `heartbeat_max_age` and at most
                `heartbeat_per_agent` per agent, so the volume does not grow
                with fleet size x time, yet recent beats can be replayed.
* LEDGER_DLQ  - dead letters (messages consumers could not use), with reasons.

Heartbeats on a single node are written with `persist_mode: async` (nats-server 2.12+, R1 only): the server
acknowledges a beat before its fsync, so a server run with `sync_interval: always` (as `ledger up` does, for
the lifecycle stream's sake) does not cap the fleet's beat rate at the disk's fsync rate (measured here: ~3 k
beats/s acknowledged with an fsync each, ~30 k without). A beat is a liveness signal, not a fact: one lost in
an OS crash is replaced by the agent's next beat, and the monitor declares nothing for its grace window after
the server comes back. The lifecycle stream keeps the default, every event fsynced before its acknowledgement.
JetStream fixes a stream's persist mode at creation: an existing stream keeps its own (no mismatch).

`ensure_streams` is idempotent: it creates what is missing, updates settings
that JetStream lets us change, refuses (StreamMismatch) when an unchangeable
setting differs, and reads every stream back to verify the result.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from nats.js.api import DiscardPolicy, PersistMode, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import APIError, NotFoundError
from nats.js.manager import JetStreamManager

from . import imported, subjects
from .errors import StreamMismatch, StreamMissing
from .settings import Settings

# JetStream refuses to change these after creation.
IMMUTABLE = ("storage", "retention", "deny_delete", "deny_purge")
CHANGE_REQUESTS = ("$JS.API.STREAM.CREATE.", "$JS.API.STREAM.UPDATE.")
"""The API requests of `ensure_streams` that change streams: in a secured deployment, only admin may make them."""
ADMIN_HINT = "run `ledger init` with admin credentials"
NO_PLACEMENT = 10005
"""'no suitable peers for placement': a cluster whose nodes have not all joined JetStream's meta group yet (a
fresh or just restarted cluster): worth asking again for a while, unlike every other refusal."""
PLACEMENT_PATIENCE = 30.0

log = logging.getLogger(__name__)


async def _placed(change: Callable[[], Awaitable[object]], name: str) -> None:
    """Run a stream create/update, asking again while the cluster has too few peers to place it."""
    give_up, delay = time.monotonic() + PLACEMENT_PATIENCE, 0.25
    while True:
        try:
            await change()
            return
        except APIError as e:
            if e.err_code != NO_PLACEMENT or time.monotonic() + delay > give_up:
                raise
            log.info("stream %s: %s; asking again in %.2f s", name, e.description, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)


def specs(settings: Settings) -> list[StreamConfig]:
    replicas = settings.replicas or 1
    return [
        StreamConfig(
            name=subjects.LEDGER_STREAM,
            description="session ledger: lifecycle events (immutable)",
            subjects=list(subjects.LEDGER_SUBJECTS),
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=replicas,
            discard=DiscardPolicy.NEW,  # never drop history; a full disk refuses writes instead
            max_age=0,  # stated, not left unset: so a change to any limit is a difference `ledger doctor` sees
            max_msgs=-1,
            max_bytes=-1,
            duplicate_window=settings.duplicate_window,
            deny_delete=True,
            deny_purge=True,
            allow_rollup_hdrs=False,
            allow_direct=True,
        ),
        StreamConfig(
            name=subjects.HEARTBEAT_STREAM,
            description="session ledger: heartbeats (bounded by age and per agent)",
            subjects=list(subjects.HEARTBEAT_SUBJECTS),
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=replicas,
            discard=DiscardPolicy.OLD,
            max_age=settings.heartbeat_max_age,
            max_msgs=-1,
            max_bytes=-1,
            max_msgs_per_subject=settings.heartbeat_per_agent,
            duplicate_window=min(settings.duplicate_window, settings.heartbeat_max_age),
            deny_delete=True,
            deny_purge=False,
            allow_direct=True,
            persist_mode=PersistMode.ASYNC if replicas == 1 else None,
        ),
        StreamConfig(
            name=subjects.DLQ_STREAM,
            description="session ledger: dead letters with their reasons",
            subjects=list(subjects.DLQ_SUBJECTS),
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=replicas,
            discard=DiscardPolicy.OLD,
            max_age=settings.dlq_max_age,
            max_msgs=-1,
            max_bytes=-1,
            duplicate_window=min(settings.duplicate_window, settings.dlq_max_age),
            deny_delete=True,
            deny_purge=False,
            allow_direct=True,
        ),
    ]


def _name(spec: StreamConfig) -> str:
    """The name of one of `specs` (nats-py's StreamConfig leaves it optional; ours are all named)."""
    if spec.name is None:
        raise ValueError("a stream spec without a name")
    return spec.name


CREATION_ONLY = ("persist_mode",)
"""Asked for when a stream is created, never compared: JetStream cannot change it later, a server before 2.12
ignores it, and either mode is a working ledger."""


def _wanted(spec: StreamConfig) -> dict[str, Any]:
    wanted = spec.as_dict()
    for key in ("name", "description", *CREATION_ONLY):
        wanted.pop(key, None)
    return wanted


def keep_existing(spec: StreamConfig, actual: StreamConfig, settings: Settings) -> None:
    """What an existing stream keeps of its own: its replicas (without an explicit replicas setting), and its
    persist mode (`CREATION_ONLY`: an update must not ask to change it, which JetStream refuses)."""
    if settings.replicas is None:
        spec.num_replicas = actual.num_replicas
    spec.persist_mode = actual.persist_mode


def differences(spec: StreamConfig, actual: StreamConfig) -> dict[str, tuple[Any, Any]]:
    """Settings of `spec` that `actual` does not match: name -> (wanted, found)."""
    have: dict[str, Any] = actual.as_dict()
    diff: dict[str, tuple[Any, Any]] = {}
    for key, want in _wanted(spec).items():
        found = have.get(key)
        if key == "subjects":
            same = sorted(want or []) == sorted(found or [])
        elif isinstance(want, float) or isinstance(found, float):
            same = found is not None and abs(float(want) - float(found)) < 1e-6
        else:
            same = want == found
        if not same:
            diff[key] = (want, found)
    return diff


@dataclass
class StreamReport:
    name: str
    action: str  # "created", "updated", "ok" or "imported" (a sealed copy of another ledger's, left as it is)
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.changed:
            return f"{self.name}: {self.action}"
        parts = ", ".join(f"{k} {old!r} -> {new!r}" for k, (new, old) in self.changed.items())
        return f"{self.name}: {self.action} ({parts})"


async def ensure_streams(jsm: JetStreamManager, settings: Settings) -> list[StreamReport]:
    """Create or upgrade the ledger's streams and verify their settings; idempotent."""
    reports = []
    for spec in specs(settings):
        name = _name(spec)
        try:
            info = await jsm.stream_info(name)
        except NotFoundError:
            try:
                await _placed(functools.partial(jsm.add_stream, spec), name)
            except APIError as e:
                raise StreamMismatch(f"cannot create stream {name}: {e.description} (error {e.err_code})") from None
            report = StreamReport(name, "created")
        else:
            if imported.is_imported(info.config.metadata, info.config.sealed):  # a copy (`ledger import`): kept as is
                reports.append(StreamReport(name, "imported"))
                continue
            keep_existing(spec, info.config, settings)
            diff = differences(spec, info.config)
            if (spec.num_replicas or 1) > 1 and info.config.persist_mode == PersistMode.ASYNC:
                raise StreamMismatch(
                    f"stream {name} was made for a single node (persist_mode async), which JetStream can neither "
                    f"replicate nor change: remove it (`nats stream rm {name}`: the agents' next beats refill it, "
                    "and projections rebuild) and run `ledger init` again")
            fixed = {k: v for k, v in diff.items() if k in IMMUTABLE}
            if fixed:
                what = ", ".join(f"{k}={found!r} (want {want!r})" for k, (want, found) in fixed.items())
                raise StreamMismatch(
                    f"stream {name} exists with settings JetStream cannot change: {what}; "
                    "it was created by something else - use another server or remove that stream"
                )
            if diff:
                try:
                    await _placed(functools.partial(jsm.update_stream, spec), name)
                except APIError as e:
                    raise StreamMismatch(
                        f"cannot update stream {name}: {e.description} (error {e.err_code})") from None
            report = StreamReport(name, "updated" if diff else "ok", diff)
        after = await jsm.stream_info(name)
        left = differences(spec, after.config)
        if left:
            what = ", ".join(f"{k}={found!r} (want {want!r})" for k, (want, found) in left.items())
            raise StreamMismatch(f"stream {name} did not take its settings: {what}")
        reports.append(report)
    return reports


def needs_admin(name: str, diff: dict[str, tuple[Any, Any]] | None) -> StreamMissing | StreamMismatch | None:
    """What a user who may not change streams is told about stream `name` (`diff` as `check_streams` gives it):
    that it is missing or differs, and who can fix it; None when it is as wanted."""
    if diff is None:
        return StreamMissing(f"stream {name} does not exist and this NATS user may not create streams: {ADMIN_HINT}")
    if diff:
        return StreamMismatch(f"stream {name} differs in {', '.join(sorted(diff))} and this NATS user may not "
                              f"change streams: {ADMIN_HINT} (or give this command the streams' settings)")
    return None


async def why_admin_is_needed(jsm: JetStreamManager, settings: Settings) -> StreamMissing | StreamMismatch | None:
    """The first stream a user who may not change streams would need changed, read one by one: a user may not
    read every stream (an agent does not read the dead letters)."""
    for spec in specs(settings):
        found = await _check(jsm, spec, settings)
        if (problem := needs_admin(_name(spec), found)) is not None:
            return problem
    return None


async def _check(jsm: JetStreamManager, spec: StreamConfig, settings: Settings) -> dict[str, tuple[Any, Any]] | None:
    try:
        info = await jsm.stream_info(_name(spec))
    except NotFoundError:
        return None
    if imported.is_imported(info.config.metadata, info.config.sealed):
        return {}  # a sealed copy (`ledger import`) is as it was exported, whatever this ledger's settings
    keep_existing(spec, info.config, settings)
    return differences(spec, info.config)


async def check_streams(jsm: JetStreamManager, settings: Settings) -> dict[str, dict[str, tuple[Any, Any]] | None]:
    """Read-only check: stream name -> differences, or None where the stream is missing."""
    return {_name(spec): await _check(jsm, spec, settings) for spec in specs(settings)}
