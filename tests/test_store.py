"""The store contract, run against every backend (sqlite and postgres) so they cannot drift.

Backend-specific tests pin the ``backend`` fixture with ``@pytest.mark.parametrize``.
"""

import multiprocessing
import os
import signal
import sqlite3
import threading
import time
import uuid

import pytest

from tunnel_telemetry.errors import ReportError, StoreUnavailable
from tunnel_telemetry.store import Enqueue, SQLiteStore, StoreError, open_store, sqlite_path

SQLITE_ONLY = pytest.mark.parametrize("backend", ["sqlite"])
POSTGRES_ONLY = pytest.mark.parametrize("backend", ["postgres"])
FORK = multiprocessing.get_context("fork")


def report(uid=None, **extra):
    return {"uuid": uid or str(uuid.uuid4()), "report-type": "tunnel-telemetry", **extra}


@pytest.fixture
def db_url(each_backend_url):
    """Every test here runs on SQLite and on PostgreSQL."""
    return each_backend_url


def run_processes(target, args_list, timeout=30):
    """Run target(*args, queue) in forked processes; returns what each put on the queue."""
    queue = FORK.Queue()
    procs = [FORK.Process(target=target, args=(*args, queue)) for args in args_list]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=timeout) for _ in procs]
    for proc in procs:
        proc.join(timeout)
        assert proc.exitcode == 0
    queue.close()
    queue.join_thread()
    return results


# -- the contract, on every backend -------------------------------------------------------------

def test_backend_name(store, backend):
    assert store.backend == {"sqlite": "sqlite", "postgres": "postgresql"}[backend]
    assert store.ping()


def test_add_is_idempotent(store):
    first = report(x=1)
    stored, created = store.add(first, Enqueue(["ooni"]))
    assert created and stored == first
    again, created = store.add({**first, "x": 2}, Enqueue(["ooni"]))
    assert not created and again == first
    assert store.count() == 1
    assert store.relay_state(first["uuid"])["ooni"]["state"] == "pending"
    assert store.backlog()["ooni"]["pending"] == 1


def test_add_round_trips_json(store):
    r = report(config={"prefix": "été ☃", "n": [1, 2.5, None, True]}, big=2**53 + 1)
    store.add(r, Enqueue([]))
    assert store.get(r["uuid"]) == r
    assert store.get("missing") is None
    assert store.relay_state(r["uuid"]) == {}


def test_update_report(store):
    r = report(keep={"a": 1})
    store.add(r, Enqueue([]))
    updated = store.update_report(r["uuid"], {"ooni-measurement-id": "m"})
    assert updated["ooni-measurement-id"] == "m" and updated["keep"] == {"a": 1}
    assert store.get(r["uuid"])["ooni-measurement-id"] == "m"
    assert store.update_report(r["uuid"], {"keep": 2})["keep"] == 2
    assert store.update_report("missing", {"a": 1}) is None


def test_claim_leases_and_finish(store):
    both = Enqueue(["ooni", "collector:http://b"])
    uids = [store.add(report(), both)[0]["uuid"] for _ in range(3)]
    claims = store.claim("ooni", 10, "w1", 30)
    assert [c.uuid for c in claims] == uids
    assert claims[0].report == store.get(uids[0]) and claims[0].attempts == 0
    assert store.claim("ooni", 10, "w2", 30) == []
    assert len(store.claim("collector:http://b", 10, "w2", 30)) == 3
    assert not store.finish(uids[0], "ooni", "w2", "delivered")
    assert store.finish(uids[0], "ooni", "w1", "delivered", result={"id": "m"})
    assert store.finish(uids[1], "ooni", "w1", "pending", error="timeout", next_attempt=1e12)
    assert store.finish(uids[2], "ooni", "w1", "failed", error="bad")
    state = store.relay_state(uids[0])["ooni"]
    assert state["state"] == "delivered" and state["result"] == {"id": "m"}
    assert state["attempts"] == 1
    assert store.relay_state(uids[2])["ooni"] == {
        "state": "failed", "attempts": 1, "error": "bad", "result": None,
        "next_attempt": store.relay_state(uids[2])["ooni"]["next_attempt"]}
    # A finished relay cannot be finished again, even by its last owner.
    assert not store.finish(uids[0], "ooni", "w1", "failed")
    # uids[1] is pending but not due; due_only=False takes it anyway.
    assert store.claim("ooni", 10, "w3", 30) == []
    retry = store.claim("ooni", 10, "w3", 30, due_only=False)
    assert [c.uuid for c in retry] == [uids[1]] and retry[0].attempts == 1
    assert store.backlog()["ooni"]["pending"] == 1


