import multiprocessing
import os
import sqlite3
import time
import uuid

import pytest

from tunnel_telemetry.errors import StoreUnavailable
from tunnel_telemetry.store import SQLiteStore, StoreError, open_store, sqlite_path


def report(uid=None, **extra):
    return {"uuid": uid or str(uuid.uuid4()), "report-type": "tunnel-telemetry", **extra}


@pytest.fixture
def store(db_url):
    store = open_store(db_url)
    yield store
    store.close()


def test_add_is_idempotent(store):
    first = report(x=1)
    stored, created = store.add(first, ["ooni"])
    assert created and stored == first
    again, created = store.add({**first, "x": 2}, ["ooni"])
    assert not created and again == first
    assert store.count() == 1
    assert store.relay_state(first["uuid"])["ooni"]["state"] == "pending"


def test_update_report(store):
    r = report()
    store.add(r, [])
    updated = store.update_report(r["uuid"], {"ooni-measurement-id": "m"})
    assert updated["ooni-measurement-id"] == "m"
    assert store.get(r["uuid"])["ooni-measurement-id"] == "m"
    assert store.update_report("missing", {"a": 1}) is None


def test_claim_leases_and_finish(store):
    uids = [store.add(report(), ["ooni", "collector:http://b"])[0]["uuid"] for _ in range(3)]
    claims = store.claim("ooni", 10, "w1", 30)
    assert [c.uuid for c in claims] == uids
    assert store.claim("ooni", 10, "w2", 30) == []
    assert len(store.claim("collector:http://b", 10, "w2", 30)) == 3
    assert not store.finish(uids[0], "ooni", "w2", "delivered")
    assert store.finish(uids[0], "ooni", "w1", "delivered", result={"id": "m"})
    assert store.finish(uids[1], "ooni", "w1", "pending", error="timeout", next_attempt=1e12)
    assert store.finish(uids[2], "ooni", "w1", "failed", error="bad")
    state = store.relay_state(uids[0])["ooni"]
    assert state["state"] == "delivered" and state["result"] == {"id": "m"}
    assert state["attempts"] == 1
    # uids[1] is pending but not due; due_only=False takes it anyway.
    assert store.claim("ooni", 10, "w3", 30) == []
    assert [c.uuid for c in store.claim("ooni", 10, "w3", 30, due_only=False)] == [uids[1]]
    assert store.backlog()["ooni"]["pending"] == 1


def test_expired_lease_is_taken_over(store):
    uid = store.add(report(), ["ooni"])[0]["uuid"]
    assert store.claim("ooni", 1, "dead", 5, now=1e10)
    assert store.claim("ooni", 1, "other", 5, now=1e10 + 1) == []
    assert [c.uuid for c in store.claim("ooni", 1, "other", 5, now=1e10 + 6)] == [uid]
    assert not store.finish(uid, "ooni", "dead", "delivered")


def test_finish_rejects_unknown_state(store):
    with pytest.raises(ValueError):
        store.finish("u", "ooni", "w", "lost")


def _writer(url, n, queue):
    store = open_store(url)
    for _ in range(n):
        store.add(report(), ["ooni"])
    store.close()
    queue.put(os.getpid())


