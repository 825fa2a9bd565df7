"""Client library: build, check, sample, deliver and spool connectivity reports.

A circumvention app embeds this (or calls the ``tt-report`` command) to hand its reports to an
ordered list of collectors: the first that takes a report wins, the others are backups, and a
report that no collector took waits in an on-disk spool until :meth:`Client.flush`.

Delivery outcome by collector answer (see docs/client.md):

- ``200``/``201`` with a JSON object body: delivered.
- ``400``/``413``/``415``: the report's fault. Not sent anywhere else (:class:`ReportRejected`).
- connection error, timeout, ``408``, ``425``, ``429``, ``5xx``: transient. Move on to the next
  collector, then retry the list with exponential backoff and jitter (``Retry-After`` honoured,
  capped).
- anything else (other ``4xx``, ``3xx``, a ``2xx`` that is not JSON such as a captive portal
  page): that collector's fault (wrong URL, auth, misconfiguration). Move on to the next one and
  do not ask it again for this report.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import re
import socket
import threading
import time as _time
import uuid as _uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import requests

from .. import __version__, httpclient
from ..files import write_private
from ..protocol import schema as _schema
from ..protocol.fields import MAX_ASN, Endpoint, canonical_asn, canonical_cc
from ..protocol.fields import parse_endpoint as _collector_parse_endpoint
from ..protocol.fields import parse_time as _collector_parse_time

log = logging.getLogger(__name__)

REPORT_TYPE = "tunnel-telemetry"
USER_AGENT = f"tunnel-telemetry-client/{__version__}"
MAX_ANSWER_BYTES = 1 << 20

# Statuses that are the report's fault: sending it elsewhere would fail the same way.
REJECT_STATUSES = frozenset({400, 413, 415})
# Statuses that mean "not now": try the next collector, then retry later.
TRANSIENT_STATUSES = frozenset({408, 425, 429})

DELIVERED = "delivered"
REJECTED = "rejected"
TRANSIENT = "transient"
COLLECTOR_FAULT = "collector-fault"


# --------------------------------------------------------------------------- errors


class ClientError(Exception):
    """A client failure with a short reason code and the ``tt-report`` exit code it maps to."""

    reason = "client-error"
    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidReport(ClientError, ValueError):
    """The report fails the local checks (schema, endpoint, time): never sent anywhere."""

    reason = "invalid-report"
    exit_code = 2

    def __init__(self, message: str, errors: Sequence[Mapping[str, str]] = ()) -> None:
        super().__init__(message)
        self.errors = [dict(e) for e in errors]

    def __str__(self) -> str:
        if not self.errors:
            return self.message
        details = "; ".join(f"{e['path'] or '/'}: {e['message']}" for e in self.errors[:5])
        more = f" (+{len(self.errors) - 5} more)" if len(self.errors) > 5 else ""
        return f"{self.message}: {details}{more}"


class ReportRejected(ClientError):
    """A collector answered 400/413/415: the report itself is at fault, so it goes nowhere else."""

    reason = "rejected"
    exit_code = 1

    def __init__(self, receipt: Receipt) -> None:
        msg = receipt.answer.get("msg") if isinstance(receipt.answer, dict) else None
        super().__init__(
            f"{receipt.collector} rejected the report ({receipt.status})"
            + (f": {msg}" if msg else "")
        )
        self.receipt = receipt


class NotDelivered(ClientError):
    """No collector took the report (all down, busy or misconfigured); it may be spooled."""

    reason = "not-delivered"
    exit_code = 3

    def __init__(self, attempts: Sequence[Attempt], *, cancelled: bool = False) -> None:
        last = attempts[-1] if attempts else None
        detail = f"; last: {last.collector}: {last.describe()}" if last else ""
        super().__init__(
            f"no collector took the report after {len(attempts)} attempt(s)"
            + (" (cancelled)" if cancelled else "")
            + detail
        )
        self.attempts = tuple(attempts)
        self.cancelled = cancelled
        self.spooled: Path | None = None
        self.spool_error: OSError | None = None
        self.uuid: str | None = None


# --------------------------------------------------------------------------- receipts


@dataclass(frozen=True)
class Attempt:
    """One POST to one collector and how it was classified."""

    collector: str
    outcome: str
    status: int | None = None
    error: str | None = None
    retry_after: float | None = None
    elapsed: float = 0.0

    def describe(self) -> str:
        """One line for humans: the status or error, and the outcome."""
        what = f"HTTP {self.status}" if self.status is not None else (self.error or "error")
        if self.status is not None and self.error:
            what += f" ({self.error})"
        return f"{what} -> {self.outcome}"


@dataclass(frozen=True)
class Receipt:
    """A collector's answer to a report: which collector, the status and its JSON body."""

    collector: str
    status: int
    answer: dict[str, Any]
    attempts: tuple[Attempt, ...] = ()

    @property
    def delivered(self) -> bool:
        return self.status in (200, 201)

    @property
    def uuid(self) -> str | None:
        return self.answer.get("uuid")

    @property
    def ooni_measurement_id(self) -> str | None:
        return self.answer.get("ooni-measurement-id")

    @property
    def ooni_measurement_link(self) -> str | None:
        return self.answer.get("ooni-measurement-link")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (collector, status, answer, uuid, OONI link)."""
        return {
            "collector": self.collector,
            "status": self.status,
            "uuid": self.uuid,
            "ooni-measurement-link": self.ooni_measurement_link,
            "answer": self.answer,
        }


# --------------------------------------------------------------------------- building


def utc_rfc3339(moment: datetime | None = None) -> str:
    """RFC 3339 UTC time with milliseconds and a ``Z`` (naive datetimes are taken as UTC)."""
    moment = moment or datetime.now(UTC)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def failure(op: str, msg: str | None = None, posix_error: str | None = None) -> dict[str, str]:
    """A ``failure`` object: the operation that failed, its message and POSIX error name."""
    out = {"op": op}
    if msg is not None:
        out["msg"] = msg
    if posix_error:
        out["posix_error"] = posix_error
    return out


def build_report(
    endpoint: str,
    *,
    time: datetime | str | None = None,
    duration_ms: int | None = None,
    failure: Mapping[str, str] | None = None,
    config: Mapping[str, str] | None = None,
    client_asn: str | None = None,
    client_cc: str | None = None,
    sampling_rate: float | None = None,
    uuid: str | None = None,
) -> dict[str, Any]:
    """A report dict in the collector's format; ``time`` defaults to now; no failure = success.

    The result is not checked here: :func:`validate_report` (or :meth:`Client.send`) does that.
    """
    report: dict[str, Any] = {
        "report-type": REPORT_TYPE,
        "time": time if isinstance(time, str) else utc_rfc3339(time),
        "endpoint": endpoint,
    }
    if config:
        report["config"] = dict(config)
    if duration_ms is not None:
        report["duration_ms"] = duration_ms
    report["failure"] = dict(failure) if failure else None
    optional = {
        "client_asn": canonical_asn(client_asn) or client_asn,
        "client_cc": canonical_cc(client_cc) or client_cc,
        "sampling_rate": sampling_rate,
        "uuid": uuid,
    }
    report.update({k: v for k, v in optional.items() if v is not None})
    return report


def is_success(report: Mapping[str, Any]) -> bool:
    """A report is a success when its ``failure`` is absent or null."""
    return report.get("failure") is None


# --------------------------------------------------------------------------- checking


def parse_endpoint(endpoint: Any) -> Endpoint:
    """Split ``protocol://address:port`` exactly as the collector does, or raise InvalidReport."""
    if not isinstance(endpoint, str):
        raise InvalidReport("invalid endpoint", [{"path": "$.endpoint", "message": "not a string"}])
    try:
        return _collector_parse_endpoint(endpoint)
    except ValueError as exc:
        hint = str(exc)
        if "user information" in hint:
            hint += " (credentials never belong in a report)"
        raise InvalidReport("invalid endpoint", [{"path": "$.endpoint", "message": hint}]) from None


