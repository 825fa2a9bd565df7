"""The OONI client against the fake OONI collector: protocol, reuse, failure classes."""

import email.utils
import re
import socket
import threading
import time
import uuid as uuidlib
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest

from tunnel_telemetry import httpclient
from tunnel_telemetry.relay import http as delivery
from tunnel_telemetry.relay import ooni


def stored(**over):
    r = {
        "report-type": "tunnel-telemetry",
        "uuid": str(uuidlib.uuid4()),
        "time": "2024-04-18T09:59:58.123456789Z",
        "t_received": "2024-04-18T10:00:01Z",
        "collector_id": "c1",
        "proto": "ss",
        "endpoint_port": 443,
        "endpoint_asn": "AS13335",
        "endpoint_cc": "AU",
        "client_asn": "AS30722",
        "client_cc": "IT",
        "config": {"prefix": "xx"},
        "duration_ms": 250,
        "failure": None,
        "sampling_rate": 1,
    }
    r.update(over)
    return {k: v for k, v in r.items() if v != "DROP"}


@pytest.fixture
def client(fake):
    c = ooni.OONIClient(fake.url, timeout=5)
    yield c
    c.close()


def test_happy_path_df000_content(fake, client):
    rep = stored()
    out = client.send(rep)
    assert out.state == "delivered", (out, fake.rejections())
    uid = out.result["measurement_uid"]
    assert re.fullmatch(r"\d{14}\.\d{6}_IT_tunneltelemetry_[0-9a-f]{16}", uid)
    assert ooni.explorer_link(uid) == f"https://explorer.ooni.org/m/{uid}"
    [m] = fake.measurements
    c = m.content
    assert m.measurement_uid == uid and c["report_id"] == out.result["report_id"]
    assert c["measurement_start_time"] == "2024-04-18 09:59:58"
    assert (c["probe_asn"], c["probe_cc"], c["probe_ip"]) == ("AS30722", "IT", "127.0.0.1")
    assert c["test_runtime"] == 0.25 and c["input"] is None
    assert c["annotations"] == {"report_uuid": rep["uuid"], "collector_id": "c1"}
    assert c["test_keys"] == {k: v for k, v in rep.items() if k != "report-type"}
    opened = fake.reports()[c["report_id"]].meta
    assert c["test_start_time"] == opened["test_start_time"]
    assert (opened["test_name"], opened["software_name"]) == ("tunneltelemetry", "tunnel-telemetry")


def test_reports_are_reused_over_one_connection(fake, client):
    outs = [client.send(stored()) for _ in range(20)]
    assert {o.state for o in outs} == {"delivered"}
    s = fake.stats()
    assert (s["opens"], s["submissions"], s["uuids"], s["connections"]) == (1, 20, 20, 1)
    assert len({o.result["report_id"] for o in outs}) == 1


def test_one_report_per_location(fake, client):
    for cc, asn in [("IT", "AS1"), ("IT", "AS2"), ("DE", "AS1"), ("IT", "AS1")]:
        assert client.send(stored(client_cc=cc, client_asn=asn)).state == "delivered"
    assert fake.stats()["opens"] == 3
    assert len(client.open_reports()) == 3


def test_concurrent_senders_open_once(fake, client):
    with ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(lambda _: client.send(stored()), range(48)))
    assert [o.state for o in outs] == ["delivered"] * 48
    s = fake.stats()
    assert (s["opens"], s["submissions"], s["uuids"]) == (1, 48, 48)


def test_day_roll_over_opens_a_new_report_and_closes_the_old(fake):
    now = [datetime(2024, 4, 18, 23, 59, 0, tzinfo=UTC).timestamp()]
    c = ooni.OONIClient(fake.url, timeout=5, clock=lambda: now[0])
    try:
        assert c.send(stored()).state == "delivered"
        now[0] += 120  # next UTC day
        assert c.send(stored()).state == "delivered"
        assert fake.stats()["closes"] == 0  # closing is not on the sending path
        assert c.close_stale() == 1
        s = fake.stats()
        assert (s["opens"], s["closes"], s["open_reports"]) == (2, 1, 1)
        tsts = sorted(r.meta["test_start_time"] for r in fake.reports().values())
        assert tsts == ["2024-04-18 23:59:00", "2024-04-19 00:01:00"]
    finally:
        c.close()
    assert fake.stats()["closes"] == 2


