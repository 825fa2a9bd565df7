"""Prometheus metrics (tt_*), counted in every gunicorn worker and served by one of them.

Off unless ``metrics-listen`` is set: then every function here is a no-op and
prometheus_client is never imported. When on, ``setup`` (in the master, before gunicorn forks)
makes a fresh private directory for prometheus_client's multiprocess mode, so each worker
writes its counts to its own files there and a scrape adds them up; the master's
``child_exit`` hook marks a dead worker's files. Labels are fixed, short codes: reason codes,
public destination labels (``ooni``, ``collector-1``), route rules. Never an address, a host
name, an ASN or free text.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger(__name__)

ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0)
_CODE = re.compile(r"[a-z][a-z0-9_-]{0,39}")
RELAY_STATES = frozenset(("delivered", "pending", "failed", "skipped", "expired"))


class _Metrics:
    """The metric objects (built once, after the multiprocess directory is set)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram  # noqa: PLC0415 - only when on

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
            return Counter(name, doc, labels, registry=None)

        self.accepted = counter("tt_reports_accepted_total",
                                "Reports stored (new uuids), by how they came: report (POST "
                                "/report) or relay (POST /relay from a primary).", ("source",))
        self.duplicates = counter("tt_reports_duplicate_total",
                                  "Reports whose uuid was stored already (answered, not stored "
                                  "again).")
        self.rejected = counter("tt_reports_rejected_total",
                                "Requests refused, by reason code (schema, time_old, too_large, "
                                "rate_limited, busy, store_error, relayed_invalid ...).",
                                ("reason",))
        self.scrubbed = counter("tt_scrubbed_fields_total",
                                "Fields removed or rewritten before storing, by kind: endpoint "
                                "(the address), config (a config entry dropped), failure (an "
                                "address or host name replaced in a failure text).", ("kind",))
        self.relay_attempts = counter("tt_relay_attempts_total",
                                      "Relay outcomes recorded, per destination.",
                                      ("destination",))
        self.relay_outcomes = counter("tt_relay_outcomes_total",
                                      "Relay outcomes per destination and outcome (delivered, "
                                      "pending = will retry, failed, skipped, expired).",
                                      ("destination", "outcome"))
        self.purged = counter("tt_reports_purged_total",
                              "Reports deleted by the retention purge.")
        self.store_commit = Histogram("tt_store_commit_seconds",
                                      "Time from handing a report to the store until its "
                                      "commit is durable (group commit wait included).",
                                      buckets=LATENCY_BUCKETS, registry=None)
        self.request = Histogram("tt_request_duration_seconds",
                                 "Time to answer a request, by route (the URL rule, not the "
                                 "path) and method.", ("route", "method"),
                                 buckets=LATENCY_BUCKETS, registry=None)


_metrics: _Metrics | None = None
_labels: dict[str, str] = {}
_directory: str | None = None


def enabled() -> bool:
    """Whether metrics are being counted in this process."""
    return _metrics is not None


def setup(listen: str | None, directory: str) -> None:
    """Turn metrics on (``listen`` set) before the workers fork; no-op when unset.

    ``directory``: a fresh private directory (prometheus_client's multiprocess files); it
    must exist and be empty. Checks that ``listen`` can be bound (one clear line if not).
    """
    global _metrics, _directory
    if listen is None:
        _metrics = None
        return
    check_listen(listen)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.environ[ENV] = directory
    _directory = directory
    import prometheus_client.values as values  # noqa: PLC0415 - after ENV is set

    if not isinstance(values.ValueClass, type) or values.ValueClass.__name__ != "MmapedValue":
        values.ValueClass = values.get_value_class()  # imported before ENV was set
    _metrics = _Metrics()


def set_destinations(destinations: Iterable[str]) -> None:
    """Public labels for the relay's destinations: ``ooni``, ``collector-1`` ... by position."""
    _labels.clear()
    _labels.update(public_labels(destinations))