def load_schema() -> dict[str, Any]:
    """The report JSON Schema the collector enforces (read once, shared with the collector)."""
    return _schema.load_schema()


_PATTERN_HINTS = {
    "time": "an RFC 3339 time with a zone, e.g. 2024-04-12T00:00:00Z",
    "endpoint": "protocol://address:port, e.g. ss://192.0.2.1:443",
    "uuid": "a UUID, e.g. fbf902ee-5d78-43cd-af39-b9b297a0d2f7",
    "client_asn": "AS and a number, e.g. AS64500",
    "client_cc": "an ISO 3166-1 alpha-2 code in upper case, e.g. NO",
}


def _problem(error: jsonschema.ValidationError) -> dict[str, str]:
    """One schema error as the collector words its path, with plain words for patterns."""
    path = error.json_path
    message = error.message
    if error.validator == "required" and message.count("'") >= 2:
        name = message.split("'")[1]
        path += f".{name}" if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) else f"['{name}']"
        message = "is required"
    field_name = error.absolute_path[-1] if error.absolute_path else None
    if error.validator == "pattern" and field_name in _PATTERN_HINTS:
        message = f"{error.instance!r} is not {_PATTERN_HINTS[field_name]}"
    return {"path": path, "message": message}


def validate_report(report: Any) -> None:
    """Check a report as the collector will (schema, endpoint, time); raise :class:`InvalidReport`.

    Uses the collector's own compiled schema validator and parsers. The collector's time window
    (too old / in the future) is its configurable policy and is not checked here.
    """
    if not isinstance(report, Mapping):
        raise InvalidReport("invalid report", [{"path": "$", "message": "must be an object"}])
    errors = sorted(_schema.validator().iter_errors(report), key=lambda e: e.json_path)
    problems = [_problem(e) for e in errors]
    if not problems:
        try:
            parse_endpoint(report["endpoint"])
        except InvalidReport as exc:
            problems.extend(exc.errors)
        try:
            _collector_parse_time(report["time"])
        except ValueError as exc:
            problems.append({"path": "$.time", "message": str(exc)})
        if "client_asn" in report and canonical_asn(report["client_asn"]) is None:
            problems.append({"path": "$.client_asn", "message": f"must be at most AS{MAX_ASN}"})
    if problems:
        raise InvalidReport("invalid report", problems)


