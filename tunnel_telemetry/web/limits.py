"""Abuse controls: a per-client rate limit and in-flight caps, shared by all gunicorn workers.

create_app runs in the gunicorn master (preload_app), so the shared memory made here before
the fork is the same in every worker. A client is known only by a keyed hash: HMAC-SHA256 of
its address (IPv6: its /64) under a random key made at start-up and held only in memory. The
table keeps 8 bytes of that hash, never an address, in anonymous memory (memfd), not on disk.

Cross-process locking is a process-shared semaphore (multiprocessing.Lock), only ever tried
without blocking: taking a free one is an atomic operation in user space, with no system call
and no release of the GIL. A thread that finds it taken sleeps a moment (releasing the GIL, so
a holder in the same process can finish) and tries again. A thread never holds the lock while
it waits for the GIL at a system call; an fcntl lock, or a blocking wait, did exactly that on
every request, and every other thread of both workers queued behind it. It is taken once per
request (token and in-flight slot together) and once to give the slot back. Where POSIX
semaphores are missing (a container without /dev/shm) the fcntl lock is used instead, slower.

A worker SIGKILLed while holding the lock would wedge the others, so the holder writes its pid
beside the table, and a waiter that has waited STUCK_AFTER seconds takes over the lock of a
holder that is gone (the takeover is serialised by an fcntl lock, taken only then).
"""

from __future__ import annotations

import fcntl
import hmac
import ipaddress
import logging
import mmap
import multiprocessing
import os
import secrets
import struct
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ..errors import Busy

log = logging.getLogger(__name__)

BUCKETS = 65536  # client buckets in the shared table (24 bytes each: 1.5 MiB)
PROBES = 8  # buckets looked at per client; the most idle one is reused when all are taken
MAX_PROCESSES = 256  # in-flight counters, one per worker process (workers <= 256)
STUCK_AFTER = 1.0  # seconds a waiter waits before it checks whether the lock holder is alive
_HOLDER = struct.Struct("<q")  # pid of the process holding the lock (0: none), at offset 0
_BUCKET = struct.Struct("<Qdd")  # hashed client, tokens, monotonic time of the last update
_TOTAL = struct.Struct("<i")  # requests in flight, all processes (the sum of the slots)
_TOTAL_AT = _HOLDER.size
_SLOT = struct.Struct("<ii")  # pid, requests in flight
_SLOTS = struct.Struct(f"<{2 * MAX_PROCESSES}i")
_SLOTS_AT = _TOTAL_AT + _TOTAL.size
_BUCKETS_AT = _SLOTS_AT + _SLOTS.size


def _slot_at(index: int) -> int:
    """Offset of the index-th process's in-flight counter in the table."""
    return _SLOTS_AT + index * _SLOT.size


