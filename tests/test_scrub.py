import ipaddress
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunnel_telemetry.pipeline.scrub import (
    PLACEHOLDER,
    SAFE_CONFIG_KEYS,
    contains_ip,
    host_names,
    scrub,
    scrub_message,
    scrub_text,
    secret_key,
)
from tunnel_telemetry.testing.spellings import address_spellings

S = PLACEHOLDER


@pytest.mark.parametrize("key, secret", [
    ("prefix", False), ("cipher", False), ("method", False), ("alpn", False), ("proto", False),
    ("transport", False), ("iat-mode", False),
    ("password", True), ("Password", True), ("pAssword", True), ("PASSword", True),
    ("serverPassword", True), ("server_key", True), ("uuid", True), ("vlessUUID", True),
    ("publicKey", True), ("shortId", True), ("auth-token", True), ("psk", True),
    ("secret", True), ("user", True), ("host", True), ("sni", True), ("seed", True),
    ("sid", True), ("contact", True), ("mail", True), ("email", True), ("path", True),
    # Run together in lower case, as scrub-allow-config-keys compares them.
    ("shortid", True), ("realitysid", True), ("clientid", True), ("serverip", True),
    ("pbk", True), ("spx", True), ("spiderx", True), ("servicename", True),
    ("servername", True), ("mkcpseed", True), ("obfs-param", True), ("protocolparam", True),
    ("username", True), ("sessionid", True), ("contactinfo", True),
    ("lang", False), ("servicemode", False), ("header-type", False), ("security", False),
])
def test_secret_keys(key, secret):
    """What the operator may not add to the allow-list (config.py)."""
    assert secret_key(key) is secret


def test_no_allow_listed_key_names_a_secret():
    assert [key for key in SAFE_CONFIG_KEYS if secret_key(key)] == []


MESSAGES = [
    # (error text, as stored): words stay, everything that could name something goes.
    ("dial tcp 1.2.3.4:443: connect: connection refused",
     f"dial tcp {S}: connect: connection refused"),
    ("dial tcp [2001:db8::1]:443: i/o timeout", f"dial tcp [{S}]:443: i/o timeout"),
    ("address 2001:db8:feed:0:0:0:0:66:443: too many colons in address",
     f"address {S}: too many colons in address"),
    ("from ip:2001:db8:feed::66 or IPv6:2001:db8:feed::66", f"from {S} or {S}"),
    ("read udp 10.0.0.2:47631->1.1.1.1:9: recvfrom: connection refused",
     f"read udp {S}->{S}: recvfrom: connection refused"),
    ("lookup secret-proxy.example.org on 127.0.0.53:53: no such host",
     f"lookup {S} on {S}: no such host"),
    ("x509: certificate is valid for cdn.example.net, not front.example",
     f"x509: certificate is valid for {S}, not {S}"),
    ("151521090 0x9080742 011.010.07.0102 9.8.1858", f"{S} {S} {S} {S}"),
    ("to 20010db8000000000000000000000001 or 2001-db8--1.ipv6-literal.net", f"to {S} or {S}"),
    ("Authorization: Bearer sesameopens", f"Authorization: Bearer {S}"),
    ("auth: basic QWxhZGRpbjpvcGVu", f"auth: basic {S}"),
    ("password: hunter and token = opensesame", f"password: {S} and token = {S}"),
    ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln rejected", f"jwt {S} rejected"),
    ("mail bob.smith@mailbox.example bounced", f"mail {S} bounced"),
    ("GET https://alice:wonderland@proxy.example/ws?token=abc: 401",
     f"GET {S}: 401"),
    ("GET /ws?token=abc failed", f"GET {S} failed"),
    ("percent secret%2Dproxy.example", f"percent {S}"),
    ("ids deadbeefcafe and aBcDeFgHiJkL", f"ids {S} and {S}"),
    # What stays as it is:
    ("tls: first record does not look like a TLS handshake", None),
    ("remote error: tls: handshake failure", None),
    ("[Errno 111] Connection refused", None),
    ("no answer within 2s; context deadline exceeded after 1m30s", None),
    ("unexpected HTTP status 403 for HTTP/1.1 (ERR_CONNECTION_RESET)", None),
    ("x509: certificate signed by unknown authority", None),
    ("tcp.connect tls.handshake dns.resolve: EOF", None),
    ("password authentication failed", None),
    ("Es konnte keine Verbindung hergestellt werden", None),
    ("连接被拒绝", None),
    ("-> -- ::", None),
    ("", None),
]


@pytest.mark.parametrize("text, expected", MESSAGES)
def test_scrub_message(text, expected):
    assert scrub_message(text) == (text if expected is None else expected)


