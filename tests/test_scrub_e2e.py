"""Issue 21's findings through the real server: a collector relaying to a fake OONI and to a
secondary collector takes reports holding addresses, host names and secrets in every
spelling found; none of them is in either collector's database or logs, in what OONI got
or in what the secondary got.

The table has one case per finding; the property test plants random addresses written every
way inside random error text. Both check each 201 answer (the report as stored) at once, and
the last test greps every sink for everything planted.
"""

import ipaddress
import json
import sqlite3
import time
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunnel_telemetry.pipeline.scrub import PLACEHOLDER
from tunnel_telemetry.testing.fake_ooni import FakeOONI
from tunnel_telemetry.testing.reports import make_report
from tunnel_telemetry.testing.server import TTServer
from tunnel_telemetry.testing.spellings import address_spellings

pytestmark = pytest.mark.e2e

TOKEN = "scrub-e2e-relay-token-0123456789"
CLIENT_V4 = "9.8.7.66"  # 151521090, 0x9080742, 011.010.07.0102, 9.8.1858
CLIENT_V6 = "2001:db8:feed::66"
ENDPOINT_V4 = "198.51.100.23"
ENDPOINT_V6 = "2a01:4f8:1::beef"
IDN = "xn--bcher-kva.example"  # bücher.example
HOST = "hiddenproxy.example.org"
PLANTED: set[str] = set()  # every needle any test below sent, for the final grep


@pytest.fixture(scope="module")
def collectors(tmp_path_factory):
    """A (relaying to the fake OONI and to B) and B, one worker each."""
    base = tmp_path_factory.mktemp("scrub-e2e")
    with FakeOONI() as fake:
        b = TTServer(base / "b", ["--workers", "1", "--collector-id", "b", "--relay-tokens",
                                  TOKEN, "--rate-limit", "0",
                                  "--database-url", f"sqlite:///{base}/b/reports.db"]).start()
        try:
            a = TTServer(base / "a", [
                "--workers", "1", "--collector-id", "a", "--proxy-hops", "1", "--debug",
                "--rate-limit", "0", "--ooni-relay", "--ooni-api", fake.url,
                "--relay-url", b.url, "--relay-token", TOKEN, "--relay-interval", "100ms",
                "--relay-retry-min", "100ms", "--relay-retry-max", "300ms",
                "--database-url", f"sqlite:///{base}/a/reports.db"]).start()
            try:
                yield a, b, fake
            finally:
                a.stop()
        finally:
            b.stop()


def post(server, report, client=CLIENT_V4):
    with requests.post(server.url + "/report", json=report, timeout=10,
                       headers={"X-Forwarded-For": client}) as resp:
        assert resp.status_code == 201, resp.text
        return resp.json()


def forms(needle):
    """A needle as bytes, as it is and JSON-escaped (OONI's request bodies are ASCII JSON)."""
    return {needle.encode(), json.dumps(needle)[1:-1].encode()}


def found(haystack, needles):
    low = haystack.lower()
    return sorted(n for n in needles if any(f.lower() in low for f in forms(n)))


def spelled(*addresses):
    return set().union(*(address_spellings(a) for a in addresses))


def report(endpoint=f"ss://{ENDPOINT_V4}:443", msg="", config=None, op="tcp.connect"):
    return make_report(endpoint=endpoint, client_asn="AS30722", client_cc="IT",
                       config={"prefix": "xx", **(config or {})},
                       failure={"op": op, "msg": msg, "posix_error": "ECONNREFUSED"})