class SharedMemory:
    """A zeroed, fixed-size shared mapping with a lock that works across processes."""

    def __init__(self, size: int) -> None:
        try:
            self.fd = os.memfd_create("tunnel-telemetry-limits", os.MFD_CLOEXEC)
        except (AttributeError, OSError):  # not Linux: an unlinked temporary file
            self.fd = os.dup(tempfile.TemporaryFile().fileno())  # noqa: SIM115
        os.ftruncate(self.fd, size)
        self.buf = mmap.mmap(self.fd, size)
        try:
            self._sem: Any = multiprocessing.Lock()
        except (OSError, ImportError):  # no POSIX semaphores (a container without /dev/shm)
            log.warning("limits_slow_lock: no POSIX semaphores here; using an fcntl lock")
            self._sem = None
        self._thread_lock = threading.Lock()
        self.pid = os.getpid()
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        self.pid = os.getpid()
        self._thread_lock = threading.Lock()  # a lock held by another thread at fork stays held

    def lock(self) -> SharedMemory:
        """``with shm.lock() as buf``: the table, held by this thread and process only."""
        return self

    def __enter__(self) -> mmap.mmap:
        if self._sem is None:  # the slower fallback: a thread lock, then a record lock
            self._thread_lock.acquire()
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_EX)
            except BaseException:
                self._thread_lock.release()
                raise
            return self.buf
        if not self._sem.acquire(False):
            self._wait()
        _HOLDER.pack_into(self.buf, 0, self.pid)
        return self.buf

    def __exit__(self, *exc: object) -> None:
        if self._sem is None:
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_UN)
            finally:
                self._thread_lock.release()
            return
        _HOLDER.pack_into(self.buf, 0, 0)
        self._sem.release()

    def _wait(self) -> None:
        """Take the lock held by someone else: retry after short sleeps; after STUCK_AFTER,
        take it over if its holder died holding it."""
        delay = 20e-6
        deadline = time.monotonic() + STUCK_AFTER
        nobody_seen = False
        while not self._sem.acquire(False):
            time.sleep(delay)
            delay = min(delay * 2, 0.001)
            if time.monotonic() < deadline:
                continue
            deadline = time.monotonic() + STUCK_AFTER
            fcntl.lockf(self.fd, fcntl.LOCK_EX)
            try:
                holder = _HOLDER.unpack_from(self.buf, 0)[0]
                # Holder 0 twice: it died between taking the lock and writing its pid.
                if (holder == 0 and nobody_seen) or (
                        holder and holder != self.pid and not _alive(holder)):
                    log.warning("limits_lock_recovered: a worker died holding it")
                    _HOLDER.pack_into(self.buf, 0, self.pid)  # ours now, still taken
                    return
                nobody_seen = holder == 0
            finally:
                fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self.buf.close()
        os.close(self.fd)


class RateLimiter:
    """Token buckets: ``per_minute`` requests a minute per client, ``burst`` at once."""

    def __init__(self, shm: SharedMemory, per_minute: int, burst: int) -> None:
        self.shm = shm
        self.rate = per_minute / 60.0
        self.burst = float(burst)

    def _refilled(self, tokens: float, stamp: float, now: float) -> float:
        return min(self.burst, tokens + max(0.0, now - stamp) * self.rate)

    def take(self, client: int, now: float | None = None) -> float:
        """Take a token for ``client``: 0 when allowed, else the seconds until one is due."""
        with self.shm.lock() as buf:
            return self.take_locked(buf, client, time.monotonic() if now is None else now)

    def take_locked(self, buf: Any, client: int, now: float) -> float:
        """take() for a caller that holds the shared lock."""
        first = client % BUCKETS
        victim, victim_tokens = -1, -1.0
        for i in range(PROBES):
            index = (first + i) % BUCKETS
            key, tokens, stamp = _BUCKET.unpack_from(buf, _BUCKETS_AT + index * _BUCKET.size)
            if key == client:
                victim, tokens = index, self._refilled(tokens, stamp, now)
                break
            # Reuse an empty bucket, else the fullest: it is the one that lost least.
            idle = self.burst + 1 if key == 0 else self._refilled(tokens, stamp, now)
            if idle > victim_tokens:
                victim, victim_tokens = index, idle
        else:
            tokens = self.burst
        if tokens >= 1.0:
            tokens -= 1.0
            wait = 0.0
        else:
            wait = (1.0 - tokens) / self.rate
        _BUCKET.pack_into(buf, _BUCKETS_AT + victim * _BUCKET.size, client, tokens, now)
        return wait


