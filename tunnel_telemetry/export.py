"""tt-server export: stored reports as JSON lines or CSV, one report at a time.

Both backends give the same text: keys in the report format's order (config and failure
keys sorted), whatever order the database keeps them in (PostgreSQL's jsonb sorts its own).
"""

from __future__ import annotations

import csv
import re
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import IO, Any

from .durations import parse_duration
from .protocol.fields import parse_time
from .store import dumps

FIELDS = ("report-type", "uuid", "time", "t_received", "collector_id", "endpoint",
          "endpoint_addr", "proto", "endpoint_port", "endpoint_asn", "endpoint_cc",
          "client_asn", "client_cc", "config", "duration_ms", "failure", "sampling_rate",
          "ooni-measurement-id", "ooni-measurement-link")
# CSV: one column per field, the failure's parts apart, config as JSON text.
CSV_COLUMNS = ("report-type", "uuid", "time", "t_received", "collector_id", "endpoint",
               "endpoint_addr", "proto", "endpoint_port", "endpoint_asn", "endpoint_cc",
               "client_asn", "client_cc", "config", "duration_ms", "failure_op", "failure_msg",
               "failure_posix_error", "sampling_rate", "ooni-measurement-id",
               "ooni-measurement-link")
_FIELD_SET = frozenset(FIELDS)


def canonical(report: dict[str, Any]) -> dict[str, Any]:
    """The report with its keys in FIELDS' order (others after, sorted), nested keys sorted."""
    out = {key: report[key] for key in FIELDS if key in report}
    out.update((key, report[key]) for key in sorted(report) if key not in _FIELD_SET)
    for key in ("config", "failure"):
        if isinstance(out.get(key), dict):
            out[key] = dict(sorted(out[key].items()))
    return out


def json_lines(reports: Iterable[dict[str, Any]]) -> Iterator[str]:
    for report in reports:
        yield dumps(canonical(report)) + "\n"


def csv_row(report: dict[str, Any]) -> list[Any]:
    failure = report.get("failure") or {}
    row: dict[str, Any] = {**report, "config": dumps(dict(sorted(
        (report.get("config") or {}).items())))}
    for part in ("op", "msg", "posix_error"):
        row[f"failure_{part}"] = failure.get(part)
    return ["" if row.get(col) is None else row[col] for col in CSV_COLUMNS]


def write(reports: Iterable[dict[str, Any]], out: IO[str], fmt: str = "jsonl") -> int:
    """Write the reports to ``out`` as they come; how many."""
    count = 0
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for report in reports:
            writer.writerow(csv_row(report))
            count += 1
        return count
    for line in json_lines(reports):
        out.write(line)
        count += 1
    return count


def parse_when(text: str, now: float | None = None) -> float:
    """A point in time (Unix time) from RFC 3339 (2026-01-02T03:04:05Z), a date (2026-01-02,
    midnight UTC) or a duration before now (36h, 7d)."""
    now = time.time() if now is None else now
    text = text.strip()
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()
    try:
        return parse_time(text).timestamp()
    except ValueError:
        pass
    try:
        return now - parse_duration(text)
    except ValueError:
        raise ValueError(f"expected an RFC 3339 time, a date (YYYY-MM-DD) or a duration "
                         f"ago (36h, 7d), got {text!r}") from None


def asn(text: str) -> str:
    """AS13335 or 13335 -> AS13335."""
    match = re.fullmatch(r"(?:AS)?(\d{1,10})", text.strip(), re.IGNORECASE)
    if not match:
        raise ValueError(f"expected an AS number such as AS13335, got {text!r}")
    return f"AS{int(match.group(1))}"


def country(text: str) -> str:
    """A two-letter country code, upper case (ZZ: unknown)."""
    if not re.fullmatch(r"[A-Za-z]{2}", text.strip()):
        raise ValueError(f"expected a two-letter country code such as DE, got {text!r}")
    return text.strip().upper()