@pytest.mark.parametrize("host, text, expected", [
    # Short names match whole tokens only: "a" is not hidden inside "handshake".
    ("a", "tls.handshake: a bad record mac", f"tls.handshake: {S} bad record mac"),
    ("xn--bcher-kva.example", "lookup bücher: BÜCHER and xn--bcher-kva timed out",
     f"lookup {S}: {S} and {S} timed out"),
    ("secret-proxy.example.org", "dial secret-proxy: SECRET-PROXY's refused",
     f"dial {S}: {S}'s refused"),
    ("secret-proxy.example.org", "secret-proxy-two is another", None),
    ("ПРОКСИ.example", "dial прокси: refused", f"dial {S}: refused"),
    ("µ-proxy.example", "Μ-PROXY and μ-proxy", f"{S} and {S}"),
    ("mproxy.example", "ｍｐｒｏｘｙ: ＭＰＲＯＸＹ．ＥＸＡＭＰＬＥ", f"{S}: {S}"),
])
def test_endpoint_host_in_any_spelling(host, text, expected):
    assert scrub_message(text, host_names(host)) == (text if expected is None else expected)


@pytest.mark.parametrize("text, expected", [
    ("dial tcp 1.2.3.4:443: refused", f"dial tcp {S}: refused"),
    ("dial tcp [2001:db8::1]:443", f"dial tcp [{S}]:443"),
    ("from ::ffff:9.9.9.9 ok", f"from {S} ok"),
    ("via fe80::1%eth0 x", f"via {S} x"),
    ("from 2a01:4f8:1::77: refused", f"from {S}: refused"),
    ("from ::1: refused", f"from {S}: refused"),
    ("address 2001:db8:feed:0:0:0:0:66:443: too many", f"address {S}: too many"),
    ("ip:2001:db8:feed::66 IPv6:2001:db8::1 ip6:2001:db8::2", f"{S} {S} {S}"),
    ("151521090 0x9080742 011.010.07.0102 9.8.1858", f"{S} {S} {S} {S}"),
    ("/x:2001:db8::1/16843009", f"/{S}/{S}"),
    ("2001-db8--1 20010db8000000000000000000000001", f"{S} {S}"),
    # Log lines keep their numbers: times, versions, pids, counts.
    ("at 12:34:56 version 1.2.3 gunicorn 23.0.0 pid 4194303", None),
    ("relay batch: 50 stored (3 new), 0 rejected", None),
    ("no address here", None),
])
def test_scrub_text(text, expected):
    """Log lines: IP addresses in any spelling, nothing else."""
    assert scrub_text(text) == (text if expected is None else expected)


@pytest.mark.parametrize("text, names, expected", [
    ("lookup front.example: sni front.example.", ["front.example"],
     f"lookup {S}: sni {S}."),
    ("a bad record mac from a", ["a"], f"{S} bad record mac from {S}"),
    ("tls.handshake failed", ["a", "s"], None),
    ("dial 1.2.3.4 via Hidden-Name", ["hidden-name"], f"dial {S} via {S}"),
])
def test_scrub_text_hides_extra_names_as_whole_tokens(text, names, expected):
    """What outline-sdk's mapping hides (option values, names from its DNS queries)."""
    assert scrub_text(text, names) == (text if expected is None else expected)


def test_contains_ip():
    assert contains_ip("10.0.0.1")
    assert contains_ip("x 0x0a000001")
    assert not contains_ip("xx 443")


def _enriched(**overrides):
    report = {
        "report-type": "tunnel-telemetry", "uuid": "u", "time": "t", "t_received": "t",
        "endpoint": "vless://proxy.example.org:443", "endpoint_addr": "proxy.example.org",
        "proto": "vless", "endpoint_port": 443, "endpoint_asn": "AS0", "endpoint_cc": "ZZ",
        "client_asn": "AS0", "client_cc": "ZZ",
        "config": {"prefix": "xx", "password": "hunter2", "peer": "x", "via": "8.8.8.8",
                   "sni": "proxy.example.org", "front": "cdn.example.net"},
        "duration_ms": 1,
        "failure": {"op": "tcp.connect", "msg": "dial proxy.example.org (5.6.7.8): refused"},
        "sampling_rate": 1,
    }
    report.update(overrides)
    return report


def test_scrub_hides_endpoint_by_default():
    out = scrub(_enriched(), allow_public_endpoint=False)
    assert "endpoint" not in out and "endpoint_addr" not in out
    assert out["config"] == {"prefix": "xx"}
    assert out["failure"] == {"op": "tcp.connect", "msg": f"dial {S} ({S}): refused"}
    assert "proxy" not in repr(out)


