"""Proxy middleware: find the client address behind a configured number of trusted proxies.

With ``hops=0`` the socket peer is the client and every forwarding header is ignored. With
``hops=N`` the N-th address from the right of the header is taken: that is the one the
outermost trusted proxy appended, and anything to its left was written by the client.
The result goes to ``environ["tunnel_telemetry.client_ip"]`` as an ``ipaddress`` object (None
when unknown), parsed once for the rate limit and geolocation; it is never stored or logged.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger(__name__)

ENVIRON_KEY = "tunnel_telemetry.client_ip"
_FORWARDED_FOR = re.compile(r'(?:^|[;,\s])for\s*=\s*("(?:[^"\\]|\\.)*"|[^;,\s]*)', re.IGNORECASE)


Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_address(value: str) -> str | None:
    """An IP address from a header value: strips ports, brackets and quotes; None if invalid."""
    address = parse_ip(value)
    return None if address is None else str(address)


def parse_ip(value: str) -> Address | None:
    """parse_address's address as an object (IPv4-mapped IPv6 as IPv4)."""
    text = value.strip().strip('"').strip()
    if text.startswith("["):
        text = text[1:].split("]", 1)[0]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    text = text.split("%", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def forwarded_for(values: Iterable[str]) -> list[str]:
    """The for= values of RFC 7239 Forwarded headers, in order."""
    out = []
    for value in values:
        for element in value.split(","):
            match = _FORWARDED_FOR.search(element)
            out.append(match.group(1) if match else "")
    return out


class ProxyHeaders:
    """WSGI middleware that resolves the client address from a trusted proxy header."""

    def __init__(self, app: WSGIApplication, hops: int = 0,
                 header: str = "X-Forwarded-For") -> None:
        self.app = app
        self.hops = hops
        self.header = header
        self.environ_name = "HTTP_" + header.upper().replace("-", "_")
        self.kind = {"x-forwarded-for": "list", "forwarded": "forwarded"}.get(
            header.lower(), "single")
        self.warned = False

    def client_ip(self, environ: WSGIEnvironment) -> Address | None:
        """The client address for this request, or None when it cannot be trusted."""
        if self.hops == 0:
            if not self.warned and self.environ_name in environ:
                self.warned = True  # once per process: a hint, not a per-request cost
                log.warning("proxy_header_ignored: requests carry %s but proxy-hops is 0; "
                            "behind a proxy every client is the proxy's address (one rate "
                            "limit, the proxy's location): set proxy-hops", self.header)
            return parse_ip(environ.get("REMOTE_ADDR") or "")
        raw = environ.get(self.environ_name)
        if raw is None:
            log.warning("proxy header missing")
            return None
        if self.kind == "single":
            # Set (not appended) by the nearest trusted proxy.
            return parse_ip(raw.split(",")[-1])
        entries = forwarded_for([raw]) if self.kind == "forwarded" else raw.split(",")
        if len(entries) < self.hops:
            log.warning("proxy header shorter than proxy-hops")
            return None
        return parse_ip(entries[-self.hops])

    def __call__(self, environ: WSGIEnvironment,
                 start_response: StartResponse) -> Iterable[bytes]:
        environ[ENVIRON_KEY] = self.client_ip(environ)
        return self.app(environ, start_response)
