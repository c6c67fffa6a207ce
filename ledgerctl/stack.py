"""What runs together: the embedded server (or a given one), the streams, the projector and the consumers.

`ledger up` and `ledger demo` are thin shells over `running_stack`; the tests and benchmarks use it too.

The log is folded once per process: one `Follower` applies each batch to one
state, which the projector commits (resuming it from the file, so a restart
reads only what the file has not seen) and the consumers act on once it has
caught up with the log; `listeners` (the demo's narrator) hear the same batches.
Resumed, the consumers first hear the events of the monitor's windows again (`recall`): what it
remembers beside the state (unreachable reports, recent deaths) survives a restart, as when they
read the whole log.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from consumers.follow import Follower, Listener
from consumers.group import ConsumerGroup
from consumers.liveness_rules import LivenessSettings
from ledger import cancellation
from ledger.errors import LedgerError, PortInUse
from ledger.settings import Settings
from ledger.store import EventStore
from ledger.subjects import HEARTBEAT_STREAM, LEDGER_STREAM
from ledger.transfer import load_file
from projections.projector import Progress, Projector
from projections.query import Query
from projections.settings import ProjectionSettings
from projections.state import STREAMS

from .query_protocol import SERVICE_NAME
from .query_service import QueryService
from .server import DEFAULT_DATA_DIR, EmbeddedServer, ServerConfig, check_port_free

Say = Callable[[str], None]
DEFAULT_HTTP_PORT = 8080


class StackStopped(LedgerError):
    """A piece of the stack (the projector, the consumers, the embedded server) stopped on its own."""


@dataclass(frozen=True)
class UpSettings:
    """What `ledger up` (and `ledger demo`) run."""

    nats_url: str | None
    """An existing NATS server; None starts an embedded one."""
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    port: int = 4222
    sync_always: bool = True
    db: Path | None = None
    """The projection file; None: projection.sqlite3 in the data directory."""
    liveness: LivenessSettings = field(default_factory=LivenessSettings)
    replicas: int | None = None
    connection: Settings | None = None
    """How to connect (credentials, timeouts); None: from the environment. An embedded server drops the
    credentials, which are meant for another server."""
    http_host: str = "127.0.0.1"
    http_port: int | None = None
    """The HTTP API and dashboard (`ledger up`: DEFAULT_HTTP_PORT); 0: any free port; None: none."""
    http_port_fallback: bool = False
    """When `http_port` is taken, serve on a free port instead (and say so) rather than fail: for the default port,
    which the user did not ask for."""
    query_service: bool = False
    """Serve the views as the NATS micro service `ledger-query` (`ledger up` does; any number of replicas may run)."""
    from_file: Path | None = None
    """An incident file (`ledger export`) to load into the (fresh) embedded server first: `ledger up --from`."""

    @property
    def db_path(self) -> Path:
        return self.db if self.db is not None else self.data_dir / "projection.sqlite3"

    def settings_for(self, url: str, *, embedded: bool) -> Settings:
        base = self.connection if self.connection is not None else Settings.from_env()
        if embedded:
            base = base.without_credentials()
        changes: dict[str, Any] = {"nats_url": url}
        if self.replicas is not None:
            changes["replicas"] = self.replicas
        return base.replace(**changes)


@dataclass
class Stack:
    """The running pieces; `run_until(stop)` supervises them."""

    url: str
    store: EventStore
    follower: Follower
    """The process's one fold of the log: the projector's and the consumers' state."""
    projector: Projector
    consumers: ConsumerGroup
    server: EmbeddedServer | None
    running: list[asyncio.Task[Any]]
    http_url: str | None = None
    """Where the HTTP API and the dashboard answer (None: not served)."""
    query_service: QueryService | None = None

    async def run_until(self, stop: asyncio.Event) -> None:
        """Return when `stop` is set; raise when a piece fails or the embedded server exits."""
        await self._watch(stop.wait())

    @property
    def caught_up(self) -> bool:
        """Whether the projector committed the log as it was at the start, and every consumer acts live."""
        return self.projector.caught_up.is_set() and not self.consumers.catching_up()

    def progress(self) -> str:
        """One line: how far the fold is in each stream, and what still catches up."""
        f = self.follower
        streams = []
        ended = {LEDGER_STREAM: f.caught_up, HEARTBEAT_STREAM: f.heartbeats_caught_up}
        for stream in STREAMS:
            at, behind = f.state.position(stream), f.behind.get(stream)
            if behind is None and ended[stream].is_set():
                behind = 0  # read to its end without a batch: nothing (more) was there
            streams.append(f"{stream} {at:,} / {at + behind:,}" if behind is not None else f"{stream} {at:,} / ?")
        waiting = ([] if self.projector.caught_up.is_set() else ["projector"]) + self.consumers.catching_up()
        return f"catching up: {', '.join(streams)} ({', '.join(waiting) or 'done'})"

    async def until_caught_up(self, stop: asyncio.Event, say: Say, *, every: float = 2.0) -> bool:
        """Wait until `caught_up`, saying `progress` every `every` seconds meanwhile; False when `stop` came
        first. Raises as `run_until` when a piece fails."""
        done = asyncio.Event()

        async def caught_up() -> None:
            await self.projector.caught_up.wait()
            await self.consumers.ready()
            done.set()

        async def told() -> None:
            while True:
                await asyncio.sleep(every)
                say(self.progress())

        async def either() -> None:
            async with asyncio.TaskGroup() as tasks:
                waiter = tasks.create_task(caught_up())
                teller = tasks.create_task(told())
                stopping = tasks.create_task(stop.wait())
                await asyncio.wait([waiter, stopping], return_when=asyncio.FIRST_COMPLETED)
                for task in (waiter, teller, stopping):
                    task.cancel()

        await self._watch(either())
        return done.is_set()

    async def _watch(self, until: Coroutine[Any, Any, object]) -> None:
        """Await `until`; raise when a piece fails or the embedded server exits first."""
        waited = asyncio.ensure_future(until)
        watched = [waited, *self.running]
        if self.server is not None:
            watched.append(asyncio.ensure_future(self._server_exit()))
        try:
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waited.cancel()
            for extra in watched[1 + len(self.running):]:
                extra.cancel()
        for task in done:
            if task is not waited:
                task.result()  # a failed piece: let its error surface
                raise StackStopped(f"{task.get_name()} stopped unexpectedly")

    async def _server_exit(self) -> None:
        assert self.server is not None
        while self.server.running:  # noqa: ASYNC110 - a Popen child has no exit to await: poll it
            await asyncio.sleep(0.5)
        raise StackStopped(f"nats-server exited unexpectedly; see {self.server.log_path}")


