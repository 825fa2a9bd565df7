"""PostgreSQL beyond the shared store contract: start-up errors, the app, restarts, instances.

The contract itself (idempotency, claims, leases, migrations) runs on both backends in
test_store.py.
"""

import itertools
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import requests

from tunnel_telemetry.cli import main
from tunnel_telemetry.errors import StoreUnavailable
from tunnel_telemetry.store import Enqueue, StoreError, open_store
from tunnel_telemetry.store.postgres import PostgresStore, redact_url
from tunnel_telemetry.testing.fake_ooni import FakeOONI
from tunnel_telemetry.testing.postgres import PostgresCluster, find_bindir
from tunnel_telemetry.testing.reports import make_report
from tunnel_telemetry.web import create_app

SECRET = "s3cret-Pa55word"


def with_password(url, password):
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or 'postgres'}:{password}@{host}"))


@pytest.mark.parametrize("url, message", [
    (f"postgresql://tt:{SECRET}@127.0.0.1:1/tt", "Connection refused"),
    (f"postgres://tt:{SECRET}@127.0.0.1:notaport/tt", "invalid integer value"),
    (f"postgresql://tt@127.0.0.1:1/tt?password={SECRET}&sslmode=bogus", "sslmode"),
    ("postgresql://tt:s3cret%2Fpw@127.0.0.1:1/tt", "Connection refused"),
    (f"postgresql://tt:{SECRET}@[::1/tt", "not a valid URL"),
])
def test_open_errors_are_one_line_without_the_password(url, message):
    with pytest.raises(StoreError, match=message) as info:
        open_store(url)
    text = str(info.value)
    assert "\n" not in text and text.startswith("database-url: ")
    assert SECRET not in text and "s3cret" not in text


def test_wrong_password_is_one_line_without_it(postgres_server):
    url = with_password(postgres_server, SECRET)
    try:
        psycopg.connect(url).close()
    except psycopg.OperationalError:
        pass
    else:
        pytest.skip("this server does not check passwords")
    with pytest.raises(StoreError, match="password authentication failed") as info:
        open_store(url)
    assert SECRET not in str(info.value) and "***" in str(info.value)


def test_cli_exits_2_without_the_password(runner):
    result = runner.invoke(main, ["--database-url", f"postgresql://tt:{SECRET}@127.0.0.1:1/tt"])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "cannot open" in result.output
    assert SECRET not in result.output


def test_redact_url():
    assert redact_url("postgres://u:p%40ss@h:5432/d?password=x&a=1") == \
        "postgres://u:***@h:5432/d?password=***&a=1"
    assert redact_url("postgresql://h/d") == "postgresql://h/d"


@pytest.fixture
def pg_client(pg_url):
    app = create_app({"database-url": pg_url, "collector-id": "pg-test"})
    yield app.test_client()
    app.extensions["tunnel_telemetry"].close()


def test_app_on_postgres(pg_client, pg_url):
    uid = str(uuid.uuid4())
    first = pg_client.post("/report", json=make_report(uuid=uid))
    assert first.status_code == 201
    again = pg_client.post("/report", json=make_report(uuid=uid, duration_ms=5))
    assert again.status_code == 201 and again.get_json() == first.get_json()
    health = pg_client.get("/healthz").get_json()
    assert health["store"] == {"backend": "postgresql", "ok": True}
    assert health["relay"]["backlog"] == {}
    with psycopg.connect(pg_url) as conn:
        body = conn.execute("SELECT body FROM reports").fetchall()
    assert [row[0] for row in body] == [first.get_json()]


def test_nul_character_is_400_not_a_retry_loop(pg_client):
    """jsonb cannot hold \\u0000: the client is told (400), not asked to retry forever (503)."""
    resp = pg_client.post("/report", json=make_report(config={"prefix": "a\u0000b"}))
    assert resp.status_code == 400 and resp.get_json()["ok"] is False


@pytest.fixture
def own_cluster():
    """A private server, for tests that stop it."""
    if find_bindir() is None:
        pytest.skip("PostgreSQL binaries not found")
    with PostgresCluster() as cluster:
        yield cluster