def public_labels(destinations: Iterable[str]) -> dict[str, str]:
    """The destinations' public names: OONI as ``ooni``, secondaries by position, no URL."""
    out: dict[str, str] = {}
    for dest in destinations:
        out[dest] = "ooni" if dest == "ooni" else f"collector-{sum(d != 'ooni' for d in out) + 1}"
    return out


def code(text: Any) -> str:
    """A reason code fit for a label; anything else (never expected) is ``other``."""
    return text if isinstance(text, str) and _CODE.fullmatch(text) else "other"


# -- the one-line calls of the places that count -------------------------------------------

def accepted(created: bool, source: str = "report") -> None:
    """A report stored (``created``) or answered as a duplicate."""
    if _metrics is not None:
        (_metrics.accepted.labels(source) if created else _metrics.duplicates).inc()


def relayed(answer: Mapping[str, Any]) -> None:
    """The answer of POST /relay: new reports stored, items refused."""
    if _metrics is not None:
        if answer.get("created"):
            _metrics.accepted.labels("relay").inc(answer["created"])
        if answer.get("stored") and len(answer["stored"]) > answer.get("created", 0):
            _metrics.duplicates.inc(len(answer["stored"]) - answer.get("created", 0))
        if answer.get("rejected"):
            _metrics.rejected.labels("relayed_invalid").inc(len(answer["rejected"]))


def rejected(reason: str) -> None:
    """A request refused with a reason code (web/errors.py)."""
    if _metrics is not None:
        _metrics.rejected.labels(code(reason)).inc()


def scrubbed(before: Mapping[str, Any], after: Mapping[str, Any]) -> None:
    """What scrubbing changed between the enriched report and the one stored, by kind."""
    if _metrics is None:
        return
    if "endpoint_addr" in before and "endpoint_addr" not in after:
        _metrics.scrubbed.labels("endpoint").inc()
    dropped = len(before.get("config") or {}) - len(after.get("config") or {})
    if dropped > 0:
        _metrics.scrubbed.labels("config").inc(dropped)
    failure, clean = before.get("failure") or {}, after.get("failure") or {}
    changed = sum(1 for key, value in failure.items() if clean.get(key) != value)
    if changed:
        _metrics.scrubbed.labels("failure").inc(changed)


def relay_outcome(destination: str, state: str) -> None:
    """One relay outcome recorded for a destination (relay/relay.py)."""
    if _metrics is not None:
        label = _labels.get(destination, "collector-unconfigured")
        _metrics.relay_attempts.labels(label).inc()
        _metrics.relay_outcomes.labels(label, state if state in RELAY_STATES else "other").inc()


def purged(count: int) -> None:
    if _metrics is not None and count:
        _metrics.purged.inc(count)


@contextmanager
def store_commit() -> Any:
    """Time a store write until it is committed."""
    if _metrics is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        _metrics.store_commit.observe(time.perf_counter() - start)


def init_app(app: Any) -> None:
    """Time every request of a Flask app by route rule (404s: ``unmatched``)."""
    if _metrics is None:
        return
    from flask import g, request  # noqa: PLC0415 - only the web face calls this

    histogram = _metrics.request

    @app.before_request
    def _started() -> None:
        g.tt_started = time.perf_counter()

    @app.after_request
    def _finished(response: Any) -> Any:
        started = g.get("tt_started")
        if started is not None:
            rule = request.url_rule
            method = request.method if request.method in _METHODS else "other"
            histogram.labels(rule.rule if rule is not None else "unmatched",
                             method).observe(time.perf_counter() - started)
        return response


_METHODS = frozenset(("GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"))


# -- gunicorn's master ---------------------------------------------------------------------

def child_exit(server: Any, worker: Any) -> None:
    """Gunicorn hook (master): a worker is gone; its live gauges go with it."""
    if _directory is not None:
        from prometheus_client import multiprocess  # noqa: PLC0415

        multiprocess.mark_process_dead(worker.pid, _directory)


# -- serving and reading -------------------------------------------------------------------

def check_listen(listen: str) -> None:
    """Bind ``listen`` once, so a bad or busy address fails at start-up with one line."""
    from .config import ConfigError, split_listen  # noqa: PLC0415

    host, port = split_listen(listen, "metrics-listen")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        raise ConfigError(f"metrics-listen: cannot listen on {listen}: "
                          f"{exc.strerror or exc}") from None


