import ipaddress
import json
import multiprocessing
import os
import select
import signal
import socket
import threading
import time

import pytest
import requests

from tunnel_telemetry.config import Config, ConfigError
from tunnel_telemetry.testing.reports import make_report
from tunnel_telemetry.testing.server import wait_for
from tunnel_telemetry.web import create_app
from tunnel_telemetry.web.errors import status_of
from tunnel_telemetry.web.limits import BUCKETS, PROBES, STUCK_AFTER, build_limits


def limits_for(**options):
    return build_limits(Config.from_mapping({k.replace("_", "-"): v for k, v in options.items()}))


@pytest.fixture
def limits():
    made = []

    def make(**options):
        made.append(limits_for(**options))
        return made[-1]

    yield make
    for item in made:
        item.close()


# ---------------------------------------------------------------------------------------------
# Units


def test_token_bucket_burst_then_retry_after(limits):
    rate = limits(rate_limit=60, rate_limit_burst=3).rate  # one a second
    now = 1000.0
    assert [rate.take(7, now) for _ in range(3)] == [0, 0, 0]
    assert rate.take(7, now) == pytest.approx(1.0)
    assert rate.take(7, now + 0.5) == pytest.approx(0.5)
    assert rate.take(7, now + 1.0) == 0
    assert rate.take(8, now) == 0, "another client has its own bucket"


def test_token_bucket_refills_up_to_the_burst_only(limits):
    rate = limits(rate_limit=60, rate_limit_burst=2).rate
    assert rate.take(7, 0.0) == 0
    assert [rate.take(7, 3600.0) for _ in range(3)][:2] == [0, 0]
    assert rate.take(7, 3600.0) > 0


def test_a_full_probe_window_evicts_the_most_idle_bucket(limits):
    rate = limits(rate_limit=60, rate_limit_burst=2).rate
    colliding = [5 + i * BUCKETS for i in range(1, PROBES + 2)]
    hog = colliding[0]
    rate.take(hog, 10.0)
    rate.take(hog, 10.0)  # empty
    for client in colliding[1:PROBES]:
        rate.take(client, 0.0)  # one token left each, and older
    rate.take(colliding[PROBES], 10.0)  # the window is full: someone is evicted, not the hog
    assert rate.take(hog, 10.0) > 0


def test_client_key_is_keyed_and_groups_ipv6_by_64(limits):
    first, second = limits(), limits()
    assert first.client_key("2001:db8:1:2::1") == first.client_key("2001:db8:1:2:ffff::9")
    assert first.client_key("2001:db8:1:2::1") != first.client_key("2001:db8:1:3::1")
    assert first.client_key("::ffff:192.0.2.1") == first.client_key("192.0.2.1")
    assert first.client_key("192.0.2.1") != first.client_key("192.0.2.2")
    assert first.client_key(None) == first.client_key("garbage") != 0
    assert first.client_key("192.0.2.1") != second.client_key("192.0.2.1"), "random key"


def test_shared_table_holds_no_address(limits):
    limit = limits(rate_limit=60, max_in_flight=4)
    addresses = ["203.0.113.77", "2001:db8:abcd:12::1", "198.51.100.200"]
    for address in addresses:
        ticket = limit.admit(address)
        limit.release(ticket)
    raw = bytes(limit.shm.buf)
    for address in addresses:
        parsed = ipaddress.ip_address(address)
        assert parsed.packed[:8] not in raw
        assert address.encode() not in raw
    assert raw.count(b"\0") < len(raw), "something was written"


def _hold_a_slot(limit, ready):
    assert limit.inflight.enter()
    assert limit.rate.take(99) == 0
    ready.set()
    time.sleep(60)  # until SIGKILLed


def test_in_flight_is_shared_across_processes_and_survives_a_killed_holder(limits):
    limit = limits(max_in_flight=1, rate_limit=60, rate_limit_burst=2)
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_hold_a_slot, args=(limit, ready))
    child.start()
    try:
        assert ready.wait(10)
        assert limit.inflight.total() == 1
        assert limit.inflight.enter() is False, "the child's request counts here"
        assert limit.rate.take(99) == 0 and limit.rate.take(99) > 0, "and so does its token"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        child.close()
    assert limit.inflight.enter() is True, "a dead process's slot is reclaimed"
    limit.inflight.leave()
    assert limit.inflight.total() == 0


def _die_holding_the_lock(limit, ready, write_pid):
    held = limit.shm.lock()  # kept referenced: a collected generator would release it
    if write_pid:
        held.__enter__()
    else:  # killed between taking the lock and writing its pid
        limit.shm._sem.acquire()
    ready.set()
    time.sleep(60)  # until SIGKILLed


