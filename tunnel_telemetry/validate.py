"""Validate step: bytes -> JSON -> schema -> time window -> parsed endpoint.

Returns a normalised report holding only the fields SPEC knows; unknown and server-owned
fields are dropped here, so nothing later can store or relay them by accident.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import uuid as uuidlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from .errors import ReportError
from .schema import schema_errors

MAX_DEPTH = 32
_SURROGATE = re.compile("[\ud800-\udfff]")

_ENDPOINT = re.compile(
    r"(?P<proto>[a-z][a-z0-9+.-]{0,31})://"
    r"(?:\[(?P<ipv6>[^\]]*)\]|(?P<host>[^\[\]:/?#@\s]+))"
    r":(?P<port>[0-9]{1,5})"
)
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_DOTTED = re.compile(r"[0-9.]+")
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


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses as inf: no more valid than Infinity
        raise ValueError("a number is out of range")
    return value


def _check_strings(value: Any) -> None:
    """Reject lone surrogates (\\ud800 escapes): valid JSON text but not storable as UTF-8."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                raise ReportError("bad_encoding", "a string holds an unpaired UTF-16 surrogate")
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError("duplicate key in object")
        out[key] = value
    return out


def _depth_ok(body: bytes) -> bool:
    """Cheap pre-check of nesting depth so deep input never reaches the recursive parser."""
    depth = 0
    in_string = False
    escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > MAX_DEPTH:
                return False
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return True


def parse_json(body: bytes) -> Any:
    """Decode a JSON body strictly: UTF-8, no NaN/Infinity, no duplicate keys, bounded depth."""
    if not body.strip():
        raise ReportError("empty_body", "the request body is empty")
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and not _depth_ok(body):
        raise ReportError("too_deep", f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ReportError("bad_encoding", "the body is not valid UTF-8") from None
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates,
                           parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise ReportError("bad_json", f"not valid JSON: {exc.msg} at line {exc.lineno} "
                          f"column {exc.colno}") from None
    except RecursionError:
        raise ReportError("too_deep", f"JSON nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        # Python refuses integers of more than 4300 digits; say so without its advice text.
        reason = "a number has too many digits" if "digits" in str(exc) else str(exc)[:100]
        raise ReportError("bad_json", f"not valid JSON: {reason}") from None
    if "\\u" in text:
        _check_strings(value)
    return value


def parse_time(text: str) -> datetime:
    """Parse an RFC 3339 time to an aware UTC datetime (a leap second counts as :59.999999)."""
    match = _TIME.fullmatch(text)
    if not match:
        raise ValueError("not an RFC 3339 time")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction = (match.group(7) or "0")[:6].ljust(6, "0")
    micro = int(fraction)
    if second == 60:
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
        return (naive - offset).replace(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise ValueError("not a valid date and time") from None


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
            raise ValueError("not a valid IPv4 address") from None
        return Endpoint(proto, host, int(port), v4)  # accepted only in canonical form
    host = host.lower().rstrip(".")
    labels = host.split(".")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError("not a valid host name")
    if labels[-1].isdigit():
        raise ValueError("not a valid host name")
    return Endpoint(proto, host, int(port), None)


def validate(
    payload: Any,
    now: datetime,
    max_age: float,
    max_skew: float,
) -> tuple[dict[str, Any], Endpoint]:
    """Check a decoded report and return (normalised report, endpoint)."""
    if not isinstance(payload, dict):
        raise ReportError("not_object", "the report must be a JSON object",
                          [{"path": "$", "message": "must be of type object"}])
    errors = schema_errors(payload)
    if errors:
        raise ReportError("schema", "the report does not match the schema", errors)

    try:
        started = parse_time(payload["time"])
    except ValueError as exc:
        raise ReportError("bad_time", "invalid time",
                          [{"path": "$.time", "message": str(exc)}]) from None
    if started > now + timedelta(seconds=max_skew):
        raise ReportError("time_future", "time is too far in the future",
                          [{"path": "$.time", "message":
                            f"more than {int(max_skew)} s ahead of the collector's clock"}])
    if started < now - timedelta(seconds=max_age):
        raise ReportError("time_old", "time is too old",
                          [{"path": "$.time", "message":
                            f"older than {int(max_age)} s"}])
    try:
        endpoint = parse_endpoint(payload["endpoint"])
    except ValueError as exc:
        raise ReportError("bad_endpoint", "invalid endpoint",
                          [{"path": "$.endpoint", "message": str(exc)}]) from None

    report: dict[str, Any] = {
        "report-type": "tunnel-telemetry",
        # The schema admits only the 8-4-4-4-12 hex form: lower case is its canonical text.
        "uuid": payload["uuid"].lower() if "uuid" in payload else str(uuidlib.uuid4()),
        "time": format_time(started),
        "config": dict(payload.get("config") or {}),
        # JSON Schema counts 3000.0 as an integer; store and relay it as one.
        "duration_ms": None if payload.get("duration_ms") is None else int(payload["duration_ms"]),
        "failure": _failure(payload.get("failure")),
        "sampling_rate": payload.get("sampling_rate", 1),
    }
    for key in ("client_asn", "client_cc"):
        if key in payload:
            report[key] = payload[key]
    nul = _nul_path(report, "$")
    if nul is not None:
        raise ReportError("nul_character", "the report contains a NUL character (\\u0000)",
                          [{"path": nul, "message": "must not contain NUL characters"}])
    return report, endpoint


def _nul_path(value: Any, path: str) -> str | None:
    """JSON path of the first string (key or value) holding U+0000; no store can keep one."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            if "\x00" in key:
                return path
            found = _nul_path(item, f"{path}.{key}")
            if found is not None:
                return found
    return None


def _failure(value: dict[str, Any] | None) -> dict[str, str] | None:
    if value is None:
        return None
    failure = {"op": value["op"]}
    msg = value.get("msg", value.get("error"))
    if msg is not None:
        failure["msg"] = msg
    if "posix_error" in value:
        failure["posix_error"] = value["posix_error"]
    return failure
