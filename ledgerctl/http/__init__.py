"""The HTTP face of the ledger: a JSON API over the queries, live events, /metrics, health, and a dashboard."""

from .app import Parts, create_app
from .server import HttpServerFailed, http_server, serve

__all__ = ["Parts", "create_app", "http_server", "serve", "HttpServerFailed"]