def test_database_restart_is_503_then_recovers(own_cluster):
    store = PostgresStore(own_cluster.url, pool_timeout=0.5)
    app = create_app({"database-url": own_cluster.url})
    app.extensions["tunnel_telemetry"].store.pool_timeout = 0.5  # before its pool is opened
    client = app.test_client()
    try:
        assert store.add(make_report(uuid=str(uuid.uuid4())), Enqueue(["ooni"]))[1]
        assert client.post("/report", json=make_report()).status_code == 201
        own_cluster.stop_server()
        with pytest.raises(StoreUnavailable):
            store.add(make_report(uuid=str(uuid.uuid4())), Enqueue(["ooni"]))
        assert not store.ping()
        down = client.post("/report", json=make_report())
        assert down.status_code == 503 and down.headers["Retry-After"]
        assert client.get("/healthz").status_code == 503
        own_cluster.start_server()
        deadline = time.monotonic() + 15
        while True:
            try:
                store.add(make_report(uuid=str(uuid.uuid4())), Enqueue(["ooni"]))
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "the pool did not reconnect"
                time.sleep(0.2)
        assert store.count() == 3
    finally:
        store.close()
        app.extensions["tunnel_telemetry"].close()


def drive_load_and_kill(servers, victim, total=400, kill_after=120, threads=8, **fields):
    """POST ``total`` reports from ``threads`` clients spread over ``servers``; SIGKILL
    ``victim`` once ``kill_after`` are acknowledged. A client retries a failed POST on another
    instance with the same uuid, as a real client behind a load balancer would.

    Returns (sent: uuid -> seq, acked: uuid -> server url, killed_at: acked count at the kill).
    """
    seqs = itertools.count()
    lock = threading.Lock()
    sent: dict[str, int] = {}
    acked: dict[str, str] = {}
    errors: list[str] = []

    def client(index):
        with requests.Session() as session:
            while (seq := next(seqs)) < total:
                uid = str(uuid.uuid4())
                report = make_report(uuid=uid, config={"seq": str(seq)}, **fields)
                with lock:
                    sent[uid] = seq
                for attempt in range(8):
                    server = servers[(index + attempt) % len(servers)]
                    try:
                        resp = session.post(server.url + "/report", json=report, timeout=10)
                    except requests.RequestException:
                        continue
                    if resp.status_code == 201:
                        with lock:
                            acked[uid] = server.url
                        break
                    if resp.status_code != 503:
                        errors.append(f"{resp.status_code} {resp.text[:200]}")
                        break
                    time.sleep(0.1)
                else:
                    errors.append(f"seq {seq} never acknowledged")

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 60
    while len(acked) < kill_after and time.monotonic() < deadline:
        time.sleep(0.01)
    victim.kill()
    killed_at = len(acked)
    for worker in workers:
        worker.join(120)
    assert not errors, errors[:5]
    assert kill_after <= killed_at < total, "the kill did not happen mid-way"
    assert any(url == victim.url for url in acked.values())
    assert len(acked) == total  # the other instance took every report the victim could not
    return sent, acked, killed_at


def stored_reports(url):
    """uuid -> seq of every stored report."""
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT uuid, body->'config'->>'seq' FROM reports").fetchall()
    stored = {uid: int(seq) for uid, seq in rows}
    assert len(stored) == len(rows)
    return stored


def backlog(server):
    return requests.get(server.url + "/healthz", timeout=5).json()["relay"]["backlog"]


@pytest.mark.e2e
def test_two_instances_one_killed_every_acknowledged_report_stored_once(tt_server, pg_url):
    """Two tt-server processes (2 workers each) on one database; one is SIGKILLed under load:
    every acknowledged report is stored, once."""
    env = {"DATABASE_URL": pg_url, "TT_SCRUB_ALLOW_CONFIG_KEYS": "seq"}
    servers = [tt_server("--workers", "2", env=env, name=name) for name in ("a", "b")]
    sent, acked, _ = drive_load_and_kill(servers, victim=servers[0])
    assert servers[1].proc.poll() is None
    stored = stored_reports(pg_url)
    assert set(acked) <= set(stored)  # acknowledged means stored, even by the killed one
    assert set(stored) <= set(sent)
    assert all(stored[uid] == sent[uid] for uid in stored)
    health = requests.get(servers[1].url + "/healthz", timeout=5).json()
    assert health["store"] == {"backend": "postgresql", "ok": True}


