"""The store is the port to JetStream: nothing above `ledger` talks the wire protocol, and what the layers above
need from JetStream the store offers (stream facts, stored times, registrations, dead letters, leader changes,
the server's INFO), with one map from JetStream's API errors to the ledger's."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import nats
import pytest
from helpers import eventually
from nats.js.errors import APIError
from test_store import created

from ledger import codec, dlq, jsapi, subjects
from ledger import events as ev
from ledger import lifecycle as lc
from ledger.codec import Recorded, Unreadable
from ledger.errors import StoreError, StreamMissing, Unavailable
from ledger.events import Producer
from ledger.jsapi import ApiError, from_nats, store_error
from ledger.settings import Settings
from ledger.store import EventStore

ROOT = Path(__file__).resolve().parent.parent
ABOVE_THE_STORE = ("projections", "consumers", "ledgerctl")


NATS_EDGES = {"ledgerctl/query_service.py", "ledgerctl/query_client.py"}
"""The composition's request/reply edge: the views as a NATS micro service and its client need the connection
itself (as the HTTP server needs its socket). They may use core NATS - never JetStream, which stays behind the
store."""
JETSTREAM = ("jsm", "jetstream", "_server_info")


def leaks(path: Path, root: Path = ROOT) -> list[str]:
    """Where a module reaches past the store: the connection (`.nc`, nats-py's privates), nats-py itself, or
    `ledger.reader`'s / `ledger.jsapi`'s request functions. A NATS edge may use the connection and core NATS."""
    edge = path.relative_to(root).as_posix() in NATS_EDGES
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Attribute) and node.attr in (JETSTREAM if edge else ("nc", *JETSTREAM)):
            found.append(f"{where} uses .{node.attr}")
        elif edge and isinstance(node, ast.Constant) and isinstance(node.value, str) and "$JS." in node.value:
            found.append(f"{where} names the JetStream API")
        elif isinstance(node, ast.Import):
            found += [f"{where} imports {a.name}" for a in node.names
                      if (a.name.startswith("nats.js") if edge else a.name.split(".")[0] == "nats")
                      or a.name in ("ledger.reader", "ledger.jsapi")]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = {a.name for a in node.names}
            nats_module = node.module.startswith("nats.js") if edge else node.module.split(".")[0] == "nats"
            if nats_module or node.module in ("ledger.jsapi", "ledger.reader"):
                found.append(f"{where} imports from {node.module}")
            elif node.module == "ledger" and names & {"reader", "jsapi"}:
                found.append(f"{where} imports {', '.join(sorted(names & {'reader', 'jsapi'}))} from ledger")
    return found


def test_nothing_above_the_store_talks_to_jetstream_itself() -> None:
    found = [leak for package in ABOVE_THE_STORE for path in sorted((ROOT / package).rglob("*.py"))
             for leak in leaks(path)]
    assert found == []
    assert all((ROOT / edge).exists() for edge in NATS_EDGES)  # a moved edge must not leave a stale exemption


def test_a_nats_edge_may_use_core_nats_but_not_jetstream(tmp_path: Path) -> None:
    probe = tmp_path / "ledgerctl" / "query_client.py"
    probe.parent.mkdir()
    probe.write_text("from nats.micro import add_service\nfrom nats.js.api import StreamConfig\n"
                     "async def f(store):\n    await store.nc.request('x', b'')\n    store.nc.jetstream()\n"
                     "    await store.nc.request('$JS.API.INFO', b'')\n")
    assert sorted(leaks(probe, tmp_path)) == sorted([
        "ledgerctl/query_client.py:2 imports from nats.js.api", "ledgerctl/query_client.py:5 uses .jetstream",
        "ledgerctl/query_client.py:6 names the JetStream API"])


def test_the_scan_sees_each_way_past_the_store(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from ledger import reader\nfrom ledger.reader import Replay, history\nimport nats.js\n"
        "from nats.errors import TimeoutError\nfrom ledger.jsapi import stream_facts\n"
        "from ledger.replay import Replay\nfrom ledger.reader import Replay\n"
        "async def f(store):\n    await store.nc.request('x', b'')\n    store.nc._server_info\n")
    assert sorted(leaks(probe, tmp_path)) == sorted([
        "probe.py:1 imports reader from ledger", "probe.py:2 imports from ledger.reader",
        "probe.py:7 imports from ledger.reader",
        "probe.py:3 imports nats.js", "probe.py:4 imports from nats.errors", "probe.py:5 imports from ledger.jsapi",
        "probe.py:9 uses .nc", "probe.py:10 uses .nc", "probe.py:10 uses ._server_info"])


LOOKUP_BUILDERS = {"registrations_lookup", "registered_lookup", "agents_lookup", "SessionFold", "AgentTimeline"}
"""What the session lookups are built from: above the store only `EventStore.session_fold` / `session_lookups`
do."""


def test_the_session_lookups_are_built_in_one_place() -> None:
    found = [f"{path.relative_to(ROOT)}:{node.lineno} uses {node.attr if isinstance(node, ast.Attribute) else node.id}"
             for package in ABOVE_THE_STORE for path in sorted((ROOT / package).rglob("*.py"))
             for node in ast.walk(ast.parse(path.read_text(), str(path)))
             if (isinstance(node, ast.Name) and node.id in LOOKUP_BUILDERS)
             or (isinstance(node, ast.Attribute) and node.attr in LOOKUP_BUILDERS)]
    assert found == []


def test_the_service_may_hear_the_advisory_the_store_subscribes_to() -> None:
    from ledgerctl import permissions

    assert permissions.LEADER_ADVISORY == jsapi.LEADER_ADVISORY
    assert jsapi.LEADER_ADVISORY in permissions.permissions_for(permissions.SERVICE).subscribe


# --- one error map ----------------------------------------------------------------------------------------------


def test_one_map_turns_jetstream_api_errors_into_the_ledgers() -> None:
    missing = store_error(ApiError(code=404, err_code=10059, description="stream not found"), "LEDGER", "stream info")
    assert type(missing) is StreamMissing and str(missing).startswith("stream LEDGER does not exist: run `ledger init`")
    for code in (500, 503):
        busy = store_error(ApiError(code=code, err_code=10008, description="JetStream system temporarily unavailable"),
                           "LEDGER", "stream info LEDGER")
        assert type(busy) is Unavailable
        assert str(busy) == "stream info LEDGER: JetStream system temporarily unavailable (error 10008)"
    refused = store_error(ApiError(code=400, err_code=10071, description="wrong last sequence: 7"), "LEDGER", "append")
    assert type(refused) is StoreError and str(refused) == "append: wrong last sequence: 7 (error 10071)"
    # nats-py's own APIError (what its JetStream manager raises) goes through the same map.
    assert type(from_nats(APIError(code=404, err_code=10059, description="stream not found"), "LEDGER_HB", "x")) \
        is StreamMissing
    assert type(from_nats(APIError(code=503, err_code=10008, description="unavailable"), "LEDGER", "x")) is Unavailable
    assert type(from_nats(APIError(code=None, description="odd"), "LEDGER", "x")) is StoreError


def test_the_api_error_struct_and_stream_not_found_live_only_in_jsapi() -> None:
    """One copy: no other module of the packages declares JetStream's error struct or reads error 10059."""
    copies = []
    for package in ("ledger", *ABOVE_THE_STORE):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "ledger" / "jsapi.py":
                continue
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef) and any(
                        isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) and s.target.id == "err_code"
                        for s in node.body):
                    copies.append(f"{path.relative_to(ROOT)}:{node.lineno} class {node.name}")
                elif isinstance(node, ast.Constant) and node.value == jsapi.STREAM_NOT_FOUND:
                    copies.append(f"{path.relative_to(ROOT)}:{node.lineno} reads {jsapi.STREAM_NOT_FOUND}")
    assert copies == []


