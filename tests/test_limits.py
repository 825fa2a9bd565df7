import ipaddress
import json
import logging
import os
import select
import signal
import socket
import threading
import time

import pytest
import requests

from tunnel_telemetry.cli import main
from tunnel_telemetry.config import Config, ConfigError
from tunnel_telemetry.testing.redis import redis_server_fixture
from tunnel_telemetry.testing.reports import make_report
from tunnel_telemetry.testing.server import free_port, wait_for
from tunnel_telemetry.web import create_app
from tunnel_telemetry.web.errors import status_of
from tunnel_telemetry.web.limits import STORAGE_TIMEOUT, build_limits

redis_server = pytest.fixture(scope="module")(redis_server_fixture)

ADDRESSES = ["203.0.113.77", "2001:db8:abcd:12::1", "198.51.100.200"]


def clear_of_a_window_edge(window, margin=None):
    """Wait, if need be, until the next edge of the limiter's windows (multiples of ``window``
    seconds of the clock) is ``margin`` seconds away: the sliding window counter estimates
    the previous window's share, and a test's few requests straddling an edge would see that
    estimate instead of the counts the test means."""
    margin = min(2.0, window / 4) if margin is None else margin
    left = window - time.time() % window
    if left < margin:
        time.sleep(left + 0.05)


def limits_for(**options):
    limit = build_limits(Config.from_mapping({k.replace("_", "-"): v
                                              for k, v in options.items()}))
    if limit.item is not None:
        clear_of_a_window_edge(limit.item.get_expiry())
    return limit


def refused(limit, address):
    """The Busy a request from ``address`` gets, or None when it is let in (and released)."""
    try:
        ticket = limit.admit(address)
    except Exception as exc:  # noqa: BLE001
        return exc
    limit.release(ticket)
    return None


def assert_no_address(text):
    for address in ADDRESSES:
        packed = ipaddress.ip_address(address).packed
        assert address not in text and packed[:8].hex() not in text, address


# ---------------------------------------------------------------------------------------------
# Units


def test_burst_then_429_with_retry_after():
    limit = limits_for(rate_limit=60, rate_limit_burst=3)  # 3 in any 3 s
    assert [refused(limit, "192.0.2.1") for _ in range(3)] == [None] * 3
    exc = refused(limit, "192.0.2.1")
    assert status_of(exc) == 429 and exc.code == "rate_limited"
    assert 1 <= exc.retry_after <= 3
    assert refused(limit, "192.0.2.2") is None, "another client has its own budget"


def test_a_limited_client_gets_in_again():
    limit = limits_for(rate_limit=60, rate_limit_burst=1)  # 1 a second
    assert refused(limit, "192.0.2.1") is None
    assert refused(limit, "192.0.2.1") is not None
    assert wait_for(lambda: refused(limit, "192.0.2.1") is None, timeout=5)


def test_client_key_is_keyed_and_groups_ipv6_by_64():
    first, second = limits_for(), limits_for()
    assert first.client_key("2001:db8:1:2::1") == first.client_key("2001:db8:1:2:ffff::9")
    assert first.client_key("2001:db8:1:2::1") != first.client_key("2001:db8:1:3::1")
    assert first.client_key("::ffff:192.0.2.1") == first.client_key("192.0.2.1")
    assert first.client_key("192.0.2.1") != first.client_key("192.0.2.2")
    assert first.client_key(None) == first.client_key("garbage")
    assert first.client_key("192.0.2.1") != second.client_key("192.0.2.1"), "random key"


def test_instances_with_one_rate_limit_key_name_a_client_alike():
    key = "k" * 32
    first, second = limits_for(rate_limit_key=key), limits_for(rate_limit_key=key)
    assert first.client_key("192.0.2.1") == second.client_key("192.0.2.1")
    assert first.client_key("192.0.2.1") != limits_for().client_key("192.0.2.1")


