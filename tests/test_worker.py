"""The gunicorn worker: slow clients cannot pin it, its own errors are JSON."""

import json
import os
import socket
import threading
import time

import pytest
import requests

from tunnel_telemetry.server.worker import error_response, http_error
from tunnel_telemetry.testing.reports import make_report

pytestmark = pytest.mark.e2e

HEADER_TIMEOUT = 2.0
REQUEST_TIMEOUT = 3.0


def connect(server):
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def read_all(sock, timeout=10.0):
    """Everything the server sends until it closes the connection."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        data += chunk
    return data


class Trickler(threading.Thread):
    """Sends ``data`` one byte every ``interval`` until the server stops listening."""

    def __init__(self, sock, data, interval=0.1):
        super().__init__(daemon=True)
        self.sock, self.data, self.interval = sock, data, interval
        self.stop = threading.Event()
        self.sent = 0

    def run(self):
        for byte in self.data:
            if self.stop.wait(self.interval):
                return
            try:
                self.sock.send(bytes([byte]))
            except OSError:
                return
            self.sent += 1


def slow_report(address):
    body = json.dumps(make_report()).encode()
    head = (b"POST /report HTTP/1.1\r\nHost: collector\r\nContent-Type: application/json\r\n"
            b"X-Forwarded-For: " + address.encode() + b"\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    return head, body


def test_slow_clients_do_not_stop_others(tt_server):
    """Idle sockets, trickled heads (new and kept-alive) and stalled bodies at once, on a
    worker with two threads: other clients are still served, and the slow ones are cut off
    with a 408 at their deadline."""
    server = tt_server("--workers", "1", "--worker-connections", "16", "--proxy-hops", "1",
                       "--rate-limit", "0", "--header-timeout", f"{HEADER_TIMEOUT}s",
                       "--request-timeout", f"{REQUEST_TIMEOUT}s")
    sockets, tricklers = [], []
    try:
        idle = [connect(server) for _ in range(4)]
        heads = [connect(server) for _ in range(4)]
        kept_alive = connect(server)
        stalled = connect(server)
        sockets += [*idle, *heads, kept_alive, stalled]

        for index, sock in enumerate(heads):
            head, _ = slow_report(f"192.0.2.{10 + index}")
            tricklers.append(Trickler(sock, head * 10))
        # One full request, then the next head trickled on the same connection.
        head, body = slow_report("192.0.2.20")
        kept_alive.sendall(head + body)
        first = kept_alive.recv(65536)
        assert first.startswith(b"HTTP/1.1 201"), first[:200]
        tricklers.append(Trickler(kept_alive, head * 10))
        # Headers complete, body stalled after 10 bytes: the app is reading it.
        head, body = slow_report("192.0.2.30")
        stalled.sendall(head + body[:10])
        for trickler in tricklers:
            trickler.start()

        # Meanwhile another client is served at once, again and again.
        started = time.monotonic()
        served = 0
        with requests.Session() as session:
            while time.monotonic() - started < REQUEST_TIMEOUT + 1:
                with session.post(server.url + "/report", json=make_report(), timeout=5,
                                  headers={"X-Forwarded-For": "198.51.100.1"}) as resp:
                    assert resp.status_code == 201
                served += 1
                time.sleep(0.05)
        assert served > 10

        # The slow ones were cut off at their deadlines; whoever sent a head gets a 408.
        for sock in [*heads, kept_alive, stalled]:
            answer = read_all(sock)
            assert b"HTTP/1.1 408" in answer, answer[:300]
            assert answer.rstrip().endswith(b'"errors": []}')
        for sock in idle:
            assert read_all(sock) == b"", "nothing sent, nothing answered: just closed"
        assert all(not t.is_alive() or t.sent < len(t.data) for t in tricklers)
    finally:
        for trickler in tricklers:
            trickler.stop.set()
        for sock in sockets:
            sock.close()
    logs = server.logs()
    assert logs.count("slow_client_cut head") >= 5
    assert logs.count("slow_client_cut body") >= 1
    assert "Traceback" not in logs


def test_a_slow_body_cannot_take_more_than_its_share(tt_server):
    """One client address holds at most max-in-flight-per-client threads of a worker."""
    server = tt_server("--workers", "1", "--worker-connections", "16", "--proxy-hops", "1",
                       "--rate-limit", "0", "--max-in-flight-per-client", "1")
    held = []
    try:
        for _ in range(4):
            sock = connect(server)
            head, body = slow_report("192.0.2.50")
            sock.sendall(head + body[:10])
            held.append(sock)
        # Whichever connection the worker took first holds the one slot; which one that is
        # depends on accept order, so read every socket and expect exactly one still waiting.
        answers, waiting = [], 0
        deadline = time.monotonic() + 10
        for sock in held:
            sock.settimeout(max(0.5, deadline - time.monotonic()) if len(answers) < 3 else 0.5)
            try:
                answers.append(sock.recv(65536))
            except TimeoutError:
                waiting += 1
        assert waiting == 1, answers
        assert len(answers) == 3 and all(a.startswith(b"HTTP/1.1 429") for a in answers), answers
        with requests.post(server.url + "/report", json=make_report(), timeout=5,
                           headers={"X-Forwarded-For": "198.51.100.2"}) as resp:
            assert resp.status_code == 201
    finally:
        for sock in held:
            sock.close()


def test_header_pieces_and_pipelining_still_work(tt_server):
    """Reading heads in the event loop must not change what a normal client sees."""
    server = tt_server("--workers", "1", "--rate-limit", "0")
    head, body = slow_report("192.0.2.60")
    with connect(server) as sock:
        for piece in (head[:5], head[5:40], head[40:], body):
            sock.sendall(piece)
            time.sleep(0.05)
        assert sock.recv(65536).startswith(b"HTTP/1.1 201")
        # Two requests in one write (pipelined) on the kept-alive connection.
        sock.sendall(head + body + head + body)
        data = b""
        deadline = time.monotonic() + 5
        while data.count(b"HTTP/1.1 201") < 2 and time.monotonic() < deadline:
            data += sock.recv(65536)
        assert data.count(b"HTTP/1.1 201") == 2
    # A bare-LF head is still answered (gunicorn rejects it), not left waiting.
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\nHost: x\n\n")
        answer = read_all(sock, timeout=5)
        assert answer.startswith(b"HTTP/1.1 "), answer


@pytest.mark.parametrize("exc, status", [
    (__import__("gunicorn.http.errors").http.errors.LimitRequestLine("x" * 9000, 4094), 414),
    (__import__("gunicorn.http.errors").http.errors.InvalidHeader("X-Secret-10.0.0.1"), 400),
    (RuntimeError("boom"), 500),
])
def test_error_answers_are_fixed_json(exc, status):
    code, message = http_error(exc)
    assert code == status
    raw = error_response(code, message)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode())
    assert b"Content-Type: application/json" in head
    assert json.loads(body) == {"ok": False, "msg": message, "errors": []}
    assert b"10.0.0.1" not in raw and b"xxx" not in raw


def test_balance_leaves_connections_to_a_less_loaded_live_worker():
    """Balance reads the other workers' slots in the shared memory: wait only when a live
    (recently beating) worker holds clearly fewer connections."""
    import os
    import struct

    from tunnel_telemetry.server.worker import BALANCE_FLOOR, Balance

    row = struct.Struct("<qqd")
    mine, other = Balance(), 5

    def other_worker(count, age=0.0, pid=None):
        pid = os.getppid() if pid is None else pid
        row.pack_into(mine.buf, other * row.size, pid, count, time.monotonic() - age)

    mine.join(age=1)
    assert not mine.should_wait()  # alone
    for _ in range(12):
        mine.opened(1)
    other_worker(0)
    assert mine.should_wait()
    other_worker(10)
    assert not mine.should_wait()  # within the slack (1 + an eighth)
    other_worker(0, age=5.0)
    assert not mine.should_wait()  # stuck or dead: not waited for
    other_worker(0, pid=0)
    assert not mine.should_wait()  # left
    other_worker(0)
    for _ in range(12 - BALANCE_FLOOR + 1):
        mine.opened(-1)
    assert not mine.should_wait()  # few connections: always accepts
    mine.leave()
    assert row.unpack_from(mine.buf, row.size * 1)[0] == 0


def _connections_per_worker(server):
    """Established connections to the server's port held by each worker (from /proc)."""
    sockets = {}
    lines = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            lines += fh.read().splitlines()[1:]
    for line in lines:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        if local_port == server.port and fields[3] == "01":  # ESTABLISHED
            sockets[fields[9]] = True
    counts = {}
    for pid in server.worker_pids():
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        counts[pid] = sum(1 for inode in sockets if inode in inodes)
    return counts


def test_a_burst_of_connections_is_shared_between_workers(tt_server):
    """60 keep-alive connections opened at once (a proxy's pool, a load generator) end up
    spread evenly over the 2 workers, burst after burst (without the balance, bursts here
    split 47/13, 42/18 ...; a fair coin would pass three bursts in a row 1 time in 4)."""
    server = tt_server("--workers", "2", "--rate-limit", "0")
    time.sleep(1.0)  # the second worker is up (a worker booting takes no connections yet)
    for _ in range(3):
        socks = [connect(server) for _ in range(60)]
        try:
            for sock in socks:
                sock.sendall(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
            for sock in socks:
                sock.settimeout(10)
                assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            counts = sorted(_connections_per_worker(server).values())
            assert sum(counts) >= 60 and counts[1] - counts[0] <= 6, counts
        finally:
            for sock in socks:
                sock.close()
        time.sleep(0.5)