# --- what the store offers, against the real server ------------------------------------------------------------------


async def test_stream_facts_and_stored_times(store: EventStore, uid: str) -> None:
    seq = await store.append(created(uid))
    facts = await store.stream_facts(subjects.LEDGER_STREAM)
    assert facts.name == subjects.LEDGER_STREAM and facts.created
    assert 1 <= facts.first_seq <= seq <= facts.last_seq and facts.messages >= 1 and facts.first_ns > 0
    assert facts.replicas == 1 and facts.peers == () and facts.subjects == {}
    [recorded] = await store.history("session", uid)
    assert await store.stored_ns(seq) == recorded.timestamp_ns >= facts.first_ns
    assert await store.stored_ns(facts.last_seq + 1_000_000) is None
    hb = await store.stream_facts(subjects.HEARTBEAT_STREAM)
    assert hb.name == subjects.HEARTBEAT_STREAM and hb.created != facts.created  # another stream
    with pytest.raises(StreamMissing, match="ledger init"):
        await store.stream_facts(f"NOPE_{uid.replace('-', '_')}")


async def test_stream_facts_count_messages_per_subject_when_asked(store: EventStore, uid: str) -> None:
    subject = subjects.dlq_subject(subjects.LEDGER_STREAM, f"probe-{uid}")
    await store.nc.jetstream().publish(subject, b"x", stream=subjects.DLQ_STREAM)
    facts = await store.stream_facts(subjects.DLQ_STREAM, with_subjects=True)
    assert facts.subjects[subject] == 1 and facts.messages >= 1


