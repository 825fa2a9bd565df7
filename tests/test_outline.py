"""outline-sdk test-connectivity reports on POST /report: recognised, translated, scrubbed.

The bodies are byte for byte what the tool sends (Go's json.Marshal: compact, struct order,
HTML characters escaped), with the time moved to now.
"""

import ipaddress
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests

from tunnel_telemetry.pipeline.outline import derive_uuid, parse_transport
from tunnel_telemetry.protocol.schema import fast_check, load_schema, schema_errors
from tunnel_telemetry.testing.fake_ooni import FakeOONI
from tunnel_telemetry.testing.reports import make_report
from tunnel_telemetry.web import create_app

STORED_FIELDS = ["report-type", "uuid", "time", "t_received", "collector_id", "proto",
                 "endpoint_port", "endpoint_asn", "endpoint_cc", "client_asn", "client_cc",
                 "config", "duration_ms", "failure", "sampling_rate"]
HEADERS = {"Content-Type": "application/json; charset=utf-8", "User-Agent": "Go-http-client/1.1"}
CLIENT = "2.3.4.5"  # in the test geo databases: AS50304 / NO

# TCP through Shadowsocks, refused (the capture): the host is a name, 1.1.1.1 was dialled.
TCP_FAILURE = (
    '{"test":{"resolver":"127.0.0.1:53","proto":"tcp","transport":"ss://REDACTED@proxy.example'
    '.net:9?prefix=POST+","time":"@T","duration_ms":13,"error":{"op":"connect","posix_error":'
    '"ECONNREFUSED","msg":"connection refused"}},"dns_queries":[{"query_name":"proxy.example.ne'
    't","time":"@T","duration_ms":4,"answer_ips":["1.1.1.1"],"error":""}],"tcp_connections":[{'
    '"hostname":"proxy.example.net","ip":"1.1.1.1","port":"9","error":"dial tcp 1.1.1.1:9: conne'
    'ct: connection refused"}]}')
# UDP through Shadowsocks: no TCP connection, the DNS answer is the address; the message names
# the client's local address and port ("->" is escaped as Go does).
UDP_FAILURE = (
    '{"test":{"resolver":"8.8.8.8:53","proto":"udp","transport":"split:2|ss://REDACTED@udp-prox'
    'y.example.net:8388","time":"@T","duration_ms":5004,"error":{"op":"receive","posix_error":"'
    'ECONNREFUSED","msg":"read udp 10.0.0.2:47631-\\u003e[2a01:4f8:1::99]:8388: recvfrom: conne'
    'ction refused (udp-proxy.example.net)"}},"dns_queries":[{"query_name":"udp-proxy.example.n'
    'et.","time":"@T","duration_ms":3,"answer_ips":["2a01:4f8:1::99"],"error":""}]}')
# No transport: the resolver itself was reached, and answered.
DIRECT_SUCCESS = (
    '{"test":{"resolver":"6.6.6.6:53","proto":"tcp","transport":"","time":"@T","duration_ms":21,'
    '"error":null},"tcp_connections":[{"hostname":"6.6.6.6","ip":"6.6.6.6","port":"53","error":'
    '""}]}')

# What must never be stored, logged or relayed: host names, addresses dialled or answered, the
# client, its local address and port, the placeholders and options of the transport.
SECRETS = ["proxy.example.net", "udp-proxy.example.net", "1.1.1.1", "6.6.6.6", "127.0.0.1:53",
           "8.8.8.8", CLIENT, "10.0.0.2", "47631", "REDACTED", "prefix=", "POST+",
           *{str(ipaddress.ip_address("2a01:4f8:1::99")),
             ipaddress.ip_address("2a01:4f8:1::99").exploded}]


def now_text(delta=timedelta(seconds=-10)):
    return (datetime.now(UTC) + delta).strftime("%Y-%m-%dT%H:%M:%SZ")


def body(template, time=None):
    return template.replace("@T", time or now_text()).encode()


def post(client, data, **headers):
    return client.post("/report", data=data, headers={**HEADERS, **headers},
                       environ_base={"REMOTE_ADDR": CLIENT})


@pytest.fixture
def app_config(db_url, geo_dbs):
    country, asn = geo_dbs
    return {"database-url": db_url, "collector-id": "test-collector",
            "geoip-country-db": str(country), "geoip-asn-db": str(asn)}


