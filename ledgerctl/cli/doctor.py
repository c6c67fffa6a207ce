"""`ledger doctor`: is the server new enough, are the streams right, is the projection keeping up, any dead letters?"""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path

import click
import msgspec

from ledger import subjects
from ledger.connection import MIN_VERSION
from ledger.errors import StoreError, StreamMissing
from ledger.settings import redact_url
from ledger.store import EventStore, ServerInfo
from ledger.streams import IMMUTABLE
from projections.db import ProjectionDB
from projections.settings import DB_ENV, DEFAULT_DB

from .check import run_check
from .common import async_command, echo, nats_url_option, settings_from

OK, WARN, FAIL = "ok", "warn", "FAIL"


class Finding(msgspec.Struct, frozen=True):
    level: str
    area: str
    message: str


async def server_findings(store: EventStore, url: str) -> list[Finding]:
    version = store.server_info().version
    text, floor = ".".join(map(str, version)), ".".join(map(str, MIN_VERSION))
    if version < MIN_VERSION:
        return [Finding(FAIL, "server", f"nats-server {text} at {url} is older than {floor}: compare-and-set on an "
                                        "entity's history needs a newer one")]
    try:
        account = await store.account_facts()
    except StoreError as e:  # whatever it is, JetStream does not answer
        return [Finding(FAIL, "server", f"nats-server {text} at {url}: JetStream does not answer ({e})")]
    return [Finding(OK, "server", f"nats-server {text} at {url} (needs >= {floor}); JetStream: {account.streams} "
                                  f"streams, {account.storage / 2**20:,.1f} MiB on disk")]


LOOPBACK_NAMES = ("localhost",)
NANOSECOND_SETTINGS = ("max_age", "duplicate_window")


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost, or "" / "0.0.0.0"-like wildcards handled above


def security_finding(info: ServerInfo) -> Finding:
    """What the server's INFO says about who may connect: a warning for an open server off loopback."""
    where = f"{info.host or '?'}:{info.port if info.port is not None else '?'}"
    tls = ("mutual TLS" if info.tls_verify else "TLS") if info.tls_required else "no TLS"
    if info.auth_required:
        return Finding(OK, "security", f"authentication required, {tls} (listening on {where})")
    if _is_loopback(info.host):
        return Finding(OK, "security", f"no authentication, {tls}: the server listens on loopback only ({where})")
    return Finding(WARN, "security", f"the server listens on {where} with no authentication, {tls}: anyone who "
                                     "reaches it may write any event, or change and delete the streams; secure it "
                                     "(`ledger auth init`, deploy/nats-secure.conf)")


def _show(key: str, value: object) -> str:
    if key in NANOSECOND_SETTINGS and isinstance(value, int):
        return f"{value / 1e9:g} s"
    return repr(value)


async def stream_findings(store: EventStore) -> list[Finding]:
    found: list[Finding] = []
    for name, diff in (await store.check_streams()).items():
        if diff is None:
            found.append(Finding(FAIL, "streams", f"{name} is missing: run `ledger init` (or `ledger up`)"))
            continue
        facts = await store.stream_facts(name)
        if diff:
            changes = ", ".join(f"{k} is {_show(k, old)}, should be {_show(k, new)}" for k, (new, old) in diff.items())
            fixed = sorted(set(diff) & set(IMMUTABLE))
            how = (f"JetStream cannot change {', '.join(fixed)} of an existing stream: it was made by something "
                   "else" if fixed else "run `ledger init` (as admin) to restore them")
            found.append(Finding(FAIL, "streams", f"{name}: {changes}: {how}"))
        elif await store.is_imported(name):
            found.append(Finding(OK, "streams", f"{name}: an imported copy (`ledger import`: sealed, read-only, "
                                                f"original stored times), {facts.messages:,} messages, "
                                                f"#{facts.first_seq}..#{facts.last_seq}"))
        else:
            found.append(Finding(OK, "streams", f"{name}: {facts.messages:,} messages, #{facts.first_seq}..#"
                                                f"{facts.last_seq}, {facts.replicas} replica(s), settings as "
                                                "expected"))
        for peer in facts.peers:
            if peer.offline or not peer.current:
                how = "offline" if peer.offline else "behind"
                found.append(Finding(WARN, "streams", f"{name}: replica {peer.name} is {how} (lag {peer.lag or 0})"))
        if facts.clustered and not facts.leader and facts.replicas > 1:
            found.append(Finding(FAIL, "streams", f"{name} has no leader: a majority of its replicas is down"))
    return found


async def dead_letter_findings(store: EventStore) -> list[Finding]:
    try:
        facts = await store.stream_facts(subjects.DLQ_STREAM, with_subjects=True)
    except StreamMissing:
        return []  # reported as a missing stream already
    if not facts.messages:
        return [Finding(OK, "dead letters", "none")]
    by_subject = sorted(facts.subjects.items(), key=lambda kv: -kv[1])
    under = subjects.dlq_subject("", "").removesuffix(".")  # what every dead letter's subject starts with
    detail = ", ".join(f"{subject.removeprefix(under)}: {n}" for subject, n in by_subject[:5])
    return [Finding(WARN, "dead letters", f"{facts.messages:,} in {subjects.DLQ_STREAM} ({detail})")]


