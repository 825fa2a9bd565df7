"""The gunicorn worker: slow clients and a few networks cannot pin it, its own errors are JSON."""

import json
import select
import selectors
import socket
import threading
import time
from collections import Counter

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tunnel_telemetry.server.worker import ConnectionLimits, corked, error_response, http_error
from tunnel_telemetry.testing.reports import make_report
from tunnel_telemetry.testing.server import answers_200, free_port, wait_for

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


def read_response(sock):
    """One whole response (head and Content-Length bytes of body) from a kept-alive socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


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


@pytest.mark.e2e
def test_slow_clients_do_not_stop_others(tt_server):
    """Idle sockets, trickled heads (new and kept-alive) and stalled bodies at once, on a
    worker with 16 places: other clients are still served; the slow ones are cut off at their
    deadline, a slow head by closing the connection, a slow body with a 408."""
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
        first = read_response(kept_alive)
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

        # The slow ones were cut off at their deadlines: a slow body gets a 408.
        answer = read_all(stalled)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
        assert answer.rstrip().endswith(b'"errors": []}')
        for sock in [*idle, *heads, kept_alive]:
            assert read_all(sock, timeout=1.0) == b"", "a slow head is not answered: closed"
        assert all(not t.is_alive() or t.sent < len(t.data) for t in tricklers)
    finally:
        for trickler in tricklers:
            trickler.stop.set()
        for sock in sockets:
            sock.close()
    logs = server.logs()
    assert logs.count("slow_client_cut body") == 1
    assert "Traceback" not in logs


@pytest.mark.e2e
def test_a_slow_body_cannot_take_more_than_its_share(tt_server):
    """One client address holds at most max-in-flight-per-client threads of a worker."""
    server = tt_server("--workers", "1", "--worker-connections", "16", "--proxy-hops", "1",
                       "--rate-limit", "0", "--max-in-flight-per-client", "1",
                       "--min-upload-rate", "0")  # the held upload stays for this test
    held = []
    try:
        for _ in range(4):
            sock = connect(server)
            head, body = slow_report("192.0.2.50")
            sock.sendall(head + body[:10])
            held.append(sock)
        # Whichever connection the worker took first holds the one slot; which one that is
        # depends on accept order: wait for three answers, then the fourth stays silent.
        answers, silent = {}, set(held)
        deadline = time.monotonic() + 10
        while len(answers) < 3 and time.monotonic() < deadline:
            readable, _, _ = select.select(list(silent), [], [], 0.1)
            for sock in readable:
                answers[sock] = sock.recv(65536)
                silent.discard(sock)
        readable, _, _ = select.select(list(silent), [], [], 0.5)
        assert len(silent) == 1 and not readable, answers
        answers = list(answers.values())
        assert len(answers) == 3 and all(a.startswith(b"HTTP/1.1 429") for a in answers), answers
        with requests.post(server.url + "/report", json=make_report(), timeout=5,
                           headers={"X-Forwarded-For": "198.51.100.2"}) as resp:
            assert resp.status_code == 201
    finally:
        for sock in held:
            sock.close()


@pytest.mark.e2e
def test_header_pieces_and_pipelining_still_work(tt_server):
    """Reading heads in the event loop must not change what a normal client sees."""
    server = tt_server("--workers", "1", "--rate-limit", "0")
    head, body = slow_report("192.0.2.60")
    with connect(server) as sock:
        for piece in (head[:5], head[5:40], head[40:], body):
            sock.sendall(piece)
            time.sleep(0.05)
        assert read_response(sock).startswith(b"HTTP/1.1 201")
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


def from_address(server, source, data=b""):
    """A connection to the server from ``source`` (any 127.x.y.z is this host), sending ``data``."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10,
                                    source_address=(source, 0))
    if data:
        sock.sendall(data)
    return sock


def answered(sock, timeout):
    """What the server sent before closing or ``timeout``; None if it sent nothing yet."""
    sock.settimeout(timeout)
    try:
        return sock.recv(65536)
    except TimeoutError:
        return None
    except ConnectionResetError:
        return b""


def served_at_once(server):
    """A normal client's report, from an address of its own: (status, seconds taken)."""
    started = time.monotonic()
    with requests.post(server.url + "/report", json=make_report(), timeout=10) as resp:
        return resp.status_code, time.monotonic() - started


