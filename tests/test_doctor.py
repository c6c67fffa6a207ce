"""`ledger doctor` against a real server: what it says when all is well, and when it is not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ledger import codec
from ledger import events as ev
from ledger.settings import Settings
from ledger.store import EventStore
from ledgerctl.server import EmbeddedServer
from projections.projector import Projector
from projections.settings import ProjectionSettings

CLI = ev.Producer(id="cli", instance="test")


def doctor(url: str, db: Path, *args: str) -> tuple[int, list[dict[str, str]]]:
    result = subprocess.run([sys.executable, "-m", "ledgerctl", "doctor", "--json", "--db", str(db), *args],
                            capture_output=True, text=True, timeout=60, env={**os.environ, "LEDGER_NATS_URL": url},
                            check=False)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, [json.loads(line) for line in result.stdout.splitlines()]


def said(findings: list[dict[str, str]], level: str, area: str, *needles: str) -> bool:
    return any(f["level"] == level and f["area"] == area and all(n in f["message"] for n in needles)
               for f in findings)


async def test_missing_streams_fail(fresh_server: EmbeddedServer, tmp_path: Path):
    code, findings = doctor(fresh_server.url, tmp_path / "none.sqlite3")
    assert code == 1
    assert said(findings, "ok", "server", "nats-server 2.14.0", "needs >= 2.11.0")
    assert said(findings, "FAIL", "streams", "LEDGER is missing", "ledger init")
    assert said(findings, "warn", "projection", "no projection file")


async def test_a_healthy_ledger_then_a_lagging_projection_and_a_dead_letter(fresh_server: EmbeddedServer,
                                                                            tmp_path: Path):
    db = tmp_path / "p.sqlite3"
    async with EventStore.connect(Settings(nats_url=fresh_server.url), ensure=True) as store:
        await store.append(ev.SessionCreated(producer=CLI, session_id="s1", pool="p"))
        async with Projector(store, ProjectionSettings(db=str(db))) as projector:
            await projector.ready(timeout=20)
        code, findings = doctor(fresh_server.url, db)
        assert code == 0, findings
        assert said(findings, "ok", "streams", "LEDGER: 1 messages", "settings as expected")
        assert said(findings, "ok", "dead letters", "none")
        assert said(findings, "ok", "projection", "LEDGER: at #1 of #1")

        # The projector is gone; the log moves on, and a malformed message is dead-lettered by the next one.
        await store.append(ev.SessionCreated(producer=CLI, session_id="s2", pool="p"))
        await store.nc.jetstream().publish("ledger.session.s3.created.cli", b"\x00garbage")
        code, findings = doctor(fresh_server.url, db)
        assert code == 0  # warnings only
        assert said(findings, "ok", "projection", "LEDGER: at #1 of #3 (2 behind)")  # committed just now
        code, findings = doctor(fresh_server.url, db, "--stale-after", "0")
        assert said(findings, "warn", "projection", "LEDGER: 2 events behind", "is `ledger up`")

        async with Projector(store, ProjectionSettings(db=str(db))) as projector:
            await projector.ready(timeout=20)
        code, findings = doctor(fresh_server.url, db)
        assert said(findings, "warn", "dead letters", "1 in LEDGER_DLQ", "LEDGER.malformed")
        assert said(findings, "warn", "dead letters", "1 x LEDGER malformed", "#3 on ledger.session.s3.created.cli")
        assert said(findings, "ok", "projection", "LEDGER: at #3 of #3")


async def test_on_the_cluster_the_streams_have_three_replicas(cluster_store: EventStore, tmp_path: Path):
    # The shared cluster holds the race tests' synthetic claims (for agents that never registered), which
    # `ledger check` rightly reports: this test is about the streams, so it leaves the history out.
    code, findings = doctor(cluster_store.settings.nats_url, tmp_path / "none.sqlite3", "--no-check")
    assert code == 0, findings
    assert said(findings, "ok", "streams", "LEDGER:", "3 replica(s)", "settings as expected")
    assert not [f for f in findings if f["area"] == "streams" and f["level"] != "ok"], findings


async def test_doctor_fails_when_ledger_check_would_and_counts_the_anomalies(fresh_server: EmbeddedServer,
                                                                             tmp_path: Path):
    db = tmp_path / "p.sqlite3"
    a1, a2 = ev.Producer(id="a1", instance="i"), ev.Producer(id="a2", instance="i")
    async with EventStore.connect(Settings(nats_url=fresh_server.url), ensure=True) as store:
        inc1 = await store.append(ev.AgentRegistered(producer=a1, agent_id="a1", instance_id="i", pool="p"))
        inc2 = await store.append(ev.AgentRegistered(producer=a2, agent_id="a2", instance_id="i", pool="p"))
        await store.append(ev.SessionCreated(producer=CLI, session_id="s1", pool="p"))
        await store.append(ev.SessionClaimed(producer=a1, session_id="s1", agent_id="a1", instance_id="i",
                                             incarnation=inc1))
        async with Projector(store, ProjectionSettings(db=str(db))) as projector:
            await projector.ready(timeout=20)
        code, findings = doctor(fresh_server.url, db)
        assert code == 0, findings
        assert said(findings, "ok", "history", "clean: 4 events checked")
        assert said(findings, "ok", "anomalies", "none flagged")

        # A second claim published raw, past the compare-and-set: two owners in the log.
        overlap = await store.nc.jetstream().publish("ledger.session.s1.claimed.a2", codec.encode(ev.SessionClaimed(
            producer=a2, session_id="s1", agent_id="a2", instance_id="i", incarnation=inc2)).payload)
        async with Projector(store, ProjectionSettings(db=str(db))) as projector:
            await projector.ready(timeout=20)
        code, findings = doctor(fresh_server.url, db)
        assert code == 1
        assert said(findings, "FAIL", "history", f"overlapping_ownership: 1 at #{overlap.seq}", "ledger check")
        assert said(findings, "warn", "anomalies", "1 flagged", f"overlapping_claim: 1 (newest #{overlap.seq})")
        code, findings = doctor(fresh_server.url, db, "--no-check")
        assert code == 0 and not [f for f in findings if f["area"] == "history"]


async def test_doctor_fails_when_the_ledger_streams_settings_drift(server: EmbeddedServer, tmp_path: Path):
    """Someone with stream rights shortened LEDGER's retention and capped it: `ledger doctor` says so and fails."""
    async with EventStore.connect(Settings(nats_url=server.url)) as store:
        jsm = store.nc.jsm()
        config = (await jsm.stream_info("LEDGER")).config
        config.max_age, config.max_msgs, config.max_bytes = 3600.0, 1000, 2**30
        await jsm.update_stream(config)
        hb = (await jsm.stream_info("LEDGER_HB")).config
        hb.max_msgs = 10
        await jsm.update_stream(hb)
    code, findings = doctor(server.url, tmp_path / "none.sqlite3", "--no-check")
    assert code == 1
    assert said(findings, "FAIL", "streams", "LEDGER:", "max_age is 3600 s, should be 0 s")
    assert said(findings, "FAIL", "streams", "LEDGER:", "max_msgs is 1000, should be -1")
    assert said(findings, "FAIL", "streams", "LEDGER:", "max_bytes is 1073741824, should be -1")
    assert said(findings, "FAIL", "streams", "LEDGER_HB:", "max_msgs is 10, should be -1")


