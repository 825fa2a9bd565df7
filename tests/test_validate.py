import json
from datetime import UTC, datetime, timedelta

import pytest

from tunnel_telemetry.errors import ReportError
from tunnel_telemetry.pipeline.validate import (
    format_time,
    parse_endpoint,
    parse_json,
    parse_time,
    validate,
)
from tunnel_telemetry.testing.reports import make_report
from tunnel_telemetry.web.errors import status_of

NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
WEEK = 7 * 86400.0


@pytest.mark.parametrize("text, proto, host, port, is_ip", [
    ("ss://1.1.1.1:443", "ss", "1.1.1.1", 443, True),
    ("obfs4://[2001:db8::1]:9001", "obfs4", "2001:db8::1", 9001, True),
    ("vless://proxy.example.org:443", "vless", "proxy.example.org", 443, False),
    ("vless://Proxy.Example.ORG.:443", "vless", "proxy.example.org", 443, False),
    ("https+h2://a-b.example:1", "https+h2", "a-b.example", 1, False),
    ("ss://[::ffff:1.2.3.4]:65535", "ss", "1.2.3.4", 65535, True),
    ("tcp://localhost:80", "tcp", "localhost", 80, False),
    ("ss://0x-proxy.cafe:443", "ss", "0x-proxy.cafe", 443, False),  # only a last label counts
    ("ss://deadbeef.cafe:443", "ss", "deadbeef.cafe", 443, False),
])
def test_parse_endpoint_ok(text, proto, host, port, is_ip):
    endpoint = parse_endpoint(text)
    assert (endpoint.proto, endpoint.host, endpoint.port) == (proto, host, port)
    assert (endpoint.address is not None) == is_ip


@pytest.mark.parametrize("text, reason", [
    ("ss://1.1.1.1", "protocol://address:port"),
    ("ss://1.1.1.1:0", "port"),
    ("ss://1.1.1.1:65536", "port"),
    ("ss://1.1.1.1:0443", "port"),
    ("ss://2001:db8::1:443", "brackets"),
    ("ss://[2001:db8::zz]:443", "IPv6"),
    ("ss://[fe80::1%eth0]:443", "zone"),
    ("ss://user:pw@1.1.1.1:443", "user information"),
    ("ss://1.1.1.1:443/path", "path"),
    ("ss://1.1.1.1:443?q=1", "path"),
    ("ss://999.1.1.1:443", "IPv4"),
    ("ss://1.1.1:443", "IPv4"),
    ("ss://-bad-.example:443", "host name"),
    ("ss://a..b:443", "host name"),
    ("SS://1.1.1.1:443", "protocol"),
    ("1.1.1.1:443", "protocol"),
    # Host names that resolvers and URL parsers read as an IPv4 address: refused.
    ("ss://0x01010101:443", "IPv4"),
    ("ss://0X1.0x1.0x1.0x1:443", "IPv4"),
    ("ss://16843009:443", "IPv4"),
    ("ss://1.1.0x101:443", "IPv4"),
    ("ss://011.010.07.0102:443", "IPv4"),
    ("ss://9.8.1858:443", "IPv4"),
    ("ss://proxy.0x10:443", "IPv4"),
    ("ss://proxy.123:443", "IPv4"),
])
def test_parse_endpoint_rejects(text, reason):
    with pytest.raises(ValueError, match=reason):
        parse_endpoint(text)


@pytest.mark.parametrize("text, expected", [
    ("2024-04-12T00:00:00Z", "2024-04-12T00:00:00Z"),
    ("2024-04-12t02:00:00+02:00", "2024-04-12T00:00:00Z"),
    ("2024-04-11 19:00:00-05:00", "2024-04-12T00:00:00Z"),
    ("2024-04-12T00:00:00.123456789Z", "2024-04-12T00:00:00.123Z"),
    ("2016-12-31T23:59:60Z", "2016-12-31T23:59:59.999Z"),
    ("2016-12-31T18:59:60-05:00", "2016-12-31T23:59:59.999Z"),
    ("2017-01-01T05:29:60+05:30", "2016-12-31T23:59:59.999Z"),
])
def test_parse_time(text, expected):
    assert format_time(parse_time(text)) == expected


@pytest.mark.parametrize("text", ["2024-02-30T00:00:00Z", "2024-04-12T00:00:00+25:00",
                                  "2024-04-12", "2024-04-12T00:00:00",
                                  # A leap second is only ever the last second of a UTC day.
                                  "2024-04-12T12:00:60Z", "2016-12-31T23:59:60+05:30",
                                  "2016-12-31T23:58:60Z", "2016-12-31T22:59:60Z"])
def test_parse_time_rejects(text):
    with pytest.raises(ValueError):
        parse_time(text)


@pytest.mark.parametrize("body, code", [
    (b"", "empty_body"),
    (b"{", "bad_json"),
    (b'{"a": NaN}', "bad_json"),
    (b'{"a": Infinity}', "bad_json"),
    (b'{"a": 1, "a": 2}', "bad_json"),
    (b'{"a": "\xff"}', "bad_encoding"),
    (b"[" * 10000 + b"]" * 10000, "too_deep"),
    (b'{"a": ' + b"9" * 5000 + b"}", "bad_json"),
    (b'{"a": 1e400}', "bad_json"),
    (b'{"a": -1e400}', "bad_json"),
    (b'{"a": "\\ud800"}', "bad_encoding"),
    (b'{"\\udfff": "x"}', "bad_encoding"),
    (b'{"a": [["x\\udc00y"]]}', "bad_encoding"),
])
def test_parse_json_rejects(body, code):
    with pytest.raises(ReportError) as info:
        parse_json(body)
    assert info.value.code == code
    assert status_of(info.value) == 400