def test_close_within_budget_when_ooni_is_unreachable(fake):
    c = ooni.OONIClient(fake.url, timeout=5)
    for cc in ("IT", "DE", "FR"):
        c.send(stored(client_cc=cc))
    fake.set_latency(1.0)
    c.close(timeout=0.2, budget=0.3)  # does not wait 3 x 0.2 s
    close_requests = [r for r in fake.requests if r.path.endswith("/close")]
    assert 1 <= len(close_requests) <= 2


def test_close_closes_open_reports_and_session(fake):
    c = ooni.OONIClient(fake.url, timeout=5)
    c.send(stored(client_cc="IT"))
    c.send(stored(client_cc="DE"))
    c.close()
    s = fake.stats()
    assert (s["closes"], s["open_reports"]) == (2, 0)


@pytest.mark.parametrize("over", [
    {"client_asn": "AS0"}, {"client_cc": "ZZ"}, {"client_asn": "DROP"}, {"client_cc": "DROP"},
    {"client_cc": "12"}, {"client_asn": "30722"}, {"client_asn": "AS00"},
    {"client_asn": "AS4294967296"},
])
def test_unknown_client_location_is_skipped_and_not_sent(fake, client, over):
    out = client.send(stored(**over))
    assert (out.state, out.reason) == ("skipped", "client-location-unknown")
    assert fake.stats()["requests"] == 0


@pytest.mark.parametrize("fault, kwargs, reason", [
    (503, {}, "http-503"),
    (500, {}, "http-500"),
    ("reset", {}, "connection-error"),
    ("disconnect", {}, "connection-error"),
    ("empty", {"ops": ["submit"]}, "accepted-without-id"),
    (429, {"retry_after": 7}, "rate-limited"),
])
@pytest.mark.parametrize("op", ["open", "submit"])
def test_retryable_failures(fake, client, fault, kwargs, reason, op):
    if op == "submit":
        assert client.send(stored()).state == "delivered"  # the report is open
    kwargs = {"ops": [op], **kwargs}
    fake.fail(fault, times=1, **kwargs)
    out = client.send(stored())
    assert (out.state, out.reason, out.retryable) == ("pending", reason, True)
    if fault == 429:
        assert out.retry_after == 7
    assert client.send(stored()).state == "delivered"  # recovers by itself


def test_timeout_is_retryable_and_bounded(fake, client):
    fake.set_latency(0.6)
    out = client.send(stored(), timeout=0.2)
    assert (out.state, out.reason) == ("pending", "timeout")


def test_timeout_budget_covers_open_and_submit(fake, client):
    fake.set_latency(0.15)
    out = client.send(stored(), timeout=0.4)  # open fits, open + submit does not
    assert fake.stats()["opens"] == 1
    assert (out.state, out.reason) == ("pending", "timeout")


def test_connection_refused_is_retryable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    c = ooni.OONIClient(f"http://127.0.0.1:{port}", timeout=2)
    try:
        out = c.send(stored())
    finally:
        c.close()
    assert (out.state, out.reason) == ("pending", "connection-error")


@pytest.mark.parametrize("status, op", [(400, "submit"), (422, "open"), (403, "submit")])
def test_other_4xx_is_permanent_with_oonis_reason(fake, client, status, op):
    fake.fail(status, ops=[op], times=1)
    out = client.send(stored())
    assert (out.state, out.reason, out.retryable) == ("failed", f"http-{status}", False)
    assert out.detail == f"{op}: Injected failure"


def test_content_differing_from_the_opened_report_is_permanent(fake):
    # a client misconfigured to send another test version than it opened with
    c = ooni.OONIClient(fake.url, timeout=5)
    try:
        c.send(stored())
        c.test_version = "9.9.9"  # opened reports keep the old version in their key...
        rep = c.open_reports()[0]
        c._reports[(rep.key[0], rep.key[1], rep.key[2], "9.9.9")] = rep  # ...force reuse
        out = c.send(stored())
    finally:
        c.close()
    assert (out.state, out.reason) == ("failed", "http-400")
    assert "test_version differs" in fake.rejections()[-1]


def test_expired_report_is_reopened_once(fake, client):
    assert client.send(stored()).state == "delivered"
    fake.fail(404, ops=["submit"], times=1)  # not OONI (stateless ids): another collector
    out = client.send(stored())
    assert out.state == "delivered"
    s = fake.stats()
    assert (s["opens"], s["submissions"]) == (2, 2)


