"""The HTTP server, run by uvicorn inside the caller's asyncio loop.

    async with http_server(stack, "127.0.0.1", 8080) as url:   # port 0: a free one
        ...                                                    # url is where it listens

It opens its own read-only `Query` on the stack's projection file (and the
stack's event store for the past and histories), hears the stack's follower,
and stops with the block: live event streams are ended first, so a browser
left open never holds the shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator

import uvicorn

from ledger.errors import LedgerError
from projections.query import Query

from .app import AppState, Parts, StackLike, create_app

log = logging.getLogger(__name__)


class HttpServerFailed(LedgerError):
    """The HTTP server could not start (the port in use, say)."""


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers: the process that runs it (`ledger up`) owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def run_here(self) -> None:
        try:
            await self.serve()
        except SystemExit:  # uvicorn exits the process when it cannot bind: here that is an error of this piece
            raise HttpServerFailed("the HTTP server could not start (see the error above: the port in use?)") from None


@contextlib.asynccontextmanager
async def serve(parts: Parts, host: str = "127.0.0.1", port: int = 0, *,
                start_timeout: float = 30.0) -> AsyncIterator[str]:
    """Serve the app on the parts; yield its URL (http://host:port)."""
    app = create_app(parts)
    # log_config=None: uvicorn's own would reconfigure the root logger (format and level) of the whole process.
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", log_config=None, lifespan="on",
                            timeout_graceful_shutdown=5)
    server = _Server(config)
    task = asyncio.create_task(server.run_here(), name="http")
    try:
        deadline = time.monotonic() + start_timeout
        while not server.started:  # uvicorn says it started with a flag, not an event
            if task.done():
                task.result()  # its error
                raise HttpServerFailed(f"the HTTP server on {host}:{port} stopped before it started")
            if time.monotonic() > deadline:
                raise HttpServerFailed(f"the HTTP server on {host}:{port} did not start within {start_timeout} s")
            await asyncio.sleep(0.02)
        bound = server.servers[0].sockets[0].getsockname()
        yield f"http://{host if ':' not in host else f'[{host}]'}:{bound[1]}"
    finally:
        ledger: AppState = app.state.ledger
        ledger.feed.close()
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, HttpServerFailed):
            await task


@contextlib.asynccontextmanager
async def http_server(stack: StackLike, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """The HTTP API and dashboard on a running stack (`ledgerctl.stack.running_stack`); yields the URL."""
    path = stack.projector.path
    async with Query.open(path, stack.store) as query:
        async with serve(Parts.of(stack, query), host, port) as url:
            yield url
