"""Per-process relay state: the senders, the first attempts in flight, the retry loop's thread,
and each destination's backoff after it failed (so one process stops sending there a while)."""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .. import httpclient
from ..store.base import RelayQueue
from .outcome import Outcome
from .senders import Sender

if TYPE_CHECKING:
    from ..config import Config


def lease_margin(attempt_timeout: float) -> float:
    """How long a lease outlasts its attempts' worst-case sending time, for the store writes
    around them: relay-attempt-timeout, at least 10 s. A lease held by a killed process
    blocks its reports this long past that time."""
    return max(10.0, attempt_timeout)

@dataclass
class Hold:
    """One destination's backoff."""

    until: float = 0.0
    failures: int = 0
    since: float = 0.0  # when the last failure was recorded
    probed: bool = False  # the backlog was made due for the probe after this hold


class Holds:
    """Destinations backing off in this process, thread-safe.

    ``started``: when an attempt began; attempts already running when the destination last
    failed neither end its backoff nor lengthen it (they overlapped the failure).
    """

    def __init__(self, minimum: float, maximum: float) -> None:
        self.minimum, self.maximum = minimum, maximum
        self._lock = threading.Lock()
        self._holds: dict[str, Hold] = {}

    def until(self, dest: str) -> float:
        """When ``dest`` may be tried again (0: now)."""
        with self._lock:
            hold = self._holds.get(dest)
            return hold.until if hold else 0.0

    def fail(self, dest: str, outcome: Outcome, started: float) -> None:
        """``dest`` failed: back off from it, longer after each failure (and at least its
        ``Retry-After``)."""
        with self._lock:
            hold = self._holds.setdefault(dest, Hold())
            if started >= hold.since:  # not one of several attempts failing together
                hold.failures += 1
            delay = httpclient.backoff(hold.failures - 1, self.minimum, self.maximum)
            if outcome.retry_after is not None:
                delay = max(delay, outcome.retry_after)
            hold.until = max(hold.until, time.time() + delay)
            hold.since = time.time()
            hold.probed = False

    def clear(self, dest: str, started: float) -> None:
        """``dest`` took a report sent after its last failure: no backoff any more."""
        with self._lock:
            hold = self._holds.get(dest)
            if hold is not None and started >= hold.since:
                del self._holds[dest]

    def recovering(self, dest: str) -> bool:
        """True once per destination failure: its hold is over and nothing was probed yet."""
        with self._lock:
            hold = self._holds.get(dest)
            if hold is None or hold.failures == 0 or hold.probed:
                return False
            hold.probed = True
            return True

    def waiting(self, now: float) -> dict[str, float]:
        """Seconds left per destination still backing off."""
        with self._lock:
            return {d: round(h.until - now, 1) for d, h in self._holds.items() if h.until > now}


@dataclass
class Process:
    """Relay state of one process (made anew after a fork)."""

    pid: int
    owner: str
    senders: dict[str, Sender]
    holds: Holds
    # Looked up when made (lambda): a worker's patched threading if it was patched after import.
    lock: threading.Lock = field(default_factory=lambda: threading.Lock())
    stop: threading.Event = field(default_factory=lambda: threading.Event())
    wake: threading.Event = field(default_factory=lambda: threading.Event())
    pool: concurrent.futures.ThreadPoolExecutor | None = None
    futures: set[concurrent.futures.Future] = field(default_factory=set)
    loop_pool: concurrent.futures.ThreadPoolExecutor | None = None
    thread: threading.Thread | None = None
    # Reports that may have arrived, by reason (timeout, accepted-without-id), and confirmed.
    tally: collections.Counter[str] = field(default_factory=collections.Counter)


class RelayParts:
    """What ``Relay``'s parts (first_attempt, loop) use of it: ``Relay`` provides them."""

    config: Config
    store: RelayQueue
    _dests: list[str]
    _pool_threads: int
    _max_inflight: int

    def _state(self) -> Process:
        raise NotImplementedError

    def _record(self, ps: Process, dest: str, uuid: str, attempts: int,
                outcome: Outcome, started: float | None = None) -> bool:
        raise NotImplementedError
