"""Relay step: deliver stored, scrubbed reports to secondary collectors, durably.

Destinations are ``ooni`` (OONI's collector) and ``collector:<base url>`` per ``relay-url``
(another tunnel-telemetry collector's ``POST /relay``).  The store keeps one relay row per
report and destination; that row is the durable queue:

* ``POST /report`` stores the report with its rows already leased to this process, tries every
  destination at once in a small thread pool and waits at most ``relay-timeout`` for the
  answers (an attempt still running goes on in the background and records its outcome);
* a retry loop in every worker claims due rows with a lease (so two workers never send the
  same report), sends a claimed OONI batch ``relay-concurrency`` reports at a time (oldest
  first, each outcome recorded as it comes), retries with exponential backoff and jitter, and
  gives up after ``relay-max-age`` (expired);
* ``tt-server relay --once`` tries every pending report now, whatever its backoff.

Delivery is at least once: a report is sent again only when a process died (or its attempt
outlived its lease) between the secondary's answer and the local commit.  Every relayed
report carries its uuid so secondaries can deduplicate.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hmac
import logging
import math
import os
import random
import secrets
import socket
import threading
import time
import uuid as uuidlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .. import __version__, green
from ..errors import ReportError
from ..pipeline.scrub import scrub
from ..protocol.fields import parse_time
from ..protocol.schema import schema_errors
from .delivery import (
    DELIVERED,
    EXPIRED,
    FAILED,
    HTTP_ERRORS,
    PENDING,
    SKIPPED,
    Deadline,
    Outcome,
    RelayHTTP,
    classify_exception,
    classify_response,
    json_body,
    one_line,
    response_detail,
    response_json,
)
from .ooni import OONIClient, explorer_link, probe_location

log = logging.getLogger(__name__)

OONI = "ooni"
COLLECTOR = "collector:"
RELAYED_SCHEMA = "relayed-report.schema.json"
MAX_BATCH = 100  # reports per POST /relay, both directions
SYNC_LEASE_MARGIN = 30.0  # lease of a fresh report beyond relay-attempt-timeout
SYNC_START_WINDOW = 5.0  # an attempt for a fresh report must start this soon
LOOP_LEASE_MARGIN = 30.0  # lease of a claimed batch beyond its worst-case sending time
LOOP_RECORD_MARGIN = 10.0  # last attempt of a batch ends this long before its lease does
ROUNDS_PER_BATCH = 4  # a concurrent sender claims this many times its concurrency at once
# First attempts in the request: relay-concurrency pool greenlets (threads outside a gevent
# worker) per destination, and up to INFLIGHT_PER_THREAD attempts per pool thread queued or
# running (those outliving relay-timeout go on in the background); beyond that a fresh
# report is left to the retry loop.
INFLIGHT_PER_THREAD = 4
MAX_POOL_THREADS = 256

# What a collector forwards to another collector (allow-list: fail closed).
RELAYED_KEYS = (
    "report-type", "uuid", "time", "t_received", "collector_id", "proto", "endpoint_port",
    "endpoint_asn", "endpoint_cc", "client_asn", "client_cc", "config", "duration_ms",
    "failure", "sampling_rate", "ooni-measurement-id", "ooni-measurement-link",
)
ENDPOINT_KEYS = ("endpoint", "endpoint_addr")
# Retryable failures that say the destination, not the report, is in trouble.
DESTINATION_REASONS = frozenset({
    "timeout", "connection-error", "rate-limited", "request-error", "bad-answer", "unauthorized",
})


def is_destination_failure(outcome: Outcome) -> bool:
    """True when further reports to the same destination would fail the same way now."""
    return outcome.retryable and (outcome.reason in DESTINATION_REASONS
                                  or outcome.reason.startswith("http-5"))


def relayable(report: Mapping[str, Any], allow_public_endpoint: bool) -> dict[str, Any]:
    """The stored report as sent to another collector (endpoint address only when allowed)."""
    keys = RELAYED_KEYS + (ENDPOINT_KEYS if allow_public_endpoint else ())
    return {k: report[k] for k in keys if k in report}


def backoff(attempts: int, minimum: float, maximum: float,
            rand: Callable[[float, float], float] = random.uniform) -> float:
    """Delay before retry number ``attempts + 1``: exponential, capped, with equal jitter."""
    delay = min(maximum, minimum * 2 ** min(attempts, 32))
    return delay / 2 + rand(0, delay / 2)


class Sender(Protocol):
    """Delivers reports to one destination.

    ``batched``: ``send`` takes a whole claimed batch in one call (one HTTP request for all);
    otherwise the retry loop calls ``send`` with one report at a time from up to
    ``concurrency`` threads at once, so ``send`` must be thread-safe.
    """

    destination: str
    batch_size: int
    batched: bool
    concurrency: int

    def precheck(self, report: Mapping[str, Any]) -> Outcome | None:
        """A skip (decided from the report alone: stored with it, never sent there), or None
        to send."""

    def send(self, reports: list[dict[str, Any]], budget: float,
             stop: Callable[[], bool]) -> dict[str, Outcome]:
        """Outcomes by uuid for the reports attempted (those left out were not sent)."""

    def report_fields(self, outcome: Outcome) -> dict[str, Any]:
        """Fields to merge into the stored report after a delivery."""

    def maintenance(self) -> None:
        """Periodic housekeeping (from the retry loop)."""

    def close(self) -> None:
        """Release connections."""


class OONISender:
    """Relay to OONI's collector, one measurement per report over reused open reports."""

    destination = OONI
    batched = False

    def __init__(self, config: Any) -> None:
        self.concurrency = config.relay_concurrency
        self.batch_size = ROUNDS_PER_BATCH * self.concurrency
        # Keep-alive connections for the retry loop's and the first attempts' threads.
        self.client = OONIClient(config.ooni_api, collector_id=config.collector_id,
                                 allow_public_endpoint=config.allow_public_endpoint,
                                 timeout=config.relay_attempt_timeout,
                                 pool_size=self.concurrency + pool_threads(config))

    def precheck(self, report: Mapping[str, Any]) -> Outcome | None:
        if report.get("ooni-measurement-id"):
            return Outcome.skipped("already-in-ooni")  # relayed to us after OONI got it
        asn, cc = probe_location(report)
        if asn == "AS0" or cc == "ZZ":
            return Outcome.skipped("client-location-unknown")  # OONI would drop it
        return None

    def send(self, reports: list[dict[str, Any]], budget: float,
             stop: Callable[[], bool]) -> dict[str, Outcome]:
        out: dict[str, Outcome] = {}
        for report in reports:
            if stop():
                break
            outcome = self.client.send(report, timeout=budget)
            out[report["uuid"]] = outcome
            if is_destination_failure(outcome):
                break
        return out

    def report_fields(self, outcome: Outcome) -> dict[str, Any]:
        uid = outcome.result.get("measurement_uid")
        if not uid:
            return {}
        return {"ooni-measurement-id": uid, "ooni-measurement-link": explorer_link(uid)}

    def maintenance(self) -> None:
        self.client.close_stale()

    def close(self) -> None:
        self.client.close()


