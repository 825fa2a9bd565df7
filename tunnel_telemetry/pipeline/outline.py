"""Validate step for outline-sdk's test-connectivity reports: translate them into ours.

``test-connectivity --report-to URL`` POSTs ``{"test": {...}, "dns_queries": [...],
"tcp_connections": [...]}`` with no report-type, uuid or sampling rate. ``translate`` checks it
against its own schema and returns what ``validate`` returns for a tunnel-telemetry report, so
enrich, scrub, store and relay are the same. The mapping is documented in docs/clients.md.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import re
import uuid as uuidlib
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from ..errors import ReportError
from ..protocol.fields import Endpoint, format_time, parse_endpoint
from ..protocol.schema import schema_errors
from .scrub import scrub_text
from .validate import check_nul, check_time

if TYPE_CHECKING:
    from .geo import Address

SCHEMA = "outline-report.schema.json"
# The tool keeps a success with probability 0.1 and a failure with 1 unless told otherwise
# (--report-success-rate, --report-failure-rate) and never sends the rate: its defaults are
# the best estimate there is, and far better than the 1 a missing rate would mean.
SUCCESS_RATE = 0.1
FAILURE_RATE = 1
# The most host names and option values a report's error text is searched for (real reports
# have a few; dns_queries and tcp_connections may hold hundreds).
MAX_NAMES = 64
# The endpoint's scheme when the transport names no proxy: the resolver was reached directly.
DIRECT = "direct"

_SCHEME = re.compile(r"[a-z][a-z0-9+.-]{0,31}")
# An IP address with its port, as Go writes them in error texts (1.2.3.4:9, [2001:db8::1]:9).
_IP_PORT = re.compile(r"(?<![\w.:\[])(?:([0-9]{1,3}(?:\.[0-9]{1,3}){3})|\[([0-9A-Fa-f:.]+"
                      r"(?:%[\w.-]+)?)\]):[0-9]{1,5}(?![0-9])")


def is_outline(payload: Any) -> bool:
    """True for the outline-sdk shape: an object with ``test`` and no ``report-type``."""
    return isinstance(payload, dict) and "test" in payload and "report-type" not in payload


@dataclass(frozen=True)
class Hop:
    """One part of a transport config: its scheme, and host:port when it names a server."""

    scheme: str
    address: str | None
    values: tuple[str, ...]  # option values (sni=, host=, userinfo ...): hidden, never kept


def parse_transport(text: str) -> list[Hop]:
    """The parts of a sanitised transport config (``split:2|ss://REDACTED@host:9?prefix=x``);
    an empty config (a direct test) has none. Raises ValueError with a short reason."""
    text = text.strip()
    if not text:
        return []
    hops = []
    for part in text.split("|"):
        scheme, _, rest = part.strip().partition(":")
        scheme = scheme.lower()
        if not _SCHEME.fullmatch(scheme):
            raise ValueError("every part must start with a scheme ([a-z][a-z0-9+.-]*)")
        if rest.startswith("//"):
            authority = re.split(r"[/?#]", rest[2:], maxsplit=1)[0]
            user, _, hostport = authority.rpartition("@")
            values = (user,) + tuple(v for _, v in parse_qsl(rest.partition("?")[2]))
            hops.append(Hop(scheme, None if hostport == "UNKNOWN" else hostport, values))
        else:  # options only: split:2, tls:sni=name&certname=name, override:host=h&port=p
            values = tuple(v for _, v in parse_qsl(rest, keep_blank_values=True))
            hops.append(Hop(scheme, None, values))
    return hops


def translate(payload: Any, now: datetime, max_age: float, max_skew: float,
              key: bytes) -> tuple[dict[str, Any], Endpoint]:
    """Check an outline-sdk report and return (normalised tunnel-telemetry report, endpoint).

    The endpoint's ``address`` is the IP to geolocate: the host itself, or the IP the client
    dialled for it. ``key`` makes the uuid of a report that has none (see ``derive_uuid``).
    """
    errors = schema_errors(payload, SCHEMA)
    if errors:
        raise ReportError("schema", "the report does not match the outline-sdk report schema",
                          errors)
    test = payload["test"]
    started = check_time(test["time"], now, max_age, max_skew, "$.test.time")
    try:
        hops = parse_transport(test["transport"])
    except ValueError as exc:
        raise ReportError("bad_transport", "invalid transport",
                          [{"path": "$.test.transport", "message": str(exc)}]) from None
    endpoint = geo_address(payload, _endpoint(hops, test["resolver"]))
    proto = test["proto"]
    config = {"proto": proto}
    if hops:
        config["chain"] = "|".join(hop.scheme for hop in hops)

    error = test.get("error")
    failure: dict[str, str] | None = None
    if error is not None:
        for field in ("msg", "posix_error"):
            if "\x00" in error.get(field, ""):
                raise ReportError("nul_character", "the report contains a NUL character "
                                  "(\\u0000)", [{"path": f"$.test.error.{field}",
                                                  "message": "must not contain NUL characters"}])
        failure = {"op": f"{proto}.{error['op']}"}
        hidden = _names(payload, hops, endpoint)
        # Each name costs a pass over the text: a report naming more than any real one does
        # loses its message rather than a worker's time.
        if error.get("msg") and len(hidden) <= MAX_NAMES:
            failure["msg"] = scrub_text(_IP_PORT.sub(_bare_ip, error["msg"]), hidden)
        if error.get("posix_error"):
            failure["posix_error"] = error["posix_error"]
    report: dict[str, Any] = {
        "report-type": "tunnel-telemetry",
        "uuid": derive_uuid(payload, key),
        "time": format_time(started),
        "config": config,
        "duration_ms": test.get("duration_ms"),
        "failure": failure,
        "sampling_rate": SUCCESS_RATE if failure is None else FAILURE_RATE,
    }
    check_nul(report)
    return report, endpoint


def derive_uuid(payload: Any, key: bytes) -> str:
    """A uuid that is the same for the same report: a client's retry is stored once.

    Keyed (HMAC-SHA256 over the canonical JSON), because the report holds addresses: a plain
    hash of it, published with the report, would let anyone confirm a guessed proxy address.
    """
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = bytearray(hmac.new(key, canonical.encode("utf-8"), hashlib.sha256).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x80  # version 8: custom (RFC 9562)
    digest[8] = (digest[8] & 0x3F) | 0x80  # the RFC variant
    return str(uuidlib.UUID(bytes=bytes(digest)))


def _endpoint(hops: list[Hop], resolver: str) -> Endpoint:
    """The last hop naming a server (scheme://host:port), else the resolver reached directly;
    its address is the IP literal (geolocation of a name comes from what was dialled)."""
    named = [hop for hop in hops if hop.address is not None]
    if named:
        text = f"{named[-1].scheme}://{named[-1].address}"
        path, what = "$.test.transport", "the last hop"
    else:
        text, path, what = f"{DIRECT}://{resolver}", "$.test.resolver", "the resolver"
    try:
        return parse_endpoint(text)
    except ValueError as exc:
        raise ReportError("bad_endpoint", "invalid endpoint",
                          [{"path": path, "message": f"{what}: {exc}"}]) from None


def dialled_ip(payload: dict[str, Any], host: str) -> Address | None:
    """The IP the client connected to for ``host``: a connection that succeeded, else the last
    one tried, else the first address the DNS answered; None when the report shows none."""
    conns = [c for c in payload.get("tcp_connections") or ()
             if _same_name(c.get("hostname"), host) and _ip(c.get("ip")) is not None]
    if conns:
        chosen = [c for c in conns if not c.get("error")] or conns
        return _ip(chosen[-1]["ip"])
    for query in payload.get("dns_queries") or ():
        if _same_name(query.get("query_name"), host):
            for answer in query.get("answer_ips") or ():
                if (address := _ip(answer)) is not None:
                    return address
    return None


def geo_address(payload: dict[str, Any], endpoint: Endpoint) -> Endpoint:
    """The endpoint with the address to geolocate: its IP, or the IP dialled for its name."""
    if endpoint.address is not None:
        return endpoint
    return Endpoint(endpoint.proto, endpoint.host, endpoint.port,
                    dialled_ip(payload, endpoint.host))


def _names(payload: dict[str, Any], hops: list[Hop], endpoint: Endpoint) -> tuple[str, ...]:
    """Every host name and option value in the report: hidden in the error text. (IP
    addresses are not listed: scrub_text replaces every address, however it is written.)"""
    found = {endpoint.host}
    for hop in hops:
        found.update(hop.values)
        if hop.address:
            found.add(hop.address.rpartition(":")[0].strip("[]"))
    found.add(payload["test"]["resolver"].rpartition(":")[0].strip("[]"))
    for query in payload.get("dns_queries") or ():
        found.add(str(query.get("query_name") or ""))
        found.update(str(a) for a in query.get("answer_ips") or ())
    for conn in payload.get("tcp_connections") or ():
        found.update((str(conn.get("hostname") or ""), str(conn.get("ip") or "")))
    names = {n.rstrip(".") for n in found}
    # Longest first, so a name is hidden whole before a shorter one inside it; no REDACTED
    # placeholders, numbers (ports) or words too short to be a name.
    return tuple(sorted((n for n in names if len(n) >= 3 and not n.isdigit()
                         and n != "REDACTED" and _ip(n) is None), key=len, reverse=True))


def _bare_ip(match: re.Match[str]) -> str:
    """An IP address and port in an error text, as the address alone (then scrubbed whole:
    a UDP error names the client's local address and port)."""
    address = match.group(1) or match.group(2)
    return address if _ip(address) is not None else match.group(0)


def _same_name(name: Any, host: str) -> bool:
    return isinstance(name, str) and name.lower().rstrip(".") == host


def _ip(text: Any) -> Address | None:
    if not isinstance(text, str):
        return None
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return mapped or address