@contextlib.asynccontextmanager
async def running_stack(s: UpSettings, say: Say, *, name: str = "ledger-up",
                        listeners: Sequence[Listener] = ()) -> AsyncIterator[Stack]:
    """Start each piece in order, say where it is, and stop them in reverse order.

    `listeners` hear every batch the stack's follower applies, from the first (resumed from the projection,
    first the recalled items, with no changes: see `projections.follow`).
    """
    async with contextlib.AsyncExitStack() as stack:
        server = None
        url = s.nats_url
        if url is None:
            config = ServerConfig(data_dir=s.data_dir, port=s.port, sync_always=s.sync_always)
            server = await stack.enter_async_context(EmbeddedServer(config))
            url = server.url
            version = ".".join(map(str, server.version or ()))
            say(f"{'nats-server ' + version:<20}{url}  data in {s.data_dir.resolve()}"
                f"  (fsync {'always' if s.sync_always else 'by interval'})")
        settings = s.settings_for(url, embedded=server is not None)
        store = await stack.enter_async_context(EventStore.connect(settings, name=name, check=False))
        if s.from_file is not None:
            loaded = await load_file(store, s.from_file, say=say)
            say(f"imported            {s.from_file}: " + (", ".join(f"{k} {n:,}" for k, n in loaded.items())
                                                          + " messages" if loaded is not None else "loaded before"))
        reports = await store.ensure_streams()
        say("streams             " + "; ".join(str(r) for r in reports))
        # A sealed copy of another ledger's log: no verdicts (a death declared, a session reclaimed) on an incident
        # that is over; the server would refuse them anyway.
        read_only = any(r.action == "imported" for r in reports)

        projection = ProjectionSettings.from_env(db=str(s.db_path))
        # The follower reads on a connection of its own, so the consumers' writes never queue behind a catch-up.
        reader = await stack.enter_async_context(EventStore.connect(settings, name=f"{name}-follower"))
        # The projection needs every beat; the monitor's windows need the recent reports and deaths again.
        follower = Follower(reader, newest_beats=False, batch=projection.batch,
                            recall=max(s.liveness.report_window, s.liveness.breaker_window))
        # The projector listens first and resumes the follower from the file's committed state.
        projector = Projector(reader, projection, follower=follower,
                              on_progress=catch_up_reporter(say, lambda: projector.caught_up.is_set()))
        await stack.enter_async_context(projector)
        say(f"projector           {s.db_path.resolve()}")

        consumers = ConsumerGroup(store, liveness=s.liveness, shared=follower, monitor=not read_only,
                                  reclaimer=not read_only, watchdog=not read_only)
        for listener in listeners:
            follower.listen(listener)
        following = asyncio.create_task(follower.run(), name="follower")
        stack.push_async_callback(cancellation.stop, [following])  # stopped before the projector commits its last batch
        pieces = [following]
        if consumers.parts:
            consumers_task = asyncio.create_task(consumers.run(), name="consumers")
            stack.push_async_callback(cancellation.stop, [consumers_task])
            pieces.append(consumers_task)
        say(f"consumers           {', '.join(consumers.parts) or 'none: an imported log is read-only'}")
        assert projector.task is not None
        projector.task.set_name("projector")
        running = Stack(url=url, store=store, follower=follower, projector=projector, consumers=consumers,
                        server=server, running=[projector.task, *pieces])
        if s.query_service:
            query = await stack.enter_async_context(Query.open(s.db_path, store, policy=s.liveness.policy))
            running.query_service = await stack.enter_async_context(QueryService.start(store, query))
            say(f"query service       {SERVICE_NAME} on NATS ($SRV.PING.{SERVICE_NAME} finds it)")
        if s.http_port is not None:
            port = s.http_port
            if port:  # a taken port is said in one line naming its holder (uvicorn would only log and exit)
                try:
                    check_port_free(s.http_host, port, "HTTP")
                except PortInUse as e:
                    if not s.http_port_fallback:
                        raise
                    say(f"{e}; serving HTTP on a free port instead")
                    port = 0
            from .http import http_server  # litestar and uvicorn load only where the HTTP API is served

            running.http_url = await stack.enter_async_context(http_server(running, s.http_host, port))
            say(f"dashboard           {running.http_url}/  (API {running.http_url}/api, {running.http_url}/metrics)")
        yield running


def catch_up_reporter(say: Say, caught_up: Callable[[], bool], every: float = 2.0) -> Callable[[Progress], None]:
    """Says how the projector's catch-up goes, at most every `every` seconds, until it has caught up."""
    last = [time.monotonic()]

    def report(p: Progress) -> None:
        now = time.monotonic()
        if caught_up() or now - last[0] < every:
            return
        last[0] = now
        done = ", ".join(f"{st} #{p.committed[st]:,} of #{p.targets[st]:,}" for st in p.committed)
        say(f"projector catching up: {done} ({p.events / p.elapsed if p.elapsed else 0:,.0f} events/s)")

    return report