def test_storage_holds_no_address():
    limit = limits_for(rate_limit=60, rate_limit_burst=5)
    for address in ADDRESSES:
        limit.release(limit.admit(address))
    keys = list(limit.storage.storage)
    assert len(keys) == len(ADDRESSES), "something was counted"
    assert_no_address(repr(vars(limit.storage)))


def test_client_in_flight_is_per_client():
    limit = limits_for(max_in_flight_per_client=1, rate_limit=0, max_in_flight=0)
    first = limit.admit("192.0.2.1")
    exc = refused(limit, "192.0.2.1")
    assert status_of(exc) == 429 and exc.retry_after == 1
    other = limit.admit("192.0.2.2")
    limit.release(first)
    limit.release(other)
    assert refused(limit, "192.0.2.1") is None


def test_refusal_by_the_in_flight_cap_gives_back_the_client_slot():
    limit = limits_for(max_in_flight=1, max_in_flight_per_client=1, rate_limit=0)
    held = limit.admit("192.0.2.1")
    exc = refused(limit, "192.0.2.2")
    assert status_of(exc) == 503 and exc.retry_after >= 1
    limit.release(held)
    assert refused(limit, "192.0.2.2") is None
    assert limit.inflight.count() == 0 and limit.client_inflight.count(
        limit.client_key("192.0.2.2")) == 0


def test_a_rate_limited_request_holds_no_slot():
    limit = limits_for(max_in_flight=1, max_in_flight_per_client=1, rate_limit=60,
                       rate_limit_burst=1)
    assert refused(limit, "192.0.2.1") is None
    assert refused(limit, "192.0.2.1").code == "rate_limited"
    assert limit.inflight.count() == 0
    assert refused(limit, "192.0.2.2") is None


def test_all_off_makes_no_storage():
    limit = limits_for(rate_limit=0, max_in_flight=0, max_in_flight_per_client=0)
    assert limit.storage is None and limit.inflight is None
    limit.release(limit.admit("192.0.2.1"))


@pytest.mark.parametrize("scheme", ["redis", "memcached"])
def test_a_shared_storage_that_does_not_answer_lets_requests_in(scheme, caplog):
    url = f"{scheme}://127.0.0.1:{free_port()}"  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="tunnel_telemetry.web.limits"):
        limit = limits_for(rate_limit=60, rate_limit_burst=1, rate_limit_storage=url)
        assert [refused(limit, address) for address in ADDRESSES * 2] == [None] * 6
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "rate_limit_storage_unavailable" in warnings[0]
    assert_no_address(caplog.text)


def test_a_hung_storage_costs_one_timeout_not_one_per_request():
    with socket.socket() as hung:  # accepts connections (the kernel does), never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        url = f"redis://127.0.0.1:{hung.getsockname()[1]}"
        limit = limits_for(rate_limit=60, rate_limit_burst=1, rate_limit_storage=url)
        started = time.monotonic()
        assert [refused(limit, address) for address in ADDRESSES * 2] == [None] * 6
        assert time.monotonic() - started < STORAGE_TIMEOUT


