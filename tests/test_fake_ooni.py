"""The fake OONI collector: protocol checks, records, run-time faults, concurrency, CLI."""

import json
import re
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tunnel_telemetry.testing.fake_ooni import FakeOONI

TST = "2024-04-18 10:00:00"
UUID = "fbf902ee-5d78-43cd-af39-b9b297a0d2f7"


def open_body(**over):
    body = {
        "data_format_version": "0.2.0",
        "format": "json",
        "probe_asn": "AS30722",
        "probe_cc": "IT",
        "software_name": "tunnel-telemetry",
        "software_version": "0.1.0",
        "test_name": "tunneltelemetry",
        "test_start_time": TST,
        "test_version": "0.1.0",
    }
    body.update(over)
    return {k: v for k, v in body.items() if v is not None}


def content(rid, **over):
    c = {
        "annotations": {"collector_id": "c1", "report_uuid": UUID},
        "data_format_version": "0.2.0",
        "input": None,
        "measurement_start_time": "2024-04-18 09:59:58",
        "probe_asn": "AS30722",
        "probe_cc": "IT",
        "probe_ip": "127.0.0.1",
        "report_id": rid,
        "software_name": "tunnel-telemetry",
        "software_version": "0.1.0",
        "test_keys": {"proto": "ss", "endpoint_port": 443},
        "test_name": "tunneltelemetry",
        "test_runtime": 0.25,
        "test_start_time": TST,
        "test_version": "0.1.0",
    }
    c.update(over)
    return {k: v for k, v in c.items() if v != "DROP"}


@pytest.fixture
def http():
    with requests.Session() as s:
        yield s


def open_report(http, fake, **over):
    r = http.post(f"{fake.url}/report", json=open_body(**over), timeout=5)
    assert r.status_code == 200, r.text
    return r.json()["report_id"]


def submit(http, fake, rid, body=None, **over):
    return http.post(f"{fake.url}/report/{rid}",
                     json=body or {"format": "json", "content": content(rid, **over)}, timeout=5)


def test_open_submit_close_happy_path(fake, http):
    rid = open_report(http, fake)
    assert re.fullmatch(r"\d{8}T\d{6}Z_tunneltelemetry_IT_30722_n1_[A-Za-z0-9o]+", rid)
    r = submit(http, fake, rid)
    assert r.status_code == 200
    uid = r.json()["measurement_uid"]
    assert re.fullmatch(r"\d{14}\.\d{6}_IT_tunneltelemetry_[0-9a-f]{16}", uid)
    assert http.post(f"{fake.url}/report/{rid}/close", timeout=5).json() == {}
    s = fake.stats()
    counts = (s["opens"], s["submissions"], s["closes"], s["uuids"], s["open_reports"])
    assert counts == (1, 1, 1, 1, 0)
    [m] = fake.measurements
    assert m.measurement_uid == uid and m.report_id == rid
    assert m.uuid == UUID
    assert fake.rejections() == []


def test_duplicates_are_counted(fake, http):
    rid = open_report(http, fake)
    for _ in range(3):
        assert submit(http, fake, rid).status_code == 200
    s = fake.stats()
    assert (s["submissions"], s["uuids"], s["duplicates"]) == (3, 1, 2)
    assert fake.uuids() == {UUID: 3}


@pytest.mark.parametrize("missing", ["data_format_version", "format", "software_name",
                                     "software_version", "test_start_time", "test_version"])
def test_open_missing_required_field_is_422(fake, http, missing):
    r = http.post(f"{fake.url}/report", json=open_body(**{missing: None}), timeout=5)
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", missing]


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b'{"format": 1}'])
def test_open_bad_body_is_422(fake, http, raw):
    r = http.post(f"{fake.url}/report", data=raw, timeout=5,
                  headers={"Content-Type": "application/json"})
    assert r.status_code == 422


@pytest.mark.parametrize("over, reason", [
    ({"format": "yaml"}, "format"),
    ({"data_format_version": "0.1.0"}, "data_format_version"),
    ({"test_start_time": "2024-04-18T10:00:00Z"}, "test_start_time"),
    ({"test_name": "Tunnel Telemetry"}, "test_name"),
    ({"probe_cc": None}, "probe_cc"),
    ({"probe_asn": "30722"}, "probe_asn"),
    ({"software_version": ""}, "software_name/version"),
])
def test_open_strict_format_checks(fake, http, over, reason):
    r = http.post(f"{fake.url}/report", json=open_body(**over), timeout=5)
    assert r.status_code == 400
    assert reason in r.json()["fake_reason"]