# --------------------------------------------------------------------------- sampling


class Sampler:
    """Keep a fraction of successes and a (separate) fraction of failures, like outline-sdk.

    A kept report carries ``sampling_rate`` = the fraction that applied (times any rate the
    report already had), so totals can be re-weighted by ``1 / sampling_rate``.
    """

    def __init__(
        self,
        success_fraction: float = 1.0,
        failure_fraction: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        for name, value in (("success", success_fraction), ("failure", failure_fraction)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} fraction must be in [0, 1], got {value}")
        self.success_fraction = float(success_fraction)
        self.failure_fraction = float(failure_fraction)
        self.rng = rng or random.Random()

    def fraction(self, report: Mapping[str, Any]) -> float:
        """The fraction that applies to this report (success or failure)."""
        return self.success_fraction if is_success(report) else self.failure_fraction

    def sample(self, report: Mapping[str, Any]) -> dict[str, Any] | None:
        """A copy of ``report`` carrying its ``sampling_rate`` when kept, else ``None``."""
        frac = self.fraction(report)
        if frac <= 0.0 or (frac < 1.0 and self.rng.random() >= frac):
            return None
        out = dict(report)
        if frac < 1.0:
            out["sampling_rate"] = float(report.get("sampling_rate", 1.0)) * frac
        return out


# --------------------------------------------------------------------------- spool


def default_spool_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$TT_SPOOL_DIR``, else ``$XDG_STATE_HOME/tunnel-telemetry/spool`` (XDG: ~/.local/state)."""
    env = os.environ if env is None else env
    if env.get("TT_SPOOL_DIR"):
        return Path(env["TT_SPOOL_DIR"]).expanduser()
    state = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state).expanduser() / "tunnel-telemetry" / "spool"


_UUID_FILE = re.compile(r"[0-9a-fA-F-]{36}\.json")


class Spool:
    """A directory of reports waiting for delivery: one ``<uuid>.json`` per report.

    Writes are atomic (temporary file, fsync, ``os.replace``, fsync of the directory), so a
    crash leaves either the old state or the new one, never a torn file. Writing the same uuid
    twice keeps one file, and the collector stores a uuid once, so resending is idempotent.
    Reports the collector refused while flushing are moved to ``rejected/`` for inspection.
    """

    def __init__(self, directory: str | os.PathLike[str], *, max_reports: int = 10_000) -> None:
        self.directory = Path(directory)
        self.max_reports = max_reports

    @property
    def rejected_dir(self) -> Path:
        return self.directory / "rejected"

    def _ensure(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def path_for(self, uuid: str) -> Path:
        return self.directory / f"{uuid}.json"

    def put(self, report: Mapping[str, Any]) -> Path:
        """Write a report (which must have a uuid) atomically; return its file."""
        uid = report.get("uuid")
        if not isinstance(uid, str) or not _UUID_FILE.fullmatch(f"{uid}.json"):
            raise ValueError("a spooled report needs a uuid")
        self._ensure()
        target = self.path_for(uid)
        if not target.exists():
            self._make_room()
        data = json.dumps(report, ensure_ascii=False, sort_keys=True).encode("utf-8")
        write_private(target, data)
        return target

    def _make_room(self) -> None:
        paths = self.paths()
        excess = len(paths) - self.max_reports + 1
        for old in paths[: max(0, excess)]:
            log.warning("spool full (%d reports): dropping the oldest, %s", len(paths), old.name)
            old.unlink(missing_ok=True)

    def paths(self) -> list[Path]:
        """Spooled report files, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            if _UUID_FILE.fullmatch(p.name) and p.is_file():
                with contextlib.suppress(FileNotFoundError):
                    found.append((p.stat().st_mtime_ns, p.name, p))
        return [p for _, _, p in sorted(found)]

    def __len__(self) -> int:
        return len(self.paths())

    def load(self, path: Path) -> dict[str, Any]:
        """Read one spooled report (``ValueError`` when the file is not a JSON object)."""
        report = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(report, dict):
            raise ValueError("not a JSON object")
        return report

    def remove(self, uuid: str) -> None:
        self.path_for(uuid).unlink(missing_ok=True)

    def reject(self, path: Path, reason: str) -> Path:
        """Move a file the collector (or the local check) refused out of the way."""
        self.rejected_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        target = self.rejected_dir / path.name
        os.replace(path, target)
        write_private(target.with_suffix(".reason"), (reason + "\n").encode("utf-8"))
        return target

    def clean_temporary(self, older_than: float = 3600.0) -> int:
        """Remove temporary files left by a crash mid-write; return how many."""
        if not self.directory.is_dir():
            return 0
        removed = 0
        cutoff = _time.time() - older_than
        for p in self.directory.glob(".*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                if p.stat().st_mtime < cutoff:
                    p.unlink()
                    removed += 1
        return removed


# --------------------------------------------------------------------------- delivery


@dataclass(frozen=True)
class RetryPolicy:
    """Bounds for one delivery: rounds over the collector list, backoff between rounds.

    Round ``n`` (from 1) waits ``min(max_backoff, backoff * 2**(n-1))`` less up to ``jitter``
    of it at random (``tunnel_telemetry.httpclient.backoff``), and at least until a collector's
    ``Retry-After`` (capped at ``retry_after_cap``) has passed. No new round starts past
    ``max_elapsed`` seconds.
    """

    attempts: int = 3
    backoff: float = 1.0
    max_backoff: float = 30.0
    jitter: float = 0.5
    max_elapsed: float = 60.0
    retry_after_cap: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("jitter must be in [0, 1]")
        if min(self.backoff, self.max_backoff, self.max_elapsed, self.retry_after_cap) < 0:
            raise ValueError("delays must not be negative")

    def delay(self, round_number: int, rng: random.Random) -> float:
        """Backoff before round ``round_number`` (1 = first retry), jittered."""
        return httpclient.backoff(round_number - 1, self.backoff, self.max_backoff,
                            jitter=self.jitter, rand=rng.random)


parse_retry_after = httpclient.parse_retry_after


def report_url(collector: str) -> str:
    """The URL to POST to: ``<base>/report`` unless the URL already ends with ``/report``."""
    parts = urlsplit(collector)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ClientError(f"collector {collector!r} is not an http(s):// URL")
    if parts.query or parts.fragment:
        raise ClientError(f"collector {collector!r}: no query or fragment allowed")
    path = parts.path.rstrip("/")
    if not path.endswith("/report"):
        path += "/report"
    return f"{parts.scheme}://{parts.netloc}{path}"


def _describe_exception(exc: BaseException) -> str:
    """A short reason for a transport error: an errno name when there is one."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return "connect timeout"
    if isinstance(exc, requests.exceptions.ReadTimeout | TimeoutError):
        return "read timeout"
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        code = e.errno if isinstance(e, OSError) else None
        if isinstance(e, socket.gaierror):
            return "DNS " + (_EAI_NAMES.get(code, "error") if code is not None else "error")
        if code is not None and code in errno.errorcode:
            return errno.errorcode[code]
        todo.extend(a for a in getattr(e, "args", ()) if isinstance(a, BaseException))
        for nxt in (e.__cause__, e.__context__, getattr(e, "reason", None)):
            if isinstance(nxt, BaseException):
                todo.append(nxt)
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS error"
    if isinstance(exc, requests.exceptions.ConnectionError):
        return "connection error"
    return type(exc).__name__


_EAI_NAMES = {getattr(socket, n): n for n in dir(socket) if n.startswith("EAI_")}

Sleep = Callable[[float], object]

_DEFAULT = object()


@dataclass
class FlushResult:
    """What :meth:`Client.flush` did with the spool."""

    delivered: list[Receipt] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)
    remaining: int = 0
    error: NotDelivered | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "delivered": [r.to_dict() for r in self.delivered],
            "rejected": [{"file": f, "reason": why} for f, why in self.rejected],
            "remaining": self.remaining,
        }


class Client:
    """Delivers reports to ``collectors`` in order, with retries, sampling and a spool.

    ``spool``: a :class:`Spool`, a directory, or ``None`` for no spool (default: the per-user
    :func:`default_spool_dir`, shared with ``tt-report flush``). ``sleep(seconds)`` waits between
    rounds and returns true when cancelled (default: an event that :meth:`cancel` sets).
    Not thread-safe: use one client per thread (each holds one ``requests.Session``).
    """

    def __init__(
        self,
        collectors: Sequence[str] | str,
        *,
        spool: Spool | str | os.PathLike[str] | None = _DEFAULT,  # type: ignore[assignment]
        policy: RetryPolicy | None = None,
        sampler: Sampler | None = None,
        timeout: float | tuple[float, float] = (5.0, 10.0),
        session: requests.Session | None = None,
        sleep: Sleep | None = None,
        clock: Callable[[], float] = _time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if isinstance(collectors, str):
            collectors = [c for c in collectors.split(",") if c.strip()]
        self.collectors = [c.strip() for c in collectors]
        self._urls = {c: report_url(c) for c in self.collectors}
        if spool is _DEFAULT:
            spool = default_spool_dir()
        self.spool = spool if isinstance(spool, Spool) or spool is None else Spool(spool)
        self.policy = policy or RetryPolicy()
        self.sampler = sampler
        self.timeout = timeout
        self._own_session = session is None
        self.session = session or httpclient.session()
        if self._own_session:
            self.session.headers["User-Agent"] = USER_AGENT
        self._cancel = threading.Event()
        self._sleep = sleep or self._cancel.wait
        self._clock = clock
        self.rng = rng or random.Random()

    # context manager / lifecycle
    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP session (when the client made it)."""
        if self._own_session:
            self.session.close()

    def cancel(self) -> None:
        """Stop delivering (e.g. at shutdown): the current and later sends end as
        :class:`NotDelivered` before their next attempt, their reports left in the spool."""
        self._cancel.set()

    # public API
    def send(self, report: Mapping[str, Any]) -> Receipt | None:
        """Check, sample, deliver; spool when no collector took it.

        Returns the :class:`Receipt`, or ``None`` when the sampler left the report out. Raises
        :class:`InvalidReport` (bad report, not sent), :class:`ReportRejected` (400/413/415,
        not spooled) or :class:`NotDelivered` (``.spooled`` = its spool file, if any).
        The report is written to the spool before the first attempt and removed once a
        collector answered, so a crash mid-way loses nothing.
        """
        report = self.prepare(report)  # a bad report is an error even if sampled out
        if self.sampler is not None:
            sampled = self.sampler.sample(report)
            if sampled is None:
                log.info("report sampled out (fraction %s)", self.sampler.fraction(report))
                return None
            report = sampled
        if not self.collectors:
            raise ClientError("no collector configured")
        path: Path | None = None
        spool_error: OSError | None = None
        if self.spool is not None:
            try:
                path = self.spool.put(report)
            except OSError as exc:  # a full or read-only disk must not stop delivery
                spool_error = exc
                log.warning("cannot write to the spool %s: %s", self.spool.directory, exc)
        try:
            receipt = self.deliver(report)
        except NotDelivered as exc:
            exc.uuid = report["uuid"]
            exc.spooled = path
            exc.spool_error = spool_error
            if path is not None:
                log.debug("not delivered; spooled as %s", path)
            raise
        except ReportRejected:
            if path is not None:
                path.unlink(missing_ok=True)  # resending cannot help
            raise
        if path is not None:
            path.unlink(missing_ok=True)
        return receipt

    def prepare(self, report: Mapping[str, Any]) -> dict[str, Any]:
        """A checked copy of the report with a uuid (so every resend is the same report)."""
        out = dict(report)
        if not out.get("uuid"):
            out["uuid"] = str(_uuid.uuid4())
        for key, canonical in (("client_asn", canonical_asn), ("client_cc", canonical_cc)):
            if canonical(out.get(key)) is not None:  # AS03215 -> AS3215, it -> IT
                out[key] = canonical(out[key])
        validate_report(out)
        return out

    def deliver(self, report: Mapping[str, Any]) -> Receipt:
        """Deliver one (already checked) report: no sampling, no spool. See module docs."""
        if not self.collectors:
            raise ClientError("no collector configured")
        body = json.dumps(report, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        start = self._clock()
        attempts: list[Attempt] = []
        eligible = list(self.collectors)
        not_before: dict[str, float] = {}
        waited_until = start  # a sleep may return early or not move the clock (tests)
        for rnd in range(self.policy.attempts):
            if rnd:
                delay = self.policy.delay(rnd, self.rng)
                ready = min(not_before.get(c, 0.0) for c in eligible) - self._clock()
                delay = max(delay, ready)
                if self._clock() - start + delay > self.policy.max_elapsed:
                    log.info("giving up: next round would pass %.0fs", self.policy.max_elapsed)
                    break
                log.info("retrying in %.1fs (round %d of %d)", delay, rnd + 1, self.policy.attempts)
                before = self._clock()
                if self._sleep(delay) or self._cancel.is_set():
                    raise NotDelivered(attempts, cancelled=True)
                waited_until = before + delay
            for collector in list(eligible):
                if self._cancel.is_set():
                    raise NotDelivered(attempts, cancelled=True)
                if not_before.get(collector, 0.0) > max(self._clock(), waited_until) + 0.001:
                    continue  # still inside its Retry-After
                if rnd and self._clock() - start > self.policy.max_elapsed:
                    break
                att, answer = self._post(collector, body)
                attempts.append(att)
                if att.outcome == DELIVERED:
                    log.info("%s: delivered (%d)", collector, att.status)
                    return Receipt(collector, att.status or 0, answer, tuple(attempts))
                if att.outcome == REJECTED:
                    receipt = Receipt(collector, att.status or 0, answer, tuple(attempts))
                    raise ReportRejected(receipt)
                log.warning("%s: %s", collector, att.describe())
                if att.outcome == COLLECTOR_FAULT:
                    eligible.remove(collector)
                elif att.retry_after is not None:
                    not_before[collector] = self._clock() + att.retry_after
            if not eligible:
                break
        raise NotDelivered(attempts)

    def flush(self) -> FlushResult:
        """Deliver spooled reports, oldest first; remove delivered ones, set aside refused ones.

        Stops at the first report no collector took (they are all down: the rest would fail
        too); those stay spooled for the next flush.
        """
        result = FlushResult()
        if self.spool is None:
            return result
        self.spool.clean_temporary()
        paths = self.spool.paths()
        for i, path in enumerate(paths):
            try:
                report = self.spool.load(path)
                report = self.prepare(report)
            except (ValueError, OSError) as exc:
                if isinstance(exc, FileNotFoundError):
                    continue  # another flush took it
                reason = str(exc) if isinstance(exc, InvalidReport) else f"unreadable: {exc}"
                log.warning("%s: %s; moved to %s", path.name, reason, self.spool.rejected_dir)
                self.spool.reject(path, reason)
                result.rejected.append((path.name, reason))
                continue
            try:
                receipt = self.deliver(report)
            except ReportRejected as exc:
                self.spool.reject(path, str(exc))
                result.rejected.append((path.name, str(exc)))
                continue
            except NotDelivered as exc:
                result.error = exc
                result.remaining = len(paths) - i
                return result
            path.unlink(missing_ok=True)
            result.delivered.append(receipt)
        return result

    # internals
    def _post(self, collector: str, body: bytes) -> tuple[Attempt, dict[str, Any]]:
        url = self._urls[collector]
        t0 = self._clock()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        try:
            with self.session.post(
                url,
                data=body,
                headers=headers,
                timeout=self.timeout,
                allow_redirects=False,
                stream=True,
            ) as resp:
                raw = resp.raw.read(MAX_ANSWER_BYTES + 1, decode_content=True)
                status = resp.status_code
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                ctype = resp.headers.get("Content-Type", "")
        except (requests.RequestException, OSError) as exc:
            reason = _describe_exception(exc)
            return Attempt(collector, TRANSIENT, None, reason, None, self._clock() - t0), {}
        elapsed = self._clock() - t0
        answer: Any = None
        if len(raw) <= MAX_ANSWER_BYTES and "json" in ctype.lower():
            try:
                answer = json.loads(raw)
            except ValueError:
                answer = None
        outcome, error = self._classify(status, answer, ctype)
        if retry_after is not None:
            retry_after = min(retry_after, self.policy.retry_after_cap)
        if outcome != TRANSIENT:
            retry_after = None
        answer = answer if isinstance(answer, dict) else {}
        if error is None and answer.get("msg") and outcome != DELIVERED:
            error = str(answer["msg"])[:200]
        return Attempt(collector, outcome, status, error, retry_after, elapsed), answer

    @staticmethod
    def _classify(status: int, answer: Any, ctype: str) -> tuple[str, str | None]:
        if status in (200, 201):
            if isinstance(answer, dict):
                return DELIVERED, None
            return COLLECTOR_FAULT, f"answer is not a JSON object ({ctype or 'no type'})"
        if status in REJECT_STATUSES:
            return REJECTED, None
        if status in TRANSIENT_STATUSES or 500 <= status <= 599:
            return TRANSIENT, None
        return COLLECTOR_FAULT, None


def send_report(
    report: Mapping[str, Any], collectors: Sequence[str] | str, **options: Any
) -> Receipt | None:
    """One-shot :meth:`Client.send` with a client made (and closed) for the call."""
    with Client(collectors, **options) as client:
        return client.send(report)
