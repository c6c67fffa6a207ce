"""The repository's promises to a newcomer: the README commands, CI, the compose file."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONTAINER_SECRETS = "/etc/ledger/secrets"


def readme_commands() -> list[str]:
    return re.findall(r"```sh\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_test_command():
    test_command = next(c for c in readme_commands() if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()


def test_readme_starts_the_embedded_default():
    run_command = readme_commands()[0]
    assert "pip install" in run_command and re.search(r"ledger (server|up|demo)$", run_command)


def compose_services() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def test_compose_runs_a_durable_three_node_cluster():
    services = compose_services()
    nats_nodes = [name for name, svc in services.items() if str(svc.get("image", "")).startswith("nats:")]
    assert len(nats_nodes) == 3
    assert all(services[n]["image"] == "nats:2.14" for n in nats_nodes)
    for node in nats_nodes:
        assert services[node]["command"] == ["--config", "/etc/ledger/nats-secure.conf"]
        assert "./deploy/nats-secure.conf:/etc/ledger/nats-secure.conf:ro" in services[node]["volumes"]
    conf = (ROOT / "deploy" / "nats-secure.conf").read_text()
    assert "sync_interval: always" in conf and "jetstream" in conf
    for node in nats_nodes:
        assert f"nats-route://{node}:6222" in conf
    assert services["ledger-init"]["environment"]["LEDGER_REPLICAS"] == "3"


def test_compose_runs_the_ledger_services_on_the_secured_cluster():
    services = compose_services()
    assert services["ledger"]["command"][:2] == ["ledger", "up"]
    assert services["ledger-consumers-b"]["command"][:2] == ["ledger", "consumers"]
    users = {"ledger-init": "admin", "ledger": "service", "ledger-consumers-b": "service"}
    for name, user in users.items():
        env = services[name]["environment"]
        # On the cluster over TLS, not on an embedded server of their own; each as its generated user.
        assert env["LEDGER_NATS_URL"].count("tls://") == 3 and "nats://" not in env["LEDGER_NATS_URL"]
        assert env["LEDGER_NKEY_SEED_FILE"] == f"{CONTAINER_SECRETS}/users/{user}/{user}.nk"
        assert env["LEDGER_INBOX_PREFIX"] == f"_INBOX_{user}"
    for name in ("ledger", "ledger-consumers-b"):
        assert services[name]["depends_on"]["ledger-init"]["condition"] == "service_completed_successfully"


def run_compose_auth_init(secrets: Path) -> list[str]:
    """Run the compose file's ledger-auth command, into `secrets` instead of the container's path."""
    from click.testing import CliRunner

    from ledgerctl.cli import cli

    command = compose_services()["ledger-auth"]["command"]
    assert command[:3] == ["ledger", "auth", "init"] and "--if-missing" in command and "--tls" in command
    args = [str(secrets) if a == CONTAINER_SECRETS else a for a in command[1:]]
    args += ["--env-dir", CONTAINER_SECRETS]  # the default: the path as the containers see it
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return args


def point_tls_files_at(secrets: Path) -> None:
    """The TLS blocks name paths inside the containers; point them at a copy on this machine."""
    for path in secrets.rglob("*tls.conf"):
        path.write_text(path.read_text().replace(CONTAINER_SECRETS, str(secrets)))


SERVICE_USERS = {"ledger-init": "admin", "ledger": "service", "ledger-consumers-b": "service"}
NATS_NODES = ("nats-1", "nats-2", "nats-3")


def bind_mounts(service: dict) -> list[tuple[str, str, str]]:
    """(source, target, mode) of a service's bind mounts (short syntax; named volumes left out)."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target, *mode = str(volume).split(":")
        if source.startswith("./"):
            mounts.append((source, target, mode[0] if mode else "rw"))
    return mounts