def test_concurrent_writers_from_processes(db_url):
    store = open_store(db_url)
    queue = multiprocessing.get_context("fork").Queue()
    procs = [multiprocessing.get_context("fork").Process(target=_writer, args=(db_url, 50, queue))
             for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    assert store.count() == 200
    assert store.backlog()["ooni"]["pending"] == 200
    store.close()
    queue.close()
    queue.join_thread()


def test_wal_mode(db_url, store):
    conn = sqlite3.connect(sqlite_path(db_url))
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


@pytest.mark.parametrize("url, message", [
    ("mysql://x/y", "unsupported scheme"),
    ("sqlite://relative.db", "expected sqlite"),
    ("sqlite:////proc/no/such/dir/x.db", "cannot open"),
])
def test_open_errors(url, message):
    with pytest.raises(StoreError, match=message):
        open_store(url)


def test_locked_database_is_503_and_writes_nothing(db_url):
    store = SQLiteStore(sqlite_path(db_url), busy_timeout=0.1)
    blocker = sqlite3.connect(sqlite_path(db_url), isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreUnavailable) as info:
            store.add(report(), ["ooni"])
        assert info.value.status == 503 and "Retry-After" in info.value.headers
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert store.count() == 0
    store.close()


def test_add_with_lease_keeps_rows_from_other_claimers(store):
    r = report()
    store.add(r, ["ooni", "collector:http://b"], lease_owner="req", lease_seconds=30)
    assert store.claim("ooni", 10, "loop", 30) == []
    assert store.finish(r["uuid"], "ooni", "req", "delivered")
    assert store.finish(r["uuid"], "collector:http://b", "req", "pending", next_attempt=0)
    assert [c.uuid for c in store.claim("collector:http://b", 10, "loop", 30)] == [r["uuid"]]


def test_add_lease_expires(store):
    r = report()
    store.add(r, ["ooni"], lease_owner="dead", lease_seconds=5)
    assert store.claim("ooni", 1, "loop", 5) == []
    assert [c.uuid for c in store.claim("ooni", 1, "loop", 5, now=time.time() + 6)] == [r["uuid"]]
    assert not store.finish(r["uuid"], "ooni", "dead", "delivered")


def test_duplicate_add_leases_nothing(store):
    r = report()
    store.add(r, ["ooni"])
    store.add(r, ["ooni"], lease_owner="req", lease_seconds=30)
    assert len(store.claim("ooni", 1, "loop", 30)) == 1


def test_finish_merges_report_fields_only_with_the_lease(store):
    r = report()
    store.add(r, ["ooni"], lease_owner="w1", lease_seconds=30)
    assert not store.finish(r["uuid"], "ooni", "w2", "delivered", report_fields={"x": 1})
    assert "x" not in store.get(r["uuid"])
    assert store.finish(r["uuid"], "ooni", "w1", "delivered", result={"id": "m"},
                        report_fields={"ooni-measurement-id": "m"})
    assert store.get(r["uuid"]) == {**r, "ooni-measurement-id": "m"}


def test_release_gives_rows_back_without_counting_an_attempt(store):
    uids = [store.add(report(), ["ooni"])[0]["uuid"] for _ in range(3)]
    assert len(store.claim("ooni", 10, "w1", 30)) == 3
    assert store.release(uids[:2], "ooni", "w2") == 0  # not the owner
    assert store.release(uids[:2], "ooni", "w1", next_attempt=time.time() + 100) == 2
    assert store.release([], "ooni", "w1") == 0
    assert store.claim("ooni", 10, "w3", 30) == []  # released rows are not due yet
    claims = store.claim("ooni", 10, "w3", 30, due_only=False)
    assert sorted(c.uuid for c in claims) == sorted(uids[:2])
    assert {c.attempts for c in claims} == {0}


def test_make_due_ignores_backoff(store):
    uids = [store.add(report(), ["ooni", "other"])[0]["uuid"] for _ in range(2)]
    for c in store.claim("ooni", 10, "w", 30):
        store.finish(c.uuid, "ooni", "w", "pending", next_attempt=time.time() + 3600)
    assert store.claim("ooni", 10, "w", 30) == []
    assert store.make_due("ooni") == 2
    assert sorted(c.uuid for c in store.claim("ooni", 10, "w", 30)) == sorted(uids)
    assert store.make_due("other") == 0  # already due


def test_requeue_failed(store):
    uids = [store.add(report(), ["ooni"])[0]["uuid"] for _ in range(3)]
    states = ["failed", "delivered", "expired"]
    for uid, state in zip(uids, states, strict=True):
        store.claim("ooni", 1, "w", 30)
        assert store.finish(uid, "ooni", "w", state)
    assert store.requeue("ooni") == 1
    assert store.requeue("ooni", ("expired",)) == 1
    assert [c.uuid for c in store.claim("ooni", 10, "w", 30)] == [uids[0], uids[2]]
    with pytest.raises(ValueError):
        store.requeue("ooni", ("pending",))