def test_scrub_keeps_endpoint_when_allowed():
    """The endpoint fields stay; free text and config are scrubbed all the same."""
    out = scrub(_enriched(), allow_public_endpoint=True)
    assert out["endpoint"] == "vless://proxy.example.org:443"
    assert out["endpoint_addr"] == "proxy.example.org"
    assert out["config"] == {"prefix": "xx"}
    assert out["failure"]["msg"] == f"dial {S} ({S}): refused"


@pytest.mark.parametrize("config, kept", [
    ({"proto": "tcp", "transport": "split|ss", "chain": "tls|ws"},
     {"proto": "tcp", "transport": "split|ss", "chain": "tls|ws"}),
    ({"cipher": "chacha20-ietf-poly1305", "Method": "aes-256-gcm", "iat_mode": "0"},
     {"cipher": "chacha20-ietf-poly1305", "method": "aes-256-gcm", "iat-mode": "0"}),
    ({"alpn": "h2,http/1.1", "fp": "chrome", "mtu": "1400", "transport": ""},
     {"alpn": "h2,http/1.1", "fp": "chrome", "mtu": "1400", "transport": ""}),
    # Not on the allow-list, in any case: dropped whatever the value.
    ({"seed": "x", "sid": "x", "contact": "x", "mail": "x", "path": "/ws", "pAssword": "x",
      "PASSword": "x", "sni": "x", "note": "x", "server": "x", "privateKey": "x"}, {}),
    # On it, but the value could name something: dropped.
    ({"prefix": "%16%03%01", "transport": "ss://proxy.example:443", "mode": "1.2.3.4",
      "type": "deadbeefcafe", "version": "16843009", "tls": "a" * 65}, {}),
    ({"plugin": "proxy", "obfs": "proxy"}, {}),  # the endpoint's own first label
    ({"proto": "tcp", "PROTO": "udp"}, {"proto": "tcp"}),  # one value per allow-listed name
    ({"prefix": "é", "Ünïcode": "x"}, {"prefix": "é"}),
])
def test_config_allow_list(config, kept):
    assert scrub(_enriched(config=config), allow_public_endpoint=False)["config"] == kept


def test_operator_extends_the_allow_list():
    report = _enriched(config={"servicemode": "gun", "ws_path": "/x", "lang": "en"})
    assert scrub(report, False, ("servicemode", "lang"))["config"] == {"servicemode": "gun",
                                                                      "lang": "en"}


def test_scrub_does_not_mutate_input():
    report = _enriched()
    scrub(report, allow_public_endpoint=False)
    assert report["endpoint_addr"] == "proxy.example.org"
    assert report["config"]["password"] == "hunter2"


def test_scrubbing_twice_changes_nothing():
    """A secondary collector scrubs what a primary relayed: the same text comes out."""
    once = scrub(_enriched(), False)
    assert scrub(once, False) == once


@pytest.mark.parametrize("function", ["scrub_text", "scrub_message"])
@pytest.mark.parametrize("text", [
    ":" * 100_000 + "x",
    "a:" * 50_000 + "g",
    "1" * 1000 + ":" + "1:" * 25_000 + "z",
    "1.1.1." * 20_000,
    "a_" * 50_000 + "!",
    "a-" * 50_000 + "1",
    "1s" * 50_000,
])
def test_scrub_is_linear_on_hostile_text(function, text):
    """A report's failure msg and every logged URL go through these: no backtracking blow-up.

    Run in a subprocess so a regression fails (timeout) instead of hanging the suite.
    """
    import subprocess
    import sys

    code = (f"import sys; from tunnel_telemetry.pipeline.scrub import {function}; "
            f"{function}(sys.stdin.read())")
    subprocess.run([sys.executable, "-c", code], input=text, text=True, check=True, timeout=20)


def test_fold_table_is_what_re_ignores_case_as():
    """Host names compare as re.IGNORECASE would have them equal, for every character."""
    from tunnel_telemetry.pipeline.scrub import _FOLD

    chars = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    folded = chars.translate(_FOLD)
    assert len(folded) == len(chars)  # one character for one: positions line up
    for letter in "abcdefghijklmnopqrstuvwxyz0123456789.-_":
        by_re = set(re.findall(re.escape(letter), chars, re.IGNORECASE))
        # Where the folded text has the letter (a case-sensitive search: fast), which
        # characters the original had there.
        by_fold = {chars[m.start()] for m in re.finditer(re.escape(letter), folded)}
        assert by_re == by_fold, letter


