"""The client against the real collector: tt-server (gunicorn) processes on loopback.

The library and the tt-report command (as a subprocess) deliver, fall back, get refused,
spool and flush, and probe; what the collector stored is read back from its database.
"""

import json
import os
import sqlite3
import subprocess
import sys
from datetime import timedelta
from importlib.metadata import entry_points

import pytest

from tunnel_telemetry.client import (
    Client,
    NotDelivered,
    ReportRejected,
    RetryPolicy,
    Spool,
    build_report,
    failure,
)
from tunnel_telemetry.testing.listeners import Listener
from tunnel_telemetry.testing.reports import iso
from tunnel_telemetry.testing.scripted import ScriptedCollector, closed_port_url
from tunnel_telemetry.testing.server import TTServer, free_port

pytestmark = pytest.mark.e2e


def stored(db_path, uid):
    conn = sqlite3.connect(db_path)
    try:
        row = conn.execute("SELECT body FROM reports WHERE uuid = ?", (uid,)).fetchone()
    finally:
        conn.close()
    return json.loads(row[0]) if row else None


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One real collector for the tests that only add reports (each its own uuids)."""
    workdir = tmp_path_factory.mktemp("shared")
    db = workdir / "c1.db"
    args = ["--database-url", f"sqlite:///{db}", "--collector-id", "c1", "--workers", "1"]
    with TTServer(workdir, args) as srv:
        yield srv, db


@pytest.fixture
def collector(tmp_path, tt_server, shared):
    """Factory: ``c1`` is the shared collector, other names start their own."""

    def start(name="c1", query=""):
        if name == "c1":
            return shared
        db = tmp_path / f"{name}.db"
        srv = tt_server("--database-url", f"sqlite:///{db}{query}", "--collector-id", name,
                        "--workers", "1", name=name)
        return srv, db

    return start


@pytest.fixture
def spool(tmp_path):
    return Spool(tmp_path / "spool")


def client(collectors, spool, **kw):
    kw.setdefault("policy", RetryPolicy(attempts=2, backoff=0.05))
    kw.setdefault("timeout", 5.0)
    return Client(collectors, spool=spool, **kw)


def tt_report(*args, env=None, input=None, timeout=60):
    """Run the tt-report command as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("TT_COLLECTORS", None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "tunnel_telemetry.client.cli", *args],
        env=full_env, input=input, capture_output=True, text=True, timeout=timeout,
    )


def test_console_script_is_declared():
    names = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert names.get("tt-report") == "tunnel_telemetry.client.cli:main"


def test_delivery_201_and_receipt(collector, spool):
    srv, db = collector("c1")
    report = build_report("ss://1.1.1.1:443", time=iso(), duration_ms=12,
                          failure=failure("tcp.connect", "refused", "ECONNREFUSED"),
                          config={"prefix": "xx"})
    with client([srv.url], spool) as c:
        receipt = c.send(report)
    assert receipt.status == 201 and receipt.collector == srv.url
    answer = receipt.answer
    assert answer["uuid"] == receipt.uuid
    assert (answer["proto"], answer["endpoint_port"]) == ("ss", 443)
    assert answer["collector_id"] == "c1"
    assert "endpoint" not in answer  # scrubbed by default
    assert receipt.ooni_measurement_link is None  # no OONI relay configured
    row = stored(db, receipt.uuid)
    assert row["failure"]["posix_error"] == "ECONNREFUSED"
    assert len(spool) == 0


def test_resend_is_idempotent(collector, spool):
    srv, db = collector("own")
    report = build_report("ss://1.1.1.1:443", time=iso(),
                          uuid="fbf902ee-5d78-43cd-af39-b9b297a0d2f7")
    with client([srv.url], spool) as c:
        first = c.send(report)
        again = c.send(report)
    assert first.uuid == again.uuid == report["uuid"]
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT count(*) FROM reports").fetchone()[0] == 1
    finally:
        conn.close()


def test_fallback_from_dead_first_to_live_second(collector, spool):
    srv, db = collector("c2")
    dead = closed_port_url()
    with client([dead, srv.url], spool) as c:
        receipt = c.send(build_report("ss://1.1.1.1:443", time=iso()))
    assert receipt.collector == srv.url
    assert [a.error for a in receipt.attempts] == ["ECONNREFUSED", None]
    assert stored(db, receipt.uuid)["collector_id"] == "c2"