def test_tcp_failure(client, app):
    resp = post(client, body(TCP_FAILURE))
    assert resp.status_code == 201, resp.get_data(as_text=True)
    report = resp.get_json()
    assert schema_errors(report, "relayed-report.schema.json") == []  # secondaries take it
    assert list(report) == STORED_FIELDS
    assert (report["proto"], report["endpoint_port"]) == ("ss", 9)
    # The name is geolocated by the IP the client dialled (1.1.1.1 in the tcp_connections).
    assert (report["endpoint_asn"], report["endpoint_cc"]) == ("AS13335", "AU")
    assert (report["client_asn"], report["client_cc"]) == ("AS50304", "NO")
    assert report["config"] == {"proto": "tcp", "chain": "ss"}
    assert report["failure"] == {"op": "tcp.connect", "msg": "connection refused",
                                 "posix_error": "ECONNREFUSED"}
    assert (report["duration_ms"], report["sampling_rate"]) == (13, 1)
    assert app.extensions["tunnel_telemetry"].store.get(report["uuid"]) == report
    text = resp.get_data(as_text=True)
    assert [s for s in SECRETS if s in text] == []


def test_udp_failure_hides_the_local_address(client):
    resp = post(client, body(UDP_FAILURE))
    assert resp.status_code == 201, resp.get_data(as_text=True)
    report = resp.get_json()
    assert schema_errors(report, "relayed-report.schema.json") == []  # secondaries take it
    assert (report["proto"], report["endpoint_port"]) == ("ss", 8388)
    # No TCP connection over UDP: the DNS answer for the name is what was dialled.
    assert (report["endpoint_asn"], report["endpoint_cc"]) == ("AS64500", "DE")
    assert report["config"] == {"proto": "udp", "chain": "split|ss"}
    failure = report["failure"]
    assert (failure["op"], failure["posix_error"]) == ("udp.receive", "ECONNREFUSED")
    assert failure["msg"].startswith("read udp ")
    assert failure["msg"].endswith(": recvfrom: connection refused ([scrubbed])")
    text = resp.get_data(as_text=True)
    assert [s for s in SECRETS if s in text] == []


def test_direct_success(client):
    resp = post(client, body(DIRECT_SUCCESS))
    assert resp.status_code == 201, resp.get_data(as_text=True)
    report = resp.get_json()
    assert schema_errors(report, "relayed-report.schema.json") == []  # secondaries take it
    # The direct case: the resolver is the endpoint, scheme "direct", no chain.
    assert (report["proto"], report["endpoint_port"]) == ("direct", 53)
    assert (report["endpoint_asn"], report["endpoint_cc"]) == ("AS666", "US")
    assert report["config"] == {"proto": "tcp"}
    assert report["failure"] is None
    assert report["sampling_rate"] == 0.1  # the tool's default for successes
    assert "6.6.6.6" not in resp.get_data(as_text=True)


def test_public_endpoint_has_no_credentials_or_query(app_config):
    app = create_app({**app_config, "allow-public-endpoint": True})
    try:
        report = post(app.test_client(), body(TCP_FAILURE)).get_json()
        direct = post(app.test_client(), body(DIRECT_SUCCESS)).get_json()
    finally:
        app.extensions["tunnel_telemetry"].close()
    assert report["endpoint"] == "ss://proxy.example.net:9"
    assert report["endpoint_addr"] == "proxy.example.net"  # the name, not the IP dialled
    assert "1.1.1.1" not in json.dumps(report)
    assert (direct["endpoint"], direct["endpoint_addr"]) == ("direct://6.6.6.6:53", "6.6.6.6")


def test_sni_and_override_values_are_never_kept(app_config):
    transport = ("tls:sni=decoy.example.com\\u0026certname=real.example.org|override:host=9.9.9"
                 ".9\\u0026port=443|ss://REDACTED@proxy.example.net:9")
    data = body(TCP_FAILURE.replace(
        "ss://REDACTED@proxy.example.net:9?prefix=POST+", transport).replace(
        '"msg":"connection refused"',
        '"msg":"tls: real.example.org via 9.9.9.9:443 sni decoy.example.com refused"'))
    app = create_app({**app_config, "allow-public-endpoint": True})
    try:
        resp = post(app.test_client(), data)
    finally:
        app.extensions["tunnel_telemetry"].close()
    assert resp.status_code == 201, resp.get_data(as_text=True)
    report = resp.get_json()
    assert report["config"] == {"proto": "tcp", "chain": "tls|override|ss"}
    assert report["failure"]["msg"].startswith("tls: ")
    text = resp.get_data(as_text=True)
    for secret in ("decoy.example.com", "real.example.org", "9.9.9.9", "sni=", "host="):
        assert secret not in text


def test_a_chain_ends_at_its_last_hop_and_hides_every_name(client):
    data = body(TCP_FAILURE.replace(
        "ss://REDACTED@proxy.example.net:9?prefix=POST+",
        "ss://REDACTED@proxy.example.net:9|ss://REDACTED@exit.example.org:2").replace(
        '"msg":"connection refused"', '"msg":"via PROXY.example.net. to exit.example.org: EOF"'))
    report = post(client, data).get_json()
    assert (report["proto"], report["endpoint_port"]) == ("ss", 2)
    # Only the entry hop was dialled: its address says nothing of where the exit is.
    assert (report["endpoint_asn"], report["endpoint_cc"]) == ("AS0", "ZZ")
    assert report["config"]["chain"] == "ss|ss"
    assert report["failure"]["msg"] == "via [scrubbed]. to [scrubbed]: EOF"


