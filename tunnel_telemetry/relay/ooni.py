"""OONI collector client: turns a stored, scrubbed report into an OONI measurement.

Speaks OONI's report protocol (open ``POST /report``, submit ``POST /report/{id}``, close
``POST /report/{id}/close``) over keep-alive connections (``RelayHTTP``).  An open report is
reused for every measurement with the same (probe_cc, probe_asn, UTC day, test version), so a
report normally costs one round trip; reports are closed when the day rolls over and at
shutdown (``close_stale()`` / ``close()``).  The measurement follows OONI's base data
format (df-000).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from .. import __version__
from ..protocol.fields import UNKNOWN_ASN, UNKNOWN_CC, canonical_asn, canonical_cc
from .http import (
    HTTP_ERRORS,
    Deadline,
    RelayHTTP,
    classify_exception,
    classify_response,
    json_body,
    response_json,
    sent_without_answer,
)
from .outcome import Outcome, one_line

log = logging.getLogger(__name__)

TEST_NAME = "tunneltelemetry"
TEST_VERSION = "0.1.0"
SOFTWARE_NAME = "tunnel-telemetry"
DATA_FORMAT_VERSION = "0.2.0"
EXPLORER = "https://explorer.ooni.org/m/"
OONI_TIME = "%Y-%m-%d %H:%M:%S"
API_TIME = "%Y-%m-%dT%H:%M:%S"  # the measurements API's since / until
CONFIRM_LIMIT = 100  # measurements of one report id within the report's second

# What an OONI measurement may carry of a stored report (allow-list: fail closed).
TEST_KEYS = (
    "uuid", "time", "t_received", "collector_id", "proto", "endpoint_port", "endpoint_asn",
    "endpoint_cc", "client_asn", "client_cc", "config", "duration_ms", "failure",
    "sampling_rate",
)
ENDPOINT_KEYS = ("endpoint", "endpoint_addr")
_FRACTION = re.compile(r"(\.\d{6})\d+")


def explorer_link(measurement_uid: str) -> str:
    """The OONI Explorer page of a measurement."""
    return EXPLORER + measurement_uid


def ooni_time(value: datetime | float) -> str:
    """A time as OONI writes it: ``YYYY-MM-DD HH:MM:SS`` in UTC."""
    if not isinstance(value, datetime):
        value = datetime.fromtimestamp(value, UTC)
    return value.astimezone(UTC).strftime(OONI_TIME)


def parse_rfc3339(value: str) -> datetime:
    """Parse a report's RFC 3339 ``time`` (any case, any fraction length)."""
    text = _FRACTION.sub(r"\1", value.strip().upper().replace(" ", "T"))
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        raise ValueError("time without offset")
    return dt


def probe_location(report: Mapping[str, Any]) -> tuple[str, str]:
    """(probe_asn, probe_cc) of a report: the client's, AS0 / ZZ when unknown or malformed."""
    # Canonical here too: reports stored before ASNs were canonical on entry (AS03215) would
    # open a report id with 3215 and be refused as inconsistent; AS00 would be sent as unknown.
    return (canonical_asn(report.get("client_asn")) or UNKNOWN_ASN,
            canonical_cc(report.get("client_cc")) or UNKNOWN_CC)


def test_keys(report: Mapping[str, Any], *, allow_public_endpoint: bool) -> dict[str, Any]:
    """The scrubbed report as the measurement's ``test_keys`` (endpoint address only when
    the report has it and the collector currently allows it)."""
    keys = TEST_KEYS + (ENDPOINT_KEYS if allow_public_endpoint else ())
    return {k: report[k] for k in keys if k in report}


@dataclass(frozen=True)
class OpenReport:
    """A report id OONI handed out, with what the submissions must repeat."""

    report_id: str
    test_start_time: str
    day: str
    key: tuple[str, str, str, str]


class _ReportGone(Exception):
    """OONI no longer knows the report id (404 / 410 on submission)."""


