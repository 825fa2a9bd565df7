"""Relay step: deliver stored, scrubbed reports to secondary collectors, durably.

Destinations are ``ooni`` (OONI's collector) and ``collector:<base url>`` per ``relay-url``
(another tunnel-telemetry collector's ``POST /relay``).  The store's relay queue keeps one row
per report and destination:

* ``POST /report`` stores the report with its rows leased to this process and makes a first
  attempt at once (``first_attempt``);
* a retry loop in every worker claims due rows with a lease, sends them oldest first, retries
  with exponential backoff and jitter, and gives up after ``relay-max-age`` (``loop``);
* ``tt-server relay --once`` tries every pending report now, whatever its backoff.

Delivery is at least once, exactly once in the normal case: a report is sent again when its
outcome was not recorded (a process died, or its attempt outlived its lease, between the
secondary's answer and the local commit). An answer that does not say whether the report
arrived (none within relay-attempt-timeout, or OONI's ``{}`` from its fallback store) makes it
"maybe delivered": it waits relay-confirm-delay, then OONI's measurements API is asked before
it is sent again (a collector gets it again; it stores each uuid once). Every relayed report
carries its uuid so secondaries can deduplicate.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .. import httpclient, metrics
from ..store.base import Enqueue, RelayQueue
from .first_attempt import INFLIGHT_PER_THREAD, FirstAttempt
from .loop import RetryLoop
from .ooni import explorer_link
from .outcome import DELIVERED, EXPIRED, FAILED, PENDING, SKIPPED, Outcome, is_destination_failure
from .senders import COLLECTOR, OONI, Sender, make_sender, pool_threads
from .state import Holds, Process, lease_margin

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger(__name__)


class NullRelay:
    """Relay off: no destinations, nothing sent."""

    def destinations(self) -> list[str]:
        return []

    def enqueue(self, report: Mapping[str, Any], *, attempt_now: bool = True) -> None:
        """No relay rows."""
        return None

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


class Relay(FirstAttempt, RetryLoop):
    """Relay to the configured destinations: first attempt in the request, durable retries."""

    def __init__(self, config: Config, store: RelayQueue,
                 sender_factory: Callable[[str], Sender] | None = None) -> None:
        self.config = config
        self.store = store
        self._dests = ([OONI] if config.ooni_relay else []) + [
            COLLECTOR + url for url in config.relay_url]
        self._sender_factory = sender_factory or self._make_sender
        self._lease = config.relay_attempt_timeout + lease_margin(config.relay_attempt_timeout)
        self._pool_threads = pool_threads(config)
        self._max_inflight = INFLIGHT_PER_THREAD * self._pool_threads
        self._proc_lock = threading.Lock()  # held without waiting (nothing under it yields)
        self._proc: Process | None = None

    # -- interface used by the views ---------------------------------------------------------

    def destinations(self) -> list[str]:
        return list(self._dests)

    def enqueue(self, report: Mapping[str, Any], *, attempt_now: bool = True) -> Enqueue:
        """The relay rows ``store.add`` writes with ``report``, in the same transaction.

        ``attempt_now``: leased to this process, so the first attempt (``after_store``) is
        ours alone. Destinations that would not take the report (e.g. OONI without the
        client's network) start skipped, with the reason: no second write records the skip.
        """
        ps = self._state()
        skipped = {dest: skip.describe() for dest in self._dests
                   if (skip := ps.senders[dest].precheck(report)) is not None}
        if not attempt_now:
            return Enqueue(self._dests, skipped=skipped)
        return Enqueue(self._dests, owner=ps.owner, lease_seconds=self._lease, skipped=skipped)

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
        held = ps.holds.waiting(now)
        with ps.lock:
            inflight = len(ps.futures)
            tally = dict(ps.tally)
        return {"backing_off_s": held, "in_flight": inflight, "maybe_delivered": tally,
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

    # -- outcomes ----------------------------------------------------------------------------

    def _record(self, ps: Process, dest: str, uuid: str, attempts: int,
                outcome: Outcome, started: float | None = None) -> bool:
        """Write an outcome to the store (and adjust the destination's backoff).

        ``started``: when the attempt began; attempts that were already running when the
        destination last failed neither end its backoff nor lengthen it (they overlapped).
        """
        now = time.time()
        started = now if started is None else started
        cfg = self.config
        if outcome.state == PENDING:
            delay = httpclient.backoff(attempts, cfg.relay_retry_min, cfg.relay_retry_max)
            if outcome.retry_after is not None:
                delay = max(delay, outcome.retry_after)
            if outcome.maybe:  # it may have arrived: confirm or resend only much later
                delay = max(delay, cfg.relay_confirm_delay)
                with ps.lock:
                    ps.tally[outcome.reason] += 1
            if is_destination_failure(outcome):
                ps.holds.fail(dest, outcome, started)
            ok = self.store.finish(uuid, dest, ps.owner, PENDING, error=outcome.describe(),
                                   next_attempt=now + delay, result=outcome.result or None)
        elif outcome.state == DELIVERED:
            if outcome.result.get("confirmed"):
                with ps.lock:
                    ps.tally["confirmed"] += 1
            ps.holds.clear(dest, started)
            ok = self.store.finish(uuid, dest, ps.owner, DELIVERED, result=outcome.result or None,
                                   report_fields=ps.senders[dest].report_fields(outcome))
        else:
            ok = self.store.finish(uuid, dest, ps.owner, outcome.state, error=outcome.describe())
        metrics.relay_outcome(dest, outcome.state)
        level = logging.DEBUG if outcome.state in (DELIVERED, SKIPPED) else logging.WARNING
        log.log(level, "relay %s: %s (%s)", dest, outcome.state, outcome.describe())
        if not ok:
            log.warning("relay %s: lease lost before the outcome was recorded", dest)
        return ok

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

    def _state(self) -> Process:
        ps = self._proc
        if ps is not None and ps.pid == os.getpid():
            return ps
        with self._proc_lock:
            ps = self._proc
            if ps is None or ps.pid != os.getpid():
                owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
                senders = {d: self._sender_factory(d) for d in self._dests}
                holds = Holds(self.config.relay_retry_min, self.config.relay_retry_max)
                ps = self._proc = Process(os.getpid(), owner, senders, holds)
            return ps

    def _make_sender(self, dest: str) -> Sender:
        return make_sender(dest, self.config)


def _rank(outcome: Outcome) -> int:
    return {FAILED: 3, EXPIRED: 3, PENDING: 2, SKIPPED: 1}.get(outcome.state, 0)


def build_relay(config: Config, store: RelayQueue) -> Relay | NullRelay:
    """The relay for this configuration (NullRelay when no destination is configured)."""
    if not config.ooni_relay and not config.relay_url:
        return NullRelay()
    return Relay(config, store)
