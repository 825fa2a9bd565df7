"""Report fields both sides read the same way: the endpoint URL and RFC 3339 times."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

_ENDPOINT = re.compile(
    r"(?P<proto>[a-z][a-z0-9+.-]{0,31})://"
    r"(?:\[(?P<ipv6>[^\]]*)\]|(?P<host>[^\[\]:/?#@\s]+))"
    r":(?P<port>[0-9]{1,5})"
)
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_DOTTED = re.compile(r"[0-9.]+")
_HEX_NUMBER = re.compile(r"0x[0-9a-f]*")
_TIME = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})"
)



@dataclass(frozen=True)
class Endpoint:
    """A parsed endpoint; ``address`` is an ip_address or a lower-case host name."""

    proto: str
    host: str
    port: int
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None

    @property
    def text(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.proto}://{host}:{self.port}"


def parse_time(text: str) -> datetime:
    """Parse an RFC 3339 time to an aware UTC datetime (a leap second counts as :59.999999).

    Second 60 exists only as the last second of a UTC day (23:59:60Z, or the same moment
    written with an offset)."""
    match = _TIME.fullmatch(text)
    if not match:
        raise ValueError("not an RFC 3339 time")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction = (match.group(7) or "0")[:6].ljust(6, "0")
    micro = int(fraction)
    leap = second == 60
    if leap:
        second, micro = 59, 999999
    zone = match.group(8)
    if zone in ("Z", "z"):
        offset = timedelta(0)
    else:
        hours, minutes = int(zone[1:3]), int(zone[4:6])
        if hours > 23 or minutes > 59:
            raise ValueError("time zone offset out of range")
        offset = timedelta(hours=hours, minutes=minutes) * (1 if zone[0] == "+" else -1)
    try:
        naive = datetime(year, month, day, hour, minute, second, micro)  # noqa: DTZ001
        moment = (naive - offset).replace(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise ValueError("not a valid date and time") from None
    if leap and (moment.hour, moment.minute) != (23, 59):
        raise ValueError("a leap second (:60) can only be 23:59:60 UTC")
    return moment


def format_time(moment: datetime) -> str:
    """RFC 3339 UTC with Z, milliseconds only when present."""
    m = moment.astimezone(UTC)
    text = f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}"
    return f"{text}.{m.microsecond // 1000:03d}Z" if m.microsecond else text + "Z"


def parse_endpoint(text: str) -> Endpoint:
    """Parse protocol://address:port; raises ValueError with a short reason."""
    match = _ENDPOINT.fullmatch(text)
    if not match:
        if "@" in text:
            raise ValueError("must not contain user information")
        if re.search(r"://[^/]*:[^/]*:", text) and "[" not in text:
            raise ValueError("an IPv6 address must be in brackets")
        if re.search(r"://[^/?#]+[/?#]", text):
            raise ValueError("must not contain a path, query or fragment")
        raise ValueError("must be protocol://address:port")
    port = match.group("port")
    if len(port) > 1 and port.startswith("0") or not 0 < int(port) < 65536:
        raise ValueError("port must be 1-65535")
    proto = match.group("proto")
    if match.group("ipv6") is not None:
        raw = match.group("ipv6")
        if "%" in raw:
            raise ValueError("IPv6 zone ids are not allowed")
        try:
            address = ipaddress.IPv6Address(raw)
        except ValueError:
            raise ValueError("not a valid IPv6 address in brackets") from None
        mapped = address.ipv4_mapped
        if mapped is not None:
            return Endpoint(proto, str(mapped), int(port), mapped)
        return Endpoint(proto, str(address), int(port), address)
    host = match.group("host")
    if _DOTTED.fullmatch(host):
        try:
            v4 = ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError("not a valid IPv4 address: write it as four decimal numbers "
                             "(a.b.c.d)") from None
        return Endpoint(proto, host, int(port), v4)  # accepted only in canonical form
    host = host.lower().rstrip(".")
    labels = host.split(".")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError("not a valid host name")
    if labels[-1].isdigit() or _HEX_NUMBER.fullmatch(labels[-1]):
        # What resolvers and URL parsers read as an IPv4 address (0x01010101, 1.1.0x101):
        # it would be geolocated as a name and hidden as one, so it is refused.
        raise ValueError("an IPv4 address must be written as four decimal numbers (a.b.c.d)")
    return Endpoint(proto, host, int(port), None)


MAX_ASN = 4294967295  # ASNs are 32-bit
UNKNOWN_ASN, UNKNOWN_CC = "AS0", "ZZ"


def canonical_asn(value: object) -> str | None:
    """An ASN in its one spelling: ``AS`` and the number without leading zeros (``AS03215``
    is ``AS3215``, ``AS00`` is ``AS0``, unknown); None when ``value`` is not ``AS`` and 1-10
    digits up to 4294967295. OONI compares ASNs as text and refuses leading zeros."""
    if not isinstance(value, str) or not 3 <= len(value) <= 12 or value[:2] != "AS":
        return None
    digits = value[2:]
    if not (digits.isascii() and digits.isdigit()):
        return None
    number = int(digits)
    return f"AS{number}" if number <= MAX_ASN else None


def canonical_cc(value: object) -> str | None:
    """A country code in its one spelling: two upper-case ASCII letters (``it`` is ``IT``);
    None for anything else (OONI refuses ``"12"``)."""
    if isinstance(value, str) and len(value) == 2 and value.isascii() and value.isalpha():
        return value.upper()
    return None