def test_a_report_naming_too_many_hosts_loses_its_message_not_a_worker(client):
    payload = json.loads(body(TCP_FAILURE))
    payload["tcp_connections"] = [{"hostname": f"h{i}.example.net", "ip": "1.1.1.1"}
                                  for i in range(200)]
    payload["test"]["error"]["msg"] = "refused by h7.example.net " * 70
    report = post(client, json.dumps(payload).encode()).get_json()
    assert report["failure"] == {"op": "tcp.connect", "posix_error": "ECONNREFUSED"}


def test_a_retry_is_stored_once(client, app):
    data = body(TCP_FAILURE)
    first, again = post(client, data), post(client, data)
    assert first.status_code == again.status_code == 201
    assert first.get_json() == again.get_json()
    other = post(client, data.replace(b'"duration_ms":13', b'"duration_ms":14'))
    assert other.get_json()["uuid"] != first.get_json()["uuid"]
    assert app.extensions["tunnel_telemetry"].store.count() == 2


def test_derived_uuid_is_keyed_and_stable():
    payload = json.loads(body(TCP_FAILURE, "2026-12-07T01:05:15Z"))
    reordered = dict(reversed(list(payload.items())))
    one = derive_uuid(payload, b"k" * 32)
    assert one == derive_uuid(reordered, b"k" * 32)  # canonical JSON: key order does not count
    assert one != derive_uuid(payload, b"j" * 32)  # a key nobody else has: not a plain hash
    assert one[14] == "8" and one[19] in "89ab"  # a well-formed version 8 UUID


def test_the_key_option_makes_uuids_the_same_across_collectors(app_config, tmp_path):
    uuids, data = [], body(TCP_FAILURE)
    for name in ("a", "b"):
        app = create_app({**app_config, "database-url": f"sqlite:///{tmp_path}/{name}.db",
                          "report-id-key": "shared-secret-0123456789"})
        try:
            uuids.append(post(app.test_client(), data).get_json())
        finally:
            app.extensions["tunnel_telemetry"].close()
    assert uuids[0]["uuid"] == uuids[1]["uuid"]


def changed(**fields):
    """TCP_FAILURE with fields set (or removed, for KeyError); "__" separates keys of a path."""
    payload = json.loads(body(TCP_FAILURE))
    for path, value in fields.items():
        *parents, last = path.split("__")
        node = payload
        for key in parents:
            node = node[key]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
    return json.dumps(payload).encode()


@pytest.mark.parametrize("fields, path", [
    ({"test": "x"}, "$.test"),
    ({"test__proto": "sctp"}, "$.test.proto"),
    ({"test__transport": KeyError}, "$.test.transport"),
    ({"test__time": "yesterday"}, "$.test.time"),
    ({"test__time": "2020-01-01T00:00:00Z"}, "$.test.time"),
    ({"test__duration_ms": -1}, "$.test.duration_ms"),
    ({"test__error": {"msg": "no op"}}, "$.test.error.op"),
    ({"test__error": {"op": "connect", "msg": "\u0000"}}, "$.test.error.msg"),
    ({"test__error": {"op": "connect", "posix_error": "E\u0000"}}, "$.test.error.posix_error"),
    ({"test__transport": "ss://REDACTED@proxy.example.net"}, "$.test.transport"),
    ({"test__transport": "ss://REDACTED@proxy.example.net:9|"}, "$.test.transport"),
    ({"test__transport": "ss://REDACTED@[2001:db8::1%25eth0]:9"}, "$.test.transport"),
    ({"test__transport": "split:2", "test__resolver": "resolver"}, "$.test.resolver"),
    ({"dns_queries": {"query_name": "x"}}, "$.dns_queries"),
    ({"tcp_connections": [{"ip": 1}]}, "$.tcp_connections[0].ip"),
])
def test_bad_input_is_a_json_400_with_paths(client, app, fields, path):
    resp = post(client, changed(**fields))
    assert resp.status_code == 400, resp.get_data(as_text=True)
    answer = resp.get_json()
    assert answer["ok"] is False and answer["msg"]
    assert path in [e["path"] for e in answer["errors"]], answer
    assert app.extensions["tunnel_telemetry"].store.count() == 0


def test_the_form_decides_the_path(client):
    # A tunnel-telemetry report is unchanged; one with report-type is never read as outline's.
    native = post(client, json.dumps(make_report()).encode())
    assert native.status_code == 201 and native.get_json()["proto"] == "ss"
    mixed = post(client, json.dumps({**make_report(endpoint=None), "test": {}}).encode())
    assert mixed.status_code == 400
    assert [e["path"] for e in mixed.get_json()["errors"]] == ["$.endpoint"]