@pytest.mark.e2e
def test_two_instances_one_killed_every_acknowledged_report_relayed(tt_server, pg_url):
    """The same with relaying to (fake) OONI: each report reaches OONI; a report reaches it
    twice only if the killed instance held its relay at the kill (interrupted mid-relay).

    Leases last at least a minute; instead of waiting, the test moves the killed instance's
    leases into the past, as the clock would (lease expiry itself is tested in test_store.py).
    """
    with FakeOONI(latency=0.005) as fake:
        fake.fail(503, probability=0.2)  # some relays go to the retry loop
        args = ["--workers", "2", "--ooni-relay", "--ooni-api", fake.url,
                "--relay-interval", "100ms", "--relay-retry-min", "100ms",
                "--relay-retry-max", "300ms"]
        env = {"DATABASE_URL": pg_url, "TT_SCRUB_ALLOW_CONFIG_KEYS": "seq"}
        servers = [tt_server(*args, env=env, name=name) for name in ("a", "b")]
        victim, survivor = servers
        victim_pids = {victim.proc.pid, *victim.worker_pids()}
        sent, acked, _ = drive_load_and_kill(servers, victim, total=300, kill_after=100,
                                             client_asn="AS30722", client_cc="IT")

        with psycopg.connect(pg_url, autocommit=True) as conn:
            leased = conn.execute("SELECT uuid, lease_owner FROM relays "
                                  "WHERE state = 'pending' AND lease_owner IS NOT NULL").fetchall()
            interrupted = {uid for uid, owner in leased
                           if int(owner.split(":")[-2]) in victim_pids}
            conn.execute("UPDATE relays SET lease_until = 0 WHERE uuid = ANY(%s)",
                         (list(interrupted),))
        stored = stored_reports(pg_url)
        assert set(acked) <= set(stored) <= set(sent)

        fake.clear_faults()
        deadline = time.monotonic() + 60
        while set(fake.uuids()) != set(stored) or backlog(survivor):
            assert time.monotonic() < deadline, (len(fake.uuids()), len(stored))
            time.sleep(0.1)
        duplicates = {uid for uid, n in fake.uuids().items() if n > 1}
        assert duplicates <= interrupted
        with psycopg.connect(pg_url) as conn:
            states = conn.execute("SELECT state, count(*) FROM relays GROUP BY 1").fetchall()
        assert states == [("delivered", len(stored))]


@pytest.mark.e2e
def test_backlog_and_relay_once_on_postgres(tt_server, pg_url):
    """/healthz shows the backlog from PostgreSQL; `tt-server relay --once` drains it."""
    with FakeOONI() as fake:
        fake.fail("reset")
        server = tt_server("--ooni-relay", "--ooni-api", fake.url, "--relay-retry-min", "1h",
                           env={"DATABASE_URL": pg_url})
        for _ in range(3):
            resp = requests.post(server.url + "/report", timeout=10, json=make_report(
                client_asn="AS30722", client_cc="IT"))
            assert resp.status_code == 201
        ooni = backlog(server)["ooni"]
        assert ooni["pending"] == 3 and ooni["oldest_age_s"] >= 0
        server.stop()
        fake.clear_faults()
        env = {**os.environ, "DATABASE_URL": pg_url, "OONI_RELAY": "true",
               "OONI_API": fake.url, "TT_CONFIG": ""}
        result = subprocess.run([sys.executable, "-m", "tunnel_telemetry.cli", "relay", "--once"],
                                env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "ooni: 3 delivered; 0 still pending" in result.stdout
        assert fake.stats()["uuids"] == 3
    store = open_store(pg_url)
    try:
        assert store.backlog() == {}
    finally:
        store.close()


COOPERATIVE_SCRIPT = r"""
import json, sys, time
from tunnel_telemetry.store.postgres import PostgresStore  # imported before the patch
store = PostgresStore(sys.argv[1], pool_min=4, pool_max=4)
from gevent import monkey
monkey.patch_all()
import gevent
from psycopg import waiting

ticks = []
def tick():
    while True:
        ticks.append(time.monotonic())
        gevent.sleep(0.01)

def slow():
    with store._tx() as conn:
        conn.execute("SELECT pg_sleep(0.3)")

store._get_pool().wait(10)
ticker = gevent.spawn(tick)
started = time.monotonic()
gevent.joinall([gevent.spawn(slow) for _ in range(4)], raise_error=True)
ended = time.monotonic()
elapsed = ended - started
ticker.kill()
points = [started] + [t for t in ticks if t > started] + [ended]
gaps = [b - a for a, b in zip(points, points[1:])]
import selectors
print(json.dumps({"elapsed": elapsed, "max_gap": max(gaps), "wait": waiting.wait.__name__,
                  "selector": waiting.DefaultSelector is selectors.DefaultSelector}))
"""


def test_queries_wait_cooperatively_in_a_gevent_worker(pg_url):
    """psycopg chose its C wait (which blocks the whole event loop) when imported before
    gevent's patch, as tt-server's master does: four 0.3 s queries in a patched process must run
    side by side, and the loop must keep running meanwhile."""
    out = subprocess.run([sys.executable, "-c", COOPERATIVE_SCRIPT, pg_url], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["wait"] == "wait_poll" and result["selector"]
    assert result["elapsed"] < 0.9, result  # one after another: 1.2 s
    assert result["max_gap"] < 0.2, result  # the loop was never blocked for a query's length