class CollectorSender:
    """Relay to another tunnel-telemetry collector's ``POST /relay``, in batches."""

    def __init__(self, base_url: str, config: Any) -> None:
        self.base_url = base_url.rstrip("/")
        self.destination = COLLECTOR + base_url
        self.batch_size = config.relay_batch
        self.batched = True  # a batch is one request
        self.concurrency = 1
        self.allow_public_endpoint = config.allow_public_endpoint
        self.timeout = config.relay_attempt_timeout
        headers = {"User-Agent": f"tunnel-telemetry/{__version__}"}
        if config.relay_token:
            headers["Authorization"] = f"Bearer {config.relay_token}"
        self.http = RelayHTTP(self.base_url, 1 + pool_threads(config), headers)

    def precheck(self, report: Mapping[str, Any]) -> Outcome | None:
        return None

    def send(self, reports: list[dict[str, Any]], budget: float,
             stop: Callable[[], bool]) -> dict[str, Outcome]:
        if not reports or stop():
            return {}
        body = [relayable(r, self.allow_public_endpoint) for r in reports]
        uuids = [r["uuid"] for r in reports]
        try:
            resp = self.http.post("/relay", json_body(body),
                                  Deadline(budget, self.timeout).timeout())
        except HTTP_ERRORS as e:
            return dict.fromkeys(uuids, classify_exception(e))
        if resp.status in (401, 403):
            # A token problem is the operator's to fix; the backlog waits for it.
            return dict.fromkeys(uuids, Outcome.retry("unauthorized", response_detail(resp)))
        bad = classify_response(resp)
        if bad is not None:
            return dict.fromkeys(uuids, bad)
        try:
            answer = response_json(resp)
            stored = {str(u) for u in answer.get("stored", [])}
            rejected = {str(item.get("uuid")): item for item in answer.get("rejected", [])
                        if isinstance(item, dict)}
        except (ValueError, AttributeError, TypeError):
            return dict.fromkeys(uuids, Outcome.retry("bad-answer", "not a /relay answer"))
        out = {}
        for u in uuids:
            if u in stored:
                out[u] = Outcome.delivered()
            elif u in rejected:
                errors = rejected[u].get("errors") or [{}]
                first = errors[0] if isinstance(errors[0], dict) else {}
                out[u] = Outcome.failed("rejected", one_line(
                    f"{first.get('path', '')} {first.get('message', '')}".strip()))
            else:
                out[u] = Outcome.retry("not-acknowledged")
        return out

    def report_fields(self, outcome: Outcome) -> dict[str, Any]:
        return {}

    def maintenance(self) -> None:
        """Nothing to do."""

    def close(self) -> None:
        self.http.close()


