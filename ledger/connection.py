"""Connections to NATS: credentials, TLS, the version floor, and what a failed connect or a refused publish means.

nats-py tells some things only through its error callback: why a first connect failed (it then reports
"no servers available"), and that the server refused a publish or a subscription (the publish itself just
goes unanswered). A `ConnectionWatch` is that callback: it keeps what it heard while connecting, so the
failure can be named, and hands permission violations to whoever waits on the subject.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import ssl
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import nkeys
from nats.aio.client import Client as NATS
from nats.errors import AuthorizationError, NoServersError
from nats.errors import Error as NatsError

from .errors import AuthFailed, ConfigError, ConnectedServerTooOld, PermissionDenied, TlsFailed, Unavailable
from .settings import Settings, redact_url

log = logging.getLogger(__name__)
T = TypeVar("T")

MIN_VERSION = (2, 11, 0)
"""The oldest nats-server the ledger accepts: older ones silently ignore the entity-wide compare-and-set header."""

__all__ = ["ConnectionWatch", "check_server_version", "classify_connect_failure", "open_connection",
           "parse_permission_violation", "redact_url", "watch_of"]

# nats-py lower-cases the server's text: 'nats: permissions violation for publish to "ledger.agent.a2.goodbye.a1"'.
_PERMISSION_RE = re.compile(r'permissions violation for (publish|subscription) to "([^"]*)"', re.IGNORECASE)
INBOX_HINT = "replies come under LEDGER_INBOX_PREFIX: set it to a prefix this user may subscribe to"
_CLIENT_CERT_REQUIRED = ("certificate required", "peer did not return a certificate", "bad certificate",
                         "handshake failure", "unknown ca")
"""How OpenSSL words a server's refusal of a missing or untrusted client certificate (an alert it sent us)."""


def parse_permission_violation(text: str) -> tuple[str, str] | None:
    """('publish' | 'subscription', subject lower-cased) from nats-py's permissions violation text, else None."""
    m = _PERMISSION_RE.search(text)
    return (m[1].lower(), m[2].lower()) if m else None


GONE = (NatsError, OSError, TimeoutError)
"""What flushing, closing or unsubscribing on a connection that may already be gone can raise: nothing to do
about it on the way out, unlike any other exception (a bug, which must surface)."""


def is_client_error(e: BaseException) -> bool:
    """An error of the NATS client itself that nothing below mapped to a ledger error (its text starts with
    "nats:"): what a command's boundary may print as it is, without knowing nats-py."""
    return isinstance(e, NatsError)


def check_server_version(version: tuple[int, int, int], url: str) -> None:
    """Refuse a server below the floor: it silently ignores Nats-Expected-Last-Subject-Sequence-Subject."""
    if version < MIN_VERSION:
        have, floor = ".".join(map(str, version)), ".".join(map(str, MIN_VERSION))
        raise ConnectedServerTooOld(
            f"nats-server {have} at {redact_url(url)} is too old: the ledger needs {floor} or newer (older servers "
            "silently ignore the entity-wide compare-and-set header Nats-Expected-Last-Subject-Sequence-Subject, "
            "so two agents could own one session); upgrade the server")


def _outside_validity(cert_file: str) -> bool:
    """Whether a PEM certificate's dates exclude now. CPython's ssl reads them only through a private helper;
    if that ever goes, we just do not know (False)."""
    try:
        decoded = ssl._ssl._test_decode_cert(cert_file)  # type: ignore[attr-defined]
        not_before, not_after = ssl.cert_time_to_seconds(decoded["notBefore"]), ssl.cert_time_to_seconds(
            decoded["notAfter"])
    except (AttributeError, KeyError, ValueError, OSError, ssl.SSLError):
        return False
    return not not_before <= time.time() <= not_after