async def test_doctor_fails_when_ledger_may_be_deleted_or_purged(fresh_server: EmbeddedServer, tmp_path: Path):
    """A LEDGER made by something else, without the deny flags: doctor fails naming them (JetStream cannot
    change them afterwards, so `ledger init` cannot fix it either)."""
    async with EventStore.connect(Settings(nats_url=fresh_server.url), check=False) as store:
        await store.nc.jsm().add_stream(name="LEDGER", subjects=["ledger.agent.*.*.*", "ledger.session.*.*.*",
                                                                 "ledger.route.*.*.*", "ledger.pool.*.*.*"])
    code, findings = doctor(fresh_server.url, tmp_path / "none.sqlite3", "--no-check")
    assert code == 1
    assert said(findings, "FAIL", "streams", "LEDGER:", "deny_delete is False, should be True",
                "deny_purge is False, should be True")


def test_no_authentication_on_a_non_loopback_address_is_a_warning():
    from ledger.store import ServerInfo
    from ledgerctl.cli import doctor

    def security_finding(info: dict[str, object]) -> doctor.Finding:
        return doctor.security_finding(ServerInfo.from_info(info))

    open_info = {"host": "0.0.0.0", "port": 4222, "auth_required": False}
    warned = security_finding(open_info)
    assert warned.level == "warn" and "0.0.0.0:4222" in warned.message and "no authentication" in warned.message
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.53"):
        assert security_finding({"host": host, "port": 4222}).level == "ok"
    for host in ("10.0.0.5", "::", "nats-1", "192.168.1.9"):
        assert security_finding({"host": host, "port": 4222}).level == "warn"
    secured = security_finding({"host": "0.0.0.0", "port": 4222, "auth_required": True, "tls_required": True,
                                "tls_verify": True})
    assert secured.level == "ok" and "authentication required" in secured.message and "mutual TLS" in secured.message


async def test_doctor_reports_what_the_server_it_talks_to_requires(fresh_server: EmbeddedServer, tmp_path: Path):
    _, findings = doctor(fresh_server.url, tmp_path / "none.sqlite3", "--no-check")
    assert said(findings, "ok", "security", "no authentication", "loopback")