def test_400_is_not_sent_elsewhere(collector, spool):
    srv, db = collector("c1")
    old = build_report("ss://1.1.1.1:443", time=iso(timedelta(days=-30)))  # valid, too old
    with ScriptedCollector() as backup, client([srv.url, backup.url], spool) as c:
        with pytest.raises(ReportRejected) as info:
            c.send(old)
        assert backup.requests == []
    rejected = info.value.receipt
    assert rejected.status == 400 and rejected.collector == srv.url
    assert rejected.answer["ok"] is False and rejected.answer["errors"]
    assert len(spool) == 0


def test_5xx_then_success(collector, spool):
    """The collector answers 503 while its database is locked, then takes the report."""
    srv, db = collector("locked", "?timeout=1")  # a write waits 1 s for the lock, then 503
    lock = sqlite3.connect(db, isolation_level=None, timeout=1)
    lock.execute("BEGIN IMMEDIATE")
    released = []

    def sleep(seconds):  # between rounds: the database becomes free again
        lock.execute("ROLLBACK")
        released.append(seconds)

    try:
        with client([srv.url], spool, timeout=30, sleep=sleep,
                    policy=RetryPolicy(attempts=2, retry_after_cap=0.1)) as c:
            receipt = c.send(build_report("ss://1.1.1.1:443", time=iso()))
    finally:
        lock.close()
    assert [a.status for a in receipt.attempts] == [503, 201]
    assert receipt.attempts[0].retry_after is not None  # the collector sent Retry-After
    assert released and stored(db, receipt.uuid) is not None


def test_all_down_spool_then_flush_with_tt_report(tmp_path, spool):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"TT_SPOOL_DIR": str(spool.directory)}
    report = json.dumps(build_report("obfs4://[2001:db8::1]:9001", time=iso(),
                                     failure=failure("tcp.connect", "timeout", "ETIMEDOUT")))
    sent = tt_report("send", "-", "--collector", url, "--attempts", "2", "--backoff", "0.05",
                     env=env, input=report)
    assert sent.returncode == 3, sent.stderr
    assert sent.stdout == ""
    [path] = spool.paths()
    assert "spooled as" in sent.stderr and "Traceback" not in sent.stderr

    db = tmp_path / "late.db"
    with TTServer(tmp_path / "late", ["--database-url", f"sqlite:///{db}", "--workers", "1"],
                  port=port):
        flushed = tt_report("flush", "--collector", url, env=env)
    assert flushed.returncode == 0, flushed.stderr
    summary = json.loads(flushed.stdout)
    assert summary["remaining"] == 0
    assert summary["delivered"][0]["uuid"] == path.stem
    assert stored(db, path.stem)["failure"]["posix_error"] == "ETIMEDOUT"
    assert spool.paths() == []


def test_library_spool_then_flush(collector, spool):
    down = closed_port_url()
    with client([down], spool) as c, pytest.raises(NotDelivered) as info:
        c.send(build_report("ss://1.1.1.1:443", time=iso()))
    assert info.value.spooled.exists()
    srv, db = collector("c1")
    with client([down, srv.url], spool) as c:
        result = c.flush()
    assert [r.uuid for r in result.delivered] == [info.value.uuid]
    assert stored(db, info.value.uuid) is not None and len(spool) == 0


def test_probe_and_send_loopback_port(collector, spool):
    srv, db = collector("c1")
    env = {"TT_SPOOL_DIR": str(spool.directory), "TT_COLLECTORS": srv.url}
    with Listener("hold") as lst:
        ok = tt_report("probe", f"ss://127.0.0.1:{lst.port}", "--config", "prefix=xx", env=env)
    assert ok.returncode == 0, ok.stderr
    answer = json.loads(ok.stdout)
    assert answer["failure"] is None and answer["endpoint_port"] == lst.port
    assert answer["config"] == {"prefix": "xx"}
    assert stored(db, answer["uuid"])["duration_ms"] >= 0

    closed = closed_port_url().rsplit(":", 1)[1]
    bad = tt_report("probe", f"ss://127.0.0.1:{closed}", env=env)
    assert bad.returncode == 0, bad.stderr  # the endpoint failed; the report was delivered
    row = stored(db, json.loads(bad.stdout)["uuid"])
    assert row["failure"]["op"] == "tcp.connect"
    assert row["failure"]["posix_error"] == "ECONNREFUSED"


def test_collector_rejection_exit_1_from_command(collector, spool):
    srv, _ = collector("c1")
    old = json.dumps(build_report("ss://1.1.1.1:443", time=iso(timedelta(days=-30))))
    result = tt_report("send", "-", "--collector", srv.url,
                       env={"TT_SPOOL_DIR": str(spool.directory)}, input=old)
    assert result.returncode == 1
    assert json.loads(result.stdout)["ok"] is False
    assert "rejected the report (400)" in result.stderr