def registry(extra: Callable[[], Iterable[Any]] | None = None) -> Any:
    """A registry adding up every worker's files, plus ``extra`` (values read at scrape time:
    backlog, geo age, retention)."""
    from prometheus_client import CollectorRegistry, multiprocess  # noqa: PLC0415

    reg = CollectorRegistry()
    multiprocess.MultiProcessCollector(reg, _directory)
    if extra is not None:
        reg.register(_Live(extra))
    return reg


class _Live:
    """A collector whose metric families a function builds at scrape time."""

    def __init__(self, build: Callable[[], Iterable[Any]]) -> None:
        self.build = build

    def collect(self) -> Iterable[Any]:
        try:
            return list(self.build())
        except Exception as exc:  # noqa: BLE001 - a scrape must still get the counters
            log.warning("metrics: live values failed: %s", type(exc).__name__)
            return []


def live_families(store: Any, geo: Any, retention: Any = None) -> list[Any]:
    """The values read when scraped: relay backlog per destination, geo database age,
    the retention purge's last run."""
    from prometheus_client.core import GaugeMetricFamily  # noqa: PLC0415

    pending = GaugeMetricFamily("tt_relay_backlog", "Reports waiting to be relayed, per "
                                "destination.", labels=("destination",))
    oldest = GaugeMetricFamily("tt_relay_backlog_oldest_seconds", "Age of the oldest report "
                               "waiting to be relayed, per destination.",
                               labels=("destination",))
    for label, row in backlog(store).items():
        pending.add_metric((label,), row["pending"])
        oldest.add_metric((label,), row["oldest_age_s"])
    families = [pending, oldest]
    age = GaugeMetricFamily("tt_geo_database_age_seconds", "Time since the geo database was "
                            "built (its build date), per role.", labels=("role",))
    now = datetime.now(UTC)
    for info in geo.info():
        if info.get("build_date"):
            built = datetime.fromisoformat(info["build_date"]).replace(tzinfo=UTC)
            age.add_metric((code(info["role"].replace("+", "_")),),
                           (now - built).total_seconds())
    families.append(age)
    if retention is not None:
        state = retention.state()
        last = GaugeMetricFamily("tt_retention_last_purge_timestamp_seconds",
                                 "When the retention purge last finished (Unix time; 0: not "
                                 "yet).")
        last.add_metric((), state["last_run"] or 0)
        families.append(last)
    return families


def backlog(store: Any) -> dict[str, dict[str, Any]]:
    """The store's relay backlog under public destination labels (configured ones at 0)."""
    out: dict[str, dict[str, Any]] = {
        label: {"pending": 0, "oldest_age_s": 0.0} for label in _labels.values()}
    for dest, row in store.backlog().items():
        out[_labels.get(dest, "collector-unconfigured")] = row
    return out


def serve(listen: str, extra: Callable[[], Iterable[Any]] | None = None) -> Any:
    """Serve the metrics on ``listen`` in a daemon thread; returns the server (``shutdown``)."""
    from prometheus_client import start_http_server  # noqa: PLC0415

    from .config import split_listen  # noqa: PLC0415

    host, port = split_listen(listen, "metrics-listen")
    server, _ = start_http_server(port, host, registry(extra))
    return server


def totals() -> dict[str, dict[str, float]]:
    """Current totals across every worker: ``{metric name: {label value(s): value}}``.

    For pages and dashboards in this collector (e.g. rejections by reason): counters only,
    summed over processes; labels joined by ``,``. Empty when metrics are off.
    """
    if _metrics is None:
        return {}
    out: dict[str, dict[str, float]] = {}
    for family in registry().collect():
        if family.type != "counter":
            continue
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            key = ",".join(sample.labels[name] for name in sorted(sample.labels))
            out.setdefault(sample.name, {})
            out[sample.name][key] = out[sample.name].get(key, 0.0) + sample.value
    return out