class InFlight:
    """Requests in progress across all workers: one counter per process, summed on entry.

    A worker killed mid-request leaves its counter behind; counters of dead processes are
    cleared whenever a process claims its slot and before a request is refused.
    """

    def __init__(self, shm: SharedMemory, cap: int) -> None:
        self.shm = shm
        self.cap = cap
        self._slot: tuple[int, int] | None = None  # (pid, index) of this process

    def _index(self, buf: Any) -> int:
        """This process's counter (claimed on first use after a fork); -1 if none is free."""
        pid = self.shm.pid
        if self._slot is not None and self._slot[0] == pid:
            return self._slot[1]
        self._reap(buf)
        pids = _SLOTS.unpack_from(buf, _SLOTS_AT)[0::2]
        if pid in pids:
            index = pids.index(pid)
        elif 0 in pids:
            index = pids.index(0)
            _SLOT.pack_into(buf, _slot_at(index), pid, 0)
        else:
            return -1
        self._slot = (pid, index)
        return index

    def _reap(self, buf: Any) -> bool:
        """Free the slots of processes that are gone (their requests leave the total); True
        if any was."""
        values = _SLOTS.unpack_from(buf, _SLOTS_AT)
        freed = False
        for index, pid in enumerate(values[0::2]):
            if pid and pid != self.shm.pid and not _alive(pid):
                _SLOT.pack_into(buf, _slot_at(index), 0, 0)
                _add_total(buf, -values[2 * index + 1])
                freed = True
        return freed

    def enter(self) -> bool:
        with self.shm.lock() as buf:
            return self.enter_locked(buf)

    def enter_locked(self, buf: Any) -> bool:
        """enter() for a caller that holds the shared lock."""
        index = self._index(buf)
        if index < 0:  # more processes than slots: do not refuse for our own bookkeeping
            return True
        total = _TOTAL.unpack_from(buf, _TOTAL_AT)[0]
        if total >= self.cap and self._reap(buf):
            total = _TOTAL.unpack_from(buf, _TOTAL_AT)[0]
        if total >= self.cap:
            return False
        pid, count = _SLOT.unpack_from(buf, _slot_at(index))
        _SLOT.pack_into(buf, _slot_at(index), pid, count + 1)
        _TOTAL.pack_into(buf, _TOTAL_AT, total + 1)
        return True

    def leave(self) -> None:
        with self.shm.lock() as buf:
            index = self._index(buf)
            if index >= 0:
                pid, count = _SLOT.unpack_from(buf, _slot_at(index))
                if count > 0:
                    _SLOT.pack_into(buf, _slot_at(index), pid, count - 1)
                    _add_total(buf, -1)

    def total(self) -> int:
        with self.shm.lock() as buf:
            return _TOTAL.unpack_from(buf, _TOTAL_AT)[0]