@pytest.mark.parametrize("write_pid", [True, False], ids=["holder-known", "holder-unwritten"])
def test_a_worker_killed_holding_the_lock_does_not_wedge_the_others(limits, write_pid):
    limit = limits(max_in_flight=4, rate_limit=60)
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_die_holding_the_lock, args=(limit, ready, write_pid))
    child.start()
    try:
        assert ready.wait(10)
        assert limit.shm._sem.acquire(False) is False, "the child holds it"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        child.close()
    started = time.monotonic()
    ticket = limit.admit("192.0.2.1")
    assert time.monotonic() - started < 4 * STUCK_AFTER
    limit.release(ticket)
    started = time.monotonic()
    limit.release(limit.admit("192.0.2.1"))
    assert time.monotonic() - started < 0.5, "and the lock works normally afterwards"


def _count_under_the_lock(limit, rounds, errors):
    for _ in range(rounds):
        with limit.shm.lock() as buf:
            value = int.from_bytes(buf[-8:], "little")
            time.sleep(0)  # give every other thread the GIL while holding the lock
            buf[-8:] = (value + 1).to_bytes(8, "little")
    errors.put(None)


def test_the_lock_excludes_threads_of_several_processes(limits):
    limit = limits(max_in_flight=4)
    ctx = multiprocessing.get_context("fork")
    done = ctx.Queue()
    children = [ctx.Process(target=_count_under_the_lock, args=(limit, 500, done))
                for _ in range(2)]
    for child in children:
        child.start()
    threads = [threading.Thread(target=_count_under_the_lock, args=(limit, 500, done))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for _ in range(6):
        done.get(timeout=30)
    for thread in threads:
        thread.join()
    for child in children:
        child.join(10)
        child.close()
    done.close()
    done.join_thread()
    assert int.from_bytes(limit.shm.buf[-8:], "little") == 6 * 500


def test_without_posix_semaphores_an_fcntl_lock_is_used(monkeypatch, caplog):
    """A container without /dev/shm cannot make a multiprocessing.Lock: still start, and
    still share one budget across processes."""
    import tunnel_telemetry.web.limits as limits_module

    def no_semaphores():
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(limits_module.multiprocessing, "Lock", no_semaphores)
    limit = limits_for(max_in_flight=4, rate_limit=60, rate_limit_burst=2)
    try:
        assert limit.shm._sem is None
        assert "limits_slow_lock" in caplog.text
        ctx = multiprocessing.get_context("fork")
        done = ctx.Queue()
        child = ctx.Process(target=_count_under_the_lock, args=(limit, 300, done))
        child.start()
        _count_under_the_lock(limit, 300, done)
        for _ in range(2):
            done.get(timeout=30)
        child.join(10)
        child.close()
        done.close()
        done.join_thread()
        assert int.from_bytes(limit.shm.buf[-8:], "little") == 600
    finally:
        limit.close()


def test_client_in_flight_is_per_client(limits):
    limit = limits(max_in_flight_per_client=1, rate_limit=0, max_in_flight=0)
    first = limit.admit("192.0.2.1")
    with pytest.raises(Exception) as info:
        limit.admit("192.0.2.1")
    assert status_of(info.value) == 429 and info.value.retry_after == 1
    other = limit.admit("192.0.2.2")
    limit.release(first)
    limit.release(other)
    limit.release(limit.admit("192.0.2.1"))


def test_refusal_by_the_global_cap_gives_back_the_client_slot(limits):
    limit = limits(max_in_flight=1, max_in_flight_per_client=1, rate_limit=0)
    held = limit.admit("192.0.2.1")
    with pytest.raises(Exception) as info:
        limit.admit("192.0.2.2")
    assert status_of(info.value) == 503 and info.value.retry_after >= 1
    limit.release(held)
    limit.release(limit.admit("192.0.2.2"))
    assert limit.inflight.total() == 0


def test_all_off_makes_no_shared_memory(limits):
    limit = limits(rate_limit=0, max_in_flight=0, max_in_flight_per_client=0)
    assert limit.shm is None
    limit.release(limit.admit("192.0.2.1"))


@pytest.mark.parametrize("options, message", [
    ({"rate-limit": -1}, "rate-limit"),
    ({"rate-limit-burst": 0}, "rate-limit-burst"),
    ({"max-in-flight": -5}, "max-in-flight"),
    ({"max-in-flight-per-client": "x"}, "max-in-flight-per-client"),
    ({"header-timeout": "0s"}, "header-timeout"),
    ({"header-timeout": "20s", "request-timeout": "10s"}, "request-timeout"),
])
def test_bad_limit_options(options, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_mapping(options)


def test_defaults_are_on():
    config = Config.from_mapping({})
    assert (config.rate_limit, config.rate_limit_burst, config.max_in_flight,
            config.max_in_flight_per_client) == (120, 60, 256, 2)
    assert (config.header_timeout, config.request_timeout) == (10.0, 30.0)


# ---------------------------------------------------------------------------------------------
# Through Flask


@pytest.fixture
def limited_app(app_config):
    made = []

    def make(**options):
        made.append(create_app({**app_config, **{k.replace("_", "-"): v
                                                 for k, v in options.items()}}))
        return made[-1]

    yield make
    for app in made:
        app.extensions["tunnel_telemetry"].close()


def post(client, address="192.0.2.1"):
    return client.post("/report", json=make_report(), environ_base={"REMOTE_ADDR": address})


def test_429_with_retry_after_after_the_burst(limited_app):
    client = limited_app(rate_limit=6, rate_limit_burst=3).test_client()
    assert [post(client).status_code for _ in range(3)] == [201] * 3
    resp = post(client)
    assert resp.status_code == 429
    assert resp.get_json() == {"ok": False, "errors": [],
                               "msg": "too many reports from this address, retry later"}
    assert 1 <= int(resp.headers["Retry-After"]) <= 10
    assert post(client, "192.0.2.2").status_code == 201
    assert client.get("/healthz").status_code == 200, "GETs are not limited"


def test_an_ipv6_64_is_one_client(limited_app):
    client = limited_app(rate_limit=6, rate_limit_burst=2).test_client()
    assert post(client, "2001:db8:0:1::1").status_code == 201
    assert post(client, "2001:db8:0:1::2").status_code == 201
    assert post(client, "2001:db8:0:1:ffff::3").status_code == 429
    assert post(client, "2001:db8:0:2::1").status_code == 201


def test_rate_limit_zero_is_off(limited_app):
    client = limited_app(rate_limit=0, rate_limit_burst=1).test_client()
    assert {post(client).status_code for _ in range(10)} == {201}


def test_behind_a_proxy_the_forwarded_client_is_limited(limited_app):
    client = limited_app(rate_limit=6, rate_limit_burst=1, proxy_hops=1).test_client()

    def via_proxy(address):
        return client.post("/report", json=make_report(),
                           headers={"X-Forwarded-For": address},
                           environ_base={"REMOTE_ADDR": "10.0.0.1"}).status_code

    assert via_proxy("192.0.2.1") == 201
    assert via_proxy("192.0.2.1") == 429
    assert via_proxy("192.0.2.2") == 201, "the proxy's own address is not the key"


def test_global_in_flight_cap_answers_503_and_recovers(limited_app):
    app = limited_app(max_in_flight=2, rate_limit=0)
    inflight = app.extensions["tunnel_telemetry"].limits.inflight
    client = app.test_client()
    assert inflight.enter() and inflight.enter()
    resp = post(client)
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "2"
    assert resp.get_json()["ok"] is False
    inflight.leave()
    assert post(client).status_code == 201
    assert inflight.total() == 1, "the request gave its slot back"
    inflight.leave()


def test_client_in_flight_cap_through_flask(limited_app):
    app = limited_app(max_in_flight_per_client=1, rate_limit=0)
    limits = app.extensions["tunnel_telemetry"].limits
    client = app.test_client()
    key = limits.client_key("192.0.2.9")
    assert limits.client_inflight.enter(key)
    assert post(client, "192.0.2.9").status_code == 429
    assert post(client, "192.0.2.10").status_code == 201
    limits.client_inflight.leave(key)
    assert post(client, "192.0.2.9").status_code == 201


# ---------------------------------------------------------------------------------------------
# A real server with several workers


def post_with(url, address, timeout=10):
    with requests.post(url + "/report", json=make_report(), timeout=timeout,
                       headers={"X-Forwarded-For": address, "Connection": "close"}) as resp:
        return resp.status_code, resp.headers.get("Retry-After")


@pytest.mark.e2e
def test_rate_limit_is_shared_by_all_workers(tt_server):
    server = tt_server("--workers", "2", "--proxy-hops", "1", "--rate-limit", "2",
                       "--rate-limit-burst", "4", "--max-in-flight-per-client", "0", "--debug")

    def send(address, results):
        results.append(post_with(server.url, address))

    for attempt in range(20):  # a worker may still be starting (gevent patching) at first
        time.sleep(0.1 * bool(attempt))
        results = []
        threads = [threading.Thread(target=send, args=(f"192.0.2.{attempt + 1}", results))
                   for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        statuses = sorted(status for status, _ in results)
        assert statuses.count(201) == 4, statuses  # 2 a minute: no refill within the test
        assert statuses.count(429) == 12
        assert all(int(after) >= 1 for status, after in results if status == 429)
        pids = {line.split("[")[1].split("]")[0] for line in server.logs().splitlines()
                if "report accepted" in line or "rejected: rate_limited" in line}
        if len(pids) == 2:
            break  # both workers answered, from one budget
    else:
        pytest.fail("the kernel never spread the requests over both workers")


def hold_a_request(server, address):
    """Headers and half a body: the app has admitted it and waits for the rest.

    A request that ended just before may still hold its slot for a moment (it is given back
    after the answer is sent): retry until this one is held, not answered.
    """
    body = json.dumps(make_report()).encode()
    for _ in range(50):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(b"POST /report HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"X-Forwarded-For: " + address.encode() + b"\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:10])
        readable, _, _ = select.select([sock], [], [], 0.3)
        if not readable:
            return sock, body[10:]
        sock.close()
    raise AssertionError("the request was never held")


@pytest.mark.e2e
def test_global_in_flight_cap_across_workers_and_a_killed_worker(tt_server):
    server = tt_server("--workers", "2", "--proxy-hops", "1",
                       "--rate-limit", "0", "--max-in-flight", "1", "--request-timeout", "60s")
    sock, rest = hold_a_request(server, "192.0.2.1")
    try:
        assert wait_for(lambda: post_with(server.url, "192.0.2.2")[0] == 503)
        # Whichever worker takes them, the one held request fills the collector.
        results = [post_with(server.url, f"192.0.2.{10 + i}") for i in range(8)]
        assert results == [(503, "2")] * 8
        sock.sendall(rest)
        assert sock.recv(100).startswith(b"HTTP/1.1 201")
    finally:
        sock.close()
    assert wait_for(lambda: post_with(server.url, "192.0.2.3")[0] == 201)

    # A worker SIGKILLed while it holds the only slot: the slot comes back.
    sock, _ = hold_a_request(server, "192.0.2.4")
    try:
        assert wait_for(lambda: post_with(server.url, "192.0.2.5")[0] == 503)
        for pid in server.worker_pids():
            os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: post_with(server.url, "192.0.2.6")[0] == 201, timeout=20)
    finally:
        sock.close()


def test_relay_batches_are_not_limited_per_client(limited_app):
    app = limited_app(rate_limit=6, rate_limit_burst=1, relay_tokens="t0123456789abcdef")
    client = app.test_client()
    assert post(client).status_code == 201
    assert post(client).status_code == 429
    for _ in range(3):
        resp = client.post("/relay", json=[], environ_base={"REMOTE_ADDR": "192.0.2.1"},
                           headers={"Authorization": "Bearer t0123456789abcdef"})
        assert resp.status_code != 429, resp.get_json()


def _close_in_child(limit, result):
    limit.close()  # a worker exiting while other threads may still admit requests
    try:
        limit.release(limit.admit("192.0.2.1"))
    except Exception as exc:  # noqa: BLE001
        result.put(repr(exc))
    else:
        result.put("ok")


def test_close_in_a_forked_worker_leaves_the_table_usable(limits):
    limit = limits(max_in_flight=4, rate_limit=60)
    ctx = multiprocessing.get_context("fork")
    result = ctx.Queue()
    child = ctx.Process(target=_close_in_child, args=(limit, result))
    child.start()
    try:
        assert result.get(timeout=10) == "ok"
    finally:
        child.join(10)
        child.close()
        result.close()
        result.join_thread()
    limit.release(limit.admit("192.0.2.1"))


@pytest.mark.e2e
def test_a_client_slot_covers_the_upload_not_the_relay_wait(tt_server):
    """Many clients behind one NAT: a request waiting on a slow relay holds no client slot."""
    from tunnel_telemetry.testing.fake_ooni import FakeOONI

    with FakeOONI(latency=1.0) as fake:
        server = tt_server("--workers", "1", "--proxy-hops", "1", "--rate-limit", "0",
                           "--max-in-flight-per-client", "1", "--ooni-relay", "--ooni-api",
                           fake.url, "--relay-timeout", "3s")
        results = []

        def send():
            with requests.post(server.url + "/report", timeout=10,
                               json=make_report(client_asn="AS30722", client_cc="IT"),
                               headers={"X-Forwarded-For": "192.0.2.77"}) as resp:
                results.append((resp.status_code, "ooni-measurement-id" in resp.json()))

        threads = [threading.Thread(target=send) for _ in range(3)]
        for thread in threads:
            thread.start()
            time.sleep(0.2)  # each arrives while the previous waits on OONI
        for thread in threads:
            thread.join()
        assert results == [(201, True)] * 3