@pytest.mark.parametrize("over, rid_part", [
    ({"probe_asn": "bogus"}, "_IT_0_"),
    ({"probe_cc": "ITA"}, "_ZZ_30722_"),
    ({"probe_asn": "AS0"}, "_IT_0_"),
    ({"probe_cc": "ZZ"}, "_ZZ_30722_"),
])
def test_malformed_or_unknown_location_is_dropped_with_empty_answer(over, rid_part, http):
    with FakeOONI(strict=False) as fake:
        rid = open_report(http, fake, **over)
        assert rid_part in rid
        r = submit(http, fake, rid)
        assert (r.status_code, r.json()) == (200, {})
        assert fake.stats()["dropped"] == 1 and fake.measurements == []


@pytest.mark.parametrize("over", [{"probe_cc": "DE"}, {"probe_asn": "AS1"},
                                  {"test_name": "web_connectivity"}])
def test_content_inconsistent_with_report_id_is_400(fake, http, over):
    rid = open_report(http, fake)
    r = submit(http, fake, rid, **over)
    assert (r.status_code, r.json()["detail"]) == (400, "Inconsistent measurement")
    assert fake.measurements == []


@pytest.mark.parametrize("rid", [
    "nounderscores", "a_b_c_d_e", "20240418T100000Z_tt_ITA_1_n1_x",
    "20240418T100000Z_tt_IT_x1_n1_x", "20240418T100000Z_t-t_IT_1_n1_x",
])
def test_malformed_report_id_is_400(fake, http, rid):
    r = http.post(f"{fake.url}/report/{rid}", json={"format": "json", "content": {}}, timeout=5)
    assert (r.status_code, r.json()["detail"]) == (400, "Incorrect format")


@pytest.mark.parametrize("body", [b"not json", b'{"format": "json"}', b'{"content": []}'])
def test_submit_bad_body_is_400(fake, http, body):
    rid = open_report(http, fake)
    r = http.post(f"{fake.url}/report/{rid}", data=body, timeout=5)
    assert (r.status_code, r.json()["detail"]) == (400, "Incorrect format")


@pytest.mark.parametrize("over, reason", [
    ({"test_start_time": "2024-04-18 10:00:01"}, "test_start_time differs"),
    ({"measurement_start_time": "2024-04-18T09:59:58Z"}, "measurement_start_time"),
    ({"probe_ip": "203.0.113.9"}, "probe_ip"),
    ({"report_id": "other"}, "report_id"),
    ({"annotations": {"n": 1}}, "annotations"),
    ({"test_runtime": "1"}, "test_runtime"),
    ({"input": "DROP"}, "lacks input"),
    ({"test_keys": "DROP"}, "lacks test_keys"),
    ({"test_keys": []}, "test_keys"),
    ({"test_version": "0.2.0"}, "test_version differs"),
    ({"data_format_version": "0.3.0"}, "data_format_version"),
])
def test_submit_strict_content_checks(fake, http, over, reason):
    rid = open_report(http, fake)
    r = submit(http, fake, rid, **over)
    assert r.status_code == 400
    assert reason in r.json()["fake_reason"]
    assert fake.stats()["rejected"] == 1


def test_submit_format_must_be_json(fake, http):
    rid = open_report(http, fake)
    r = submit(http, fake, rid, body={"format": "yaml", "content": content(rid)})
    assert r.status_code == 400


@pytest.mark.parametrize("how", ["unknown", "closed"])
def test_report_ids_are_stateless_as_ooni_s(fake, http, how):
    """OONI's backend never answers 404 for a well-formed id (another instance opened it)."""
    rid = open_report(http, fake)
    if how == "unknown":
        rid = rid[:-3] + "zzz"
    else:
        http.post(f"{fake.url}/report/{rid}/close", timeout=5)
    r = submit(http, fake, rid)
    assert r.status_code == 200 and "measurement_uid" in r.json()


