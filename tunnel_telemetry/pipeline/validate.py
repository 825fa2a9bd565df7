"""Validate step: bytes -> JSON -> schema -> time window -> parsed endpoint.

Returns a normalised report holding only the fields SPEC knows; unknown and server-owned
fields are dropped here, so nothing later can store or relay them by accident.
"""

from __future__ import annotations

import json
import math
import re
import uuid as uuidlib
from datetime import datetime, timedelta
from typing import Any, NoReturn

from ..durations import format_duration
from ..errors import ReportError
from ..protocol.fields import (
    MAX_ASN,
    Endpoint,
    canonical_asn,
    canonical_cc,
    format_time,
    parse_endpoint,
    parse_time,
)
from ..protocol.schema import schema_errors

MAX_DEPTH = 32
_SURROGATE = re.compile("[\ud800-\udfff]")



def _reject_constant(name: str) -> NoReturn:
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

    started = check_time(payload["time"], now, max_age, max_skew)
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
    if "client_asn" in payload:  # the schema checked the form: AS and 1-10 digits
        report["client_asn"] = canonical_asn(payload["client_asn"])
        if report["client_asn"] is None:
            raise ReportError("bad_asn", "invalid client_asn", [{
                "path": "$.client_asn", "message": f"must be at most AS{MAX_ASN}"}])
    if "client_cc" in payload:
        report["client_cc"] = canonical_cc(payload["client_cc"])
    check_nul(report)
    return report, endpoint


def check_time(text: str, now: datetime, max_age: float, max_skew: float,
               path: str = "$.time") -> datetime:
    """Parse a report's start time and check it is inside the accepted window."""
    try:
        started = parse_time(text)
    except ValueError as exc:
        raise ReportError("bad_time", "invalid time",
                          [{"path": path, "message": str(exc)}]) from None
    if started > now + timedelta(seconds=max_skew):
        raise ReportError("time_future", "time is too far in the future",
                          [{"path": path, "message":
                            f"more than {format_duration(max_skew)} ahead of the collector's clock "
                            "(max-clock-skew)"}])
    if started < now - timedelta(seconds=max_age):
        raise ReportError("time_old", "time is too old",
                          [{"path": path, "message":
                            f"older than {format_duration(max_age)} (max-report-age)"}])
    return started


def check_nul(report: dict[str, Any]) -> None:
    """Reject a normalised report with U+0000 in a string: no store can keep one."""
    nul = _nul_path(report, "$")
    if nul is not None:
        raise ReportError("nul_character", "the report contains a NUL character (\\u0000)",
                          [{"path": nul, "message": "must not contain NUL characters"}])


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