def _add_total(buf: Any, delta: int) -> None:
    total = _TOTAL.unpack_from(buf, _TOTAL_AT)[0]
    _TOTAL.pack_into(buf, _TOTAL_AT, max(0, total + delta))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ClientInFlight:
    """Bodies one client is sending to this process at once (a slow upload holds a thread)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._lock = threading.Lock()
        self._counts: Counter[int] = Counter()
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._counts = Counter()

    def enter(self, client: int) -> bool:
        with self._lock:
            if self._counts[client] >= self.cap:
                return False
            self._counts[client] += 1
            return True

    def leave(self, client: int) -> None:
        with self._lock:
            self._counts[client] -= 1
            if self._counts[client] <= 0:
                del self._counts[client]


@dataclass
class Ticket:
    """What admit() took for one request, given back by release()."""

    client: int
    global_slot: bool = False
    client_slot: bool = False


class Limits:
    """The abuse controls of one collector; each part is None when its option is 0."""

    def __init__(self, rate: RateLimiter | None, inflight: InFlight | None,
                 client_inflight: ClientInFlight | None, shm: SharedMemory | None) -> None:
        self.rate = rate
        self.inflight = inflight
        self.client_inflight = client_inflight
        self.shm = shm
        self._key = secrets.token_bytes(32)  # in memory only; a restart makes a new one
        self._pid = os.getpid()

    def client_key(self, ip: Any) -> int:
        """A 64-bit keyed hash of the client address (an ``ipaddress`` object or text; IPv6:
        its /64); never 0."""
        address = ip
        if not isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address):
            try:
                address = ipaddress.ip_address(ip or "")
            except ValueError:
                address = None
        if address is None:
            raw = b"?"
        else:
            if address.version == 6 and address.ipv4_mapped is not None:
                address = address.ipv4_mapped
            raw = b"4" + address.packed if address.version == 4 else b"6" + address.packed[:8]
        digest = hmac.digest(self._key, raw, "sha256")
        return int.from_bytes(digest[:8], "little") or 1

    def admit(self, ip: Any, per_client: bool = True) -> Ticket:
        """Let a request in, or raise Busy (429 for this client, 503 for everyone).

        ``per_client=False`` applies the global cap only (authenticated collector traffic).
        """
        ticket = Ticket(self.client_key(ip))
        if per_client and self.client_inflight is not None:
            if not self.client_inflight.enter(ticket.client):
                raise Busy("client_busy", "too many requests in progress from this address",
                           retry_after=1)
            ticket.client_slot = True
        rate = self.rate if per_client else None
        if rate is None and self.inflight is None:
            return ticket
        wait, admitted = 0.0, True
        with self.shm.lock() as buf:  # one cross-process lock for the token and the slot
            if rate is not None:
                wait = rate.take_locked(buf, ticket.client, time.monotonic())
            if wait <= 0 and self.inflight is not None:
                admitted = ticket.global_slot = self.inflight.enter_locked(buf)
        if wait > 0:
            self.release(ticket)
            raise Busy("rate_limited", "too many reports from this address, retry later",
                       retry_after=wait)
        if not admitted:
            self.release(ticket)
            raise Busy("busy", "the collector is busy, retry later", retry_after=2)
        return ticket

    def release_client(self, ticket: Ticket) -> None:
        """The body is in: a client's slot guards uploads, not the processing that follows
        (relay waits, store contention), which many clients behind one NAT may share."""
        if ticket.client_slot and self.client_inflight is not None:
            self.client_inflight.leave(ticket.client)
            ticket.client_slot = False

    def release(self, ticket: Ticket) -> None:
        self.release_client(ticket)
        if ticket.global_slot and self.inflight is not None:
            self.inflight.leave()
            ticket.global_slot = False

    def close(self) -> None:
        """Release the shared memory, in the process that made it only.

        A gunicorn worker closes its services on exit while, past graceful-timeout, request
        threads may still run: they must not find the table gone (the process exits anyway).
        """
        if self.shm is not None and os.getpid() == self._pid:
            self.shm.close()
            self.shm = None


def build_limits(config: Any) -> Limits:
    """The abuse controls for this configuration (shared memory made now, before any fork)."""
    shm = None
    if config.rate_limit or config.max_in_flight:
        shm = SharedMemory(_BUCKETS_AT + BUCKETS * _BUCKET.size)
    rate = RateLimiter(shm, config.rate_limit, config.rate_limit_burst) \
        if config.rate_limit and shm is not None else None
    inflight = InFlight(shm, config.max_in_flight) \
        if config.max_in_flight and shm is not None else None
    client = ClientInFlight(config.max_in_flight_per_client) \
        if config.max_in_flight_per_client else None
    return Limits(rate, inflight, client, shm)


def init_app(app: Any, limits: Limits) -> None:
    """Admit every POST through ``limits`` before its body is read; release it afterwards.

    The per-client limits apply to POST /report, the public endpoint; POST /relay carries a
    primary collector's token (checked before its body is read) and counts against the
    global in-flight cap only, so one primary draining a backlog is not throttled as a client.
    """
    from flask import request

    from .proxy import ENVIRON_KEY

    @app.before_request
    def _admit() -> None:
        req = request._get_current_object()
        if req.method == "POST":
            environ = req.environ
            environ[TICKET_KEY] = limits.admit(environ.get(ENVIRON_KEY),
                                               per_client=req.path == "/report")
            environ[LIMITS_KEY] = limits

    @app.teardown_request
    def _release(exc: BaseException | None) -> None:
        ticket = request.environ.pop(TICKET_KEY, None)
        if ticket is not None:
            limits.release(ticket)


TICKET_KEY = "tunnel_telemetry.ticket"  # what admit() took for this request (WSGI environ)
LIMITS_KEY = "tunnel_telemetry.limits"


def body_read(environ: dict[str, Any]) -> None:
    """Called by the view once the request body is read: give back the client's slot."""
    ticket = environ.get(TICKET_KEY)
    if ticket is not None:
        environ[LIMITS_KEY].release_client(ticket)