@pytest.mark.parametrize("body, message", [
    (b'{"a": ' + b"9" * 5000 + b"}", "too many digits"),
    (b'{"a": 1e400}', "out of range"),
])
def test_parse_json_number_messages_are_short(body, message):
    with pytest.raises(ReportError) as info:
        parse_json(body)
    assert message in info.value.msg and "sys." not in info.value.msg


def test_parse_json_keeps_surrogate_pairs_and_nul():
    assert parse_json(b'{"a": "\\ud83d\\ude00 \\u0000"}') == {"a": "\U0001F600 \x00"}


def test_duration_ms_float_integer_is_stored_as_int():
    report, _ = _check(make_report(time="2026-11-25T11:00:00Z", duration_ms=3000.0))
    assert report["duration_ms"] == 3000 and isinstance(report["duration_ms"], int)


def test_parse_json_accepts_nesting_in_strings():
    assert parse_json(json.dumps({"a": "[" * 100}).encode()) == {"a": "[" * 100}


def _check(payload, now=NOW):
    return validate(payload, now, WEEK, 300.0)


def test_validate_normalises_and_drops_unknown():
    report, endpoint = _check(make_report(
        time="2026-11-25T11:00:00+00:00", extra="dropped", collector_id="spoofed",
        endpoint_asn="AS1", failure={"op": "tcp.connect", "error": "refused", "x": "y"},
        uuid="FBF902EE-5D78-43CD-AF39-B9B297A0D2F7"))
    assert endpoint.host == "1.1.1.1"
    assert report == {
        "report-type": "tunnel-telemetry",
        "uuid": "fbf902ee-5d78-43cd-af39-b9b297a0d2f7",
        "time": "2026-11-25T11:00:00Z",
        "config": {"prefix": "xx"},
        "duration_ms": None,
        "failure": {"op": "tcp.connect", "msg": "refused"},
        "sampling_rate": 1,
    }


def test_validate_generates_uuid():
    first, _ = _check(make_report(time="2026-11-25T11:00:00Z"))
    second, _ = _check(make_report(time="2026-11-25T11:00:00Z"))
    assert first["uuid"] != second["uuid"]


@pytest.mark.parametrize("fields, code, path", [
    ({"report_type": None}, "schema", "$['report-type']"),
    ({"time": None}, "schema", "$.time"),
    ({"endpoint": None}, "schema", "$.endpoint"),
    ({"report_type": "other"}, "schema", "$['report-type']"),
    ({"time": "yesterday"}, "schema", "$.time"),
    ({"time": "2026-11-25T12:06:00Z"}, "time_future", "$.time"),
    ({"time": "2026-11-18T11:59:00Z"}, "time_old", "$.time"),
    ({"endpoint": "ss://1.1.1.1:99999"}, "bad_endpoint", "$.endpoint"),
    ({"duration_ms": -1}, "schema", "$.duration_ms"),
    ({"duration_ms": 1.5}, "schema", "$.duration_ms"),
    ({"failure": {"msg": "no op"}}, "schema", "$.failure.op"),
    ({"config": {"a": 1}}, "schema", "$.config.a"),
    ({"sampling_rate": 0}, "schema", "$.sampling_rate"),
    ({"sampling_rate": 1.5}, "schema", "$.sampling_rate"),
    ({"uuid": "not-a-uuid"}, "schema", "$.uuid"),
    ({"client_cc": "norway"}, "schema", "$.client_cc"),
    ({"client_asn": "13335"}, "schema", "$.client_asn"),
])
def test_validate_rejects(fields, code, path):
    payload = make_report(time="2026-11-25T11:59:00Z")
    payload.update({("report-type" if k == "report_type" else k): v for k, v in fields.items()})
    payload = {k: v for k, v in payload.items() if v is not None}
    with pytest.raises(ReportError) as info:
        _check(payload)
    assert info.value.code == code
    assert path in [e["path"] for e in info.value.errors]


def test_validate_time_window_edges():
    _check(make_report(time=format_time(NOW + timedelta(seconds=299))))
    _check(make_report(time=format_time(NOW - timedelta(days=7) + timedelta(seconds=1))))


def test_validate_rejects_non_object():
    with pytest.raises(ReportError) as info:
        _check([make_report()])
    assert info.value.code == "not_object"


def test_error_messages_do_not_echo_input():
    with pytest.raises(ReportError) as info:
        _check(make_report(time="2026-11-25T11:59:00Z", duration_ms="1.2.3.4" * 1000))
    assert all("1.2.3.4" not in e["message"] for e in info.value.errors)


@pytest.mark.parametrize("fields, path", [
    ({"config": {"a": "x\u0000y"}}, "$.config.a"),
    ({"config": {"a\u0000": "x"}}, "$.config"),
    ({"failure": {"op": "tcp.connect", "msg": "\u0000"}}, "$.failure.msg"),
])
def test_nul_characters_rejected_for_every_backend(fields, path):
    with pytest.raises(ReportError) as info:
        _check(make_report(time="2026-11-25T11:59:00Z", **fields))
    assert info.value.code == "nul_character"
    assert info.value.errors[0]["path"] == path