async def test_registrations_are_the_agents_own_and_give_the_incarnation_lookup(store: EventStore, uid: str) -> None:
    agent = f"{uid}-a"

    def registered(producer: str) -> ev.AgentRegistered:
        return ev.AgentRegistered(producer=Producer(id=producer, instance="i"), agent_id=agent, instance_id="i",
                                  pool="p")

    first = await store.append(registered(agent))
    await store.append(registered(f"{uid}-mallory"))  # on ledger.agent.<agent>.registered.<mallory>: not its own
    second = await store.append(registered(agent))
    assert await store.registrations(agent) == [first, second]
    assert await store.registrations(f"{uid}-nobody") == []
    claim = ev.SessionClaimed(producer=Producer(id=agent, instance="i"), session_id=uid, agent_id=agent,
                              instance_id="i", incarnation=second)
    seq = await store.append(claim)
    [recorded] = [r for r in await store.history("session", uid) if isinstance(r, Recorded)]
    incarnation_at = lc.registrations_lookup({agent: await store.registrations(agent, min_last_seq=seq)})
    assert incarnation_at(agent, seq) == second and incarnation_at(agent, second) == first
    assert incarnation_at(agent, first) is None and incarnation_at(f"{uid}-nobody", seq) is None


async def _dead_letter(store: EventStore, subject: str) -> tuple[int, bytes, dict[str, str]]:
    """(how many, data, headers) of the letters on a dead-letter subject (read past the store: what is stored is
    the test)."""
    count = (await store.stream_facts(subjects.DLQ_STREAM, with_subjects=True)).subjects.get(subject, 0)
    last = await store.nc.jsm().get_last_msg(subjects.DLQ_STREAM, subject)
    return count, last.data or b"", dict(last.headers or {})


async def test_a_dead_letter_keeps_the_original_with_where_it_came_from_once(store: EventStore, uid: str) -> None:
    item = Unreadable(stream=subjects.LEDGER_STREAM, seq=10**9 + abs(hash(uid)) % 10**6,
                      subject=f"ledger.session.{uid}.x.y", timestamp_ns=123, data=b"\x00not json",
                      reason="malformed:\n  not an event")
    reason = f"malformed-{uid}"
    await store.dead_letter(item, reason=reason, consumer="test")
    await store.dead_letter(item, reason=reason, consumer="test")  # again, as after a crash: the same letter
    count, data, h = await _dead_letter(store, subjects.dlq_subject(item.stream, reason))
    assert count == 1 and data == item.data
    assert h[codec.MSG_ID] == f"dlq:{item.stream}:{item.seq}" and h[dlq.H_SUBJECT] == item.subject
    assert h[dlq.H_SEQ] == str(item.seq) and h[dlq.H_REASON] == "malformed: not an event"
    assert h[dlq.H_CONSUMER] == "test" and dlq.H_TRUNCATED not in h


