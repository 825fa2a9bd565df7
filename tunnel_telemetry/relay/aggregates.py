"""Relaying aggregates instead of reports (``relay-aggregates-url``): each closed UTC day's
k-anonymous document goes to a secondary collector's ``POST /aggregates``, so an operator can
share what fails where without any single report leaving this collector.

Each worker sends the closed days of the last week it has not delivered yet, once a day
closes (and after a start: the secondary keeps one copy per collector and day, so a day sent
twice, by two workers or after a restart, replaces itself). A failed send is retried with the
relay's backoff; nothing is queued in the store.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING

from .. import httpclient
from ..aggregate import PERIODS, Query, build, parse_query
from .http import HTTP_ERRORS, RelayHTTP, classify_exception, classify_response, json_body
from .outcome import Outcome

if TYPE_CHECKING:
    from ..config import Config
    from ..store import Reports

log = logging.getLogger(__name__)

PATH = "/aggregates"
LOOKBACK = 7  # closed days (re)sent after a start


class AggregateRelay:
    """Sends closed days to ``relay-aggregates-url`` from one thread per process."""

    def __init__(self, config: Config, store: Reports) -> None:
        if not config.relay_aggregates_url:
            raise ValueError("relay-aggregates-url is not set")
        self.config = config
        self.store = store
        self.http = RelayHTTP(config.relay_aggregates_url, 1,
                              {"Authorization": f"Bearer {config.relay_token}"})
        self.sent_until: int | None = None  # end of the last day delivered (this process)
        self.failures = 0
        self._pid: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def due(self, now: float) -> Query | None:
        """The closed days not delivered yet (the last LOOKBACK at most, and only days whose
        reports the retention purge has not begun to delete: sent again after a restart, a
        purged day would replace the secondary's copy), or None."""
        day = PERIODS["day"]
        end = parse_query({"period": "day"}, now).end
        start = max(end - LOOKBACK * day, self.sent_until or 0)
        retention = self.config.retention
        if retention:
            start = max(start, -int(-(now - retention) // day) * day)
        return Query(start, end, "day") if start < end else None

    def send_due(self, now: float | None = None) -> Outcome | None:
        """Send what is due now; its outcome (None: nothing due)."""
        query = self.due(time.time() if now is None else now)
        if query is None:
            return None
        document = build(self.store, query, self.config.aggregate_k)
        body = json_body({"source": self.config.collector_id, **document})
        timeout = (min(5.0, self.config.relay_attempt_timeout), self.config.relay_attempt_timeout)
        try:
            with self.http.post(PATH, body, timeout) as response:
                outcome = classify_response(response) or Outcome.delivered()
        except HTTP_ERRORS as exc:
            outcome = classify_exception(exc)
        if outcome.state == "delivered":
            self.sent_until, self.failures = query.end, 0
            log.info("relay aggregates: delivered %d days", (query.end - query.start) // 86400)
        else:
            self.failures += 1
            log.warning("relay aggregates: %s (%s)", outcome.state, outcome.describe())
        return outcome

    def _loop(self) -> None:
        while not self._stop.is_set():
            wait = self.config.relay_interval
            try:
                outcome = self.send_due()
            except Exception as exc:  # noqa: BLE001 - the loop must go on (store down ...)
                log.error("relay aggregates: %s", type(exc).__name__)
                outcome = Outcome.retry("error")
            if outcome is not None and outcome.state != "delivered":
                wait = httpclient.backoff(self.failures, self.config.relay_retry_min,
                                          self.config.relay_retry_max)
                if outcome.retry_after is not None:
                    wait = max(wait, outcome.retry_after)
            self._stop.wait(wait)

    def start(self) -> None:
        """Start this process's sender (after gunicorn's fork); idempotent."""
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tt-relay-aggregates",
                                        daemon=True)
        self._thread.start()

    def close(self, wait: float = 5.0) -> None:
        if self._pid != os.getpid() or self._thread is None:
            return
        self._stop.set()
        self._thread.join(wait)
        self.http.close()


def build_aggregate_relay(config: Config, store: Reports) -> AggregateRelay | None:
    """The sender when ``relay-aggregates-url`` is set, else None."""
    return AggregateRelay(config, store) if config.relay_aggregates_url else None