def classify_connect_failure(seen: Sequence[BaseException], final: BaseException | None, url: str,
                             client_cert: str | None = None) -> AuthFailed | TlsFailed | Unavailable:
    """What went wrong with a first connect, from the errors nats-py reported while trying."""
    where = redact_url(url)
    if client_cert and _outside_validity(client_cert):
        # With TLS 1.3 the server checks our certificate after the client's side of the handshake is done: its
        # alert can lose the race with the connection closing, and all we see is a broken pipe or a reset.
        return TlsFailed(f"TLS handshake with {where} failed: our client certificate is expired or not yet valid "
                         f"({client_cert}); renew the certificate given with --tls-cert")
    for e in seen:
        text = str(e).lower()
        if isinstance(e, AuthorizationError) or "authorization violation" in text:
            return AuthFailed(f"authorization violation at {where}: the server refused these credentials "
                              "(check --user/--password, --token, --creds or --nkey-seed)")
        if "authentication expired" in text or "user authentication revoked" in text:
            return AuthFailed(f"authorization refused at {where}: {str(e).removeprefix('nats: ')}")
    for e in seen:
        if isinstance(e, ssl.SSLCertVerificationError):
            return TlsFailed(f"TLS handshake with {where} failed: the server's certificate is not trusted "
                             f"({e.verify_message or e.reason}); pass the CA that signed it with --tls-ca")
        if isinstance(e, ssl.SSLError):
            why = (e.reason or str(e)).lower().replace("_", " ")
            if "alert certificate expired" in why:  # the server's alert: our certificate is outside its dates
                return TlsFailed(f"TLS handshake with {where} failed: the server refused our client certificate as "
                                 f"expired or not yet valid ({why}); renew the certificate given with --tls-cert")
            if any(s in why for s in _CLIENT_CERT_REQUIRED):
                return TlsFailed(f"TLS handshake with {where} failed: the server requires a client certificate it "
                                 f"trusts ({why}); pass --tls-cert and --tls-key")
            return TlsFailed(f"TLS handshake with {where} failed: {why}")
        if "tls required" in str(e).lower():
            return TlsFailed(f"{where} requires TLS: use a tls:// URL and --tls-ca")
    last = seen[-1] if seen else final
    why = (str(last) or type(last).__name__) if last is not None else "no answer"
    return Unavailable(f"cannot reach NATS at {where}: {why}")


def _refuses_credentials(text: str) -> bool:
    text = text.lower()
    return "authorization violation" in text or "authentication expired" in text or "authentication revoked" in text


class _GiveUp(Exception):
    """Raised from the error callback to end a first connect that cannot succeed."""


