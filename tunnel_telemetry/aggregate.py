"""Aggregates: stored reports counted per cell, with a k-anonymity floor and rounded counts.

The store groups the reports of a time range by period and cell (SQL, ``Store.aggregate``);
this module checks every value against a closed vocabulary, folds cells of fewer than ``k``
reports into coarser ones (network -> country -> all -> suppressed) and rounds what it
publishes. docs/aggregates.md is the specification; GET /aggregates, ``tt-server aggregate``
and the dashboard all use ``build``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .errors import ReportError
from .protocol.fields import format_time, parse_time

if TYPE_CHECKING:
    from .store import Reports

FORMAT = "tunnel-telemetry-aggregates/1"
PERIODS = {"hour": 3600, "day": 86400}
DEFAULT_SPAN = {"hour": 48, "day": 30}  # periods shown when ``from`` is not given
MAX_PERIODS = 1000
DEFAULT_K = 10
ROUND_TO = 10
CLOSE_GRACE = 60  # seconds after its end before a period counts as closed (clock skew)
LEVELS = ("network", "country", "all")
CELL_FIELDS = ("level", "client_cc", "client_asn", "proto", "endpoint_asn", "endpoint_cc",
               "outcome", "op", "posix_error", "count", "weighted")
PERIOD_FIELDS = ("start", "end", "reports", "folded", "suppressed")

# A value is published only when it is one of these shapes; anything else becomes the
# unknown value of its field, so no free text, address or id can reach an aggregate.
_CC = re.compile(r"[A-Z]{2}")
_ASN = re.compile(r"AS(?:0|[1-9][0-9]{0,9})")
_PROTO = re.compile(r"[a-z][a-z0-9+-]{0,15}")
# outline-sdk's operations come qualified by their transport (tcp.connect, udp.send): a dot
# only there, so that a host name does not pass for an operation.
_OP = re.compile(r"(?:tcp\.|udp\.)?[a-z][a-z0-9_-]{0,31}")
_ERRNO = re.compile(r"E[A-Z0-9]{1,31}")
# (client_cc, client_asn, proto, endpoint_asn, endpoint_cc, outcome, op, posix_error)
Key = tuple[str | None, ...]


def _pick(pattern: re.Pattern[str], value: Any, unknown: str) -> str:
    return value if isinstance(value, str) and pattern.fullmatch(value) else unknown


def clean_key(row: tuple) -> Key:
    """A store row's cell, every field from its closed vocabulary (``AGGREGATE_COLUMNS``)."""
    _, client_cc, client_asn, proto, endpoint_asn, endpoint_cc, failed, op, errno = row[:9]
    failure = bool(failed)
    return (
        _pick(_CC, client_cc, "ZZ"), _pick(_ASN, client_asn, "AS0"),
        _pick(_PROTO, proto, "other"), _pick(_ASN, endpoint_asn, "AS0"),
        _pick(_CC, endpoint_cc, "ZZ"), "failure" if failure else "success",
        _pick(_OP, op, "other") if failure else None,
        (None if errno is None else _pick(_ERRNO, errno, "other")) if failure else None,
    )


def coarser(key: Key, level: str) -> Key:
    """The cell at ``level``: networks dropped for "country", countries too for "all"."""
    cc, asn, proto, easn, ecc, outcome, op, errno = key
    if level == "country":
        return (cc, None, proto, None, ecc, outcome, op, errno)
    return (None, None, proto, None, None, outcome, op, errno)