def container_view(service: dict, secrets: Path, root: Path) -> Path:
    """What the container sees of the host: a copy of each bind mount's source at its target under `root`,
    ./deploy/secrets being `secrets` (what the compose init step wrote)."""
    for source, target, _ in bind_mounts(service):
        rel = Path(source).relative_to("./deploy/secrets") if source.startswith("./deploy/secrets") else None
        host = ROOT / source if rel is None else secrets / rel
        assert host.exists(), f"{source} does not exist after `ledger auth init`"
        dest = root / target.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if host.is_dir():
            shutil.copytree(host, dest)
        else:
            shutil.copy(host, dest)
    return root


def env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


def test_compose_wiring_matches_what_ledger_auth_generates(tmp_path: Path):
    """Run the compose init step's own command (into a temporary directory). Each container, seeing only what it
    mounts, finds every file it names: the ledger services their user's env file's paths (the same as the env file
    `ledger auth init` wrote for that user), the nodes what nats-server needs to accept deploy/nats-secure.conf."""
    from click.testing import CliRunner

    from ledgerctl.cli import cli
    from ledgerctl.server import find_binary

    services = compose_services()
    secrets = tmp_path / "secrets"
    args = run_compose_auth_init(secrets)
    assert ("./deploy/secrets", CONTAINER_SECRETS, "rw") in bind_mounts(services["ledger-auth"])
    for name, svc in services.items():
        for source, target, mode in bind_mounts(svc):
            if source.startswith("./deploy/secrets") and name != "ledger-auth":
                # Read-only, and where the env files and TLS blocks say the directory is.
                assert mode == "ro" and target == CONTAINER_SECRETS + source.removeprefix("./deploy/secrets"), source
    for name, user in SERVICE_USERS.items():
        view = container_view(services[name], secrets, tmp_path / name)
        env = services[name]["environment"]
        for key, value in env.items():
            if key.endswith("_FILE"):
                assert (view / value.lstrip("/")).is_file(), (name, key, value)
        generated = env_file(secrets / "users" / user / f"{user}.env")
        assert {k: env[k] for k in generated} == generated, name
    # Run again, as compose does on every `up`: the secrets stay as they were.
    before = (secrets / "admin.nk").read_bytes()
    assert CliRunner().invoke(cli, args).exit_code == 0 and (secrets / "admin.nk").read_bytes() == before
    binary, _ = find_binary()
    for node in NATS_NODES:
        assert services[node]["command"][:2] == ["--config", "/etc/ledger/nats-secure.conf"]
        view = container_view(services[node], secrets, tmp_path / node)
        point_tls_files_at(view / CONTAINER_SECRETS.lstrip("/"))
        checked = subprocess.run([binary, "-t", "-c", str(view / "etc/ledger/nats-secure.conf")], capture_output=True,
                                 text=True, check=False, timeout=30, env={**os.environ, "NATS_SERVER_NAME": node})
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_no_container_but_ledger_auth_sees_another_roles_secret(tmp_path: Path):
    """Whoever gets into a container holds only its role: a node no seed and no CA key, a ledger service its own
    user's seed and key only."""
    services = compose_services()
    secrets = tmp_path / "secrets"
    run_compose_auth_init(secrets)
    assert set(services) == {"ledger-auth", *NATS_NODES, *SERVICE_USERS}  # a new service gets a rule here
    for name in [*NATS_NODES, *SERVICE_USERS]:
        view = container_view(services[name], secrets, tmp_path / name)
        secret_files = sorted(p.name for p in view.rglob("*") if p.name.endswith((".nk", "-key.pem")))
        user = SERVICE_USERS.get(name)
        expected = sorted([f"{user}.nk", f"{user}-key.pem"]) if user else ["route-key.pem", "server-key.pem"]
        assert secret_files == expected, name


def test_the_compose_file_passes_docker_compose_config():
    compose = shutil.which("docker-compose")
    assert compose, "docker-compose is not installed: `apt-get install -y docker-compose` (.ci/run does)"
    checked = subprocess.run([compose, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], capture_output=True,
                             text=True, timeout=60, cwd=ROOT, check=False)
    assert checked.returncode == 0, checked.stderr