V6_FORMS = " ".join(sorted(spelled(CLIENT_V6)))
CASES = [
    # (id, report, needles planted)
    ("ipv6-joined-to-a-word", report(
        endpoint=f"ss://[{CLIENT_V6}]:443",
        msg=f"dial ip:{CLIENT_V6} from IPv6:{CLIENT_V6}: refused",
        config={"mode": f"ip6:{CLIENT_V6}", "note": f"ip:{CLIENT_V6}"}), spelled(CLIENT_V6)),
    ("go-eight-groups-and-port", report(
        msg="address 2001:db8:feed:0:0:0:0:66:443: too many colons in address"),
     spelled(CLIENT_V6)),
    ("ipv6-every-spelling", report(msg=f"dial {V6_FORMS}: refused"), spelled(CLIENT_V6)),
    ("ipv4-inet-aton-client", report(msg="from 151521090 0x9080742 011.010.07.0102 9.8.1858"),
     spelled(CLIENT_V4)),
    ("ipv4-inet-aton-endpoint", report(
        msg="dial " + " ".join(sorted(spelled(ENDPOINT_V4))) + ": refused",
        config={"version": str(int(ipaddress.IPv4Address(ENDPOINT_V4)))}),
     spelled(ENDPOINT_V4)),
    ("ipv6-endpoint", report(
        endpoint=f"obfs4://[{ENDPOINT_V6}]:9001",
        msg="dial " + " ".join(sorted(spelled(ENDPOINT_V6))) + ": refused"),
     spelled(ENDPOINT_V6)),
    ("idn-unicode-form", report(
        endpoint=f"vless://{IDN}:443",
        msg="lookup bücher.example: no such host; BÜCHER: bücher refused (xn--bcher-kva)",
        config={"plugin": "bücher", "obfs": "xn--bcher-kva"}), spelled(IDN)),
    ("percent-encoded-host", report(
        endpoint=f"vless://{HOST}:443",
        msg="GET https://hiddenproxy%2Eexample%2Eorg/ and "
            + "".join(f"%{b:02X}" for b in HOST.encode()) + " failed"), spelled(HOST)),
    ("first-label-alone", report(
        endpoint=f"vless://{HOST}:443", msg="dial hiddenproxy: connection refused",
        config={"type": "hiddenproxy"}), spelled(HOST)),
    ("bearer-and-jwt", report(
        msg="401 Authorization: Bearer sesameopensdoor; jwt "
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJib2IifQ.c2lnbmF0dXJl rejected"),
     {"sesameopensdoor", "eyJhbGciOiJIUzI1NiJ9", "eyJzdWIiOiJib2IifQ", "c2lnbmF0dXJl"}),
    ("email-address", report(msg="contact bob.smith@mailbox.example for access"),
     {"bob.smith", "mailbox.example"}),
    ("userinfo-in-url", report(
        msg="proxyconnect https://alicewonder:hunterpassword@relay.example:8443/: failed"),
     {"alicewonder", "hunterpassword", "relay.example"}),
    ("token-in-path", report(msg="GET /ws?token=pathtokenword: 403 Forbidden"),
     {"pathtokenword"}),
    ("secret-config-keys", report(config={
        "seed": "mkcpseedword", "sid": "shortidword", "contact": "opsteamword",
        "mail": "opsmailword", "path": "/ws?token=pathtokenword", "pAssword": "pwwordone",
        "PASSword": "pwwordtwo"}),
     {"mkcpseedword", "shortidword", "opsteamword", "opsmailword", "pathtokenword",
      "pwwordone", "pwwordtwo"}),
]


@pytest.mark.parametrize("name, body, needles", CASES, ids=[c[0] for c in CASES])
def test_finding(collectors, name, body, needles):
    a, _, _ = collectors
    PLANTED.update(needles)
    stored = post(a, body, client=CLIENT_V6 if "ipv6" in name else CLIENT_V4)
    assert found(json.dumps(stored, ensure_ascii=False).encode(), needles) == []
    assert PLACEHOLDER in stored["failure"]["msg"] or stored["config"] != body["config"]
    assert stored["config"].get("prefix") == "xx"


def test_short_host_names_are_whole_tokens_only(collectors):
    """Endpoint ss://a:443 used to hide every letter a: tls.h[scrubbed]ndsh[scrubbed]ke."""
    a, _, _ = collectors
    stored = post(a, report(endpoint="ss://a:443", op="tls.handshake",
                            msg="remote error: tls: handshake failure, a retry failed",
                            config={"transport": "split|ss", "proto": "tcp"}))
    assert stored["failure"] == {"op": "tls.handshake", "posix_error": "ECONNREFUSED",
                                 "msg": f"remote error: tls: handshake failure, {PLACEHOLDER} "
                                        "retry failed"}
    assert stored["config"] == {"prefix": "xx", "transport": "split|ss", "proto": "tcp"}


ERROR_WORDS = ["dial", "tcp", "udp", "connect:", "refused", "lookup", "on", "no such host",
               "read", "i/o timeout", "tls:", "handshake failure", "from", "->", "(", ")",
               "[", "]", ",", "address", "443", "EOF"]
# Never "" between a planted name and a word: "hiddenproxydial" is another word (its letters
# are the name's only to a substring search; the unit property test glues them too).
GLUE = [" ", ":", ": ", "(", ")", "]:443 ", "/", "@", "=", ", ", "'", "->", "\t"]
hosts = st.from_regex(r"\A[a-z]{4,10}-[a-z]{4,10}(\.[a-z]{3,10}){1,2}\Z")
addresses = st.one_of(
    st.ip_addresses(v=4).filter(lambda ip: ip.is_global).map(str),
    st.ip_addresses(v=6).filter(lambda ip: ip.is_global).map(str),
    hosts,
)


def endpoint_of(address):
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return f"vless://{address}:443"
    return f"ss://{ip}:443" if ip.version == 4 else f"ss://[{ip}]:443"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(endpoint=addresses, client=st.ip_addresses().filter(lambda ip: ip.is_global),
       data=st.data())
def test_no_spelling_survives(collectors, endpoint, client, data):
    a, _, _ = collectors
    needles = spelled(endpoint, str(client))
    pieces = []
    for spelling in data.draw(st.permutations(sorted(needles))):
        pieces += [data.draw(st.sampled_from(ERROR_WORDS)), data.draw(st.sampled_from(GLUE)),
                   spelling, data.draw(st.sampled_from(GLUE))]
    msg = "".join(pieces)[:2048]
    config = {"mode": data.draw(st.sampled_from(sorted(needles)))}
    PLANTED.update(needles)
    stored = post(a, report(endpoint=endpoint_of(endpoint), msg=msg, config=config),
                  client=str(client))
    text = json.dumps(stored, ensure_ascii=False)
    assert [n for n in needles if _token_in(n, text)] == []


def _token_in(needle, text):
    """As a token of its own: a first label ("proxy") may be inside an unrelated word."""
    low, needle = text.lower(), needle.lower()
    at = low.find(needle)
    while at >= 0:
        end = at + len(needle)
        if not ((at and low[at - 1].isalnum()) or (end < len(low) and low[end].isalnum())):
            return True
        at = low.find(needle, at + 1)
    return False


def everything_on_disk(server):
    return b"".join(p.read_bytes() for p in sorted(Path(server.workdir).rglob("*"))
                    if p.is_file())


def test_nothing_planted_is_anywhere(collectors):
    """Databases, logs, the OONI submissions and the batches B received."""
    a, b, fake = collectors
    assert PLANTED, "run with the tests above"
    stored = _rows(a)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (
            _backlog(a) == {} and fake.stats()["uuids"] >= stored and _rows(b) >= stored):
        time.sleep(0.1)
    assert _backlog(a) == {} and fake.stats()["uuids"] >= stored and _rows(b) >= stored
    sinks = {"A's files and logs": everything_on_disk(a), "B's files and logs":
             everything_on_disk(b), "OONI submissions": fake.all_text().encode()}
    assert b"POST /report" in sinks["A's files and logs"]
    # First labels of random names ("abcd-efgh") are searched as they are: long enough.
    for sink, data in sinks.items():
        assert found(data, PLANTED) == [], sink


def _backlog(server):
    with requests.get(server.url + "/healthz", timeout=10) as resp:
        return resp.json()["relay"]["backlog"]


def _rows(server):
    conn = sqlite3.connect(f"file:{server.workdir}/reports.db?mode=ro", uri=True)
    try:
        return conn.execute("SELECT count(*) FROM reports").fetchone()[0]
    finally:
        conn.close()
