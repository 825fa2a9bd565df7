"""Hostile input through Flask's test client and a real tt-server (gunicorn on loopback).

Whatever arrives, the answer is a JSON error (400/413/415/429) or a 201, never a 500, a stack
trace or an HTML page; and nothing outside the limits is stored.
"""

import gzip
import json
import socket
import sqlite3
import string
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunnel_telemetry.testing.reports import make_report
from tunnel_telemetry.testing.server import TTServer
from tunnel_telemetry.web import create_app

pytestmark = pytest.mark.e2e

LIMIT = 64 * 1024
BIG_LIMIT = 2 * 1024 * 1024
ALLOWED = {201, 400, 413, 415, 429}
FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@dataclass
class Answer:
    status: int
    content_type: str
    content: bytes
    headers: dict

    def json(self):
        return json.loads(self.content)


def start_server(path, *args):
    server = TTServer(path, ["--workers", "1", "--collector-id", "hostile",
                             "--rate-limit", "0",
                             "--database-url", f"sqlite:///{path}/reports.db", *args])
    return server.start()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two real servers: the default 64 KiB limit and a 2 MiB one (for 1 MB strings)."""
    base = tmp_path_factory.mktemp("hostile")
    started = []
    try:
        started.append(start_server(base / "default"))
        started.append(start_server(base / "big", "--max-report-size", str(BIG_LIMIT)))
        yield {"default": started[0], "big": started[1]}
    finally:
        for server in started:
            server.stop()
    for server in started:
        logs = server.logs()
        assert "Traceback" not in logs
        assert '" 500 ' not in logs


@pytest.fixture(scope="module")
def apps(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile-flask")
    made = {
        "default": create_app({"database-url": f"sqlite:///{base}/d.db",
                               "collector-id": "hostile", "rate-limit": 0}),
        "big": create_app({"database-url": f"sqlite:///{base}/b.db", "collector-id": "hostile",
                           "max-report-size": BIG_LIMIT, "rate-limit": 0}),
    }
    yield made
    for app in made.values():
        app.extensions["tunnel_telemetry"].close()


@pytest.fixture(scope="module", params=["flask", "http"])
def post(request, servers, apps):
    """post(body, content_type=..., size="default") -> Answer, through one transport."""
    if request.param == "flask":
        clients = {name: app.test_client() for name, app in apps.items()}

        def send(body, content_type="application/json", size="default", headers=None):
            kwargs = {"data": body, "headers": headers or {}}
            if content_type is not None:
                kwargs["content_type"] = content_type
            resp = clients[size].post("/report", **kwargs)
            return Answer(resp.status_code, resp.content_type or "", resp.data,
                          dict(resp.headers))

        yield send
        return

    session = requests.Session()

    def send(body, content_type="application/json", size="default", headers=None):
        headers = dict(headers or {})
        if content_type is not None:
            headers["Content-Type"] = content_type
        with session.post(servers[size].url + "/report", data=body, headers=headers,
                          timeout=30) as resp:
            return Answer(resp.status_code, resp.headers.get("Content-Type", ""),
                          resp.content, dict(resp.headers))

    yield send
    session.close()


STORED_FIELDS = {"report-type", "uuid", "time", "t_received", "collector_id", "proto",
                 "endpoint_port", "endpoint_asn", "endpoint_cc", "client_asn", "client_cc",
                 "config", "duration_ms", "failure", "sampling_rate"}


def check(answer):
    """The answer is JSON, a 201 or a well-formed error, never a trace or HTML."""
    assert answer.status in ALLOWED, (answer.status, answer.content[:300])
    assert answer.content_type.startswith("application/json"), answer.content[:300]
    assert b"Traceback" not in answer.content and b"<html" not in answer.content.lower()
    body = answer.json()
    if answer.status == 201:
        assert body["report-type"] == "tunnel-telemetry"
        assert set(body) == STORED_FIELDS
        assert body["collector_id"] == "hostile"
    else:
        assert body["ok"] is False and isinstance(body["msg"], str) and body["msg"]
        assert isinstance(body["errors"], list)
        assert all(set(e) == {"path", "message"} for e in body["errors"])
        assert len(answer.content) < 8192, "error answers never echo large input"
    if answer.status == 429:
        assert int(answer.headers["Retry-After"]) > 0
    return body


def dumps(value):
    return json.dumps(value).encode()


# ---------------------------------------------------------------------------------------------
# Property tests

# Every code point, with lone surrogates, NUL, separators and address characters made common.
awkward = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff", "\x00", "\n", ":", "1", ".",
                           "\u2028", "\ufeff", "\U0001F600", "\\", '"', "%"])
any_text = st.text(alphabet=st.characters(codec=None, exclude_categories=()) | awkward,
                   max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=20,
)
# Text a report may carry: anything but NUL (PostgreSQL cannot store it) and lone surrogates.
storable = st.characters(exclude_characters="\x00", exclude_categories=("Cs",))
text = st.text(alphabet=storable, max_size=100)
clean_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text.map(lambda t: t[:10]), inner,
                                                                max_size=4),
    max_leaves=20,
)
protos = st.from_regex(r"\A[a-z][a-z0-9+.-]{0,10}\Z")
ports = st.integers(1, 65535)
hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
    st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z]{2,10}){1,3}\Z"),
)
endpoints = st.builds(lambda p, h, n: f"{p}://{h}:{n}", protos, hosts, ports)
offsets = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: timedelta(minutes=m))


def rfc3339(ago, offset):
    moment = datetime.now(UTC) - ago
    return moment.astimezone(timezone(offset)).isoformat()


times = st.builds(rfc3339, st.timedeltas(timedelta(seconds=0), timedelta(days=6)), offsets)
valid_reports = st.fixed_dictionaries(
    {"report-type": st.just("tunnel-telemetry"), "time": times, "endpoint": endpoints},
    optional={
        "config": st.dictionaries(st.text(alphabet=storable, min_size=1, max_size=64), text,
                                  max_size=8),
        "duration_ms": st.integers(0, 86_400_000),
        "failure": st.none() | st.fixed_dictionaries(
            {"op": text.filter(bool).map(lambda t: t[:128])},
            optional={"msg": text, "error": text, "posix_error": text.map(lambda t: t[:64])}),
        "uuid": st.uuids().map(str),
        "sampling_rate": st.floats(0, 1, exclude_min=True),
        "client_asn": st.integers(0, 2**32 - 1).map(lambda n: f"AS{n}"),
        "client_cc": st.from_regex(r"\A[A-Z]{2}\Z"),
        "unknown-field": clean_json,
    },
)
KEYS = ["report-type", "time", "endpoint", "config", "duration_ms", "failure", "uuid",
        "sampling_rate", "client_asn", "client_cc", "t_received", "collector_id",
        "endpoint_addr", "ooni-measurement-id"]


@FUZZ
@given(body=st.binary(max_size=2048))
def test_arbitrary_bytes(post, body):
    assert check(post(body)) is not None


@FUZZ
@given(body=st.binary(max_size=256),
       content_type=st.one_of(st.none(), st.text(string.printable.strip(), max_size=60),
                              st.sampled_from(["application/json", "text/plain",
                                               "application/json; charset=latin-1",
                                               "application/json; charset=UTF-8",
                                               "multipart/form-data; boundary=x"])))
def test_arbitrary_content_types(post, body, content_type):
    answer = post(body, content_type=content_type)
    check(answer)
    if content_type is None or not content_type.lower().startswith("application/json"):
        assert answer.status == 415


@FUZZ
@given(value=json_values)
def test_arbitrary_json(post, value):
    check(post(json.dumps(value).encode()))


@FUZZ
@given(report=valid_reports)
def test_valid_reports_are_stored(post, report):
    answer = post(dumps(report))
    body = check(answer)
    assert answer.status == 201, body
    if "uuid" in report:
        assert body["uuid"] == report["uuid"].lower()
    assert "unknown-field" not in body


@FUZZ
@given(report=valid_reports, config=st.dictionaries(any_text.filter(bool), any_text, max_size=4),
       failure=st.fixed_dictionaries({"op": any_text.filter(bool)}, optional={"msg": any_text}))
def test_reports_with_any_text(post, report, config, failure):
    """Every code point, lone surrogates included, in the strings that get stored."""
    report.update(config=config, failure=failure)
    check(post(dumps(report)))


@FUZZ
@given(report=valid_reports, data=st.data())
def test_mutated_reports(post, report, data):
    action = data.draw(st.sampled_from(["drop", "set", "bytes"]))
    if action == "drop" and report:
        del report[data.draw(st.sampled_from(sorted(report)))]
    elif action == "set":
        report[data.draw(st.sampled_from(KEYS))] = data.draw(json_values)
    body = dumps(report)
    if action == "bytes":
        start = data.draw(st.integers(0, len(body)))
        end = data.draw(st.integers(start, min(len(body), start + 8)))
        body = body[:start] + data.draw(st.binary(max_size=8)) + body[end:]
    check(post(body))


# ---------------------------------------------------------------------------------------------
# Explicit cases: every item of the issue, with the limit that applies


DAY = (datetime.now(UTC) - timedelta(days=2)).date()


def at(clock, offset="Z", day=None):
    """An RFC 3339 time two days ago (inside the 7 day window) at ``clock`` with ``offset``."""
    return f"{(day or DAY).isoformat()}T{clock}{offset}"


def utc(clock, offset_minutes=0):
    """What at(clock, offset) is in UTC, by datetime arithmetic (not the code under test)."""
    local = datetime.fromisoformat(f"{DAY.isoformat()}T{clock}")
    return (local - timedelta(minutes=offset_minutes)).strftime("%Y-%m-%dT%H:%M:%SZ")


def nested(depth):
    return b'{"report-type": "tunnel-telemetry", "x": ' + b"[" * depth + b"]" * depth + b"}"


def with_raw(raw):
    """A valid report with one more top-level member written as raw JSON text."""
    return b'{"x": ' + raw + b", " + dumps(make_report())[1:]


CASES = [
    # (id, body, kwargs, status, text in the answer)
    ("over-limit", b" " * (LIMIT + 1), {}, 413, "larger than 65536"),
    ("at-limit", dumps(make_report(pad="x" * (LIMIT - 200))).ljust(LIMIT), {}, 201, ""),
    ("1mb-string-over-default", dumps(make_report(config={"k": "x" * 2**20})), {}, 413, "larger"),
    ("1mb-config-value", dumps(make_report(config={"k": "x" * 2**20})), {"size": "big"}, 400,
     "longer than 1024"),
    ("1mb-config-key", dumps(make_report(config={"k" * 2**20: "x"})), {"size": "big"}, 400,
     "longer than 64"),
    ("1mb-failure-msg", dumps(make_report(failure={"op": "x", "msg": ":" * 2**20})),
     {"size": "big"}, 400, "longer than 2048"),
    ("1mb-unknown-field-dropped", dumps(make_report(junk="x" * 2**20)), {"size": "big"}, 201, ""),
    ("no-content-type", b"{}", {"content_type": None}, 415, "application/json"),
    ("text-plain", dumps(make_report()), {"content_type": "text/plain"}, 415, "application/json"),
    ("form", b"a=b", {"content_type": "application/x-www-form-urlencoded"}, 415, "json"),
    ("latin-1", dumps(make_report()), {"content_type": "application/json; charset=latin-1"}, 415,
     "utf-8"),
    ("json-upper-case", dumps(make_report()), {"content_type": "Application/JSON; Charset=UTF-8"},
     201, ""),
    ("gzip-encoding", gzip.compress(dumps(make_report())),
     {"headers": {"Content-Encoding": "gzip"}}, 415, "Content-Encoding"),
    ("br-encoding", dumps(make_report()), {"headers": {"Content-Encoding": "br"}}, 415,
     "uncompressed"),
    ("gzip-bomb-encoding", gzip.compress(b" " * 50 * 2**20),
     {"headers": {"Content-Encoding": "gzip"}}, 415, "Content-Encoding"),
    ("identity-encoding", dumps(make_report()), {"headers": {"Content-Encoding": "Identity"}},
     201, ""),
    ("invalid-utf8", b'{"report-type": "\xff\xfe"}', {}, 400, "UTF-8"),
    ("overlong-utf8", b'{"a": "\xc0\xaf"}', {}, 400, "UTF-8"),
    ("utf8-surrogate-bytes", b'{"a": "\xed\xa0\x80"}', {}, 400, "UTF-8"),
    ("utf16-body", json.dumps(make_report()).encode("utf-16"), {}, 400, "UTF-8"),
    ("lone-surrogate-escape", dumps(make_report(config={"a": "\ud800"})), {}, 400, "surrogate"),
    ("lone-surrogate-in-unknown", dumps(make_report(junk=["\udfff"])), {}, 400, "surrogate"),
    ("nul-in-config", dumps(make_report(config={"a": "x\u0000y"})), {}, 400, "NUL"),
    ("nul-in-unknown-field-dropped", dumps(make_report(junk="\u0000")), {}, 201, ""),
    ("nesting-10000", nested(10_000), {}, 400, "deeper than 32"),
    ("nesting-33", nested(33), {}, 400, "deeper than 32"),
    ("nesting-32-dropped", with_raw(b"[" * 31 + b"]" * 31), {}, 201, ""),
    ("huge-int", b'{"report-type": 1' + b"0" * 5000 + b"}", {}, 400, "too many digits"),
    ("huge-int-duration", dumps(make_report(duration_ms=10**300)), {}, 400, "at most"),
    ("float-overflow", with_raw(b"1e400"), {}, 400, "out of range"),
    ("float-underflow-dropped", with_raw(b"1e-400"), {}, 201, ""),
    ("nan", with_raw(b"NaN"), {}, 400, "NaN"),
    ("infinity", with_raw(b"-Infinity"), {}, 400, "Infinity"),
    ("huge-int-unknown-field", with_raw(b"9" * 4300), {}, 201, ""),
    ("huge-int-unknown-field-4301", with_raw(b"9" * 4301), {}, 400, "too many digits"),
    ("duplicate-keys", b'{"report-type": "tunnel-telemetry", "report-type": "x"}', {}, 400,
     "duplicate"),
    ("duplicate-nested", dumps(make_report()).replace(b'"config": {', b'"config": {"a": "1", "a": '
                                                      b'"2", ', 1), {}, 400, "duplicate"),
    ("config-5000-keys", dumps(make_report(config={f"k{i}": "" for i in range(5000)})), {}, 400,
     "more than 64 keys"),
    ("config-6000-bad-values", json.dumps(make_report(config={f"{i}": 0 for i in range(6000)}),
                                          separators=(",", ":")).encode(), {}, 400, "64 keys"),
    ("config-64-keys", dumps(make_report(config={f"k{i}": "v" for i in range(64)})), {}, 201, ""),
    ("top-level-array", b"[]", {}, 400, "object"),
    ("top-level-string", b'"x"', {}, 400, "object"),
    ("empty", b"", {}, 400, "empty"),
    ("whitespace", b" \r\n\t", {}, 400, "empty"),
    ("bom", b"\xef\xbb\xbf" + dumps(make_report()), {}, 400, "not valid JSON"),
]

TIME_CASES = [
    # (id, time, status, stored UTC time): odd offsets, leap seconds, fractions.
    ("nepal", at("12:00:00", "+05:45"), 201, utc("12:00:00", 5 * 60 + 45)),
    ("kiribati", at("12:00:00", "+14:00"), 201, utc("12:00:00", 14 * 60)),
    ("baker-island", at("12:00:00", "-12:00"), 201, utc("12:00:00", -12 * 60)),
    ("minus-zero", at("12:00:00", "-00:00"), 201, utc("12:00:00")),
    ("max-offset", at("12:00:00", "+23:59"), 201, utc("12:00:00", 23 * 60 + 59)),
    ("min-offset", at("12:00:00", "-23:59"), 201, utc("12:00:00", -23 * 60 - 59)),
    ("odd-minutes", at("12:00:00", "+00:01"), 201, utc("12:00:00", 1)),
    ("leap-second", at("23:59:60"), 201, utc("23:59:59")[:-1] + ".999Z"),
    ("leap-second-offset", at("05:29:60", "+05:30"), 201, utc("05:29:59", 330)[:-1] + ".999Z"),
    ("leap-second-midday", at("12:00:60"), 400, None),
    ("leap-second-not-utc-midnight", at("23:59:60", "+01:00"), 400, None),
    ("nanoseconds", at("12:00:00.123456789"), 201, utc("12:00:00")[:-1] + ".123Z"),
    ("lower-case", at("12:00:00", "z").replace("T", "t"), 201, utc("12:00:00")),
    ("space", at("12:00:00").replace("T", " "), 201, utc("12:00:00")),
    ("offset-24h", at("12:00:00", "+24:00"), 400, None),
    ("offset-60min", at("12:00:00", "+23:60"), 400, None),
    ("offset-no-colon", at("12:00:00", "+0545"), 400, None),
    ("no-offset", at("12:00:00", ""), 400, None),
    ("hour-24", at("24:00:00"), 400, None),
    ("minute-60", at("12:60:00"), 400, None),
    ("second-61", at("12:00:61"), 400, None),
    ("feb-30", "2026-02-30T00:00:00Z", 400, None),
    ("real-old-leap-second", "2016-12-31T23:59:60Z", 400, None),
    ("year-9999-overflow", "9999-12-31T23:59:59-23:59", 400, None),
    ("year-1-underflow", "0001-01-01T00:00:00+23:59", 400, None),
    ("year-0", "0000-01-01T00:00:00Z", 400, None),
    ("tomorrow", at("12:00:00", day=DAY + timedelta(days=3)), 400, None),
    ("eight-days-ago", at("12:00:00", day=DAY - timedelta(days=6)), 400, None),
]

ENDPOINT_CASES = [
    # (endpoint, status, message part)
    ("ss://user:pass@1.1.1.1:443", 400, "user information"),
    ("ss://user@proxy.example.org:443", 400, "user information"),
    ("ss://:@1.1.1.1:443", 400, "user information"),
    ("ss://1.1.1.1:443/", 400, "path"),
    ("ss://1.1.1.1:443/path?x=1", 400, "path"),
    ("ss://1.1.1.1:443?x=1", 400, "path"),
    ("ss://1.1.1.1:443#frag", 400, "path"),
    ("ss://[fe80::1%eth0]:443", 400, "zone"),
    ("ss://[fe80::1%25eth0]:443", 400, "zone"),
    ("ss://[::ffff:1.2.3.4]:443", 201, ""),
    ("ss://[::ffff:0102:0304]:443", 201, ""),
    ("ss://[::1]:443", 201, ""),
    ("ss://1.1.1.1:0", 400, "port"),
    ("ss://1.1.1.1:65536", 400, "port"),
    ("ss://1.1.1.1:99999", 400, "port"),
    ("ss://1.1.1.1:00443", 400, "port"),
    ("ss://1.1.1.1:-1", 400, "protocol://address:port"),
    ("ss://1.1.1.1:65535", 201, ""),
    ("ss://1.1.1.1:1", 201, ""),
    ("ss://1.1.1.1", 400, "protocol://address:port"),
    ("ss://[2001:db8::1]", 400, "protocol://address:port"),
    ("ss://2001:db8::1:443", 400, "brackets"),
    ("ss://01.1.1.1:443", 400, "IPv4"),
    ("ss://1.1.1.1.:443", 400, "IPv4"),
    ("ss://\uff11.1.1.1:443", 400, "host name"),
    ("ss://ex\u00e4mple.org:443", 400, "host name"),
    ("ss://xn--exmple-cua.org:443", 201, ""),
    ("ss://0x01010101:443", 400, "IPv4"),
    ("ss://16843009:443", 400, "IPv4"),
    ("ss://1.1.1.0x1:443", 400, "IPv4"),
    ("ss://0x1.0x1.0x1.0x1:443", 400, "IPv4"),
    ("ss://a b:443", 400, "protocol://address:port"),
    ("ss://1.1.1.1:443\n", 400, "protocol://address:port"),
    ("SS://1.1.1.1:443", 400, "must be protocol://address:port"),
    ("ss://" + "a" * 64 + ".org:443", 400, "host name"),
    ("ss://" + "a." * 126 + "org:443", 400, "host name"),
    ("ss://" + "a." * 150 + "org:443", 400, "longer than 300"),
]


@pytest.mark.parametrize("name, body, kwargs, status, text", CASES, ids=[c[0] for c in CASES])
def test_hostile_cases(post, name, body, kwargs, status, text):
    answer = post(body, **kwargs)
    assert answer.status == status, answer.content[:300]
    body = check(answer)
    assert text in json.dumps(body, ensure_ascii=False)


@pytest.mark.parametrize("name, text, status, stored", TIME_CASES,
                         ids=[c[0] for c in TIME_CASES])
def test_odd_times(post, name, text, status, stored):
    answer = post(dumps(make_report(time=text)))
    assert answer.status == status, (text, answer.content[:300])
    body = check(answer)
    if status == 201:
        assert body["time"] == stored
    else:
        assert body["errors"][0]["path"] == "$.time"


@pytest.mark.parametrize("endpoint, status, text", ENDPOINT_CASES,
                         ids=[c[0].encode("unicode_escape").decode() for c in ENDPOINT_CASES])
def test_hostile_endpoints(post, endpoint, status, text):
    answer = post(dumps(make_report(endpoint=endpoint)))
    assert answer.status == status, answer.content[:300]
    body = check(answer)
    assert text in json.dumps(body)
    if status == 400:
        assert body["errors"][0]["path"] == "$.endpoint"
        # The error names the rule, never the address it was given.
        assert "1.1.1.1" not in answer.content.decode() and "fe80" not in answer.content.decode()


def test_ipv4_mapped_endpoint_is_stored_as_ipv4(tmp_path):
    app = create_app({"database-url": f"sqlite:///{tmp_path}/r.db", "allow-public-endpoint": True})
    try:
        resp = app.test_client().post("/report", json=make_report(endpoint="ss://[::ffff:1.2.3.4]:8"))
        assert resp.status_code == 201
        assert resp.get_json()["endpoint"] == "ss://1.2.3.4:8"
        assert resp.get_json()["endpoint_addr"] == "1.2.3.4"
    finally:
        app.extensions["tunnel_telemetry"].close()


# ---------------------------------------------------------------------------------------------
# The real HTTP stack: what only a socket can send


def raw_request(server, data, shut_write=False, timeout=5.0):
    """Send raw bytes and return the first response (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(data)
        if shut_write:
            sock.shutdown(socket.SHUT_WR)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        length = int(headers.get("content-length", 0))
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return status, headers, rest


def post_head(extra=b"", length=None, chunked=False, content_type=b"application/json"):
    head = b"POST /report HTTP/1.1\r\nHost: collector\r\n"
    if content_type:
        head += b"Content-Type: " + content_type + b"\r\n"
    if length is not None:
        head += b"Content-Length: " + str(length).encode() + b"\r\n"
    if chunked:
        head += b"Transfer-Encoding: chunked\r\n"
    return head + extra + b"\r\n"


def chunk(data):
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def assert_json_error(status, headers, body, expected):
    assert status == expected, body[:300]
    assert headers["content-type"].startswith("application/json")
    answer = json.loads(body)
    assert answer["ok"] is False and answer["msg"] and answer["errors"] == []
    return answer


def test_huge_content_length_is_refused_before_the_body(servers):
    """1 TB announced, 100 bytes sent: 413 comes back at once, nothing waits for the rest."""
    server = servers["default"]
    status, headers, body = raw_request(server, post_head(length=10**12) + b"{" * 100)
    assert_json_error(status, headers, body, 413)


def test_chunked_body_over_the_limit_is_refused_without_reading_to_the_end(servers):
    """Chunks past the limit, and the body never ends: 413 after limit + 1 bytes."""
    server = servers["default"]
    data = post_head(chunked=True) + b"".join(chunk(b" " * 8192) for _ in range(LIMIT // 8192 + 2))
    status, headers, body = raw_request(server, data)
    answer = assert_json_error(status, headers, body, 413)
    assert "65536" in answer["msg"]


def test_declared_chunk_over_the_limit_is_refused_at_once(servers):
    """A chunk announced larger than max-report-size: 413 without waiting for its bytes."""
    server = servers["default"]
    data = post_head(chunked=True) + f"{LIMIT + 1:x}\r\n".encode() + b"{" * 10
    status, headers, body = raw_request(server, data, timeout=3.0)
    answer = assert_json_error(status, headers, body, 413)
    assert "65536" in answer["msg"]


def test_chunked_report_in_small_pieces_is_read_whole(servers):
    server = servers["default"]
    report = dumps(make_report())
    data = post_head(chunked=True) + b"".join(chunk(report[i:i + 7])
                                              for i in range(0, len(report), 7)) + b"0\r\n\r\n"
    status, headers, body = raw_request(server, data)
    assert status == 201, body
    assert json.loads(body)["collector_id"] == "hostile"


def test_chunked_report_of_exactly_the_limit_is_accepted(servers):
    server = servers["default"]
    report = dumps(make_report(pad="x" * (LIMIT - 200))).ljust(LIMIT)
    data = post_head(chunked=True) + chunk(report[:40000]) + chunk(report[40000:]) + b"0\r\n\r\n"
    status, _, body = raw_request(server, data)
    assert status == 201, body


def test_body_shorter_than_content_length_is_400(servers):
    """The client sends part of the body and half-closes: a truncated body is not a report."""
    server = servers["default"]
    report = dumps(make_report())
    status, headers, body = raw_request(server, post_head(length=len(report) + 10) + report,
                                        shut_write=True)
    assert_json_error(status, headers, body, 400)


MALFORMED = [
    ("garbage", b"GARBAGE\r\n\r\n", 400),
    ("bad-version", b"POST /report HTTP/9.9\r\nHost: x\r\n\r\n", 400),
    ("header-too-large", b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
    ("too-many-headers", b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n", 431),
    ("uri-too-long", b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    ("two-content-lengths", post_head(b"Content-Length: 3\r\n", length=2) + b"{}", 400),
    ("negative-content-length", post_head(length=-5) + b"{}", 400),
    ("gzip-transfer-coding", post_head(b"Transfer-Encoding: gzip\r\n") + b"{}", 400),
    ("bad-chunk-size", post_head(chunked=True) + b"zz\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk-missing-terminator", post_head(chunked=True) + b"3\r\nabcde\r\n0\r\n\r\n", 400),
    ("header-injection", b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n", 400),
    ("nul-in-header", b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n", 400),
]


@pytest.mark.parametrize("name, data, expected", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_http_gets_json(servers, name, data, expected):
    status, headers, body = raw_request(servers["default"], data)
    answer = assert_json_error(status, headers, body, expected)
    assert "<" not in answer["msg"] and "'" not in answer["msg"]


def test_long_colon_url_does_not_stall_the_worker(servers):
    """Access logs are scrubbed of addresses: a hostile URL must not make that scan explode."""
    server = servers["default"]
    status, headers, body = raw_request(
        server, b"GET /" + b":" * 4000 + b"x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert_json_error(status, headers, body, 404)
    with requests.get(server.url + "/healthz", timeout=5) as resp:
        assert resp.status_code == 200


def test_nothing_invalid_was_stored(servers):
    """After everything above, every stored row is a valid, scrubbed report."""
    from tunnel_telemetry.pipeline.validate import parse_time

    for server in servers.values():
        db = server.workdir / "reports.db"
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            rows = conn.execute("SELECT body FROM reports").fetchall()
        conn.close()
        assert rows
        for (text,) in rows:
            report = json.loads(text)
            assert report["report-type"] == "tunnel-telemetry"
            assert set(report) <= STORED_FIELDS
            assert len(report["config"]) <= 64
            assert all(len(v) <= 1024 for v in report["config"].values())
            parse_time(report["time"])


def test_the_real_server_was_fuzzed(servers):
    """Guard against a transport fixture that silently skipped the real server."""
    access = [line for line in servers["default"].logs().splitlines() if '"POST /report' in line]
    assert len(access) > 1000
