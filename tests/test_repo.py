"""The repository's promises to a newcomer: the README commands, CI, the compose file."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    return re.findall(r"```sh\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_test_command():
    test_command = next(c for c in readme_commands() if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()


def test_readme_starts_the_embedded_default():
    run_command = readme_commands()[0]
    assert "pip install" in run_command and re.search(r"ledger (server|up|demo)$", run_command)


def test_compose_runs_a_durable_three_node_cluster():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    nats_nodes = [name for name, svc in compose["services"].items() if str(svc.get("image", "")).startswith("nats:")]
    assert len(nats_nodes) == 3
    assert all(compose["services"][n]["image"] == "nats:2.14" for n in nats_nodes)
    conf = (ROOT / "deploy" / "nats-cluster.conf").read_text()
    assert "sync_interval: always" in conf and "jetstream" in conf
    for node in nats_nodes:
        assert f"nats-route://{node}:6222" in conf
    assert compose["services"]["ledger-init"]["environment"]["LEDGER_REPLICAS"] == "3"


def test_compose_runs_the_ledger_services_on_the_cluster():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert services["ledger"]["command"][:2] == ["ledger", "up"]
    assert services["ledger-consumers-b"]["command"][:2] == ["ledger", "consumers"]
    for name in ("ledger", "ledger-consumers-b"):
        # On the cluster, not on an embedded server of their own.
        assert services[name]["environment"]["LEDGER_NATS_URL"].count("nats://") == 3
        assert services[name]["depends_on"]["ledger-init"]["condition"] == "service_completed_successfully"