@pytest.mark.e2e
def test_a_few_networks_cannot_take_every_connection_or_upload(tt_server):
    """Clients of two networks fill the worker's places with idle sockets and trickled heads,
    then hold slow uploads: every in-flight place would be theirs. The caps per address and
    per network leave room for everyone else: a normal client gets its 201 in under a second
    while both run, and min-upload-rate cuts the slow uploads off long before request-timeout
    (30 s)."""
    server = tt_server("--workers", "1", "--worker-connections", "40", "--rate-limit", "0",
                       "--max-in-flight", "8", "--max-connections-per-client", "4",
                       "--max-connections-per-network", "6")
    held = []
    try:
        # 8 addresses of 127.1.0.0/24 x 6 sockets, idle or with half a head: 48 > 40 places.
        for index in range(48):
            data = b"POST /report HTTP/1.1\r\nHost: x\r\n" if index % 2 else b""
            held.append(from_address(server, f"127.1.0.{1 + index % 8}", data))
        refused = [answered(sock, 5) for sock in held[6:]]  # past the network's 6: closed
        assert all(a == b"" or a.startswith(b"HTTP/1.1 429") for a in refused), refused
        assert [answered(sock, 0.05) for sock in held[:6]] == [None] * 6  # still open
        status, took = served_at_once(server)
        assert status == 201 and took < 1.0, (status, took)

        # Then slow uploads from 4 addresses of 127.2.0.0/24, 4 each: 2 per address in flight
        # would take all 8 places; the network's 6 connections leave 2.
        head, body = slow_report("0.0.0.0")
        uploads = [from_address(server, f"127.2.0.{1 + index % 4}", head + body[:10])
                   for index in range(16)]
        held += uploads
        status, took = served_at_once(server)
        assert status == 201 and took < 1.0, (status, took)
        cut = [answered(sock, 10) for sock in uploads]
        assert all(a.startswith(b"HTTP/1.1 408") for a in cut[:6]), cut  # min-upload-rate
        assert all(a == b"" or a.startswith(b"HTTP/1.1 429") for a in cut[6:]), cut
    finally:
        for sock in held:
            sock.close()
    logs = server.logs()
    assert "connection_refused" in logs and "slow_client_cut body" in logs
    assert "127.1.0." not in logs and "127.2.0." not in logs
    assert "Traceback" not in logs


@pytest.mark.parametrize("one, other, same_client, same_network", [
    ("192.0.2.1", "192.0.2.1", True, True),
    ("192.0.2.1", "192.0.2.200", False, True),  # one /24
    ("192.0.2.1", "192.0.3.1", False, False),
    ("192.0.2.1", "::ffff:192.0.2.1", True, True),  # IPv4-mapped is the IPv4 address
    ("2001:db8:1:2::1", "2001:db8:1:2:ffff::9", True, True),  # one /64
    ("2001:db8:1:2::1", "2001:db8:1:3::1", False, True),  # one /48
    ("2001:db8:1:2::1", "2001:db8:2:2::1", False, False),
    ("fe80::1%eth0", "fe80::2", True, True),  # the zone does not matter
])
def test_connection_keys(one, other, same_client, same_network):
    a, b = ConnectionLimits.keys((one, 1)), ConnectionLimits.keys((other, 2))
    assert (a[0] == b[0], a[1] == b[1]) == (same_client, same_network)


def test_connection_caps_count_open_connections_only():
    limits = ConnectionLimits(per_client=2, per_network=3)
    first, second = limits.open(("192.0.2.1", 1)), limits.open(("192.0.2.1", 2))
    assert first and second and limits.open(("192.0.2.1", 3)) is False  # the client's 2
    third = limits.open(("192.0.2.2", 1))
    assert third and limits.open(("192.0.2.3", 1)) is False  # the network's 3
    assert limits.open(("198.51.100.1", 1))  # another network
    limits.close(first)
    assert limits.open(("192.0.2.3", 1))  # a place freed
    assert limits.open(("", 0)) is None and limits.open(None) is None  # no address: not counted
    assert ConnectionLimits(0, 0).open(("192.0.2.1", 1)) is None  # off
    for keys in (second, third):
        limits.close(keys)
    assert "192.0.2.1" not in repr(limits.clients) + repr(limits.networks)