def test_report_unknown_twice_is_permanent(fake, client):
    fake.fail(404, ops=["submit"])
    out = client.send(stored())
    assert (out.state, out.reason) == ("failed", "report-unknown")
    assert fake.stats()["opens"] == 2  # reopened exactly once


def test_open_answer_without_report_id_is_retryable(fake, client):
    fake.fail("empty", ops=["open"], times=1)
    out = client.send(stored())
    assert (out.state, out.reason) == ("pending", "bad-answer")
    assert client.send(stored()).state == "delivered"


def test_endpoint_address_only_when_allowed(fake):
    rep = stored(endpoint="ss://198.51.100.7:443", endpoint_addr="198.51.100.7")
    for allowed in (False, True):
        c = ooni.OONIClient(fake.url, timeout=5, allow_public_endpoint=allowed)
        try:
            assert c.send(rep).state == "delivered"
        finally:
            c.close()
        tk = fake.measurements[-1].content["test_keys"]
        assert ("endpoint_addr" in tk, "endpoint" in tk) == (allowed, allowed)
    assert fake.all_text().count("198.51.100.7") == 2  # only in the allowed submission


def test_unknown_fields_are_never_relayed(fake, client):
    out = client.send(stored(client_ip="203.0.113.5", secret="x"))
    assert out.state == "delivered"
    assert "203.0.113.5" not in fake.all_text() and '"secret"' not in fake.all_text()


def test_report_without_valid_time_is_permanent(fake, client):
    out = client.send(stored(time="yesterday"))
    assert out.state == "failed" and fake.stats()["requests"] == 0


def test_collector_id_annotation_falls_back_to_config(fake):
    c = ooni.OONIClient(fake.url, timeout=5, collector_id="mine")
    try:
        c.send(stored(collector_id="DROP"))
    finally:
        c.close()
    assert fake.measurements[0].content["annotations"]["collector_id"] == "mine"


@pytest.mark.parametrize("value, seconds", [
    ("7", 7.0), (" 0 ", 0.0), ("-3", None), ("1e9", None),
    ("999999999", httpclient.MAX_RETRY_AFTER), ("soon", None), (None, None), ("nan", None),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
])
def test_parse_retry_after(value, seconds):
    assert httpclient.parse_retry_after(value) == seconds


def test_parse_retry_after_http_date_in_the_future():
    when = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 55 <= httpclient.parse_retry_after(when) <= 60


@pytest.mark.parametrize("value, expected", [
    ("2024-04-18T09:59:58Z", "2024-04-18 09:59:58"),
    ("2024-04-18t09:59:58.5z", "2024-04-18 09:59:58"),
    ("2024-04-18T11:59:58+02:00", "2024-04-18 09:59:58"),
    ("2024-04-18T09:59:58.123456789-00:30", "2024-04-18 10:29:58"),
])
def test_ooni_time_of_rfc3339(value, expected):
    assert ooni.ooni_time(ooni.parse_rfc3339(value)) == expected


def test_one_session_is_shared_by_threads(fake, client):
    barrier = threading.Barrier(4)

    def go():
        barrier.wait()
        return client.send(stored()).state

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda _: go(), range(4))) == ["delivered"] * 4
    assert isinstance(client.http, delivery.RelayHTTP)
    assert fake.stats()["connections"] <= 4


@pytest.mark.parametrize("fields, expected", [
    ({"client_asn": "AS3320", "client_cc": "DE"}, ("AS3320", "DE")),
    ({"client_asn": "AS3320\n", "client_cc": "DE\n"}, ("AS0", "ZZ")),
    ({"client_asn": "as3320", "client_cc": "de"}, ("AS0", "DE")),
    ({"client_asn": "AS03320", "client_cc": "12"}, ("AS3320", "ZZ")),
    ({"client_asn": "AS00", "client_cc": "D"}, ("AS0", "ZZ")),
    ({"client_asn": "AS4294967295"}, ("AS4294967295", "ZZ")),
    ({"client_asn": "AS4294967296"}, ("AS0", "ZZ")),
    ({}, ("AS0", "ZZ")),
])
def test_probe_location_takes_only_well_formed_values(fields, expected):
    assert ooni.probe_location(fields) == expected