def test_lenient_mode_accepts_what_ooni_accepts(http):
    with FakeOONI(strict=False) as fake:
        rid = open_report(http, fake)
        r = submit(http, fake, rid, probe_ip="203.0.113.9", test_start_time="whenever")
        assert r.status_code == 200 and "measurement_uid" in r.json()


def test_status_fault_for_a_number_of_times(fake, http):
    fake.fail(503, times=2)
    assert [http.post(f"{fake.url}/report", json=open_body(), timeout=5).status_code
            for _ in range(3)] == [503, 503, 200]
    assert fake.stats()["faults"] == 2


def test_429_with_retry_after(fake, http):
    fake.fail(429, retry_after=7, ops=["submit"])
    rid = open_report(http, fake)
    r = submit(http, fake, rid)
    assert (r.status_code, r.headers["Retry-After"]) == (429, "7")
    fake.clear_faults()
    assert submit(http, fake, rid).status_code == 200


@pytest.mark.parametrize("kind", ["reset", "disconnect"])
def test_connection_faults_raise_connection_error(fake, http, kind):
    fake.fail(kind, times=1)
    with pytest.raises(requests.ConnectionError):
        http.post(f"{fake.url}/report", json=open_body(), timeout=5)
    assert open_report(http, fake)  # the session recovers on a new connection


def test_empty_fault_answers_empty_object_and_records_nothing(fake, http):
    rid = open_report(http, fake)
    fake.fail("empty", times=1)
    r = submit(http, fake, rid)
    assert (r.status_code, r.json()) == (200, {})
    assert fake.measurements == [] and fake.stats()["dropped"] == 1
    assert "measurement_uid" in submit(http, fake, rid).json()


def test_probabilistic_fault(fake, http):
    fake.fail(500, probability=0.0)
    assert open_report(http, fake)


def test_bad_fault_kind_is_refused(fake):
    with pytest.raises(ValueError):
        fake.fail("explode")
    with pytest.raises(ValueError):
        fake.fail(503, ops=["opne"])


def test_latency_makes_a_short_timeout_expire(fake, http):
    fake.set_latency(0.5)
    with pytest.raises(requests.Timeout):
        http.post(f"{fake.url}/report", json=open_body(), timeout=0.1)


def test_keep_alive_reuses_one_connection(fake, http):
    rid = open_report(http, fake)
    for _ in range(5):
        assert submit(http, fake, rid).status_code == 200
    assert fake.stats()["connections"] == 1


def test_64_concurrent_keep_alive_connections(fake):
    n = 64
    barrier = threading.Barrier(n, timeout=20)

    def worker(_):
        with requests.Session() as s:
            rid = open_report(s, fake)
            barrier.wait()  # every connection is open and idle at this point
            return submit(s, fake, rid).status_code

    with ThreadPoolExecutor(n) as pool:
        codes = list(pool.map(worker, range(n)))
    assert codes == [200] * n
    s = fake.stats()
    assert (s["connections"], s["opens"], s["submissions"]) == (n, n, n)


def test_stop_with_idle_keep_alive_connections_returns():
    fake = FakeOONI().start()
    with requests.Session() as s:
        open_report(s, fake)
        fake.stop()  # must not wait for the idle connection to time out
        with pytest.raises(requests.ConnectionError):
            s.post(f"{fake.url}/report", json=open_body(), timeout=2)


def test_records_every_request_for_privacy_checks(fake, http):
    rid = open_report(http, fake)
    submit(http, fake, rid, probe_ip="198.51.100.7")
    assert "198.51.100.7" in fake.all_text()
    assert [r.path for r in fake.requests] == ["/report", f"/report/{rid}"]
    assert [r.status for r in fake.requests] == [200, 400]


def test_unknown_path_and_method(fake, http):
    assert http.post(f"{fake.url}/nothing", json={}, timeout=5).status_code == 404
    assert http.get(f"{fake.url}/report", timeout=5).status_code == 405


def test_http_control_endpoints_are_not_recorded(fake, http):
    r = http.post(f"{fake.url}/_fake/behave", timeout=5,
                  json={"latency_ms": 0, "fault": {"kind": "502", "times": 1}})
    assert r.json() == {"ok": True}
    assert http.post(f"{fake.url}/report", json=open_body(), timeout=5).status_code == 502
    stats = http.get(f"{fake.url}/_fake/stats", timeout=5).json()
    assert (stats["requests"], stats["faults"]) == (1, 1)
    assert http.post(f"{fake.url}/_fake/behave", json={"fault": {"kind": "x"}},
                     timeout=5).status_code == 400
    http.post(f"{fake.url}/_fake/clear", json={"records": True}, timeout=5)
    assert fake.stats()["requests"] == 0