class ConnectionWatch:
    """nats-py's error callback for one connection."""

    def __init__(self, inbox_prefix: str) -> None:
        self.connecting = True
        self.seen: list[BaseException] = []
        self._inbox = inbox_prefix.lower()
        self._listeners: list[Callable[[str, str], None]] = []
        self.inbox_denied: PermissionDenied | None = None
        """Set when the server refused a subscription to our inbox: no reply can ever reach us."""
        self._refused: set[str] = set()
        self.refused_told = False
        """Whether we said, since the last (re)connect, that the server refuses our credentials."""

    async def error_cb(self, e: Exception) -> None:
        found = parse_permission_violation(str(e))
        if found is None:
            if self.connecting:
                self.seen.append(e)
                if isinstance(e, ssl.SSLError):
                    # nats-py would now close the failed TLS transport and wait for it forever (the first connect
                    # then hangs until the caller's timeout); the handshake will not succeed on a retry either.
                    raise _GiveUp(e)
            elif not self.refused_told and (isinstance(e, AuthorizationError) or _refuses_credentials(str(e))):
                # Credentials revoked or changed while we ran: say so once per outage (reconnecting goes on),
                # or all the operator reads is "no heartbeat acknowledged" and "no consumer yet".
                self.refused_told = True
                log.warning("nats: the server refuses this connection's credentials (%s): revoked or changed? "
                            "still trying to reconnect", str(e).removeprefix("nats: ") or "authorization violation")
                return
            log.debug("nats: %s", e)
            return
        operation, subject = found
        log.info("nats: %s", e)  # whoever waits on the subject raises PermissionDenied
        if operation == "subscription" and subject.startswith(self._inbox):
            self.inbox_denied = PermissionDenied(operation, subject, INBOX_HINT)
        elif operation == "publish" and len(self._refused) < 1000:
            self._refused.add(subject)
        for listener in list(self._listeners):
            listener(operation, subject)

    def refused_under(self, prefix: str) -> bool:
        """Whether the server has refused us a publish to some subject under `prefix` on this connection."""
        under = prefix.lower()
        return any(s.startswith(under) for s in self._refused)

    def add_listener(self, listener: Callable[[str, str], None]) -> None:
        """`listener(operation, subject lower-cased)` hears every permissions violation."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[str, str], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    async def guard(self, request: Awaitable[T], subject: str | None = None, *, prefix: str | None = None) -> T:
        """Await a request, or raise PermissionDenied as soon as the server refuses its subject.

        `subject` is the request's subject; `prefix` covers every subject under it (several API requests).
        A refused subscription to our inbox refuses every request: the reply could never arrive.
        """
        if self.inbox_denied is not None:
            raise self.inbox_denied
        want, under = (subject or "").lower(), (prefix or "\0").lower()
        denied: asyncio.Future[PermissionDenied] = asyncio.get_running_loop().create_future()

        def on_violation(operation: str, refused: str) -> None:
            if denied.done():
                return
            if operation == "publish" and (refused == want or refused.startswith(under)):
                denied.set_result(PermissionDenied(operation, subject if subject and refused == want else refused))
            elif operation == "subscription" and refused.startswith(self._inbox):
                denied.set_result(PermissionDenied(operation, refused, INBOX_HINT))

        self.add_listener(on_violation)
        task = asyncio.ensure_future(request)
        try:
            racing: list[asyncio.Future[Any]] = [task, denied]
            await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        finally:
            self.remove_listener(on_violation)
        if task.done():
            return task.result()
        task.cancel()
        raise denied.result()


_watches: weakref.WeakKeyDictionary[NATS, ConnectionWatch] = weakref.WeakKeyDictionary()


def watch_of(nc: NATS) -> ConnectionWatch | None:
    """The watch of a connection made by `open_connection` (None for one made some other way)."""
    return _watches.get(nc)


def _readable(path: str, what: str) -> str:
    path = os.path.expanduser(path)
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror or e}") from None
    return path


def wants_tls(settings: Settings) -> bool:
    """A tls:// URL or any TLS file: the connection must be TLS, never plain text."""
    return bool(settings.tls_ca_file or settings.tls_cert_file
                or any(u.strip().lower().startswith("tls://") for u in settings.nats_url.split(",")))


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The client's TLS context: the CA to trust (else the system's), and its own certificate for mutual TLS."""
    if not wants_tls(settings):
        return None
    ca = _readable(settings.tls_ca_file, "TLS CA file") if settings.tls_ca_file else None
    try:
        ctx = ssl.create_default_context(cafile=ca)
    except ssl.SSLError as e:
        raise ConfigError(f"TLS CA file {ca}: not a PEM certificate ({e.reason or e})") from None
    if settings.tls_cert_file and settings.tls_key_file:
        cert = _readable(settings.tls_cert_file, "TLS certificate file")
        key = _readable(settings.tls_key_file, "TLS key file")
        try:
            ctx.load_cert_chain(cert, key)
        except ssl.SSLError as e:
            raise ConfigError(f"TLS certificate {cert} with key {key}: {e.reason or e}") from None
    return ctx


def connect_options(settings: Settings) -> dict[str, Any]:
    """nats.connect's credential and TLS arguments; ConfigError for a file that cannot be read."""
    options: dict[str, Any] = {"inbox_prefix": settings.inbox_prefix}
    if settings.creds_file:
        options["user_credentials"] = _readable(settings.creds_file, "credentials file")
    if settings.nkey_seed_file:
        options["nkeys_seed"] = _readable(settings.nkey_seed_file, "nkey seed file")
    if settings.user is not None:
        options["user"] = settings.user
        options["password"] = settings.password
    if settings.token is not None:
        options["token"] = settings.token
    if (ctx := tls_context(settings)) is not None:
        options["tls"] = ctx
    return options


