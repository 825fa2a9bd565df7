"""The first attempt, in the request: ``POST /report`` stores the report with its relay rows
leased to this process, tries every destination at once in a small pool and waits at most
``relay-timeout``; an attempt still running goes on in the background and records its outcome.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Iterable
from typing import Any

from ..errors import ReportError
from .outcome import Outcome
from .state import Process, RelayParts

log = logging.getLogger(__name__)

SYNC_START_WINDOW = 5.0  # an attempt for a fresh report must start this soon
# First attempts in the request: relay-concurrency pool greenlets (threads outside a gevent
# worker) per destination, and up to INFLIGHT_PER_THREAD attempts per pool thread queued or
# running (those outliving relay-timeout go on in the background); beyond that a fresh
# report is left to the retry loop.
INFLIGHT_PER_THREAD = 4


class FirstAttempt(RelayParts):
    """The first attempt's part of ``Relay`` (uses its config, queue, _dests, _state, _record)."""

    def _attempt_now(self, report: dict[str, Any]) -> dict[str, Outcome]:
        ps = self._state()
        uuid = report["uuid"]
        start_by = time.time() + SYNC_START_WINDOW
        results: dict[str, Outcome] = {}
        futures: dict[str, concurrent.futures.Future] = {}
        for dest in self._dests:
            skip = ps.senders[dest].precheck(report)
            if skip is not None:  # stored skipped with the report (enqueue)
                results[dest] = skip
                continue
            hold = ps.holds.until(dest)
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

    def _submit(self, ps: Process, dest: str, report: dict[str, Any],
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
    def _forget(ps: Process, future: concurrent.futures.Future) -> None:
        with ps.lock:
            ps.futures.discard(future)

    def _attempt_one(self, ps: Process, dest: str, report: dict[str, Any],
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