def test_fold_of_every_cased_character_is_what_re_ignores_case_as():
    """Non-ASCII host names too (ς / σ / Σ, µ / μ, ϐ / β, ᲀ / в, ...)."""
    from tunnel_telemetry.pipeline.scrub import _fold

    cased = [chr(c) for c in range(0x80, 0x110000) if not 0xD800 <= c < 0xE000
             and (chr(c).lower() != chr(c) or chr(c).upper() != chr(c)
                  or chr(c).casefold() != chr(c))]
    for c in cased:
        for other in {c.lower(), c.upper(), c.casefold(), c.title()} - {c}:
            if len(other) == 1:
                same_to_re = re.fullmatch(re.escape(c), other, re.IGNORECASE) is not None
                assert same_to_re == (_fold(c) == _fold(other)), (hex(ord(c)), other)


def test_scrub_leaves_no_host_name_in_the_regex_cache():
    host = "unique-proxy-7f3a.example.net"
    report = {"endpoint_addr": host, "endpoint": f"ss://{host}:443", "config": {},
              "failure": {"op": "dns", "msg": f"lookup {host.upper()}: no such host ünïcode"}}
    out = scrub(report, False)
    assert out["failure"]["msg"] == f"lookup {S}: no such host ünïcode"
    caches = [getattr(re, name) for name in ("_cache", "_cache2") if hasattr(re, name)]
    if not caches:
        pytest.skip("this Python's re keeps its pattern cache elsewhere")
    assert not any("7f3a" in str(key) for cache in caches for key in cache)


# ---------------------------------------------------------------------------------------------
# Property: an address in any spelling, inside any error text, never survives.

ERROR_WORDS = ["dial", "tcp", "udp", "connect:", "connection", "refused", "lookup", "on",
               "no", "such", "host", "read", "write:", "i/o", "timeout", "tls:", "handshake",
               "failure", "from", "to", "->", "(", ")", "[", "]", ",", ":", "x509:", "EOF",
               "address", "443", "Bearer", "password:"]
GLUE = ["", " ", ":", ": ", "(", ")", "[", "]:443 ", "/", "@", "=", ", ", "'", '"', "->", "\t"]
LOG_GLUE = [" ", ", ", "(", ")", "[", "]", "/", "@", "=", "'", '"', "\t", "->"]
addresses = st.one_of(
    st.ip_addresses(v=4).filter(lambda a: int(a) >= 1 << 24).map(str),
    st.ip_addresses(v=6).filter(lambda a: int(a) >> 32 != 0).map(str),
    st.from_regex(r"\A(xn--[a-z]{3,8}-[a-z0-9]{3}|[a-z]{3,10}-[a-z]{4,10})"
                  r"(\.[a-z]{3,10}){1,2}\Z").filter(lambda h: _idna_ok(h)),
)


def _idna_ok(host):
    try:
        return all(label.encode().decode("idna") for label in host.split("."))
    except UnicodeError:
        return False


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(address=addresses, data=st.data())
def test_no_spelling_survives_in_error_text(address, data):
    spellings = sorted(address_spellings(address))
    words = st.sampled_from(ERROR_WORDS)
    pieces = []
    for spelling in data.draw(st.permutations(spellings)):
        pieces += [data.draw(st.lists(words, max_size=3).map(" ".join)),
                   data.draw(st.sampled_from(GLUE)), spelling, data.draw(st.sampled_from(GLUE))]
    text = "".join(pieces)
    is_name = not _is_ip(address)
    out = scrub_message(text, host_names(address) if is_name else ())
    for spelling in spellings:
        assert not _survives(spelling, out), (spelling, text, out)
    assert scrub_message(out, host_names(address) if is_name else ()) == out
    if not is_name:  # log lines: addresses in any spelling between separators
        logged = scrub_text(" ".join(
            data.draw(st.sampled_from(LOG_GLUE)).join(("", s, "")) for s in spellings))
        for spelling in spellings:
            if spelling.startswith(("ip:", "IPv6:", "ip6:")):
                spelling = spelling.split(":", 1)[1]
            if _version_like(spelling):
                continue  # 100.64.0 is inet_aton's 100.64.0.0, and a version: logs keep it
            assert spelling not in logged, (spelling, logged)


def _version_like(text):
    parts = text.split(".")
    return (2 <= len(parts) <= 3 and all(p.isdigit() and (p == "0" or p[0] != "0")
                                         for p in parts) and int(parts[-1]) <= 255)


def _is_ip(text):
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _survives(spelling, out):
    """The spelling is in the output as a token of its own (a first label such as "proxy"
    may still be part of an unrelated word such as "proxyconnect")."""
    low = out.lower()
    needle = spelling.lower()
    at = low.find(needle)
    while at >= 0:
        before = low[at - 1] if at else " "
        after = low[at + len(needle)] if at + len(needle) < len(low) else " "
        if not (before.isalnum() or after.isalnum()):
            return True
        at = low.find(needle, at + 1)
    return False