def round_count(value: float, floor: int = 0) -> int:
    """To the nearest multiple of ROUND_TO (halves up), at least ``floor``."""
    return max(floor, ROUND_TO * int((value + ROUND_TO / 2) // ROUND_TO))


def fold(cells: Mapping[Key, list[float]], k: int) -> tuple[list[dict[str, Any]], int, int]:
    """Publishable cells of one period, how many reports were folded, how many suppressed.

    A cell of at least ``k`` reports is published as it is; the others are added up in the
    next coarser cell, which is published when it reaches ``k``; what is still under ``k``
    at "all" is suppressed. Counts are exact here (``publish`` rounds them).
    """
    out: list[dict[str, Any]] = []
    folded = 0
    current: dict[Key, list[float]] = {key: list(v) for key, v in cells.items()}
    for depth, level in enumerate(LEVELS):
        under: dict[Key, list[float]] = {}
        for key, (count, weighted) in current.items():
            if count >= k:
                out.append({"level": level, "key": key, "count": count, "weighted": weighted})
                if depth:
                    folded += int(count)
            elif depth + 1 < len(LEVELS):
                into = under.setdefault(coarser(key, LEVELS[depth + 1]), [0, 0.0])
                into[0] += count
                into[1] += weighted
            else:
                under[key] = [count, weighted]
        current = under
    suppressed = int(sum(count for count, _ in current.values()))
    return out, folded, suppressed


def _cell(item: dict[str, Any]) -> dict[str, Any]:
    values = dict(zip(CELL_FIELDS[1:9], item["key"], strict=True))
    return {"level": item["level"], **values, "count": round_count(item["count"], ROUND_TO),
            "weighted": round_count(item["weighted"], ROUND_TO)}


def _sort_key(cell: dict[str, Any]) -> tuple:
    return (LEVELS.index(cell["level"]),
            *("" if cell[f] is None else cell[f] for f in CELL_FIELDS[1:9]))


@dataclass(frozen=True)
class Query:
    """Closed periods [start, end) of ``period``; both bounds on period boundaries."""

    start: int
    end: int
    period: str

    @property
    def width(self) -> int:
        return PERIODS[self.period]


def _bad(name: str, message: str) -> ReportError:
    return ReportError("bad_parameter", f"{name}: {message}",
                       [{"path": name, "message": message}])


def _moment(name: str, text: str) -> float:
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        text += "T00:00:00Z"
    try:
        return parse_time(text).timestamp()
    except ValueError:
        raise _bad(name, "expected a UTC date YYYY-MM-DD or an RFC 3339 time") from None


def parse_query(args: Mapping[str, Any], now: float) -> Query:
    """``from``, ``to``, ``period`` (hour or day) -> Query; ReportError (400) when bad.

    ``from`` is rounded down and ``to`` up to period boundaries; ``to`` stops at the current
    period, which is still open (its counts change with every report: never published), and
    a period closes CLOSE_GRACE seconds after its end.
    """
    unknown = sorted(set(args) - {"from", "to", "period"})
    if unknown:
        raise _bad(unknown[0], "unknown parameter (known: from, to, period)")
    period = args.get("period") or "day"
    if period not in PERIODS:
        raise _bad("period", "must be hour or day")
    width = PERIODS[period]
    closed = int((now - CLOSE_GRACE) // width) * width
    end = closed
    if args.get("to"):
        to = _moment("to", str(args["to"]))
        end = min(closed, -int(-to // width) * width)
    start = end - DEFAULT_SPAN[period] * width
    if args.get("from"):
        start = int(_moment("from", str(args["from"])) // width) * width
    if start > end:
        raise _bad("from", "must not be after to")
    if (end - start) // width > MAX_PERIODS:
        raise _bad("from", f"at most {MAX_PERIODS} periods at once")
    return Query(start, end, period)


def cells_of(store: Reports, start: int, end: int, width: int) -> dict[int, dict[Key, list[float]]]:
    """Exact counts per period and cell (not yet folded), from ``store.aggregate``."""
    by_period: dict[int, dict[Key, list[float]]] = {s: {} for s in range(start, end, width)}
    for row in store.aggregate(start, end, width):
        cells = by_period.setdefault(int(row[0]), {})
        into = cells.setdefault(clean_key(row), [0, 0.0])
        into[0] += row[9]
        into[1] += float(row[10])
    return by_period


class PeriodCache:
    """Closed periods' exact cells, kept by one process: a closed period's reports do not
    change (new reports are received now), so each is read from the store once, for at most
    ``seconds`` (a retention purge of old reports shows after that), ``size`` periods at most."""

    def __init__(self, seconds: float = 6 * 3600, size: int = 5000) -> None:
        self.seconds, self.size = seconds, size
        self._periods: dict[tuple[int, int], tuple[float, dict[Key, list[float]]]] = {}

    def cells(self, store: Reports, query: Query) -> dict[int, dict[Key, list[float]]]:
        now, width = time.monotonic(), query.width
        starts = range(query.start, query.end, width)
        missing = [s for s in starts
                   if now - self._periods.get((width, s), (-math.inf, None))[0] > self.seconds]
        if missing:
            for start, cells in cells_of(store, missing[0], missing[-1] + width, width).items():
                self._periods.pop((width, start), None)
                self._periods[(width, start)] = (now, cells)
            while len(self._periods) > self.size:  # the oldest read first
                del self._periods[next(iter(self._periods))]
        return {s: self._periods[(width, s)][1] if (width, s) in self._periods
                else cells_of(store, s, s + width, width)[s] for s in starts}


def build(store: Reports, query: Query, k: int = DEFAULT_K,
          cache: PeriodCache | None = None) -> dict[str, Any]:
    """The aggregate document of ``query`` from ``store`` (docs/aggregates.md)."""
    width = query.width
    by_period = (cache.cells(store, query) if cache is not None
                 else cells_of(store, query.start, query.end, width))
    periods = []
    for start in range(query.start, query.end, width):
        cells = by_period.get(start, {})
        published, folded, suppressed = fold(cells, k)
        total = sum(count for count, _ in cells.values())
        periods.append({
            "start": iso(start), "end": iso(start + width),
            "reports": round_count(total), "folded": round_count(folded),
            "suppressed": round_count(suppressed),
            "cells": sorted((_cell(item) for item in published), key=_sort_key),
        })
    return {"format": FORMAT, "period": query.period, "from": iso(query.start),
            "to": iso(query.end), "k": k, "rounding": ROUND_TO, "periods": periods}


def iso(epoch: float) -> str:
    """Epoch seconds as RFC 3339 UTC."""
    return format_time(datetime.fromtimestamp(epoch, UTC))


def flat_rows(document: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """One row per published cell, with its period's fields (``period_`` + PERIOD_FIELDS)."""
    for period in document["periods"]:
        head = {f"period_{name}": period[name] for name in PERIOD_FIELDS}
        for cell in period["cells"]:
            yield {**head, **cell}


CSV_FIELDS = tuple(f"period_{name}" for name in PERIOD_FIELDS) + CELL_FIELDS


def to_csv(document: Mapping[str, Any]) -> str:
    """The document's cells as CSV (header first; empty fields for null)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat_rows(document))
    return out.getvalue()


def to_json_lines(document: Mapping[str, Any]) -> Iterable[str]:
    """One JSON line per period (its cells included), each naming the format, period and k."""
    for period in document["periods"]:
        yield json.dumps({"format": document["format"], "period": document["period"],
                          "k": document["k"], "rounding": document["rounding"], **period},
                         separators=(",", ":"))


# -- relayed aggregates (relay-aggregates-url -> POST /aggregates) ---------------------------

SOURCE = re.compile(r"[\w.:-]{1,128}", re.ASCII)
_VOCABULARY = {"client_cc": _CC, "client_asn": _ASN, "proto": _PROTO, "endpoint_asn": _ASN,
               "endpoint_cc": _CC, "op": _OP, "posix_error": _ERRNO}
_NULL_AT = {"network": (), "country": ("client_asn", "endpoint_asn"),
            "all": ("client_cc", "client_asn", "endpoint_asn", "endpoint_cc")}
MAX_CELLS = 100_000


def _rounded(value: Any, floor: int = 0) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool) and value >= floor
            and value % ROUND_TO == 0)


def _cell_errors(cell: Any, path: str) -> list[dict[str, str]]:
    if not isinstance(cell, dict) or set(cell) != set(CELL_FIELDS):
        return [{"path": path, "message": f"must be an object of {', '.join(CELL_FIELDS)}"}]
    errors = []
    level = cell["level"]
    if level not in _NULL_AT:
        return [{"path": f"{path}.level", "message": "must be network, country or all"}]
    failure = cell["outcome"] == "failure"
    if cell["outcome"] not in ("success", "failure"):
        errors.append({"path": f"{path}.outcome", "message": "must be success or failure"})
    for name, pattern in _VOCABULARY.items():
        value = cell[name]
        null = (name in _NULL_AT[level] or (name in ("op", "posix_error") and not failure)
                or name == "posix_error" and value is None)
        if null and value is not None or not null and not (
                isinstance(value, str) and pattern.fullmatch(value)):
            errors.append({"path": f"{path}.{name}", "message":
                           "must be null here" if null else "not a published value"})
    for name in ("count", "weighted"):
        if not _rounded(cell[name], ROUND_TO):
            errors.append({"path": f"{path}.{name}",
                           "message": f"must be a multiple of {ROUND_TO}, at least {ROUND_TO}"})
    return errors


def check_document(payload: Any, k: int, now: float) -> tuple[str, str, list[tuple[int, dict]]]:
    """A relayed aggregate document (``source`` + the format above) -> (source, period,
    [(start, period object)]); ReportError (400) naming the first fields at fault.

    Only what this collector would publish itself is taken: closed periods, cells of the
    vocabulary, rounded counts, and a ``k`` at least this collector's own."""
    def bad(errors: list[dict[str, str]]) -> ReportError:
        return ReportError("bad_aggregates", "the aggregates do not match the format",
                           errors[:20])

    if not isinstance(payload, dict):
        raise bad([{"path": "$", "message": "must be an object"}])
    errors = []
    if payload.get("format") != FORMAT:
        errors.append({"path": "$.format", "message": f"must be {FORMAT}"})
    source = payload.get("source")
    if not (isinstance(source, str) and SOURCE.fullmatch(source)):
        errors.append({"path": "$.source", "message": "must be the sender's collector-id"})
    period = payload.get("period")
    if period not in PERIODS:
        errors.append({"path": "$.period", "message": "must be hour or day"})
    given_k = payload.get("k")
    if not (isinstance(given_k, int) and not isinstance(given_k, bool) and given_k >= k):
        errors.append({"path": "$.k", "message": f"must be at least this collector's {k}"})
    if payload.get("rounding") != ROUND_TO:
        errors.append({"path": "$.rounding", "message": f"must be {ROUND_TO}"})
    periods = payload.get("periods")
    if not (isinstance(periods, list) and 0 < len(periods) <= MAX_PERIODS):
        errors.append({"path": "$.periods", "message": f"must list 1 to {MAX_PERIODS} periods"})
    if errors or not (isinstance(source, str) and isinstance(period, str)
                      and isinstance(periods, list)):  # (the types: errors says so)
        raise bad(errors)
    width = PERIODS[period]
    closed = int((now - CLOSE_GRACE) // width) * width
    out: list[tuple[int, dict]] = []
    cells_total = 0
    for i, item in enumerate(periods):
        path = f"$.periods[{i}]"
        if not isinstance(item, dict) or set(item) != {*PERIOD_FIELDS, "cells"}:
            errors.append({"path": path, "message": "must be an object of "
                           f"{', '.join(PERIOD_FIELDS)}, cells"})
            continue
        try:
            start, end = (parse_time(item[n]).timestamp() if isinstance(item[n], str)
                          else math.nan for n in ("start", "end"))
        except ValueError:
            start = end = math.nan
        if not (start % width == 0 and end == start + width and end <= closed):
            errors.append({"path": f"{path}.start",
                           "message": f"must be a closed {period} (start and end)"})
        for name in ("reports", "folded", "suppressed"):
            if not _rounded(item[name]):
                errors.append({"path": f"{path}.{name}",
                               "message": f"must be a multiple of {ROUND_TO}"})
        cells = item["cells"]
        if not isinstance(cells, list):
            errors.append({"path": f"{path}.cells", "message": "must be a list"})
            continue
        cells_total += len(cells)
        if cells_total > MAX_CELLS:
            errors.append({"path": f"{path}.cells", "message": f"more than {MAX_CELLS} cells"})
            break
        for j, cell in enumerate(cells):
            errors.extend(_cell_errors(cell, f"{path}.cells[{j}]"))
        if not errors:
            out.append((int(start), {**{n: item[n] for n in PERIOD_FIELDS}, "k": given_k,
                                     "cells": cells}))
    if errors:
        raise bad(errors)
    return source, period, out
