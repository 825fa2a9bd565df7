"""Work done by one process of the collector at a time: the retention purge and /metrics.

Built in the master before gunicorn forks (a fresh private run directory, a shared page for
the purge's figures); every worker then runs ``start`` and tries for a lock file in that
directory. The worker holding it is the leader: it serves the metrics on ``metrics-listen``
and purges every ``purge-interval``; when it exits the lock is released and another worker
takes over within a second. Outside gunicorn (tests' Flask client, one process) that process
is the leader.
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import mmap
import os
import shutil
import struct
import tempfile
import threading
import time
from typing import Any

from . import metrics

log = logging.getLogger(__name__)

ELECT_EVERY = 1.0  # seconds between a follower's tries for the leader lock
PURGE_BATCH = 1000  # reports deleted per transaction (other writers go on in between)


def run_directory() -> str:
    """A fresh directory only this user can read (0700), removed when this process exits."""
    path = tempfile.mkdtemp(prefix="tt-server-")
    owner = os.getpid()

    def remove() -> None:
        if os.getpid() == owner:  # forked workers inherit this handler: only the maker removes
            shutil.rmtree(path, ignore_errors=True)

    atexit.register(remove)
    return path


def purge(store: Any, before: float, dry_run: bool = False,
          stop: threading.Event | None = None) -> int:
    """Delete the reports received before ``before`` (Unix time) whose relays are all final;
    how many (with ``dry_run``: how many would go). Reports waiting to be relayed stay."""
    if dry_run:
        return store.purgeable(before)
    total = 0
    while stop is None or not stop.is_set():
        deleted = store.purge(before, PURGE_BATCH)
        total += deleted
        if deleted < PURGE_BATCH:
            break
    return total


class Housekeeping:
    """The leader's work: serve metrics, purge old reports; figures for /healthz."""

    _ROW = struct.Struct("<qd")  # reports purged since start, last purge finished (Unix time)

    def __init__(self, config: Any, store: Any, geo: Any, directory: str) -> None:
        self.store = store
        self.geo = geo
        self.retention = config.retention
        self.interval = config.purge_interval
        self.listen = config.metrics_listen
        self.lock_path = os.path.join(directory, "leader.lock")
        self.shared = mmap.mmap(-1, self._ROW.size)  # made before the fork: every worker's
        self._pid: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._server: Any = None
        self._fd: int | None = None

    def start(self) -> None:
        """Start this process's candidacy (after gunicorn's fork); idempotent."""
        if (not self.retention and not self.listen) or self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._stop = threading.Event()
        self._server = self._fd = None
        self._thread = threading.Thread(target=self._run, name="tt-housekeeping", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop (and give up the lead, if this process has it)."""
        if self._pid != os.getpid():
            return
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._pid = None

    def state(self) -> dict[str, Any]:
        """What the leader published: reports purged since start, when it last purged."""
        purged, last = self._ROW.unpack_from(self.shared)
        return {"purged": purged, "last_run": last or None}

    def health(self) -> dict[str, Any]:
        """The /healthz part: the retention in seconds (0: forever) and the purge's figures."""
        state = self.state()
        last = state["last_run"]
        return {"retention_s": self.retention, "purged": state["purged"],
                "last_purge": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last))
                if last else None}

    # -- the leader --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            log.error("housekeeping: cannot open the leader lock: %s", exc.strerror)
            return
        self._fd = fd
        while not self._stop.is_set():
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                self._stop.wait(ELECT_EVERY)
        else:
            return
        log.info("housekeeping: worker %d leads (metrics, retention purge)", os.getpid())
        if self.listen:
            try:
                self._server = metrics.serve(self.listen, self._live)
            except OSError as exc:
                log.error("metrics: cannot listen on %s: %s", self.listen, exc.strerror)
        while self.retention and not self._stop.is_set():
            self.purge_once()
            self._stop.wait(self.interval)

    def _live(self) -> list[Any]:
        return metrics.live_families(self.store, self.geo, self)

    def purge_once(self) -> int:
        """One purge by the retention; never raises (logged, retried next interval)."""
        try:
            count = purge(self.store, time.time() - self.retention, stop=self._stop)
        except Exception as exc:  # noqa: BLE001 - the loop must go on; the store logged it
            log.warning("retention purge failed: %s", type(exc).__name__)
            return 0
        purged, _ = self._ROW.unpack_from(self.shared)
        self._ROW.pack_into(self.shared, 0, purged + count, time.time())
        metrics.purged(count)
        if count:
            log.info("retention purge: %d reports deleted", count)
        return count