class OONIClient:
    """Relays reports to one OONI collector; thread-safe, one per process."""

    def __init__(
        self,
        base_url: str,
        *,
        collector_id: str | None = None,
        allow_public_endpoint: bool = False,
        timeout: float = 30.0,
        software_name: str = SOFTWARE_NAME,
        software_version: str = __version__,
        test_version: str = TEST_VERSION,
        http: RelayHTTP | None = None,
        pool_size: int = 10,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``http``: the connections to use (default: new ones, ``pool_size`` kept alive)."""
        self.base_url = base_url.rstrip("/")
        self.collector_id = collector_id
        self.allow_public_endpoint = allow_public_endpoint
        self.timeout = timeout
        self.software_name = software_name
        self.software_version = software_version
        self.test_version = test_version
        self.http = http or RelayHTTP(
            self.base_url, pool_size, {"User-Agent": f"{software_name}/{software_version}"})
        self.clock = clock
        self._lock = threading.Lock()
        self._reports: dict[tuple[str, str, str, str], OpenReport] = {}
        self._key_locks: dict[tuple[str, str, str, str], threading.Lock] = {}
        self._stale: list[OpenReport] = []

    # -- public ---------------------------------------------------------------------------

    def send(self, report: Mapping[str, Any], *, timeout: float | None = None) -> Outcome:
        """Submit one stored report; ``timeout`` bounds the whole attempt (seconds).

        Never raises for network or protocol trouble: the Outcome says what happened.
        Delivered outcomes carry ``measurement_uid`` and ``report_id`` in ``result``.
        """
        asn, cc = probe_location(report)
        if asn == "AS0" or cc == "ZZ":
            return Outcome.skipped("client-location-unknown")
        deadline = Deadline(timeout, self.timeout)
        try:
            content_base = self._content_base(report, asn, cc)
        except (KeyError, TypeError, ValueError):
            return Outcome.failed("bad-report", "stored report lacks a valid time")
        try:
            for reopened in (False, True):  # a report id OONI no longer knows: reopen once
                rep = self._report_for(asn, cc, deadline)
                if isinstance(rep, Outcome):
                    return rep
                try:
                    return self._submit(rep, content_base, deadline)
                except _ReportGone:
                    self._forget(rep)
                    if not reopened:
                        log.info("ooni: report id no longer known, reopening once")
            return Outcome.failed("report-unknown", "OONI rejected a fresh report id")
        except HTTP_ERRORS as e:
            return classify_exception(e)

    def confirm(self, report: Mapping[str, Any], report_id: str, *,
                timeout: float | None = None) -> Outcome | None:
        """Look for ``report`` in OONI's measurements API (submitted under ``report_id`` and
        perhaps kept): delivered with its id when it is there, None when it is not (send it
        again), a retry when the API cannot tell now.

        Searches the report id's measurements started within a second of the report's time,
        then reads each candidate's raw measurement for the report's uuid.
        """
        deadline = Deadline(timeout, self.timeout)
        try:
            start = parse_rfc3339(report["time"]).astimezone(UTC)
        except (KeyError, TypeError, ValueError):
            return None
        window = {"report_id": report_id, "test_name": TEST_NAME, "limit": str(CONFIRM_LIMIT),
                  "since": (start - timedelta(seconds=1)).strftime(API_TIME),
                  "until": (start + timedelta(seconds=2)).strftime(API_TIME)}
        try:
            resp = self.http.get("/api/v1/measurements", window, deadline.timeout())
            bad = classify_response(resp)
            if bad is not None:
                return _stage(bad, "confirm")
            results = response_json(resp).get("results")
            if not isinstance(results, list):
                return Outcome.retry("bad-answer", "confirm: no results list")
            for item in results:
                uid = item.get("measurement_uid") if isinstance(item, dict) else None
                if not isinstance(uid, str) or not uid:
                    continue
                resp = self.http.get("/api/v1/raw_measurement", {"measurement_uid": uid},
                                     deadline.timeout())
                if classify_response(resp) is not None:
                    continue
                raw = response_json(resp)
                annotations = raw.get("annotations") if isinstance(raw, dict) else None
                if isinstance(annotations, dict) and annotations.get(
                        "report_uuid") == str(report.get("uuid")):
                    return Outcome.delivered(measurement_uid=one_line(uid, 256),
                                             report_id=report_id, confirmed=True)
        except HTTP_ERRORS as e:
            return _stage(classify_exception(e), "confirm")
        except (ValueError, AttributeError):
            return Outcome.retry("bad-answer", "confirm: the answer is not JSON")
        return None

    def open_reports(self) -> list[OpenReport]:
        """Reports currently open (for health output and tests)."""
        with self._lock:
            return list(self._reports.values())

    def close_stale(self, timeout: float = 2.0, budget: float = 10.0) -> int:
        """Close reports of past days (the day rolled over); returns how many were closed."""
        with self._lock:
            stale, self._stale = self._stale, []
        return self._close_all(stale, timeout, budget)

    def close(self, timeout: float = 2.0, budget: float = 5.0) -> None:
        """Close every open report (best effort, within ``budget`` s) and the connections."""
        with self._lock:
            reports = self._stale + list(self._reports.values())
            self._stale, self._reports = [], {}
        self._close_all(reports, timeout, budget)
        self.http.close()

    def _close_all(self, reports: list[OpenReport], timeout: float, budget: float) -> int:
        end = time.monotonic() + budget
        done = 0
        for rep in reports:
            left = end - time.monotonic()
            if left <= 0:
                log.info("ooni: %d reports left open (no time to close them)", len(reports) - done)
                break
            self._close_report(rep, min(timeout, left))
            done += 1
        return done

    # -- protocol -------------------------------------------------------------------------

    def _content_base(self, report: Mapping[str, Any], asn: str, cc: str) -> dict[str, Any]:
        start = parse_rfc3339(report["time"])
        runtime = report.get("duration_ms")
        annotations = {"report_uuid": str(report.get("uuid", ""))}
        cid = report.get("collector_id") or self.collector_id
        if cid:
            annotations["collector_id"] = str(cid)
        return {
            "annotations": annotations,
            "data_format_version": DATA_FORMAT_VERSION,
            "input": None,
            "measurement_start_time": ooni_time(start),
            "probe_asn": asn,
            "probe_cc": cc,
            "probe_ip": "127.0.0.1",
            "software_name": self.software_name,
            "software_version": self.software_version,
            "test_keys": test_keys(report, allow_public_endpoint=self.allow_public_endpoint),
            "test_name": TEST_NAME,
            "test_runtime": round(runtime / 1000, 3) if isinstance(runtime, int) else 0.0,
            "test_version": self.test_version,
        }

    def _report_for(self, asn: str, cc: str, deadline: Deadline) -> OpenReport | Outcome:
        now = self.clock()
        day = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")
        key = (cc, asn, day, self.test_version)
        with self._lock:
            rep = self._reports.get(key)
            if rep is not None:
                return rep
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # one open per key even when several threads need it at once
            with self._lock:
                rep = self._reports.get(key)
            if rep is not None:
                return rep
            rep_or_outcome = self._open(key, now, deadline)
            if isinstance(rep_or_outcome, Outcome):
                return rep_or_outcome
            with self._lock:
                self._reports[key] = rep_or_outcome
                for r in [r for k, r in self._reports.items() if k[2] != day]:
                    # The day rolled over: yesterday's report is closed by close_stale().
                    del self._reports[r.key]
                    self._key_locks.pop(r.key, None)
                    self._stale.append(r)
        return rep_or_outcome

    def _open(self, key: tuple[str, str, str, str], now: float,
              deadline: Deadline) -> OpenReport | Outcome:
        cc, asn, day, test_version = key
        start = ooni_time(now)
        body = {
            "data_format_version": DATA_FORMAT_VERSION,
            "format": "json",
            "probe_asn": asn,
            "probe_cc": cc,
            "software_name": self.software_name,
            "software_version": self.software_version,
            "test_name": TEST_NAME,
            "test_start_time": start,
            "test_version": test_version,
        }
        resp = self.http.post("/report", json_body(body), deadline.timeout())
        bad = classify_response(resp)
        if bad is not None:
            return _stage(bad, "open")
        try:
            rid = response_json(resp).get("report_id")
        except (ValueError, AttributeError):
            rid = None
        if not isinstance(rid, str) or not rid or "/" in rid:
            return Outcome.retry("bad-answer", "open: no report_id")
        log.info("ooni: opened a report for %s %s", cc, asn)
        return OpenReport(rid, start, day, key)

    def _submit(self, rep: OpenReport, base: dict[str, Any], deadline: Deadline) -> Outcome:
        content = dict(base, report_id=rep.report_id, test_start_time=rep.test_start_time)
        body = json_body({"format": "json", "content": content})
        try:
            resp = self.http.post(f"/report/{rep.report_id}", body, deadline.timeout())
        except HTTP_ERRORS as e:
            if sent_without_answer(e):  # OONI may have it: confirm before sending it again
                return Outcome.maybe_delivered("timeout", "submit: no answer in time",
                                               report_id=rep.report_id)
            raise
        if resp.status_code in (404, 410):
            raise _ReportGone()
        bad = classify_response(resp)
        if bad is not None:
            return _stage(bad, "submit")
        try:
            answer = response_json(resp)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            # Not OONI (a captive portal, a proxy's error page): the destination is in trouble,
            # not this report, so back off from it instead of trying every report in turn.
            return Outcome.retry("bad-answer", "submit: the answer is not a JSON object")
        uid = answer.get("measurement_uid")
        if not isinstance(uid, str) or not uid:
            # OONI answers {} when its fastpath is down and it kept the measurement in its
            # fallback store (re-uploaded later), and also when even that failed: confirm later.
            return Outcome.maybe_delivered("accepted-without-id",
                                           "OONI answered without measurement_uid",
                                           report_id=rep.report_id)
        return Outcome.delivered(measurement_uid=one_line(uid, 256), report_id=rep.report_id)

    def _forget(self, rep: OpenReport) -> None:
        with self._lock:
            if self._reports.get(rep.key) == rep:
                del self._reports[rep.key]

    def _close_report(self, rep: OpenReport, timeout: float) -> None:
        try:
            self.http.post(f"/report/{rep.report_id}/close", None, (timeout, timeout))
        except HTTP_ERRORS as e:
            log.info("ooni: closing a report failed (%s)", classify_exception(e).reason)


def _stage(outcome: Outcome, stage: str) -> Outcome:
    detail = f"{stage}: {outcome.detail}" if outcome.detail else stage
    return Outcome(outcome.state, outcome.reason, detail, outcome.result, outcome.retry_after)
