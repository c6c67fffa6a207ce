"""The service image, structurally (no Docker engine runs here): a pinned base, a non-root user, a build context
without secrets or caches, and a healthcheck on `/readyz` that works - run here against a real HTTP server."""

from __future__ import annotations

import fnmatch
import http.server
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
READYZ = "http://127.0.0.1:8080/readyz"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments left out."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    out = []
    for raw in joined.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def services() -> dict[str, dict]:  # type: ignore[type-arg]
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def test_the_base_image_is_pinned_to_a_full_version():
    bases = [args for word, args in instructions() if word == "FROM"]
    assert len(bases) == 1
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", bases[0]), bases[0]


def test_the_image_runs_as_a_numeric_non_root_user_after_installing():
    steps = instructions()
    users = [(i, args) for i, (word, args) in enumerate(steps) if word == "USER"]
    assert users, "no USER: the services would run as root"
    last_at, user = users[-1]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or (gid.isdigit() and int(gid) != 0)), user
    install = max(i for i, (word, args) in enumerate(steps) if word == "RUN" and "pip install" in args)
    assert install < last_at, "pip install must run as root, before the image switches user"
    # The user exists with that id, and owns the data directory the named volume is mounted on.
    assert f"--uid {uid}" in DOCKERFILE and "chown ledger:ledger /data" in DOCKERFILE


def copied_sources() -> list[str]:
    return [src for word, args in instructions() if word == "COPY" for src in args.split()[:-1]
            if not src.startswith("--")]


def ignored(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p.removeprefix("**/")) or path.startswith(p + "/")
               for p in patterns)


def test_the_build_context_leaves_out_secrets_caches_and_data_but_not_what_is_copied():
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    for must_go in (".git", ".venv", "ledger-data", "deploy/secrets", ".pytest_cache", ".mypy_cache", "tests",
                    "ledger/__pycache__", "ledger/x.pyc"):
        assert ignored(must_go, patterns), must_go
    sources = copied_sources()
    assert {"pyproject.toml", "README.md", "ledger", "ledgerctl"} <= set(sources)
    for source in sources:
        assert not ignored(source, patterns), f"{source} is COPYed but .dockerignore leaves it out"


def healthcheck_command() -> list[str]:
    (args,) = [args for word, args in instructions() if word == "HEALTHCHECK"]
    assert "--start-period=" in args and "--interval=" in args
    command = json.loads(args[args.index("CMD") + len("CMD"):].strip())
    assert isinstance(command, list) and command[:2] == ["python", "-c"]  # no curl in a slim image
    return command


def test_compose_checks_readyz_where_ledger_up_runs_and_nowhere_else():
    image_check = healthcheck_command()
    for name, svc in services().items():
        command = svc.get("command") or []
        check = svc.get("healthcheck")
        if svc.get("build") is None:
            continue  # the NATS nodes: the official image
        if command[:2] == ["ledger", "up"]:
            assert check["test"] == ["CMD", *image_check], name
            assert {"interval", "timeout", "start_period", "retries"} <= check.keys(), name
        else:
            assert check == {"disable": True}, f"{name} serves no HTTP: the image's /readyz check must be off"


def test_ledger_auth_hands_the_users_secrets_to_the_images_user():
    auth = services()["ledger-auth"]
    (user,) = [args for word, args in instructions() if word == "USER"]
    assert auth["user"] == "0:0"  # it creates ./deploy/secrets on the host, whoever owns the directory there
    shell, flag, script, _ = auth["entrypoint"]
    assert (shell, flag) == ("sh", "-c")
    # "$$" is compose's escape for "$": the script runs the command, then gives users/ to the image's user.
    assert script == f'"$$@" && chown -R {user} /etc/ledger/secrets/users'
    assert auth["command"][:3] == ["ledger", "auth", "init"]


class _Readyz(http.server.BaseHTTPRequestHandler):
    ready = True

    def do_GET(self) -> None:
        code = 200 if self.path == "/readyz" and type(self).ready else 503
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"ok" if code == 200 else b"not ready")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def readyz_server() -> Iterator[tuple[str, type[_Readyz]]]:
    handler = type("Handler", (_Readyz,), {"ready": True})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/readyz", handler
    finally:
        server.shutdown()
        server.server_close()


def run_check(url: str) -> int:
    code = healthcheck_command()[2]
    assert READYZ in code
    return subprocess.run([sys.executable, "-c", code.replace(READYZ, url)], capture_output=True, timeout=30,
                          check=False).returncode


def test_the_healthcheck_passes_when_ready_and_fails_otherwise(readyz_server: tuple[str, type[_Readyz]]):
    url, handler = readyz_server
    assert run_check(url) == 0
    handler.ready = False
    assert run_check(url) != 0  # a 503 raises
    assert run_check(url.replace("/readyz", "/nothing-here")) != 0
