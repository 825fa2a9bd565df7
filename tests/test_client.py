"""Client library: building, local checks, delivery classification, retries, spool, sampling.

Collectors here are real HTTP servers on 127.0.0.1 (tunnel_telemetry.testing.scripted) whose
answers each test scripts; sleeps between retry rounds are recorded instead of slept.
"""

import email.utils
import errno
import json
import os
import random
import re
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests

from tunnel_telemetry import client as tc
from tunnel_telemetry.client import (
    Client,
    ClientError,
    InvalidReport,
    NotDelivered,
    ReportRejected,
    RetryPolicy,
    Sampler,
    Spool,
    build_report,
    failure,
    parse_endpoint,
    validate_report,
)
from tunnel_telemetry.testing.scripted import Reply, ScriptedCollector, closed_port_url

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def a_report(**kw):
    kw.setdefault("duration_ms", 42)
    return build_report("ss://192.0.2.1:443", **kw)


class FakeTime:
    """A clock that only the recorded sleeps move: retries run at once, delays are checked."""

    def __init__(self):
        self.now = 1000.0
        self.sleeps = []

    def clock(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def fake_time():
    return FakeTime()


@pytest.fixture
def sleeps(fake_time):
    return fake_time.sleeps


@pytest.fixture
def make_client(tmp_path, fake_time):
    made = []

    def make(collectors, **kw):
        kw.setdefault("spool", Spool(tmp_path / "spool"))
        kw.setdefault("policy", RetryPolicy(attempts=3, backoff=1.0, jitter=0.5))
        kw.setdefault("timeout", 2.0)
        kw.setdefault("sleep", fake_time.sleep)
        kw.setdefault("clock", fake_time.clock)
        kw.setdefault("rng", random.Random(7))
        c = Client(collectors, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def server():
    with ScriptedCollector() as s:
        yield s


@pytest.fixture
def server2():
    with ScriptedCollector() as s:
        yield s


# ----------------------------------------------------------------------------- building


def test_build_report_minimal_is_valid_success():
    r = build_report("ss://192.0.2.1:443")
    assert r["report-type"] == "tunnel-telemetry"
    assert r["endpoint"] == "ss://192.0.2.1:443"
    assert r["failure"] is None
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", r["time"])
    validate_report(r)
    assert tc.is_success(r)


def test_build_report_all_fields():
    when = datetime(2024, 4, 12, 10, 0, 0, 123456, tzinfo=UTC)
    r = build_report(
        "vless+tls://proxy.example.org:443",
        time=when,
        duration_ms=5,
        failure=failure("tls.handshake", "reset", "ECONNRESET"),
        config={"prefix": "xx"},
        client_asn="AS1234",
        client_cc="NO",
        sampling_rate=0.5,
        uuid="fbf902ee-5d78-43cd-af39-b9b297a0d2f7",
    )
    assert r["time"] == "2024-04-12T10:00:00.123Z"
    assert r["failure"] == {"op": "tls.handshake", "msg": "reset", "posix_error": "ECONNRESET"}
    validate_report(r)
    assert not tc.is_success(r)


def test_naive_datetime_is_utc():
    assert tc.utc_rfc3339(datetime(2024, 1, 2, 3, 4, 5)) == "2024-01-02T03:04:05.000Z"


# ----------------------------------------------------------------------------- checking


def test_schema_is_the_collectors():
    from tunnel_telemetry.protocol import schema

    repo_schema = Path(__file__).resolve().parent.parent / "schemas" / "report.schema.json"
    assert tc.load_schema() == json.loads(repo_schema.read_text())
    assert schema.validator() is schema.validator()  # compiled once, shared with the collector


BAD_REPORTS = [
    ("not-an-object", ["x"], "$"),
    ("missing endpoint", {"report-type": "tunnel-telemetry", "time": "2024-01-01T00:00:00Z"},
     "$.endpoint"),
    ("wrong type", {"report-type": "other", "time": "2024-01-01T00:00:00Z",
                    "endpoint": "ss://1.2.3.4:1"}, "$['report-type']"),
    ("time without zone", {"time": "2024-01-01T00:00:00"}, "$.time"),
    ("impossible date", {"time": "2024-13-45T00:00:00Z"}, "$.time"),
    ("no protocol", {"endpoint": "1.2.3.4:443"}, "$.endpoint"),
    ("credentials", {"endpoint": "ss://secret@1.2.3.4:443"}, "$.endpoint"),
    ("path", {"endpoint": "https://example.org:443/x"}, "$.endpoint"),
    ("port too big", {"endpoint": "ss://1.2.3.4:70000"}, "$.endpoint"),
    ("no port", {"endpoint": "ss://1.2.3.4"}, "$.endpoint"),
    ("bad ipv6", {"endpoint": "ss://[2001:zz::1]:443"}, "$.endpoint"),
    ("config number", {"config": {"a": 1}}, "$.config.a"),
    ("negative duration", {"duration_ms": -1}, "$.duration_ms"),
    ("failure without op", {"failure": {"msg": "x"}}, "$.failure.op"),
    ("zero sampling", {"sampling_rate": 0}, "$.sampling_rate"),
    ("bad asn", {"client_asn": "1234"}, "$.client_asn"),
    ("bad uuid", {"uuid": "nope"}, "$.uuid"),
]


@pytest.mark.parametrize("name,change,path", BAD_REPORTS, ids=[b[0] for b in BAD_REPORTS])
def test_invalid_reports_are_local_errors(name, change, path):
    if isinstance(change, dict) and "report-type" not in change:
        report = {**a_report(), **change}
    else:
        report = change
    with pytest.raises(InvalidReport) as info:
        validate_report(report)
    assert info.value.errors, info.value
    assert any(e["path"] == path for e in info.value.errors), info.value.errors
    assert info.value.exit_code == 2
    assert "invalid" in str(info.value)


def test_credentials_hint():
    with pytest.raises(InvalidReport, match="user information.*credentials"):
        validate_report({**a_report(), "endpoint": "ss://pw@1.2.3.4:443"})


@pytest.mark.parametrize(
    "endpoint,proto,host,port",
    [
        ("ss://1.1.1.1:443", "ss", "1.1.1.1", 443),
        ("obfs4://[2001:db8::1]:9001", "obfs4", "2001:db8::1", 9001),
        ("vless+tls://proxy.example.org:8443", "vless+tls", "proxy.example.org", 8443),
    ],
)
def test_parse_endpoint(endpoint, proto, host, port):
    ep = parse_endpoint(endpoint)
    assert (ep.proto, ep.host, ep.port) == (proto, host, port)
    assert (ep.address is None) == (host == "proxy.example.org")


@pytest.mark.parametrize(
    "value",
    ["2024-01-01T00:00:00Z", "2024-01-01 00:00:00.123456789+02:00", "2024-01-01t00:00:00z"],
)
def test_rfc3339_variants(value):
    validate_report({**a_report(), "time": value})


# ----------------------------------------------------------------------------- URLs, headers


@pytest.mark.parametrize(
    "given,url",
    [
        ("https://c.example.org", "https://c.example.org/report"),
        ("https://c.example.org/", "https://c.example.org/report"),
        ("https://c.example.org/tt/report", "https://c.example.org/tt/report"),
        ("http://127.0.0.1:8080/base/", "http://127.0.0.1:8080/base/report"),
    ],
)
def test_report_url(given, url):
    assert tc.report_url(given) == url


@pytest.mark.parametrize("bad", ["ftp://x.org", "c.example.org", "https://x.org/?a=1", "https://"])
def test_bad_collector_url(bad):
    with pytest.raises(ClientError, match="collector"):
        Client([bad], spool=None)


@pytest.mark.parametrize(
    "value,seconds",
    [("5", 5.0), ("0", 0.0), (None, None), ("", None), ("soon", None), ("-3", None)],
)
def test_parse_retry_after(value, seconds):
    assert tc.parse_retry_after(value) == seconds


def test_parse_retry_after_http_date():
    assert 5 <= tc.parse_retry_after(email.utils.formatdate(time.time() + 10, usegmt=True)) <= 10
    assert tc.parse_retry_after("Thu, 01 Jan 1970 00:01:40 GMT") == 0.0


def test_retry_policy_delays_are_exponential_jittered_and_capped():
    p = RetryPolicy(backoff=1.0, max_backoff=5.0, jitter=0.5)
    rng = random.Random(1)
    for n, base in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (9, 5.0)]:
        for _ in range(50):
            d = p.delay(n, rng)
            assert base * 0.5 <= d <= base
    assert RetryPolicy(jitter=0.0).delay(3, rng) == 4.0
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(jitter=2)


# ----------------------------------------------------------------------------- delivery


def test_delivered_201_receipt(server, make_client):
    ooni = {"ooni-measurement-id": "20240422_x", "ooni-measurement-link": "https://e/m/20240422_x"}
    server.push(lambda req: Reply(201, {**req.json, **ooni}))
    c = make_client([server.url])
    report = a_report(config={"prefix": "xx"})
    receipt = c.send(report)
    assert receipt.delivered and receipt.status == 201
    assert receipt.collector == server.url
    assert UUID_RE.match(receipt.uuid)
    assert receipt.ooni_measurement_link == "https://e/m/20240422_x"
    assert receipt.ooni_measurement_id == "20240422_x"
    assert receipt.to_dict()["uuid"] == receipt.uuid
    [req] = server.requests
    assert req.path == "/report"
    assert req.headers["Content-Type"] == "application/json"
    assert req.headers["User-Agent"].startswith("tunnel-telemetry-client/")
    assert req.json == {**report, "uuid": receipt.uuid}
    assert "uuid" not in report  # the caller's dict is not changed
    assert len(c.spool) == 0


def test_client_uuid_is_kept(server, make_client):
    uid = "fbf902ee-5d78-43cd-af39-b9b297a0d2f7"
    receipt = make_client([server.url]).send(a_report(uuid=uid))
    assert receipt.uuid == uid == server.requests[0].json["uuid"]


def test_fallback_from_dead_first_collector(server, make_client, sleeps):
    dead = closed_port_url()
    receipt = make_client([dead, server.url]).send(a_report())
    assert receipt.collector == server.url
    first, second = receipt.attempts
    assert first.collector == dead and first.outcome == tc.TRANSIENT
    assert first.error == "ECONNREFUSED"
    assert second.outcome == tc.DELIVERED
    assert sleeps == []  # moved on at once, no backoff within a round


def test_5xx_then_success_retries_with_backoff(server, make_client, sleeps):
    server.push(Reply(500, {"ok": False, "msg": "store down"}), Reply(503))
    receipt = make_client([server.url]).send(a_report())
    assert receipt.status == 201
    assert [a.status for a in receipt.attempts] == [500, 503, 201]
    assert receipt.attempts[0].error == "store down"
    assert len(sleeps) == 2
    assert 0.5 <= sleeps[0] <= 1.0 and 1.0 <= sleeps[1] <= 2.0
    uuids = {r.json["uuid"] for r in server.requests}
    assert len(uuids) == 1  # the same report each time: idempotent at the collector


def test_second_collector_tried_before_sleeping(server, server2, make_client, sleeps):
    server.push(Reply(502))
    receipt = make_client([server.url, server2.url]).send(a_report())
    assert receipt.collector == server2.url
    assert sleeps == []


def test_429_retry_after_is_honoured_and_capped(server, make_client, sleeps):
    server.push(
        Reply(429, headers={"Retry-After": "7"}), Reply(429, headers={"Retry-After": "999"})
    )
    policy = RetryPolicy(attempts=3, backoff=1.0, retry_after_cap=20.0, max_elapsed=1000)
    receipt = make_client([server.url], policy=policy).send(a_report())
    assert receipt.status == 201
    assert receipt.attempts[0].retry_after == 7.0
    assert receipt.attempts[1].retry_after == 20.0
    assert 6.0 < sleeps[0] <= 7.0 and 19.0 < sleeps[1] <= 20.0


def test_retry_after_beyond_budget_gives_up(server, make_client, sleeps):
    server.push(Reply(503, headers={"Retry-After": "30"}))
    policy = RetryPolicy(attempts=3, max_elapsed=10.0)
    with pytest.raises(NotDelivered):
        make_client([server.url], policy=policy).send(a_report())
    assert sleeps == [] and len(server.requests) == 1


@pytest.mark.parametrize("status", [400, 413, 415])
def test_report_fault_is_not_sent_elsewhere(server, server2, make_client, sleeps, status):
    answer = {"ok": False, "msg": "bad time", "errors": [{"path": "/time", "message": "old"}]}
    server.push(Reply(status, answer))
    c = make_client([server.url, server2.url])
    with pytest.raises(ReportRejected) as info:
        c.send(a_report())
    assert info.value.exit_code == 1
    assert info.value.receipt.status == status
    assert info.value.receipt.collector == server.url
    assert info.value.receipt.answer == answer
    assert "bad time" in str(info.value)
    assert len(server.requests) == 1 and server2.requests == []
    assert sleeps == []
    assert len(c.spool) == 0  # not kept: resending cannot help


@pytest.mark.parametrize(
    "reply",
    [
        Reply(404, {"msg": "no such route"}),
        Reply(401),
        Reply(405),
        Reply(302, headers={"Location": "http://127.0.0.1:9/"}),
        Reply(200, b"<html>captive portal</html>"),
        Reply(201, b"not json"),
    ],
    ids=["404", "401", "405", "302", "200-html", "201-not-json"],
)
def test_collector_fault_moves_on_and_is_not_asked_again(
    server, server2, make_client, reply
):
    server.push(reply)
    server2.push(Reply(503), Reply(503))
    receipt = make_client([server.url, server2.url]).send(a_report())
    assert receipt.collector == server2.url
    assert len(server.requests) == 1  # faulty collector left out of later rounds
    assert len(server2.requests) == 3
    assert receipt.attempts[0].outcome == tc.COLLECTOR_FAULT


def test_hanging_collector_times_out_and_falls_back(server, server2, make_client):
    server.push(Reply(action="hang"))
    receipt = make_client([server.url, server2.url], timeout=0.3).send(a_report())
    assert receipt.collector == server2.url
    assert receipt.attempts[0].error == "read timeout"


def test_connection_closed_without_answer_is_transient(server, make_client):
    server.push(Reply(action="close"))
    receipt = make_client([server.url]).send(a_report())
    assert [a.outcome for a in receipt.attempts] == [tc.TRANSIENT, tc.DELIVERED]


def test_all_down_spools_and_is_bounded(tmp_path, make_client, sleeps):
    dead1, dead2 = closed_port_url(), closed_port_url()
    policy = RetryPolicy(attempts=3, backoff=1.0, jitter=0.0)
    c = make_client([dead1, dead2], policy=policy)
    report = a_report()
    with pytest.raises(NotDelivered) as info:
        c.send(report)
    exc = info.value
    assert exc.exit_code == 3
    assert len(exc.attempts) == 6  # 3 rounds x 2 collectors
    assert sleeps == [1.0, 2.0]  # exponential between rounds
    assert exc.spooled == tmp_path / "spool" / f"{exc.uuid}.json"
    assert json.loads(exc.spooled.read_text()) == {**report, "uuid": exc.uuid}
    assert "ECONNREFUSED" in str(exc)


def test_total_time_budget_stops_rounds(make_client, sleeps):
    policy = RetryPolicy(attempts=10, backoff=4.0, jitter=0.0, max_elapsed=20.0)
    c = make_client([closed_port_url()], policy=policy)
    with pytest.raises(NotDelivered) as info:
        c.send(a_report())
    assert sleeps == [4.0, 8.0]  # a third wait (16 s) would end past 20 s
    assert len(info.value.attempts) == 3


def test_retry_after_collector_skipped_until_due(server, server2, make_client, sleeps):
    """A collector that said Retry-After is left out until then; others are retried sooner."""
    server.push(Reply(503, headers={"Retry-After": "2"}))
    server2.push(Reply(503), Reply(503))
    policy = RetryPolicy(attempts=3, backoff=1.0, jitter=0.0, max_elapsed=100)
    receipt = make_client([server.url, server2.url], policy=policy).send(a_report())
    # round 2 after 1 s: server is not due yet, only server2; round 3 after 2 s more: both
    assert sleeps == [1.0, 2.0]
    assert [(a.collector, a.status) for a in receipt.attempts] == [
        (server.url, 503), (server2.url, 503), (server2.url, 503), (server.url, 201)]


def test_cancel_stops_waiting(tmp_path):
    c = Client([closed_port_url()], spool=Spool(tmp_path), policy=RetryPolicy(backoff=3600))
    c.cancel()  # e.g. the app is shutting down
    with pytest.raises(NotDelivered) as info:
        c.send(a_report())
    c.close()
    assert info.value.cancelled
    assert info.value.attempts == ()  # no network once cancelled
    assert info.value.spooled.exists()  # kept for a later flush


def test_cancel_between_rounds(server, make_client):
    server.default = Reply(503)
    holder = []

    def sleep(seconds):
        holder[0].cancel()  # the app shuts down while the client waits

    c = make_client([server.url], sleep=sleep)
    holder.append(c)
    with pytest.raises(NotDelivered) as info:
        c.send(a_report())
    assert info.value.cancelled and len(server.requests) == 1
    assert info.value.spooled.exists()


def test_no_collectors_is_an_error(tmp_path):
    with Client([], spool=None) as c, pytest.raises(ClientError, match="no collector"):
        c.send(a_report())


def test_invalid_report_never_sent_nor_spooled(server, make_client):
    c = make_client([server.url])
    with pytest.raises(InvalidReport):
        c.send({**a_report(), "endpoint": "nope"})
    assert server.requests == [] and len(c.spool) == 0


def test_collectors_from_comma_string(server, server2, tmp_path):
    with Client(f"{server.url}, {server2.url}", spool=None) as c:
        assert c.collectors == [server.url, server2.url]


def test_one_session_per_client(server, make_client):
    c = make_client([server.url])
    session = c.session
    c.send(a_report())
    c.send(a_report())
    assert c.session is session
    assert isinstance(session, requests.Session)


def test_send_report_helper(server, tmp_path):
    receipt = tc.send_report(a_report(), [server.url], spool=Spool(tmp_path))
    assert receipt.status == 201


# ----------------------------------------------------------------------------- spool


def test_report_is_spooled_before_the_first_attempt(server, make_client, tmp_path):
    """A crash mid-delivery loses nothing: the report is on disk while it is being sent."""
    seen = []

    def check(req):
        seen.append(sorted(p.name for p in (tmp_path / "spool").iterdir()))
        return Reply(201, req.json)

    server.push(check)
    receipt = make_client([server.url]).send(a_report())
    assert seen == [[f"{receipt.uuid}.json"]]
    assert list((tmp_path / "spool").iterdir()) == []


def test_spool_put_is_atomic(tmp_path, monkeypatch):
    spool = Spool(tmp_path / "s")
    report = {**a_report(), "uuid": "fbf902ee-5d78-43cd-af39-b9b297a0d2f7"}
    path = spool.put(report)
    before = path.read_bytes()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert oct(spool.directory.stat().st_mode & 0o777) == "0o700"

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        spool.put({**report, "duration_ms": 999})
    monkeypatch.undo()
    assert path.read_bytes() == before  # old version intact
    assert sorted(p.name for p in spool.directory.iterdir()) == [path.name]  # no temp left


def test_spool_same_uuid_is_one_file(tmp_path):
    spool = Spool(tmp_path)
    report = {**a_report(), "uuid": "fbf902ee-5d78-43cd-af39-b9b297a0d2f7"}
    spool.put(report)
    spool.put(report)
    assert len(spool) == 1
    with pytest.raises(ValueError, match="uuid"):
        spool.put(a_report())


def test_spool_ignores_and_cleans_crash_leftovers(tmp_path):
    spool = Spool(tmp_path)
    stale = tmp_path / ".fbf902ee-5d78-43cd-af39-b9b297a0d2f7.json.x1.tmp"
    fresh = tmp_path / ".fbf902ee-5d78-43cd-af39-b9b297a0d2f7.json.x2.tmp"
    stale.write_text("{half")
    fresh.write_text("{half")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    assert spool.paths() == []
    assert spool.clean_temporary() == 1
    assert not stale.exists() and fresh.exists()


def test_spool_cap_drops_oldest(tmp_path):
    spool = Spool(tmp_path, max_reports=3)
    uids = [f"00000000-0000-4000-8000-00000000000{i}" for i in range(5)]
    for i, uid in enumerate(uids):
        p = spool.put({**a_report(), "uuid": uid})
        os.utime(p, (1000 + i, 1000 + i))
    assert [p.stem for p in spool.paths()] == uids[2:]


def test_spool_write_failure_does_not_stop_delivery(server, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with Client([server.url], spool=Spool(blocker / "spool")) as c:
        assert c.send(a_report()).status == 201


@pytest.mark.parametrize(
    "env,expected",
    [
        ({"TT_SPOOL_DIR": "/x/spool"}, "/x/spool"),
        ({"XDG_STATE_HOME": "/state"}, "/state/tunnel-telemetry/spool"),
        ({}, str(Path.home() / ".local/state/tunnel-telemetry/spool")),
    ],
)
def test_default_spool_dir(env, expected):
    assert str(tc.default_spool_dir(env)) == expected


def test_flush_delivers_and_removes(server, make_client, tmp_path):
    down = make_client([closed_port_url()], policy=RetryPolicy(attempts=1))
    uuids = []
    for _ in range(3):
        with pytest.raises(NotDelivered) as info:
            down.send(a_report())
        uuids.append(info.value.uuid)
    assert len(down.spool) == 3
    up = make_client([server.url])
    result = up.flush()
    assert [r.uuid for r in result.delivered] == [r.json["uuid"] for r in server.requests]
    assert sorted(r.uuid for r in result.delivered) == sorted(uuids)
    assert result.remaining == 0 and result.rejected == [] and result.error is None
    assert len(up.spool) == 0
    assert up.flush().delivered == []


def test_flush_sets_aside_rejected_and_corrupt(server, make_client, tmp_path):
    spool = Spool(tmp_path / "spool")
    good = {**a_report(), "uuid": "00000000-0000-4000-8000-000000000001"}
    refused = {**a_report(), "uuid": "00000000-0000-4000-8000-000000000002"}
    spool.put(good)
    spool.put(refused)
    (spool.directory / "00000000-0000-4000-8000-000000000003.json").write_text("{torn")
    server.push(
        lambda req: Reply(400, {"ok": False, "msg": "too old"})
        if req.json["uuid"] == refused["uuid"]
        else Reply(201, req.json)
    )
    server.default = server.queue[0]
    result = make_client([server.url], spool=spool).flush()
    assert [r.uuid for r in result.delivered] == [good["uuid"]]
    assert sorted(f for f, _ in result.rejected) == [
        "00000000-0000-4000-8000-000000000002.json",
        "00000000-0000-4000-8000-000000000003.json",
    ]
    assert len(spool) == 0
    moved = sorted(p.name for p in spool.rejected_dir.iterdir())
    assert "00000000-0000-4000-8000-000000000002.json" in moved
    reason = (spool.rejected_dir / "00000000-0000-4000-8000-000000000002.reason").read_text()
    assert "too old" in reason


def test_flush_stops_when_collectors_are_down(make_client, tmp_path):
    spool = Spool(tmp_path / "spool")
    for i in range(4):
        spool.put({**a_report(), "uuid": f"00000000-0000-4000-8000-00000000000{i}"})
    c = make_client([closed_port_url()], spool=spool, policy=RetryPolicy(attempts=2))
    result = c.flush()
    assert result.remaining == 4 and result.delivered == []
    assert isinstance(result.error, NotDelivered)
    assert len(result.error.attempts) == 2  # gave up after the first report
    assert len(spool) == 4


# ----------------------------------------------------------------------------- sampling


def test_sampling_fractions_statistically():
    sampler = Sampler(success_fraction=0.1, failure_fraction=0.6, rng=random.Random(1234))
    ok = a_report()
    bad = a_report(failure=failure("tcp.connect", "refused", "ECONNREFUSED"))
    n = 20_000
    kept_ok = [s for s in (sampler.sample(ok) for _ in range(n)) if s]
    kept_bad = [s for s in (sampler.sample(bad) for _ in range(n)) if s]
    for kept, p in ((kept_ok, 0.1), (kept_bad, 0.6)):
        mean, sd = n * p, (n * p * (1 - p)) ** 0.5
        assert abs(len(kept) - mean) < 4 * sd, (len(kept), mean)
        assert all(s["sampling_rate"] == p for s in kept)
    # re-weighting by 1/sampling_rate estimates the true totals
    assert abs(sum(1 / s["sampling_rate"] for s in kept_ok) - n) < 4 * (n * 0.9 / 0.1) ** 0.5


@pytest.mark.parametrize("frac", [-0.1, 1.5])
def test_sampling_fraction_range(frac):
    with pytest.raises(ValueError):
        Sampler(frac, 1.0)


def test_sampling_edges():
    s = Sampler(0.0, 1.0, random.Random(0))
    assert s.sample(a_report()) is None
    kept = s.sample(a_report(failure=failure("x")))
    assert kept is not None and "sampling_rate" not in kept  # rate 1: nothing to re-weight
    composed = Sampler(0.5, 1.0, random.Random(3))
    results = [composed.sample(a_report(sampling_rate=0.5)) for _ in range(20)]
    assert {r["sampling_rate"] for r in results if r} == {0.25}


def test_client_sampling_sends_rate_and_skips_sampled_out(server, make_client):
    c = make_client([server.url], sampler=Sampler(0.3, 1.0, random.Random(99)))
    outcomes = [c.send(a_report()) for _ in range(60)]
    sent = [o for o in outcomes if o is not None]
    assert 0 < len(sent) < 60
    assert len(server.requests) == len(sent)
    assert all(r.json["sampling_rate"] == 0.3 for r in server.requests)
    assert c.send(a_report(failure=failure("tcp.connect"))) is not None
    assert "sampling_rate" not in server.requests[-1].json


def test_invalid_report_is_an_error_even_when_sampled_out(server, make_client):
    c = make_client([server.url], sampler=Sampler(0.0, 0.0))
    with pytest.raises(InvalidReport):
        c.send({**a_report(), "time": "noon"})
    assert c.send(a_report()) is None and server.requests == []


def test_transport_errors_are_named():
    import socket

    import urllib3

    gai = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    wrapped = urllib3.exceptions.MaxRetryError(None, "/report", reason=gai)
    assert tc._describe_exception(requests.ConnectionError(wrapped)) == "DNS EAI_NONAME"
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    assert tc._describe_exception(requests.ConnectionError(refused)) == "ECONNREFUSED"
    assert tc._describe_exception(requests.ConnectTimeout()) == "connect timeout"
    assert tc._describe_exception(requests.ReadTimeout()) == "read timeout"
    assert tc._describe_exception(requests.ConnectionError("?")) == "connection error"