async def history_findings(store: EventStore, grace: float) -> list[Finding]:
    """The same check as `ledger check`: any violation in the history is a failure here too."""
    report = await run_check(store, grace=grace)
    if report.clean:
        return [Finding(OK, "history", f"clean: {report.events:,} events checked (`ledger check`)")]
    by_kind: dict[str, list[int]] = {}
    for v in report.violations:
        by_kind.setdefault(v.kind, []).append(v.seq)
    return [Finding(FAIL, "history", f"{kind}: {len(seqs):,} at #{', #'.join(map(str, seqs[:5]))}"
                                     f"{' ...' if len(seqs) > 5 else ''}: run `ledger check` for the details")
            for kind, seqs in by_kind.items()]


async def projection_findings(store: EventStore, db: Path, stale_after: float) -> list[Finding]:
    if not db.exists():
        return [Finding(WARN, "projection", f"no projection file at {db}: `ledger up` or `ledger project` makes it")]
    found: list[Finding] = []
    async with await ProjectionDB.open(db, readonly=True) as pdb:
        checkpoints = await pdb.checkpoints()
        kinds = list(await pdb.conn.execute_fetchall(
            "SELECT kind, count(*), max(seq) FROM anomalies GROUP BY kind ORDER BY count(*) DESC, kind"))
        if kinds:
            detail = ", ".join(f"{kind}: {n:,} (newest #{seq})" for kind, n, seq in kinds)
            found.append(Finding(WARN, "anomalies", f"{sum(n for _, n, _ in kinds):,} flagged, not applied: {detail}"))
        else:
            found.append(Finding(OK, "anomalies", "none flagged"))
        for d in await pdb.dead_letters():
            found.append(Finding(WARN, "dead letters", f"{d.count:,} x {d.stream} {d.reason}; the newest, "
                                                       f"#{d.last_seq} on {d.last_subject}: {d.last_detail[:200]}"))
    for cp in checkpoints:
        try:
            state = await store.stream_facts(cp.stream)
        except StreamMissing:
            continue
        behind = max(0, state.last_seq - max(cp.seq, state.first_seq - 1))
        since = time.time() - cp.updated_ns / 1e9 if cp.updated_ns else None
        ago = f"{since:,.0f} s ago" if since is not None else "never"
        if cp.seq > state.last_seq:
            found.append(Finding(FAIL, "projection", f"{db} is at {cp.stream} #{cp.seq}, past the stream's end "
                                                     f"#{state.last_seq}: built from another stream; `ledger rebuild`"))
        elif behind and (since is None or since > stale_after):
            found.append(Finding(WARN, "projection", f"{cp.stream}: {behind:,} events behind, last commit {ago}: "
                                                     "is `ledger up` (or `ledger project`) running?"))
        else:
            found.append(Finding(OK, "projection", f"{cp.stream}: at #{cp.seq} of #{state.last_seq}"
                                                   f"{f' ({behind:,} behind)' if behind else ''}, last commit {ago}"))
    return found


@click.command("doctor")
@nats_url_option
@click.option("--db", envvar=DB_ENV, default=DEFAULT_DB, show_default=True, show_envvar=True,
              type=click.Path(dir_okay=False, path_type=Path), help="The projection's SQLite file.")
@click.option("--stale-after", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="Seconds since its last commit after which a projection that is behind looks stopped.")
@click.option("--grace", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="As for `ledger check`: seconds beyond an owner's ttl before its session counts as stranded.")
@click.option("--check/--no-check", "run_history_check", default=True, show_default=True,
              help="Also run `ledger check` over the whole history (it reads every message: slow on a long log).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per finding.")
@async_command
async def doctor_command(nats_url: str, db: Path, stale_after: float, grace: float, run_history_check: bool,
                         as_json: bool) -> None:
    """Check the server version, the streams' settings and replicas, the projection's lag, anomalies and dead
    letters, and the history itself (the rules of `ledger check`).

    Exits 1 when something is wrong (FAIL), 0 otherwise (warnings included).
    """
    settings = settings_from(nats_url)
    async with EventStore.connect(settings, name="ledger-doctor", check=False) as store:
        findings = await server_findings(store, redact_url(settings.nats_url))
        findings.append(security_finding(store.server_info()))
        if findings[0].level != FAIL:
            findings += await stream_findings(store)
            findings += await dead_letter_findings(store)
            findings += await projection_findings(store, db, stale_after)
            if run_history_check and not any(f.level == FAIL and f.area == "streams" for f in findings):
                findings += await history_findings(store, grace)
    for f in findings:
        echo(msgspec.json.encode(f).decode() if as_json else f"{f.level:<5} {f.area:<13} {f.message}")
    if any(f.level == FAIL for f in findings):
        raise SystemExit(1)