def test_claim_limit_and_order(store):
    uids = [store.add(report(), Enqueue(["ooni"]))[0]["uuid"] for _ in range(5)]
    first = store.claim("ooni", 2, "w1", 30)
    second = store.claim("ooni", 2, "w2", 30)
    third = store.claim("ooni", 2, "w3", 30)
    assert [c.uuid for c in first + second + third] == uids
    assert [len(c) for c in (first, second, third)] == [2, 2, 1]


def test_expired_lease_is_taken_over(store):
    uid = store.add(report(), Enqueue(["ooni"]))[0]["uuid"]
    assert store.claim("ooni", 1, "dead", 5, now=1e10)
    assert store.claim("ooni", 1, "other", 5, now=1e10 + 1) == []
    assert [c.uuid for c in store.claim("ooni", 1, "other", 5, now=1e10 + 6)] == [uid]
    assert not store.finish(uid, "ooni", "dead", "delivered")
    assert store.finish(uid, "ooni", "other", "delivered")


def test_backlog_age(store):
    store.add(report(), Enqueue(["ooni"]))
    store.add(report(), Enqueue(["ooni", "collector:http://b"]))
    created = min(c.created for c in store.claim("ooni", 10, "w", 0, now=1e10))
    backlog = store.backlog(now=created + 60)
    assert backlog["ooni"] == {"pending": 2, "oldest_age_s": 60.0}
    assert backlog["collector:http://b"]["pending"] == 1


def test_finish_rejects_unknown_state(store):
    with pytest.raises(ValueError):
        store.finish("u", "ooni", "w", "lost")


def _writer(url, n, queue):
    store = open_store(url)
    for _ in range(n):
        store.add(report(), Enqueue(["ooni"]))
    store.close()
    queue.put(os.getpid())


def test_concurrent_writers_from_processes(db_url, store):
    run_processes(_writer, [(db_url, 50)] * 4)
    assert store.count() == 200
    assert store.backlog()["ooni"]["pending"] == 200


def _claimer(url, queue):
    """Claim and deliver until nothing is left; report what this process delivered."""
    store = open_store(url)
    owner = f"claimer-{os.getpid()}"
    mine = []
    while claims := store.claim("ooni", 3, owner, 60):
        for claim in claims:
            assert store.finish(claim.uuid, "ooni", owner, "delivered")
            mine.append(claim.uuid)
    store.close()
    queue.put(mine)


def test_concurrent_claimers_never_double_claim(db_url, store):
    uids = {store.add(report(), Enqueue(["ooni"]))[0]["uuid"] for _ in range(120)}
    results = run_processes(_claimer, [(db_url,)] * 4)
    delivered = [uid for mine in results for uid in mine]
    assert len(delivered) == len(set(delivered)) == 120
    assert set(delivered) == uids
    assert store.backlog() == {}
    assert all(store.relay_state(uid)["ooni"]["attempts"] == 1 for uid in uids)


def test_threads_share_one_store(store):
    """gthread workers: several threads of one process use the same store object."""
    uids = [store.add(report(), Enqueue(["ooni"]))[0]["uuid"] for _ in range(40)]
    got, errors = [], []

    def work(name):
        try:
            while claims := store.claim("ooni", 2, name, 60):
                for claim in claims:
                    store.finish(claim.uuid, "ooni", name, "delivered")
                    got.append(claim.uuid)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"t{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    assert sorted(got) == sorted(uids)


def _use_after_fork(store, queue):
    """A child uses the store object its parent had already used (gunicorn preload)."""
    created = store.add(report(), Enqueue(["ooni"]))[1]
    queue.put(created)
    store.close()


def test_store_is_fork_safe(store):
    store.add(report(), Enqueue([]))  # the parent has a live connection before the fork
    results = run_processes(_use_after_fork, [(store,)] * 2)
    assert results == [True, True]
    assert store.count() == 3  # and the parent's connection still works