@dataclass
class _Hold:
    until: float = 0.0
    failures: int = 0
    since: float = 0.0  # when the last failure was recorded
    probed: bool = False  # the backlog was made due for the probe after this hold


@dataclass
class _Process:
    """Relay state of one process (rebuilt after a fork)."""

    pid: int
    owner: str
    senders: dict[str, Sender]
    # Looked up per process: gevent's primitives in a worker it patched after this loaded.
    lock: threading.Lock = field(default_factory=lambda: threading.Lock())
    holds: dict[str, _Hold] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=lambda: threading.Event())
    wake: threading.Event = field(default_factory=lambda: threading.Event())
    pool: concurrent.futures.ThreadPoolExecutor | None = None
    futures: set[concurrent.futures.Future] = field(default_factory=set)
    loop_pool: concurrent.futures.ThreadPoolExecutor | None = None
    thread: threading.Thread | None = None


class NullRelay:
    """Relay off: no destinations, nothing sent."""

    def destinations(self) -> list[str]:
        return []

    def add_options(self, report: Mapping[str, Any]) -> dict[str, Any]:
        """Extra arguments for ``store.add`` (none: nothing is attempted at once)."""
        return {}

    def skipped(self, report: Mapping[str, Any]) -> dict[str, str]:
        """No destination, none skipped."""
        return {}

    def after_store(self, report: dict[str, Any], created: bool) -> dict[str, Any]:
        return {}

    def health(self) -> dict[str, Any]:
        return {}

    def wake(self) -> None:
        """Nothing to wake."""

    def start(self) -> None:
        """Nothing runs in the background."""

    def close(self) -> None:
        """Nothing to release."""