async def open_connection(settings: Settings, name: str = "session-ledger",
                          on_event: Callable[[str], None] | None = None) -> NATS:
    """Connect to NATS (reconnecting forever afterwards), or raise a typed error saying why not.

    Unavailable when no server answers, AuthFailed / TlsFailed when one refuses us, ConnectedServerTooOld
    below the version floor, ConfigError for a credential file that cannot be read. `on_event` hears
    "disconnected" and "reconnected".
    """
    options = connect_options(settings)
    watch = ConnectionWatch(settings.inbox_prefix)

    async def disconnected_cb() -> None:
        log.info("nats: disconnected")
        if on_event:
            on_event("disconnected")

    async def reconnected_cb() -> None:
        log.info("nats: reconnected")
        watch.refused_told = False
        if refuse_old_node():
            return
        if on_event:
            on_event("reconnected")

    def refuse_old_node() -> bool:
        """A reconnect is a connection too: a node below the floor (a cluster half-way through a downgrade, a
        stray old server on a listed URL) ends this connection rather than carrying compare-and-set writes
        it would silently ignore. What used it then fails as on any closed connection (an agent fences)."""
        v = nc.connected_server_version
        url = nc.connected_url.geturl() if nc.connected_url else settings.nats_url
        try:
            check_server_version((v.major, v.minor, v.patch), url)
        except ConnectedServerTooOld as e:
            log.error("%s; closing the connection", e)
            closing = asyncio.get_running_loop().create_task(_close(nc), name="close-old-node")
            _closing.add(closing)
            closing.add_done_callback(_closing.discard)
            return True
        return False

    servers = [u.strip() for u in settings.nats_url.split(",") if u.strip()]
    try:
        # nats-py applies max_reconnect_attempts to the first connect too: a few
        # tries there (so a wrong URL fails fast), then reconnect forever.
        # Pings find a frozen server (its socket stays open, so nothing else would); the client then moves
        # to another node of the cluster (the URLs given, and those the cluster announces).
        # nats-py annotates its timings as int seconds and uses them as floats (asyncio timeouts and sleeps).
        nc = NATS()
        await nc.connect(
            servers=servers, name=name, connect_timeout=settings.connect_timeout,  # type: ignore[arg-type]
            allow_reconnect=True, max_reconnect_attempts=2,
            reconnect_time_wait=settings.reconnect_time_wait,  # type: ignore[arg-type]
            ping_interval=settings.ping_interval,  # type: ignore[arg-type]
            max_outstanding_pings=settings.max_outstanding_pings,
            dont_randomize=not settings.randomize_servers,
            # A forced flush (past the 2 MiB pending buffer) otherwise waits for a frozen server forever, and
            # with it every append and re-send: bounded, the appends fail by their deadlines instead.
            flush_timeout=settings.request_timeout,
            error_cb=watch.error_cb, disconnected_cb=disconnected_cb, reconnected_cb=reconnected_cb, **options,
        )
    except nkeys.NkeysError as e:  # read when connecting starts: a file that holds no seed
        what = f"nkey seed file {settings.nkey_seed_file}" if settings.nkey_seed_file else \
            f"credentials file {settings.creds_file}"
        raise ConfigError(f"{what}: {str(e).removeprefix('nkeys: ')}") from None
    except (_GiveUp, NoServersError, NatsError, OSError, TimeoutError) as e:
        if isinstance(e, _GiveUp) and nc._transport is not None:
            # No wait: waiting for a failed TLS transport to close is what hangs. (nats-py leaves close unannotated.)
            nc._transport.close()  # type: ignore[no-untyped-call]
        raise classify_connect_failure(watch.seen, e, settings.nats_url, settings.tls_cert_file) from None
    try:
        # nats-py's connect() returns without an error when the server closes the socket instead of answering
        # its PING (it only looks for PONG or -ERR): one more round trip proves the server accepted us.
        await nc.flush(timeout=settings.connect_timeout)  # type: ignore[arg-type] # int-annotated, used as a float
    except Exception as e:  # noqa: BLE001 - whatever it was, this connection is not usable
        await _close(nc)
        raise classify_connect_failure(watch.seen, e, settings.nats_url, settings.tls_cert_file) from None
    watch.connecting = False
    url = nc.connected_url.geturl() if nc.connected_url else settings.nats_url
    try:
        v = nc.connected_server_version
        check_server_version((v.major, v.minor, v.patch), url)
        if wants_tls(settings) and not getattr(nc, "_server_info", {}).get("tls_required"):
            # nats-py upgrades to TLS only when the server asks: a tls:// URL or a CA must not fall back to plain text.
            raise TlsFailed(f"{redact_url(url)} does not offer TLS, but TLS was asked for (a tls:// URL or --tls-*)")
    except BaseException:
        await _close(nc)
        raise
    _watches[nc] = watch
    nc.options["max_reconnect_attempts"] = -1
    return nc


_closing: set[asyncio.Task[None]] = set()
"""Closes under way (held so that they are not garbage-collected half-way)."""


async def _close(nc: NATS) -> None:
    try:
        await nc.close()
    except Exception as e:  # noqa: BLE001 - closing a connection we are abandoning
        log.debug("closing a refused connection: %s", e)