@pytest.mark.parametrize("url, message", [
    ("mysql://x/y", "unsupported scheme"),
    ("sqlite://relative.db", "expected sqlite"),
    ("sqlite:////proc/no/such/dir/x.db", "cannot open"),
    ("sqlite:///x.db?timeout=0", "timeout"),
    ("sqlite:///x.db?timeout=soon", "timeout"),
    ("sqlite:///x.db?journal=off", "unknown SQLite option 'journal'"),
    ("sqlite:///x.db?min_free_mb=-1", "min_free_mb"),
    ("sqlite:///x.db?min_free_mb=lots", "min_free_mb"),
    ("sqlite:///x.db?min_free_mb=inf", "min_free_mb"),
])
def test_open_errors(url, message):
    with pytest.raises(StoreError, match=message):
        open_store(url)


def _queue_behind_blocker(store, db_url, jobs):
    """Run jobs in threads while another connection holds the write lock, so that they
    queue up behind the first one (the leader, waiting for the lock); release the lock once all
    are queued. Returns results."""
    import threading
    import time

    blocker = sqlite3.connect(sqlite_path(db_url), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    results = [None] * len(jobs)

    def run(i):
        try:
            results[i] = jobs[i]()
        except Exception as exc:  # noqa: BLE001
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    try:
        threads[0].start()
        deadline = time.monotonic() + 5
        while not store._group.leading and time.monotonic() < deadline:
            time.sleep(0.001)
        for thread in threads[1:]:
            thread.start()
        # The leader takes its batch once it has the write lock: all of them queue up.
        while len(store._group.queue) < len(jobs) and time.monotonic() < deadline:
            time.sleep(0.001)
        assert len(store._group.queue) == len(jobs)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        for thread in threads:
            thread.join(10)
    return results


@SQLITE_ONLY
def test_concurrent_adds_share_one_commit(store, db_url, monkeypatch):
    batches = []
    commit = store._commit_batch

    def counting(take):
        def counted():
            batch = take()
            batches.append(len(batch))
            return batch
        return commit(counted)

    monkeypatch.setattr(store, "_commit_batch", counting)
    earlier = report(x="stored before")
    store.add(earlier, Enqueue(["ooni"]))
    same = report()
    reports = [report() for _ in range(10)] + [same, dict(same, x=1), dict(earlier, x=2)]
    results = _queue_behind_blocker(store, db_url,
                                    [lambda r=r: store.add(r, Enqueue(["ooni"])) for r in reports])
    assert batches == [1, len(reports)]  # earlier, then the leader and all that queued
    assert [created for _, created in results] == [True] * 11 + [False, False]
    assert results[-2][0] == same  # a duplicate in the same batch sees the first one
    assert results[-1][0] == earlier  # and one of an earlier batch the stored one
    assert store.count() == 12
    assert store.backlog()["ooni"]["pending"] == 12
    assert all(store.get(r["uuid"]) == r for r in reports[:11])


@SQLITE_ONLY
def test_a_failing_write_does_not_fail_its_batch(store, db_url):
    def poison(conn):
        conn.execute("INSERT INTO reports (uuid, received, body) VALUES ('p', 0, '{}')")
        raise sqlite3.IntegrityError("boom")

    reports = [report() for _ in range(5)]
    jobs = [lambda r=r: store.add(r, Enqueue([]))[1] for r in reports]
    jobs.insert(2, lambda: store._grouped(poison))
    results = _queue_behind_blocker(store, db_url, jobs)
    assert isinstance(results[2], StoreUnavailable)
    assert [r for i, r in enumerate(results) if i != 2] == [True] * 5
    assert store.count() == 5 and store.get("p") is None


def test_add_with_lease_keeps_rows_from_other_claimers(store):
    r = report()
    store.add(r, Enqueue(["ooni", "collector:http://b"], owner="req", lease_seconds=30))
    assert store.claim("ooni", 10, "loop", 30) == []
    assert store.finish(r["uuid"], "ooni", "req", "delivered")
    assert store.finish(r["uuid"], "collector:http://b", "req", "pending", next_attempt=0)
    assert [c.uuid for c in store.claim("collector:http://b", 10, "loop", 30)] == [r["uuid"]]


def test_add_lease_expires(store):
    r = report()
    store.add(r, Enqueue(["ooni"], owner="dead", lease_seconds=5))
    assert store.claim("ooni", 1, "loop", 5) == []
    assert [c.uuid for c in store.claim("ooni", 1, "loop", 5, now=time.time() + 6)] == [r["uuid"]]
    assert not store.finish(r["uuid"], "ooni", "dead", "delivered")


def test_duplicate_add_leases_nothing(store):
    r = report()
    store.add(r, Enqueue(["ooni"]))
    store.add(r, Enqueue(["ooni"], owner="req", lease_seconds=30))
    assert len(store.claim("ooni", 1, "loop", 30)) == 1


def test_finish_merges_report_fields_only_with_the_lease(store):
    r = report()
    store.add(r, Enqueue(["ooni"], owner="w1", lease_seconds=30))
    assert not store.finish(r["uuid"], "ooni", "w2", "delivered", report_fields={"x": 1})
    assert "x" not in store.get(r["uuid"])
    assert store.finish(r["uuid"], "ooni", "w1", "delivered", result={"id": "m"},
                        report_fields={"ooni-measurement-id": "m"})
    assert store.get(r["uuid"]) == {**r, "ooni-measurement-id": "m"}


def test_release_gives_rows_back_without_counting_an_attempt(store):
    uids = [store.add(report(), Enqueue(["ooni"]))[0]["uuid"] for _ in range(3)]
    assert len(store.claim("ooni", 10, "w1", 30)) == 3
    assert store.release(uids[:2], "ooni", "w2") == 0  # not the owner
    assert store.release(uids[:2], "ooni", "w1", next_attempt=time.time() + 100) == 2
    assert store.release([], "ooni", "w1") == 0
    assert store.claim("ooni", 10, "w3", 30) == []  # released rows are not due yet
    claims = store.claim("ooni", 10, "w3", 30, due_only=False)
    assert sorted(c.uuid for c in claims) == sorted(uids[:2])
    assert {c.attempts for c in claims} == {0}


def test_make_due_ignores_backoff(store):
    uids = [store.add(report(), Enqueue(["ooni", "other"]))[0]["uuid"] for _ in range(2)]
    for c in store.claim("ooni", 10, "w", 30):
        store.finish(c.uuid, "ooni", "w", "pending", next_attempt=time.time() + 3600)
    assert store.claim("ooni", 10, "w", 30) == []
    assert store.make_due("ooni") == 2
    assert sorted(c.uuid for c in store.claim("ooni", 10, "w", 30)) == sorted(uids)
    assert store.make_due("other") == 0  # already due


def test_requeue_failed(store):
    uids = [store.add(report(), Enqueue(["ooni"]))[0]["uuid"] for _ in range(3)]
    states = ["failed", "delivered", "expired"]
    for uid, state in zip(uids, states, strict=True):
        store.claim("ooni", 1, "w", 30)
        assert store.finish(uid, "ooni", "w", state)
    assert store.requeue("ooni") == 1
    assert store.requeue("ooni", ("expired",)) == 1
    assert [c.uuid for c in store.claim("ooni", 10, "w", 30)] == [uids[0], uids[2]]
    with pytest.raises(ValueError):
        store.requeue("ooni", ("pending",))


# -- SQLite only --------------------------------------------------------------------------------

@SQLITE_ONLY
def test_wal_mode(db_url, store):
    conn = sqlite3.connect(sqlite_path(db_url))
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


@SQLITE_ONLY
def test_locked_database_is_503_and_writes_nothing(db_url):
    store = SQLiteStore(sqlite_path(db_url), busy_timeout=0.1)
    blocker = sqlite3.connect(sqlite_path(db_url), isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreUnavailable) as info:
            store.add(report(), Enqueue(["ooni"]))
        assert info.value.retry_after
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert store.count() == 0
    store.close()


# -- PostgreSQL only ----------------------------------------------------------------------------

def admin(url):
    import psycopg

    return psycopg.connect(url, autocommit=True)


@POSTGRES_ONLY
def test_heroku_postgres_scheme(db_url):
    assert db_url.startswith("postgresql://")
    store = open_store("postgres://" + db_url.removeprefix("postgresql://"))
    assert store.backend == "postgresql" and store.add(report(), Enqueue(["ooni"]))[1]
    store.close()


@POSTGRES_ONLY
def test_schema_is_versioned_and_jsonb(db_url, store):
    from tunnel_telemetry.store.postgres import MIGRATIONS

    with admin(db_url) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY 1")]
        body_type = conn.execute(
            "SELECT data_type FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = 'reports' "
            "AND column_name = 'body'").fetchone()[0]
    assert versions == list(range(1, len(MIGRATIONS) + 1))
    assert body_type == "jsonb"


@POSTGRES_ONLY
def test_locked_table_is_503_and_writes_nothing(db_url):
    from tunnel_telemetry.store.postgres import PostgresStore

    store = PostgresStore(db_url, busy_timeout=0.2)
    with admin(db_url) as blocker:
        with blocker.transaction():
            blocker.execute("LOCK TABLE reports IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(StoreUnavailable) as info:
                store.add(report(), Enqueue(["ooni"]))
            assert info.value.retry_after
    assert store.count() == 0
    assert store.add(report(), Enqueue(["ooni"]))[1]  # the pool recovered its connection
    store.close()


@POSTGRES_ONLY
def test_connection_killed_by_the_server_is_replaced(store, db_url):
    store.add(report(), Enqueue([]))
    with admin(db_url) as conn:
        pids = [r[0] for r in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'tt-server' "
            "AND pid <> pg_backend_pid()")]
        assert pids
        for pid in pids:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    assert store.add(report(), Enqueue(["ooni"]))[1]
    assert store.count() == 2


@POSTGRES_ONLY
def test_nul_character_is_a_client_error(store):
    with pytest.raises(ReportError) as info:
        store.add(report(config={"prefix": "a\u0000b"}), Enqueue(["ooni"]))
    assert isinstance(info.value, ReportError) and info.value.code == "nul_character"
    assert store.count() == 0


@POSTGRES_ONLY
def test_write_path_errors_are_503(store, db_url):
    with admin(db_url) as conn:
        conn.execute("ALTER TABLE relays ADD CONSTRAINT no_more CHECK (destination <> 'x')")
    with pytest.raises(StoreUnavailable):
        store.add(report(), Enqueue(["x"]))
    assert store.count() == 0  # the report row was rolled back with its relay rows


def _opener(url, migrations, barrier, queue):
    from tunnel_telemetry.store.postgres import PostgresStore

    barrier.wait(10)
    try:
        store = PostgresStore(url, migrations=migrations)
    except StoreError as exc:
        queue.put(("error", str(exc)))
        return
    queue.put(("ok", store.schema_version))
    store.close()


@POSTGRES_ONLY
@pytest.mark.parametrize("rounds", [1, 2])
def test_migration_under_concurrent_start_up(db_url, rounds):
    """4 processes open the store at once, twice: every one succeeds, each step applies once."""
    from tunnel_telemetry.store.postgres import MIGRATIONS, Migration

    slow = Migration(len(MIGRATIONS) + 1, "slow test step",
                     "SELECT pg_sleep(0.3); CREATE TABLE extra (n integer);")
    migrations = (*MIGRATIONS, slow)
    for _ in range(rounds):
        barrier = FORK.Barrier(4)
        results = run_processes(_opener, [(db_url, migrations, barrier)] * 4)
        assert results == [("ok", slow.version)] * 4
    with admin(db_url) as conn:
        rows = conn.execute("SELECT version, description FROM schema_version ORDER BY 1").fetchall()
    assert rows == [(m.version, m.description) for m in migrations]


@POSTGRES_ONLY
def test_migrates_forward_and_refuses_a_newer_schema(db_url, store):
    from tunnel_telemetry.store.postgres import MIGRATIONS, Migration, PostgresStore

    uid = store.add(report(), Enqueue(["ooni"]))[0]["uuid"]
    step = Migration(len(MIGRATIONS) + 1, "add a column",
                     "ALTER TABLE reports ADD COLUMN note text DEFAULT 'n'")
    newer = PostgresStore(db_url, migrations=(*MIGRATIONS, step))
    assert newer.schema_version == step.version
    assert newer.get(uid) == store.get(uid)
    with admin(db_url) as conn:
        assert conn.execute("SELECT note FROM reports").fetchone()[0] == "n"
    newer.close()
    with pytest.raises(StoreError, match="newer than this tt-server"):
        PostgresStore(db_url)
    with pytest.raises(ValueError, match="1..n"):
        PostgresStore(db_url, migrations=(step,))


def _claim_and_die(url, queue):
    store = open_store(url)
    claims = store.claim("ooni", 5, "doomed", 1.0)
    queue.put([c.uuid for c in claims])
    queue.close()
    queue.join_thread()  # flushed before dying
    os.kill(os.getpid(), signal.SIGKILL)


@POSTGRES_ONLY
def test_killed_claimer_is_taken_over_after_its_lease(db_url, store):
    uids = [store.add(report(), Enqueue(["ooni"]))[0]["uuid"] for _ in range(8)]
    queue = FORK.Queue()
    proc = FORK.Process(target=_claim_and_die, args=(db_url, queue))
    proc.start()
    doomed = queue.get(timeout=30)
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL and doomed == uids[:5]
    queue.close()
    queue.join_thread()
    assert [c.uuid for c in store.claim("ooni", 10, "live", 60)] == uids[5:]
    time.sleep(1.1)
    assert [c.uuid for c in store.claim("ooni", 10, "live", 60)] == uids[:5]


@SQLITE_ONLY
def test_claim_walks_the_backlog_in_order_without_sorting_it(store):
    uids = [store.add(report(), Enqueue(["ooni"]))[0]["uuid"] for _ in range(30)]
    statements = []
    store._conn.set_trace_callback(statements.append)
    try:
        claims = store.claim("ooni", 5, "me", 60)
    finally:
        store._conn.set_trace_callback(None)
    assert [c.uuid for c in claims] == uids[:5]  # oldest first
    [select] = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    plan = " ".join(str(row) for row in store._conn.execute("EXPLAIN QUERY PLAN " + select))
    assert "relays_oldest" in plan and "TEMP B-TREE" not in plan


def test_sqlite_url_timeout(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/t.db?timeout=0.25")
    assert store.busy_timeout == 0.25 and store.path == f"{tmp_path}/t.db"
    assert store.min_free_mb == 64
    store.close()


def test_ping_is_false_when_the_disk_is_nearly_full(tmp_path):
    """A full disk fails every commit while reads still work: ping (and /healthz) tell
    before. Real free space of tmp_path's file system, against a bar it cannot reach."""
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize / 2**20
    roomy = open_store(f"sqlite:///{tmp_path}/a.db?min_free_mb=0")
    full = open_store(f"sqlite:///{tmp_path}/b.db?min_free_mb={free * 1000 + 10**6:.0f}")
    try:
        assert roomy.ping() and not full.ping()
        assert (roomy.disk(), full.disk()) == ("ok", "low")
        assert abs(full.free_mb() - free) < max(64, free * 0.05)
    finally:
        roomy.close()
        full.close()


@pytest.mark.parametrize("how", ["deleted", "moved", "replaced"])
def test_a_database_file_gone_while_open_is_503_not_a_ghost_write(tmp_path, how):
    """An open SQLite file that is deleted keeps accepting writes that are lost on restart."""
    path = tmp_path / "r.db"
    store = SQLiteStore(str(path))
    store.add(report(), Enqueue(["ooni"]))
    assert store.ping()
    if how == "deleted":
        for suffix in ("", "-wal", "-shm"):
            (tmp_path / f"r.db{suffix}").unlink()
    elif how == "moved":
        os.rename(path, tmp_path / "elsewhere.db")
    else:
        other = SQLiteStore(str(tmp_path / "other.db"))
        other.close()
        for suffix in ("-wal", "-shm"):  # a restored copy comes without the old WAL
            (tmp_path / f"r.db{suffix}").unlink()
        os.replace(tmp_path / "other.db", path)
    with pytest.raises(StoreUnavailable):
        store.add(report(), Enqueue(["ooni"]))
    assert store.ping() is (how == "replaced")
    if how == "replaced":  # the file now at the path is used from here on
        store.add(report(), Enqueue(["ooni"]))
        assert store.count() == 1
    else:
        with pytest.raises(StoreUnavailable):
            store.add(report(), Enqueue(["ooni"]))
        assert not path.exists(), "no empty database is started in its place"
    store.close()


def test_make_due_leaves_what_may_have_arrived_unless_asked(store):
    uid = store.add(report(), Enqueue(["ooni"]))[0]["uuid"]
    [c] = store.claim("ooni", 10, "w", 30)
    store.finish(uid, "ooni", "w", "pending", next_attempt=time.time() + 3600,
                 result={"report_id": "r1", "maybe": True})
    assert store.make_due("ooni") == 0
    assert store.make_due("ooni", unconfirmed=True) == 1
    [again] = store.claim("ooni", 10, "w", 30)
    assert again.result == {"report_id": "r1", "maybe": True}  # what the sender confirms with
    store.finish(uid, "ooni", "w", "pending", error="http-503")  # the last result is kept
    assert store.relay_state(uid)["ooni"]["result"]["maybe"] is True