@pytest.mark.parametrize("transport, schemes, address", [
    ("", [], None),
    ("ss://REDACTED@proxy.example.net:9?prefix=POST+", ["ss"], "proxy.example.net:9"),
    ("split:2|ss://REDACTED@[2001:db8::1]:443", ["split", "ss"], "[2001:db8::1]:443"),
    ("ss://REDACTED@a.example:1|ss://REDACTED@b.example:2", ["ss", "ss"], "b.example:2"),
    ("socks5://REDACTED@s.example:1080|ws://UNKNOWN", ["socks5", "ws"], "s.example:1080"),
    ("tlsfrag:1|tls:sni=x.example&certname=y.example", ["tlsfrag", "tls"], None),
    ("disorder://UNKNOWN|split:2", ["disorder", "split"], None),
])
def test_parse_transport(transport, schemes, address):
    hops = parse_transport(transport)
    assert [h.scheme for h in hops] == schemes
    named = [h.address for h in hops if h.address]
    assert (named[-1] if named else None) == address


def test_schema_is_published_and_both_validators_agree(client):
    resp = client.get("/outline-report.schema.json")
    assert resp.status_code == 200 and resp.mimetype == "application/schema+json"
    assert resp.get_json() == load_schema("outline-report.schema.json")
    name = "outline-report.schema.json"
    for template in (TCP_FAILURE, UDP_FAILURE, DIRECT_SUCCESS):
        instance = json.loads(body(template))
        assert fast_check(name)(instance) and schema_errors(instance, name) == []
        instance["test"]["proto"] = "x"
        assert not fast_check(name)(instance) and schema_errors(instance, name)


# End to end: the real server, the real relay to a (fake) OONI, every file and log searched.

@pytest.fixture
def collector(tt_server, geo_dbs, tmp_path):
    """A real tt-server (2 workers, geo databases, one trusted proxy, debug logs) relaying to a
    fake OONI."""
    country, asn = geo_dbs
    with FakeOONI() as fake:
        yield tt_server("--workers", "2", "--proxy-hops", "1", "--debug",
                        "--collector-id", "outline-e2e", "--geoip-country-db", str(country),
                        "--geoip-asn-db", str(asn), "--ooni-relay", "--ooni-api", fake.url,
                        "--database-url", f"sqlite:///{tmp_path}/server/reports.db"), fake


def send(server, data, client=CLIENT):
    with requests.post(server.url + "/report", data=data, timeout=10,
                       headers={**HEADERS, "X-Forwarded-For": client}) as resp:
        return resp.status_code, resp.json()


@pytest.mark.e2e
def test_e2e_reports_of_the_tool_are_stored_relayed_and_leak_nothing(collector):
    server, fake = collector
    reports = {}
    for name, template in (("tcp", TCP_FAILURE), ("udp", UDP_FAILURE),
                           ("direct", DIRECT_SUCCESS)):
        status, reports[name] = send(server, body(template))
        assert status == 201, reports[name]
        assert list(reports[name])[:len(STORED_FIELDS)] == STORED_FIELDS
    tcp, udp, direct = reports["tcp"], reports["udp"], reports["direct"]
    assert (tcp["proto"], tcp["endpoint_asn"], tcp["client_asn"]) == ("ss", "AS13335", "AS50304")
    assert (udp["failure"]["op"], udp["endpoint_cc"]) == ("udp.receive", "DE")
    assert (direct["proto"], direct["failure"], direct["sampling_rate"]) == ("direct", None, 0.1)

    # The tool retries after a lost answer: the same bytes again are the same report.
    data = body(TCP_FAILURE, now_text(timedelta(seconds=-30)))  # not the first one's time
    status, first = send(server, data)
    status_again, again = send(server, data)
    assert status == status_again == 201 and first["uuid"] == again["uuid"]
    status, bad = send(server, data.replace(b'"proto":"tcp"', b'"proto":"quic"'))
    assert status == 400 and bad["errors"][0]["path"] == "$.test.proto"

    fake.wait_for(lambda s: len(fake.uuids()) == 4)  # relayed to OONI: once each
    assert set(fake.uuids()) == {tcp["uuid"], udp["uuid"], direct["uuid"], first["uuid"]}
    server.stop()
    files = b"".join(p.read_bytes() for p in sorted(Path(server.workdir).rglob("*"))
                     if p.is_file())
    assert b"POST /report" in files  # the access log was written
    assert first["uuid"].encode() in files and files.count(b"proxy.example") == 0
    haystack = files + fake.all_text().encode()
    assert [s for s in SECRETS if s.encode() in haystack] == []
