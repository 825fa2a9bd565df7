"""The retry loop: every worker claims due reports with a lease (so two workers never send the
same report), sends them oldest first, records each outcome and backs off; ``relay --once``."""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable

from ..store.base import Claim
from .outcome import DELIVERED, EXPIRED, Outcome, is_destination_failure
from .senders import Sender, is_batched, sender_concurrency
from .state import Process, RelayParts, lease_margin

log = logging.getLogger(__name__)



class RetryLoop(RelayParts):
    """The retry loop's part of ``Relay`` (uses its config, queue, _dests, _state, _record)."""

    def run_once(self, *, now_all: bool = False) -> dict[str, Counter]:
        """One pass over every destination; ``now_all`` ignores backoff (relay --once).

        Returns per destination a Counter of final states and reasons.
        """
        ps = self._state()
        summary: dict[str, Counter] = {}
        for dest in self._dests:
            if now_all:
                self.store.make_due(dest, unconfirmed=True)
            summary[dest] = self._drain(ps, dest, ignore_hold=now_all)
        return summary

    def _loop(self, ps: Process) -> None:
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

    def _drain(self, ps: Process, dest: str, ignore_hold: bool = False) -> Counter:
        """Claim and attempt due reports for one destination until none is left or it fails."""
        counts: Counter = Counter()
        sender = ps.senders[dest]
        concurrency = sender_concurrency(sender)
        lease = self.loop_lease(sender)
        warm = False  # a destination answered in this pass: send at full concurrency
        while not ps.stop.is_set():
            if not ignore_hold and ps.holds.until(dest) > time.time():
                break
            if ps.holds.recovering(dest):
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
                          - lease_margin(self.config.relay_attempt_timeout) / 3)
            todo: list[Claim] = []
            for claim in claims:
                outcome: Outcome | None
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
                hold = ps.holds.until(dest)
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
        return (rounds * self.config.relay_attempt_timeout
                + lease_margin(self.config.relay_attempt_timeout))

    def _send_batch(self, ps: Process, dest: str, claims: list[Claim],
                    stop: Callable[[], bool], counts: Counter) -> tuple[set[str], bool]:
        """Send ``claims`` in one ``send`` call, then record the outcomes (oldest first).

        Returns the uuids attempted and whether the destination failed.
        """
        if not claims:
            return set(), False
        started = time.time()
        previous = {c.uuid: c.result for c in claims if c.result}
        outcomes = ps.senders[dest].send([c.report for c in claims],
                                         self.config.relay_attempt_timeout, stop, previous)
        for claim in claims:
            outcome = outcomes.get(claim.uuid)
            if outcome is not None:
                self._record(ps, dest, claim.uuid, claim.attempts, outcome, started)
                _tally(counts, outcome)
        return set(outcomes), any(is_destination_failure(o) for o in outcomes.values())

    def _send_each(self, ps: Process, dest: str, claims: list[Claim], stop: Callable[[], bool],
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

    def _attempt_claim(self, ps: Process, dest: str, claim: Claim,
                       stop: Callable[[], bool]) -> tuple[str, Outcome | None]:
        """One report of a claimed batch (in a loop pool thread): send it, record the outcome.

        Never raises; the outcome is None when the report was not attempted.
        """
        if stop():
            return claim.uuid, None
        started = time.time()
        try:
            previous = {claim.uuid: claim.result} if claim.result else None
            outcome = ps.senders[dest].send([claim.report], self.config.relay_attempt_timeout,
                                            ps.stop.is_set, previous).get(claim.uuid)
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

    def _loop_pool(self, ps: Process) -> concurrent.futures.ThreadPoolExecutor | None:
        """The retry loop's sending threads (None once closing)."""
        with ps.lock:
            if ps.loop_pool is None and not ps.stop.is_set():
                size = max(sender_concurrency(s) for s in ps.senders.values())
                ps.loop_pool = concurrent.futures.ThreadPoolExecutor(size, "tt-relay-loop")
            return ps.loop_pool


def _tally(counts: Counter, outcome: Outcome) -> None:
    counts[outcome.state] += 1
    if outcome.state != DELIVERED:
        counts[f"{outcome.state}:{outcome.reason}"] += 1
