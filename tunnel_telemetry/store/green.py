"""The store's one concession to gevent: the collector's gunicorn worker runs requests as
greenlets of one OS thread, and what gevent cannot make cooperative (SQLite's statements and
the fsync of a COMMIT, flock; psycopg's C wait) would stall every greenlet of the worker, so
``offload`` runs it in a real OS thread of gevent's thread pool while the others go on (the
group commit's figures in docs/benchmarks.md depend on it).

Code run by ``offload`` must not touch gevent objects (locks, events, log handlers made after
patching): they belong to the hub's thread, and a real thread waiting on one hangs. Locks and
thread-locals it shares with greenlets come from ``native_lock`` and ``native_local``.
Without gevent (the tests' Flask client, ``tt-server relay --once``) everything runs inline.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def active() -> bool:
    """True in a process whose threading module gevent has patched (a collector worker)."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and monkey.is_module_patched("threading")


def offload(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a real thread when gevent is active (the caller's greenlet waits, the
    others run); inline otherwise. Exceptions propagate to the caller."""
    if not active():
        return fn(*args)
    import gevent  # noqa: PLC0415 - only in a patched process

    return gevent.get_hub().threadpool.apply(fn, args)


def native_lock() -> threading.Lock:
    """A lock usable from greenlets and offloaded threads alike (hold it without waiting)."""
    if active():
        from gevent import monkey  # noqa: PLC0415

        return monkey.get_original("_thread", "allocate_lock")()
    return threading.Lock()


def native_local() -> threading.local:
    """Per-OS-thread storage: all greenlets of a worker share one value, each offload thread
    has its own (gevent's patched ``threading.local`` would give every greenlet its own)."""
    if active():
        from gevent import monkey  # noqa: PLC0415

        return monkey.get_original("_thread", "_local")()
    return threading.local()


class ProcessLock:
    """A lock made anew in each process on first use, for sections that may wait (start a
    thread, open a pool). Made before the fork it would be native in a gevent worker, and a
    greenlet waiting while it holds a native lock hangs the worker when another one asks."""

    def __init__(self) -> None:
        self._guard = threading.Lock()  # held only without waiting
        self._pid: int | None = None
        self._lock: threading.Lock | None = None
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        self._guard = threading.Lock()

    def _current(self) -> threading.Lock:
        pid = os.getpid()
        lock = self._lock
        if self._pid != pid or lock is None:
            with self._guard:
                if self._pid != pid or self._lock is None:
                    self._lock, self._pid = threading.Lock(), pid
                lock = self._lock
        return lock

    def __enter__(self) -> bool:
        return self._current().acquire()

    def __exit__(self, *exc: object) -> None:
        if self._lock is None:
            raise RuntimeError("ProcessLock released before it was taken")
        self._lock.release()