class Flood(threading.Thread):
    """Connections from a few source addresses, held open: each sends its ``data`` at once,
    then, when ``trickle``, one more header byte every TRICKLE seconds. An answered or closed
    connection is counted by its status (``closed`` without one) and, with ``again``, opened
    once more after that many seconds: the flood is kept up."""

    TRICKLE = 0.2

    def __init__(self, server, plan, again=None):
        super().__init__(daemon=True)
        self.server, self.plan, self.again = server, plan, again  # plan: (source, data, trickle)
        self.answers: Counter[str] = Counter()
        self.first_answer: dict[str, float] = {}
        self.ready, self.stop = threading.Event(), threading.Event()
        self.selector = selectors.DefaultSelector()
        self.started = 0.0

    def open(self, index):
        source, data, _ = self.plan[index]
        sock = from_address(self.server, source, data)
        sock.setblocking(False)
        self.selector.register(sock, selectors.EVENT_READ, index)

    def held(self):
        """Connections open and not answered."""
        return len(self.selector.get_map())

    def _answered(self, key, data):
        status = data[9:12].decode() if data.startswith(b"HTTP/1.1 ") else "closed"
        self.answers[status] += 1
        self.first_answer.setdefault(status, time.monotonic() - self.started)
        self.selector.unregister(key.fileobj)
        key.fileobj.close()
        return key.data

    def run(self):
        self.started = time.monotonic()
        for index in range(len(self.plan)):
            self.open(index)
        self.ready.set()
        pending: list[tuple[float, int]] = []
        next_byte = time.monotonic() + self.TRICKLE
        while not self.stop.is_set():
            for key, _ in self.selector.select(timeout=0.05):
                try:
                    data = key.fileobj.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                index = self._answered(key, data)
                if self.again is not None:
                    pending.append((time.monotonic() + self.again, index))
            now = time.monotonic()
            for due, index in [p for p in pending if p[0] <= now]:
                pending.remove((due, index))
                self.open(index)
            if now >= next_byte:
                next_byte = now + self.TRICKLE
                for key in list(self.selector.get_map().values()):
                    if self.plan[key.data][2]:
                        try:
                            key.fileobj.send(b"a")
                        except OSError:
                            self._answered(key, b"")
        for key in list(self.selector.get_map().values()):
            self.selector.unregister(key.fileobj)
            key.fileobj.close()

    def __enter__(self):
        self.start()
        assert self.ready.wait(60)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.join(10)


# The defaults that the test harness turns off (TTServer: one client sends a whole test's load).
DEFAULT_LIMITS = ("--rate-limit", "120", "--max-in-flight-per-client", "2",
                  "--max-connections-per-client", "8", "--max-connections-per-network", "32")


def served_again_and_again(server, seconds):
    """A normal client sending report after report for ``seconds``: the time each took."""
    took = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        status, seconds_taken = served_at_once(server)
        assert status == 201, status
        took.append(seconds_taken)
        time.sleep(0.1)
    return took


@pytest.mark.e2e
def test_two_thousand_idle_or_trickling_sockets_from_a_few_networks(tt_server):
    """Issue 21.4 at its scale and the default limits: 2,000 sockets, idle or trickling a
    request head, from 16 addresses of 4 networks, would take both workers' 1,000 places
    (new clients waited header-timeout, 10 s). Each worker holds 32 of a /24, 8 of an
    address, and answers the rest 429: a normal client gets its 201 in under a second."""
    server = tt_server("--workers", "2", *DEFAULT_LIMITS)
    sources = [f"127.21.{network}.{host}" for network in range(1, 5) for host in range(1, 5)]
    head = b"POST /report HTTP/1.1\r\nHost: collector\r\nX-Pad: "
    plan = [(sources[index % 16], head if index % 2 else b"", bool(index % 2))
            for index in range(2000)]
    with Flood(server, plan) as flood:
        time.sleep(0.5)  # the workers have taken or refused all of them
        took = served_again_and_again(server, 2.0)
        held = flood.held()
    assert len(took) >= 8 and max(took) < 1.0, took
    assert 0 < held <= 2 * 4 * 32, held  # two workers, four networks, 32 each
    refused = flood.answers["429"] + flood.answers["closed"]
    assert flood.answers["429"] > 0 and refused == 2000 - held, flood.answers
    logs = server.logs()
    assert "connection_refused" in logs and "127.21." not in logs and "Traceback" not in logs