def test_wait_for_times_out_with_stats(fake):
    with pytest.raises(TimeoutError, match="submissions"):
        fake.wait_for(lambda s: s["submissions"] > 0, timeout=0.1)


def test_command_line(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunnel_telemetry.testing.fake_ooni", "--port", "0",
         "--latency-ms", "1", "--fail", "503", "--fail-rate", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
        with requests.Session() as s:
            rid = s.post(f"{url}/report", json=open_body(), timeout=5).json()["report_id"]
            assert s.post(f"{url}/report/{rid}", json={"format": "json", "content": content(rid)},
                          timeout=5).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        proc.stderr.close()
        proc.stdout.close()
    assert proc.returncode == 0, err
    stats = json.loads(out.strip().splitlines()[-1])
    assert (stats["opens"], stats["submissions"]) == (1, 1)


def test_command_line_rejects_bad_fault():
    r = subprocess.run([sys.executable, "-m", "tunnel_telemetry.testing.fake_ooni",
                        "--fail", "explode"], capture_output=True, text=True, timeout=10)
    assert r.returncode == 2 and "unknown fault kind" in r.stderr


# -- as OONI's backend: fallback store, zstd, canonical ASN / CC, measurements API --------------

def test_fallback_answers_empty_but_keeps_the_measurement_findable(fake, http):
    rid = open_report(http, fake)
    fake.fail("fallback", times=1, ops=["submit"])
    r = submit(http, fake, rid)
    assert (r.status_code, r.json()) == (200, {})
    s = fake.stats()
    assert (s["submissions"], s["fallback"], s["dropped"], s["uuids"]) == (1, 1, 0, 1)
    found = http.get(f"{fake.url}/api/v1/measurements", timeout=5, params={
        "report_id": rid, "since": "2024-04-18T09:59:57", "until": "2024-04-18T10:00:00"}).json()
    [item] = found["results"]
    raw = http.get(f"{fake.url}/api/v1/raw_measurement", timeout=5,
                   params={"measurement_uid": item["measurement_uid"]}).json()
    assert raw["annotations"]["report_uuid"] == UUID
    outside = http.get(f"{fake.url}/api/v1/measurements", timeout=5, params={
        "report_id": rid, "since": "2024-04-18T10:00:00"}).json()
    assert outside["results"] == []


def test_zstd_request_bodies_are_accepted(fake, http):
    zstandard = pytest.importorskip("zstandard")
    rid = open_report(http, fake)
    body = json.dumps({"format": "json", "content": content(rid)}).encode()
    r = http.post(f"{fake.url}/report/{rid}", data=zstandard.ZstdCompressor().compress(body),
                  headers={"Content-Encoding": "zstd", "Content-Type": "application/json"},
                  timeout=5)
    assert r.status_code == 200 and "measurement_uid" in r.json()


def test_digit_country_codes_and_leading_zero_asns_are_refused(fake, http):
    assert http.post(f"{fake.url}/report", json=open_body(probe_cc="12"),
                     timeout=5).status_code == 400
    rid = open_report(http, fake, probe_asn="AS3215")
    assert "_3215_" in rid
    r = submit(http, fake, rid, probe_asn="AS03215")
    assert (r.status_code, r.json()["detail"]) == (400, "Incorrect format")
    unknown = open_report(http, fake, probe_asn="AS00")  # not recognised as AS0 at the open...
    assert "_0_" in unknown
    assert submit(http, fake, unknown, probe_asn="AS00").json() == {}  # ... dropped on submit
    assert fake.stats()["dropped"] == 1


def test_slow_mode_keeps_what_the_client_gave_up_on(fake, http):
    rid = open_report(http, fake)
    fake.set_latency(0.5, ops=["submit"])
    with pytest.raises(requests.Timeout):
        http.post(f"{fake.url}/report/{rid}", json={"format": "json", "content": content(rid)},
                  timeout=0.1)
    fake.wait_for(lambda s: s["submissions"] == 1, timeout=5)