@pytest.mark.parametrize("options, message", [
    ({"rate-limit": -1}, "rate-limit"),
    ({"rate-limit-burst": 0}, "rate-limit-burst"),
    ({"max-in-flight": -5}, "max-in-flight"),
    ({"max-in-flight-per-client": "x"}, "max-in-flight-per-client"),
    ({"header-timeout": "0s"}, "header-timeout"),
    ({"header-timeout": "20s", "request-timeout": "10s"}, "request-timeout"),
    ({"rate-limit-storage": "mongodb://db:27017"}, "unknown scheme 'mongodb'"),
    ({"rate-limit-storage": "localhost:6379"}, "unknown scheme"),
    ({"rate-limit-storage": "redis://"}, "needs a host"),
    ({"rate-limit-storage": "memcached://:11211"}, "needs a host"),
    ({"rate-limit-storage": "redis://h:port"}, "not a URL"),
    ({"rate-limit-storage": "redis+unix://"}, "socket path"),
    ({"rate-limit-key": "short"}, "rate-limit-key"),
])
def test_bad_limit_options(options, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_mapping(options)


@pytest.mark.parametrize("url", ["redis://:hunter2secret@cache:notaport/0",
                                 "ftp://user:hunter2secret@cache/",
                                 "redis+sentinel://:hunter2secret@cache:26379"])  # no service
def test_a_bad_storage_url_exits_2_with_one_line_and_no_password(runner, tmp_path, url):
    result = runner.invoke(main, ["--rate-limit-storage", url, "--database-url",
                                  f"sqlite:///{tmp_path}/reports.db"], env={"CONFIG": ""})
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("tt-server: error: rate-limit-storage")
    assert "hunter2" not in result.output


@pytest.mark.parametrize("url", ["memory://", "redis://cache.internal:6379/2",
                                 "rediss://:pw@cache:6380", "redis+unix:///run/redis.sock",
                                 "memcached://cache:11211", "memcached:///run/memcached.sock"])
def test_good_storage_urls(url):
    assert Config.from_mapping({"rate-limit-storage": url}).rate_limit_storage == url


def test_defaults_are_on():
    config = Config.from_mapping({})
    assert (config.rate_limit, config.rate_limit_burst, config.max_in_flight,
            config.max_in_flight_per_client) == (120, 60, 256, 2)
    assert (config.rate_limit_storage, config.rate_limit_key) == ("memory://", None)
    assert (config.header_timeout, config.request_timeout) == (10.0, 30.0)


# ---------------------------------------------------------------------------------------------
# Through Flask


@pytest.fixture
def limited_app(app_config):
    made = []

    def make(**options):
        made.append(create_app({**app_config, **{k.replace("_", "-"): v
                                                 for k, v in options.items()}}))
        item = made[-1].extensions["tunnel_telemetry"].limits.item
        if item is not None:
            clear_of_a_window_edge(item.get_expiry())
        return made[-1]

    yield make
    for app in made:
        app.extensions["tunnel_telemetry"].close()


def post(client, address="192.0.2.1"):
    return client.post("/report", json=make_report(), environ_base={"REMOTE_ADDR": address})


def test_429_with_retry_after_after_the_burst(limited_app):
    client = limited_app(rate_limit=6, rate_limit_burst=3).test_client()  # 3 in any 30 s
    assert [post(client).status_code for _ in range(3)] == [201] * 3
    resp = post(client)
    assert resp.status_code == 429
    assert resp.get_json() == {"ok": False, "errors": [],
                               "msg": "too many reports from this address, retry later"}
    assert 1 <= int(resp.headers["Retry-After"]) <= 30
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


def test_in_flight_cap_answers_503_and_recovers(limited_app):
    app = limited_app(max_in_flight=2, rate_limit=0)
    inflight = app.extensions["tunnel_telemetry"].limits.inflight
    client = app.test_client()
    assert inflight.enter() and inflight.enter()
    resp = post(client)
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "2"
    assert resp.get_json()["ok"] is False
    inflight.leave()
    assert post(client).status_code == 201
    assert inflight.count() == 1, "the request gave its slot back"
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


def test_relay_batches_are_not_limited_per_client(limited_app):
    app = limited_app(rate_limit=6, rate_limit_burst=1, relay_tokens="t0123456789abcdef")
    client = app.test_client()
    assert post(client).status_code == 201
    assert post(client).status_code == 429
    for _ in range(3):
        resp = client.post("/relay", json=[], environ_base={"REMOTE_ADDR": "192.0.2.1"},
                           headers={"Authorization": "Bearer t0123456789abcdef"})
        assert resp.status_code != 429, resp.get_json()


# ---------------------------------------------------------------------------------------------
# A real server


def post_with(url, address, timeout=10):
    with requests.post(url + "/report", json=make_report(), timeout=timeout,
                       headers={"X-Forwarded-For": address, "Connection": "close"}) as resp:
        return resp.status_code, resp.headers.get("Retry-After")


@pytest.mark.e2e
def test_a_redis_rate_limit_is_shared_by_all_workers(tt_server, redis_server):
    # socket_timeout: on a loaded machine a slow answer must not become a let-in.
    server = tt_server("--workers", "2", "--proxy-hops", "1", "--rate-limit", "2",
                       "--rate-limit-burst", "4", "--max-in-flight-per-client", "0", "--debug",
                       "--rate-limit-storage", redis_server.url + "?socket_timeout=10")

    def send(address, results):
        results.append(post_with(server.url, address))

    for attempt in range(20):  # a worker may still be starting at first
        time.sleep(0.1 * bool(attempt))
        results = []
        threads = [threading.Thread(target=send, args=(ADDRESSES[attempt % 3], results))
                   for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        statuses = sorted(status for status, _ in results)
        assert statuses.count(201) == 4, statuses  # 4 in any 2 minutes: no refill here
        assert statuses.count(429) == 12
        assert all(int(after) >= 1 for status, after in results if status == 429)
        if len(answers_by_worker(server)) == 2:
            break  # both workers answered, from one budget
        redis_server.client().flushdb()
    else:
        pytest.fail("the kernel never spread the requests over both workers")

    store = redis_server.client()
    keys = store.keys("*")
    assert keys, "the counts are in Redis"
    assert_no_address(repr(keys) + repr([store.dump(key) for key in keys]))
    assert_no_address(server.logs())


def answers_by_worker(server):
    """Worker pid -> [True when accepted, False when rate limited, ...] from its debug log."""
    answers = {}
    for line in server.logs().splitlines():
        if "report accepted" in line or "rejected: rate_limited" in line:
            answers.setdefault(line.split("[")[1].split("]")[0], []).append("accepted" in line)
    return answers


@pytest.mark.e2e
def test_a_memory_rate_limit_counts_per_worker(tt_server):
    """The default storage, as documented: each worker gives a client its own budget."""
    server = tt_server("--workers", "2", "--proxy-hops", "1", "--rate-limit", "2",
                       "--rate-limit-burst", "4", "--max-in-flight-per-client", "0", "--debug")
    for attempt in range(20):  # until the kernel spreads one round over both workers
        before = answers_by_worker(server)
        threads = [threading.Thread(target=post_with, args=(server.url, f"192.0.2.{attempt + 1}"))
                   for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        total = sum(map(len, before.values())) + 16
        assert wait_for(lambda n=total: sum(map(len, answers_by_worker(server).values())) == n,
                        timeout=10)
        round_ = {pid: flags[len(before.get(pid, [])):]
                  for pid, flags in answers_by_worker(server).items()}
        round_ = {pid: flags for pid, flags in round_.items() if flags}
        for flags in round_.values():
            assert sum(flags) == min(4, len(flags)), round_  # 4 from each worker's budget
        if len(round_) == 2:
            break
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
def test_in_flight_cap_of_a_worker_and_a_killed_worker(tt_server):
    server = tt_server("--workers", "1", "--proxy-hops", "1",
                       "--rate-limit", "0", "--max-in-flight", "1", "--request-timeout", "60s")
    sock, rest = hold_a_request(server, "192.0.2.1")
    try:
        assert wait_for(lambda: post_with(server.url, "192.0.2.2")[0] == 503)
        results = [post_with(server.url, f"192.0.2.{10 + i}") for i in range(4)]
        assert results == [(503, "2")] * 4
        sock.sendall(rest)
        assert sock.recv(100).startswith(b"HTTP/1.1 201")
    finally:
        sock.close()
    assert wait_for(lambda: post_with(server.url, "192.0.2.3")[0] == 201)

    # The worker SIGKILLed while it holds the only slot: its replacement starts at 0.
    sock, _ = hold_a_request(server, "192.0.2.4")
    try:
        assert wait_for(lambda: post_with(server.url, "192.0.2.5")[0] == 503)
        for pid in server.worker_pids():
            os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: post_with(server.url, "192.0.2.6")[0] == 201, timeout=20)
    finally:
        sock.close()


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