@pytest.mark.e2e
def test_sixty_four_addresses_holding_four_slow_uploads_each(tt_server):
    """Issue 21.4's other flood, kept up: 64 addresses (each in a network of its own) send 4
    uploads each that stall after 10 bytes, and send them again when cut off. 256 would be
    the whole max-in-flight of the worker; max-in-flight-per-client lets 2 of an address in,
    min-upload-rate cuts them off in ~3 s instead of request-timeout's 30, and a normal
    client gets its 201 in under a second throughout."""
    server = tt_server("--workers", "1", *DEFAULT_LIMITS)
    head, body = slow_report("0.0.0.0")
    plan = [(f"127.22.{address}.1", head + body[:10], False)
            for address in range(64) for _ in range(4)]
    with Flood(server, plan, again=0.2) as flood:
        took = served_again_and_again(server, 4.0)
    assert len(took) >= 15 and max(took) < 1.0, took
    assert flood.answers["408"] >= 128 and flood.answers["429"] > 0, flood.answers
    assert flood.first_answer["408"] < 4.0, flood.first_answer
    logs = server.logs()
    assert "slow_client_cut body" in logs and "client_busy" in logs
    assert "127.22." not in logs and "Traceback" not in logs


@pytest.mark.skipif(not hasattr(socket, "TCP_CORK"), reason="TCP_CORK is Linux's")
def test_corked_holds_segments_for_the_block_only():
    """An answer's head and body leave together: TCP_CORK is set for the block and cleared
    after it, when the block fails too; a socket that is not TCP is left alone."""
    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.create_connection(server.getsockname()) as sock:
        def cork():
            return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK)

        with corked(sock):
            assert cork() == 1
            sock.sendall(b"HTTP/1.1 201 Created\r\n\r\n")
            sock.sendall(b"{}")
        assert cork() == 0
        with pytest.raises(RuntimeError), corked(sock):
            raise RuntimeError("the app failed")
        assert cork() == 0
        peer, _ = server.accept()
        with peer:
            peer.settimeout(5)
            expected, received = b"HTTP/1.1 201 Created\r\n\r\n{}", b""
            while len(received) < len(expected):
                received += peer.recv(100)
            assert received == expected
    left, right = socket.socketpair()
    with left, right, corked(left):
        left.sendall(b"x")
        assert right.recv(1) == b"x"


@pytest.mark.e2e
def test_the_workers_refusals_are_counted_in_the_metrics(tt_server):
    """What the worker answers itself (never reaching the app) counts in
    tt_reports_rejected_total by reason code, like the app's refusals."""
    port = free_port()
    server = tt_server("--workers", "1", "--metrics-listen", f"127.0.0.1:{port}",
                       "--max-connections-per-client", "1", "--max-report-size", "2000",
                       "--header-timeout", "1s", "--request-timeout", "1s")
    head = b"POST /report HTTP/1.1\r\nHost: c\r\nContent-Type: application/json\r\n"
    asks = [  # (source address, bytes sent, status expected)
        ("127.24.0.1", b"NOT HTTP AT ALL\r\n\r\n", b"400"),
        ("127.24.0.2", head + b"Transfer-Encoding: chunked\r\n\r\n10000\r\n", b"413"),
        ("127.24.0.3", head + b"Content-Length: 500\r\n\r\n{\"uu", b"408"),
    ]
    for source, data, status in asks:
        with from_address(server, source, data) as sock:
            assert read_all(sock).startswith(b"HTTP/1.1 " + status)
    with from_address(server, "127.24.0.4") as held:
        time.sleep(0.3)  # the worker has taken the first connection of this address
        with from_address(server, "127.24.0.4") as second:
            assert read_all(second).startswith(b"HTTP/1.1 429")
        held.sendall(b"GET /healthz HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n")
        assert read_all(held).startswith(b"HTTP/1.1 200")
    assert wait_for(lambda: answers_200(f"http://127.0.0.1:{port}/metrics"), timeout=10)
    with requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        families = list(text_string_to_metric_families(resp.text))
    rejected = {s.labels["reason"]: s.value for f in families for s in f.samples
                if s.name == "tt_reports_rejected_total"}
    assert rejected == {"malformed_http": 1, "too_large": 1, "slow_client_cut": 1,
                        "connection_refused": 1}
    assert "127.24." not in resp.text and "127.24." not in server.logs()