async def test_a_dead_letter_too_big_for_the_server_keeps_what_fits(store: EventStore, uid: str) -> None:
    big = b"y" * store.nc.max_payload
    item = Unreadable(stream=subjects.LEDGER_STREAM, seq=2 * 10**9 + abs(hash(uid)) % 10**6,
                      subject=f"ledger.session.{uid}.x.y", timestamp_ns=1, data=big, reason="too big")
    reason = f"too-big-{uid}"
    await store.dead_letter(item, reason=reason, consumer="test")
    count, data, h = await _dead_letter(store, subjects.dlq_subject(item.stream, reason))
    assert count == 1 and data == big[: store.nc.max_payload - dlq.HEADER_ROOM] and h[dlq.H_TRUNCATED] == str(len(big))


async def test_server_info_and_account_facts(store: EventStore, nats_server) -> None:  # type: ignore[no-untyped-def]
    info = store.server_info()
    assert info.version >= (2, 10, 0) and info.host and info.port == int(nats_server.url.rsplit(":", 1)[1])
    assert not info.auth_required and not info.tls_required
    account = await store.account_facts()
    assert account.streams >= 3  # LEDGER, LEDGER_HB, LEDGER_DLQ


async def test_check_streams_finds_the_ledgers_as_made(store: EventStore) -> None:
    assert await store.check_streams() == {subjects.LEDGER_STREAM: {}, subjects.HEARTBEAT_STREAM: {},
                                           subjects.DLQ_STREAM: {}}


async def test_leader_changes_are_told_with_the_streams_name(store: EventStore, settings: Settings) -> None:
    """The advisory a server publishes when a stream elects a leader, here published as the server would (a single
    node elects none); the election itself is in test_a_stream_leader_election_is_told_on_the_cluster."""
    heard: list[str] = []
    other = await nats.connect(settings.nats_url)
    try:
        async with store.leader_changes(heard.append):
            await store.nc.flush()

            async def told() -> bool:
                if not heard:  # published again until heard: a core message to a subscription not yet seen is lost
                    await other.publish(jsapi.LEADER_ADVISORY.replace("*", subjects.LEDGER_STREAM), b"{}")
                    await other.flush()
                return bool(heard)

            await eventually(told, what="the leader change")
            assert set(heard) == {subjects.LEDGER_STREAM}
    finally:
        await other.close()


async def test_a_stream_leader_election_is_told_on_the_cluster(cluster_store: EventStore) -> None:
    heard: list[str] = []
    async with cluster_store.leader_changes(heard.append):
        await cluster_store.nc.flush()
        answer = await cluster_store.nc.request(f"{jsapi.API_PREFIX}.STREAM.LEADER.STEPDOWN.{subjects.LEDGER_STREAM}",
                                                b"", timeout=10)
        assert json.loads(answer.data).get("success"), answer.data
        await eventually(lambda: subjects.LEDGER_STREAM in heard, timeout=30, what="the leader election")
    facts = await eventually_facts(cluster_store)
    assert facts.replicas == 3 and facts.clustered and len(facts.peers) == 2


async def eventually_facts(store: EventStore) -> jsapi.StreamFacts:
    """LEDGER's facts once it has a leader again (an election was just asked for)."""
    found: list[jsapi.StreamFacts] = []

    async def led() -> bool:
        try:
            facts = await store.stream_facts(subjects.LEDGER_STREAM)
        except Unavailable:
            return False
        found.append(facts)
        return facts.leader is not None

    await eventually(led, timeout=30, interval=0.2, what="a LEDGER leader")
    return found[-1]


async def test_a_missing_stream_is_told_typed_in_one_line(fresh_server) -> None:  # type: ignore[no-untyped-def]
    """A server without the ledger's streams: the store says which stream is missing, typed, in one line."""
    nc = await nats.connect(fresh_server.url)
    store = EventStore(nc, Settings(nats_url=fresh_server.url, request_timeout=2.0))
    try:
        with pytest.raises(StreamMissing) as missing:
            await store.stream_facts(subjects.LEDGER_STREAM)
        assert "\n" not in str(missing.value)
        with pytest.raises(StreamMissing):
            await store.stored_ns(1)
    finally:
        await nc.close()