class Relay:
    """Relay to the configured destinations: synchronous first attempt, durable retries."""

    def __init__(self, config: Any, store: Any,
                 sender_factory: Callable[[str], Sender] | None = None) -> None:
        self.config = config
        self.store = store
        self._dests = ([OONI] if config.ooni_relay else []) + [
            COLLECTOR + url for url in config.relay_url]
        self._sender_factory = sender_factory or self._make_sender
        self._lease = config.relay_attempt_timeout + SYNC_LEASE_MARGIN
        self._pool_threads = pool_threads(config)
        self._max_inflight = INFLIGHT_PER_THREAD * self._pool_threads
        self._proc_lock = green.ProcessLock()
        self._proc: _Process | None = None

    # -- interface used by the views ---------------------------------------------------------

    def destinations(self) -> list[str]:
        return list(self._dests)

    def add_options(self, report: Mapping[str, Any]) -> dict[str, Any]:
        """Lease the new relay rows to this process so the first attempt is ours alone; the
        rows of destinations that would not take ``report`` start skipped (one write, where
        recording the skip afterwards took a second one)."""
        return {"lease_owner": self._state().owner, "lease_seconds": self._lease,
                "skipped": self.skipped(report)}

    def skipped(self, report: Mapping[str, Any]) -> dict[str, str]:
        """The destinations that would not take ``report`` (e.g. OONI without the client's
        network), with the reason: ``store.add`` stores their rows as skipped."""
        senders = self._state().senders
        return {dest: skip.describe() for dest in self._dests
                if (skip := senders[dest].precheck(report)) is not None}

    def after_store(self, report: dict[str, Any], created: bool) -> dict[str, Any]:
        """Try every destination now (up to relay-timeout); the fields to add to the answer.

        Never raises: a relay problem must not fail a report that is already stored.
        """
        if not self._dests:
            return {}
        try:
            if not created:
                return self._describe_stored(report)
            return self._describe(self._attempt_now(report))
        except Exception as e:  # noqa: BLE001 - the report is stored; answer, log, retry later
            log.error("relay: first attempt failed: %s", type(e).__name__)
            return self._describe({d: Outcome.retry("internal-error") for d in self._dests})

    def health(self) -> dict[str, Any]:
        """This process's view: destinations backing off, attempts in flight."""
        ps = self._state()
        now = time.time()
        with ps.lock:
            held = {d: round(h.until - now, 1) for d, h in ps.holds.items() if h.until > now}
            inflight = len(ps.futures)
        return {"backing_off_s": held, "in_flight": inflight,
                "retry_loop": bool(ps.thread and ps.thread.is_alive())}

    def wake(self) -> None:
        """Make the retry loop look for due reports now (e.g. after a relayed batch)."""
        ps = self._proc
        if ps is not None and ps.pid == os.getpid():
            ps.wake.set()

    def start(self) -> None:
        """Start this process's retry loop (call after gunicorn's fork); idempotent."""
        if not self._dests:
            return
        ps = self._state()
        with ps.lock:
            if ps.thread is not None:
                return
            ps.thread = threading.Thread(target=self._loop, args=(ps,), name="tt-relay-retry",
                                         daemon=True)
        ps.thread.start()

    def close(self, wait: float = 5.0) -> None:
        """Stop the retry loop and the attempts of this process, close open OONI reports."""
        ps = self._proc
        if ps is None or ps.pid != os.getpid():
            return
        ps.stop.set()
        ps.wake.set()
        end = time.monotonic() + wait
        if ps.thread is not None:
            ps.thread.join(max(0.0, end - time.monotonic()))
        with ps.lock:
            pending = set(ps.futures)
            pool, ps.pool = ps.pool, None
            loop_pool, ps.loop_pool = ps.loop_pool, None
        if pending:
            concurrent.futures.wait(pending, max(0.0, end - time.monotonic()))
        for executor in (pool, loop_pool):
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)
        for sender in ps.senders.values():
            try:
                sender.close()
            except Exception as e:  # noqa: BLE001 - shutting down anyway
                log.warning("relay: closing %s failed: %s", sender.destination, type(e).__name__)

    # -- retry loop and relay --once ----------------------------------------------------------

    def run_once(self, *, now_all: bool = False) -> dict[str, Counter]:
        """One pass over every destination; ``now_all`` ignores backoff (relay --once).

        Returns per destination a Counter of final states and reasons.
        """
        ps = self._state()
        summary: dict[str, Counter] = {}
        for dest in self._dests:
            if now_all:
                self.store.make_due(dest)
            summary[dest] = self._drain(ps, dest, ignore_hold=now_all)
        return summary

    def _loop(self, ps: _Process) -> None:
        interval = self.config.relay_interval
        while True:
            ps.wake.wait(interval * random.uniform(0.8, 1.2))
            ps.wake.clear()
            if ps.stop.is_set():
                return
            for dest in self._dests:
                if ps.stop.is_set():
                    return
                try:
                    self._drain(ps, dest)
                    ps.senders[dest].maintenance()
                except Exception as e:  # noqa: BLE001 - keep the loop alive; retried next round
                    log.error("relay: retry loop error for %s: %s", dest, type(e).__name__)

    def _drain(self, ps: _Process, dest: str, ignore_hold: bool = False) -> Counter:
        """Claim and attempt due reports for one destination until none is left or it fails."""
        counts: Counter = Counter()
        sender = ps.senders[dest]
        concurrency = sender_concurrency(sender)
        lease = self.loop_lease(sender)
        warm = False  # a destination answered in this pass: send at full concurrency
        while not ps.stop.is_set():
            if not ignore_hold and self._held_until(ps, dest) > time.time():
                break
            if self._recovering(ps, dest):
                # The destination failed and its backoff is over: probe with the oldest
                # report, and once it answers the backlog goes out in order of age. (The
                # reports' own backoffs grew while the destination was down; they would
                # otherwise come due in an order that has nothing to do with their age.)
                self.store.make_due(dest)
            started = time.time()
            claims = self.store.claim(dest, sender.batch_size, ps.owner, lease)
            if not claims:
                break
            # The last moment an attempt may start and still be recorded inside the lease.
            last_start = (started + lease - self.config.relay_attempt_timeout
                          - LOOP_RECORD_MARGIN)
            todo = []
            for claim in claims:
                if started - claim.created > self.config.relay_max_age:
                    outcome = Outcome(EXPIRED, "max-age")
                else:
                    outcome = sender.precheck(claim.report)
                if outcome is None:
                    todo.append(claim)
                else:
                    self._record(ps, dest, claim.uuid, claim.attempts, outcome)
                    counts[outcome.state] += 1

            def stop(last_start: float = last_start) -> bool:
                return ps.stop.is_set() or time.time() > last_start

            if is_batched(sender):
                attempted, blocked = self._send_batch(ps, dest, todo, stop, counts)
            else:
                attempted, blocked, warm = self._send_each(ps, dest, todo, stop, concurrency,
                                                           counts, warm)
            unattempted = [c.uuid for c in todo if c.uuid not in attempted]
            if unattempted:
                hold = self._held_until(ps, dest)
                self.store.release(unattempted, dest, ps.owner,
                                   next_attempt=hold if hold > time.time() else None)
            if blocked or unattempted or len(claims) < sender.batch_size:
                break
        return counts

    def loop_lease(self, sender: Sender) -> float:
        """Lease of a batch the retry loop claims: the batch's worst-case sending time (every
        attempt taking relay-attempt-timeout, ``concurrency`` at a time) plus a margin."""
        rounds = (1 if is_batched(sender)
                  else math.ceil(sender.batch_size / sender_concurrency(sender)))
        return rounds * self.config.relay_attempt_timeout + LOOP_LEASE_MARGIN

    def _send_batch(self, ps: _Process, dest: str, claims: list[Any],
                    stop: Callable[[], bool], counts: Counter) -> tuple[set[str], bool]:
        """Send ``claims`` in one ``send`` call, then record the outcomes (oldest first).

        Returns the uuids attempted and whether the destination failed.
        """
        if not claims:
            return set(), False
        started = time.time()
        outcomes = ps.senders[dest].send([c.report for c in claims],
                                         self.config.relay_attempt_timeout, stop)
        for claim in claims:
            outcome = outcomes.get(claim.uuid)
            if outcome is not None:
                self._record(ps, dest, claim.uuid, claim.attempts, outcome, started)
                _tally(counts, outcome)
        return set(outcomes), any(is_destination_failure(o) for o in outcomes.values())

    def _send_each(self, ps: _Process, dest: str, claims: list[Any], stop: Callable[[], bool],
                   concurrency: int, counts: Counter,
                   warm: bool) -> tuple[set[str], bool, bool]:
        """Send ``claims`` one report per ``send`` call, ``concurrency`` at a time, oldest
        first; each outcome is recorded as it comes (so commits group).  Until the destination
        has answered in this pass (``warm``), one report at a time: a destination that is down
        costs one attempt per pass, not ``concurrency``.  The first failure of the destination
        stops further submissions: those left are not attempted.

        Returns the uuids attempted, whether the destination failed, and ``warm``.
        """
        attempted: set[str] = set()
        blocked = False
        queue = collections.deque(claims)
        running: set[concurrent.futures.Future] = set()
        pool = self._loop_pool(ps) if claims else None
        while pool is not None:
            while (queue and not blocked and len(running) < (concurrency if warm else 1)
                   and not stop()):
                claim = queue[0]
                try:
                    running.add(pool.submit(self._attempt_claim, ps, dest, claim, stop))
                except RuntimeError:  # the pool was shut down: closing
                    queue.clear()
                    break
                queue.popleft()
            if not running:
                break
            done, running = concurrent.futures.wait(
                running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                uuid, outcome = future.result()
                if outcome is None:
                    continue  # not attempted (too late): released by the caller
                attempted.add(uuid)
                _tally(counts, outcome)
                failed = is_destination_failure(outcome)
                blocked |= failed
                warm |= not failed
        return attempted, blocked, warm

    def _attempt_claim(self, ps: _Process, dest: str, claim: Any,
                       stop: Callable[[], bool]) -> tuple[str, Outcome | None]:
        """One report of a claimed batch (in a loop pool thread): send it, record the outcome.

        Never raises; the outcome is None when the report was not attempted.
        """
        if stop():
            return claim.uuid, None
        started = time.time()
        try:
            outcome = ps.senders[dest].send([claim.report], self.config.relay_attempt_timeout,
                                            ps.stop.is_set).get(claim.uuid)
        except Exception as e:  # noqa: BLE001 - a sender bug must not lose the report
            log.error("relay: %s sender error: %s", dest, type(e).__name__)
            outcome = Outcome.retry("internal-error")
        if outcome is None:
            return claim.uuid, None
        try:
            self._record(ps, dest, claim.uuid, claim.attempts, outcome, started)
        except Exception as e:  # noqa: BLE001 - the lease expires and the report is retried
            log.error("relay: could not record the outcome for %s: %s", dest,
                      getattr(e, "code", type(e).__name__))
        return claim.uuid, outcome

    def _loop_pool(self, ps: _Process) -> concurrent.futures.ThreadPoolExecutor | None:
        """The retry loop's sending threads (None once closing)."""
        with ps.lock:
            if ps.loop_pool is None and not ps.stop.is_set():
                size = max(sender_concurrency(s) for s in ps.senders.values())
                ps.loop_pool = concurrent.futures.ThreadPoolExecutor(size, "tt-relay-loop")
            return ps.loop_pool

    # -- first attempt, in the request -------------------------------------------------------

    def _attempt_now(self, report: dict[str, Any]) -> dict[str, Outcome]:
        ps = self._state()
        uuid = report["uuid"]
        start_by = time.time() + SYNC_START_WINDOW
        results: dict[str, Outcome] = {}
        futures: dict[str, concurrent.futures.Future] = {}
        for dest in self._dests:
            skip = ps.senders[dest].precheck(report)
            if skip is not None:  # stored skipped with the report (add_options)
                results[dest] = skip
                continue
            hold = self._held_until(ps, dest)
            if hold > time.time():
                self.store.release([uuid], dest, ps.owner, next_attempt=hold)
                results[dest] = Outcome.retry("backing-off", "the destination failed recently")
                continue
            future = self._submit(ps, dest, report, start_by)
            if future is None:
                self.store.release([uuid], dest, ps.owner)
                results[dest] = Outcome.retry("relay-busy", "too many attempts in flight")
            else:
                futures[dest] = future
        if futures:
            _wait_all(futures.values(), self.config.relay_timeout)
        for dest, future in futures.items():
            if not future.done():
                results[dest] = Outcome.retry("relay-timeout", "still trying in the background")
            elif future.cancelled() or future.exception() is not None:
                results[dest] = Outcome.retry("internal-error")
            else:
                results[dest] = future.result()
        return results

    def _submit(self, ps: _Process, dest: str, report: dict[str, Any],
                start_by: float) -> concurrent.futures.Future | None:
        with ps.lock:
            if ps.stop.is_set() or len(ps.futures) >= self._max_inflight:
                return None
            if ps.pool is None:
                ps.pool = concurrent.futures.ThreadPoolExecutor(self._pool_threads, "tt-relay")
            future = ps.pool.submit(self._attempt_one, ps, dest, report, start_by)
            ps.futures.add(future)
        future.add_done_callback(lambda f: self._forget(ps, f))
        return future

    @staticmethod
    def _forget(ps: _Process, future: concurrent.futures.Future) -> None:
        with ps.lock:
            ps.futures.discard(future)

    def _attempt_one(self, ps: _Process, dest: str, report: dict[str, Any],
                     start_by: float) -> Outcome:
        uuid = report["uuid"]
        if ps.stop.is_set() or time.time() > start_by:
            # Too late to finish inside the lease: leave the report to the retry loop.
            self.store.release([uuid], dest, ps.owner)
            return Outcome.retry("relay-busy", "no time left for a first attempt")
        started = time.time()
        try:
            outcomes = ps.senders[dest].send([report], self.config.relay_attempt_timeout,
                                             ps.stop.is_set)
            outcome = outcomes.get(uuid) or Outcome.retry("not-attempted")
        except Exception as e:  # noqa: BLE001 - a sender bug must not lose the report
            log.error("relay: %s sender error: %s", dest, type(e).__name__)
            outcome = Outcome.retry("internal-error")
        try:
            self._record(ps, dest, uuid, 0, outcome, started)
        except ReportError as e:  # the store is unavailable: the lease expires, retried later
            log.error("relay: could not record the outcome for %s: %s", dest, e.code)
        return outcome

    # -- outcomes ----------------------------------------------------------------------------

    def _record(self, ps: _Process, dest: str, uuid: str, attempts: int,
                outcome: Outcome, started: float | None = None) -> bool:
        """Write an outcome to the store (and adjust the destination's backoff).

        ``started``: when the attempt began; attempts that were already running when the
        destination last failed neither end its backoff nor lengthen it (they overlapped).
        """
        now = time.time()
        started = now if started is None else started
        cfg = self.config
        if outcome.state == PENDING:
            delay = backoff(attempts, cfg.relay_retry_min, cfg.relay_retry_max)
            if outcome.retry_after is not None:
                delay = max(delay, outcome.retry_after)
            if is_destination_failure(outcome):
                self._hold(ps, dest, outcome, started)
            ok = self.store.finish(uuid, dest, ps.owner, PENDING, error=outcome.describe(),
                                   next_attempt=now + delay)
        elif outcome.state == DELIVERED:
            self._clear_hold(ps, dest, started)
            ok = self.store.finish(uuid, dest, ps.owner, DELIVERED, result=outcome.result or None,
                                   report_fields=ps.senders[dest].report_fields(outcome))
        else:
            ok = self.store.finish(uuid, dest, ps.owner, outcome.state, error=outcome.describe())
        level = logging.DEBUG if outcome.state in (DELIVERED, SKIPPED) else logging.WARNING
        log.log(level, "relay %s: %s (%s)", dest, outcome.state, outcome.describe())
        if not ok:
            log.warning("relay %s: lease lost before the outcome was recorded", dest)
        return ok

    def _held_until(self, ps: _Process, dest: str) -> float:
        with ps.lock:
            hold = ps.holds.get(dest)
            return hold.until if hold else 0.0

    def _hold(self, ps: _Process, dest: str, outcome: Outcome, started: float) -> None:
        cfg = self.config
        with ps.lock:
            hold = ps.holds.setdefault(dest, _Hold())
            if started >= hold.since:  # not one of several attempts failing together
                hold.failures += 1
            delay = backoff(hold.failures - 1, cfg.relay_retry_min, cfg.relay_retry_max)
            if outcome.retry_after is not None:
                delay = max(delay, outcome.retry_after)
            hold.until = max(hold.until, time.time() + delay)
            hold.since = time.time()
            hold.probed = False

    @staticmethod
    def _recovering(ps: _Process, dest: str) -> bool:
        """True once per destination failure: its hold is over and nothing was probed yet."""
        with ps.lock:
            hold = ps.holds.get(dest)
            if hold is None or hold.failures == 0 or hold.probed:
                return False
            hold.probed = True
            return True

    @staticmethod
    def _clear_hold(ps: _Process, dest: str, started: float) -> None:
        with ps.lock:
            hold = ps.holds.get(dest)
            if hold is not None and started >= hold.since:
                del ps.holds[dest]

    # -- answers -----------------------------------------------------------------------------

    def _describe(self, results: Mapping[str, Outcome]) -> dict[str, Any]:
        """Response fields: the OONI id and link when OONI gave one, else a relay status."""
        extra: dict[str, Any] = {}
        status: dict[str, Any] = {}
        worst: Outcome | None = None
        for dest, outcome in results.items():
            if dest == OONI:
                uid = outcome.result.get("measurement_uid")
                if outcome.state == DELIVERED and uid:
                    extra["ooni-measurement-id"] = uid
                    extra["ooni-measurement-link"] = explorer_link(uid)
                else:
                    status["ooni"] = outcome.state
                    status["ooni-reason"] = outcome.describe()
            elif outcome.state != DELIVERED and (worst is None or _rank(outcome) > _rank(worst)):
                worst = outcome
        if worst is not None:
            status["collectors"] = worst.state
            status["collectors-reason"] = worst.describe()
        if status:
            extra["relay"] = status
        return extra

    def _describe_stored(self, report: Mapping[str, Any]) -> dict[str, Any]:
        """For a duplicate: the relay state so far (the stored report has any OONI id)."""
        states = self.store.relay_state(report["uuid"])
        results = {}
        for dest, row in states.items():
            if dest not in self._dests or row["state"] == DELIVERED:
                continue
            results[dest] = Outcome(row["state"], row["error"] or row["state"])
        return self._describe(results)

    # -- per-process state -------------------------------------------------------------------

    def _state(self) -> _Process:
        ps = self._proc
        if ps is not None and ps.pid == os.getpid():
            return ps
        with self._proc_lock:
            ps = self._proc
            if ps is None or ps.pid != os.getpid():
                owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
                senders = {d: self._sender_factory(d) for d in self._dests}
                ps = self._proc = _Process(os.getpid(), owner, senders)
            return ps

    def _make_sender(self, dest: str) -> Sender:
        if dest == OONI:
            return OONISender(self.config)
        return CollectorSender(dest[len(COLLECTOR):], self.config)


def _tally(counts: Counter, outcome: Outcome) -> None:
    counts[outcome.state] += 1
    if outcome.state != DELIVERED:
        counts[f"{outcome.state}:{outcome.reason}"] += 1


def is_batched(sender: Sender) -> bool:
    """True when the sender takes a whole batch per ``send`` call (the default)."""
    return bool(getattr(sender, "batched", True))


def sender_concurrency(sender: Sender) -> int:
    """How many single-report ``send`` calls the sender takes at once."""
    return 1 if is_batched(sender) else max(1, int(getattr(sender, "concurrency", 1)))


def pool_threads(config: Any) -> int:
    """Pool threads (greenlets) for first attempts: relay-concurrency per destination
    (capped)."""
    dests = (1 if config.ooni_relay else 0) + len(config.relay_url)
    return max(1, min(MAX_POOL_THREADS, config.relay_concurrency * max(1, dests)))


def _wait_all(futures: Iterable[concurrent.futures.Future], timeout: float) -> None:
    """Wait until every future is done or ``timeout`` seconds have passed.

    Like ``concurrent.futures.wait`` (all completed), on each future's own condition: no
    waiter objects installed and removed on every future, about half the CPU per request.
    """
    end = time.monotonic() + timeout
    for future in futures:
        try:
            future.exception(max(0.0, end - time.monotonic()))
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            pass


def _rank(outcome: Outcome) -> int:
    return {FAILED: 3, EXPIRED: 3, PENDING: 2, SKIPPED: 1}.get(outcome.state, 0)


def build_relay(config: Any, store: Any) -> Relay | NullRelay:
    """The relay for this configuration (NullRelay when no destination is configured)."""
    if not config.ooni_relay and not config.relay_url:
        return NullRelay()
    return Relay(config, store)


# -- receiving side: POST /relay ----------------------------------------------------------------

def check_token(header: str | None, accepted: tuple[str, ...]) -> None:
    """Accept ``Authorization: Bearer <token>`` for one of ``accepted`` (constant time)."""
    given = ""
    if header and header[:7].lower() == "bearer ":
        given = header[7:].strip()
    ok = False
    for token in accepted:  # compare with every token: the time does not tell which matched
        ok |= hmac.compare_digest(given.encode(), token.encode())
    if not (accepted and given and ok):
        raise ReportError("unauthorized", "a valid relay token is required")


def check_relayed(item: Any) -> list[dict[str, str]]:
    """Errors of one relayed report (empty when it is acceptable)."""
    if not isinstance(item, dict):
        return [{"path": "$", "message": "must be of type object"}]
    errors = schema_errors(item, RELAYED_SCHEMA)
    if errors:
        return errors
    for key in ("time", "t_received"):
        try:
            parse_time(item[key])
        except ValueError as e:
            errors.append({"path": f"$.{key}", "message": str(e)})
    uid, link = item.get("ooni-measurement-id"), item.get("ooni-measurement-link")
    if link is not None and (uid is None or link != explorer_link(uid)):
        errors.append({"path": "$.ooni-measurement-link",
                       "message": "must be the explorer link of ooni-measurement-id"})
    return errors


def receive_batch(payload: Any, store: Any, relay: Any, config: Any) -> dict[str, Any]:
    """Store a batch relayed by a primary collector; the answer of ``POST /relay``.

    The primary's geolocation and collector id are kept (the sender is never geolocated);
    each uuid is stored once and queued for this collector's own destinations.  The
    endpoint address is kept only when this collector allows public endpoints too, and
    config values are scrubbed again.
    """
    if not isinstance(payload, list):
        raise ReportError("not_array", "the body must be a JSON array of reports",
                          [{"path": "$", "message": "must be of type array"}])
    if not 1 <= len(payload) <= MAX_BATCH:
        raise ReportError("batch_size", f"send between 1 and {MAX_BATCH} reports per batch",
                          [{"path": "$", "message": f"must hold 1-{MAX_BATCH} items"}])
    stored: list[str] = []
    rejected: list[dict[str, Any]] = []
    created = 0
    for index, item in enumerate(payload):
        errors = check_relayed(item)
        if errors:
            uid = item.get("uuid") if isinstance(item, dict) else None
            rejected.append({
                "index": index,
                "uuid": uid.lower() if isinstance(uid, str) and _is_uuid(uid) else None,
                "errors": [{"path": f"$[{index}]{e['path'][1:]}", "message": e["message"]}
                           for e in errors],
            })
            continue
        report = scrub(dict(item, uuid=str(uuidlib.UUID(item["uuid"]))),
                       config.allow_public_endpoint)
        kept, new = store.add(report, relay.destinations(), skipped=relay.skipped(report))
        stored.append(kept["uuid"])
        created += new
    if created:
        relay.wake()
    log.info("relay batch: %d stored (%d new), %d rejected", len(stored), created, len(rejected))
    return {"ok": True, "stored": stored, "created": created, "rejected": rejected}


def _is_uuid(text: str) -> bool:
    try:
        uuidlib.UUID(text)
    except ValueError:
        return False
    return len(text) == 36
