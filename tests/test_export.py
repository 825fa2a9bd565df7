"""tt-server export: what was stored comes back, filtered, streamed, alike on both backends."""

import csv
import io
import json
import time
import tracemalloc
import uuid
from datetime import UTC, datetime

import psycopg
import pytest

from tunnel_telemetry.cli import main
from tunnel_telemetry.export import CSV_COLUMNS, parse_when
from tunnel_telemetry.store import ExportFilter, open_store
from tunnel_telemetry.testing.reports import make_report
from tunnel_telemetry.web import create_app

# (client_asn, client_cc, endpoint, failure): endpoints in the test geo databases' networks
CASES = [
    ("AS30722", "IT", "ss://1.1.1.1:443", None),
    ("AS30722", "IT", "https://2.3.4.5:8443", {"op": "tls.handshake", "msg": "reset"}),
    ("AS3320", "DE", "ss://6.6.6.6:80", {"op": "tcp.connect", "posix_error": "ECONNREFUSED"}),
    ("AS3320", "DE", "ss://[2a01:4f8:1::9]:443", None),
    ("AS0", "ZZ", "vless://1.1.1.2:443", None),
]


@pytest.fixture
def db_url(each_backend_url):
    """Every test here runs on SQLite and on PostgreSQL."""
    return each_backend_url


def moment(ts):
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def export(runner, db_url, *args):
    result = runner.invoke(main, ["export", "--database-url", db_url, *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_round_trip_with_filters(runner, db_url, geo_dbs):
    country, asn = geo_dbs
    app = create_app({"database-url": db_url, "geoip-country-db": str(country),
                      "geoip-asn-db": str(asn)})
    client = app.test_client()
    uuids = []
    middle = None
    for round_ in range(2):
        for client_asn, client_cc, endpoint, failure in CASES:
            uid = str(uuid.uuid4())
            resp = client.post("/report", json=make_report(
                uuid=uid, client_asn=client_asn, client_cc=client_cc, endpoint=endpoint,
                failure=failure, config={"prefix": "xx", "z": "1", "a": "ü"}))
            assert resp.status_code == 201, resp.get_json()
            uuids.append(uid)
        if round_ == 0:
            middle = time.time()
    store = app.extensions["tunnel_telemetry"].store
    stored = {uid: store.get(uid) for uid in uuids}
    app.extensions["tunnel_telemetry"].close()

    lines = export(runner, db_url).splitlines()
    assert [json.loads(line) for line in lines] == [stored[uid] for uid in uuids]

    def uuids_of(*args):
        return [json.loads(line)["uuid"] for line in export(runner, db_url, *args).splitlines()]

    def where(pred):
        return [uid for uid in uuids if pred(stored[uid])]

    assert uuids_of("--since", moment(middle)) == uuids[5:]
    assert uuids_of("--until", moment(middle)) == uuids[:5]
    assert uuids_of("--since", "1h", "--until", moment(middle)) == uuids[:5]
    assert uuids_of("--client-cc", "de") == where(lambda r: r["client_cc"] == "DE")
    assert uuids_of("--client-asn", "30722") == where(lambda r: r["client_asn"] == "AS30722")
    assert uuids_of("--proto", "SS") == where(lambda r: r["proto"] == "ss")
    assert uuids_of("--endpoint-asn", "AS13335") == where(
        lambda r: r["endpoint_asn"] == "AS13335")
    assert len(uuids_of("--endpoint-asn", "AS13335")) == 4  # 1.1.1.1 and 1.1.1.2, twice
    assert uuids_of("--failed") == where(lambda r: r["failure"] is not None)
    assert uuids_of("--succeeded") == where(lambda r: r["failure"] is None)
    assert uuids_of("--failed", "--client-cc", "IT", "--proto", "https") == where(
        lambda r: r["failure"] and r["client_cc"] == "IT" and r["proto"] == "https")
    assert uuids_of("--client-cc", "FR") == []

    rows = list(csv.DictReader(io.StringIO(export(runner, db_url, "--format", "csv"))))
    assert [row["uuid"] for row in rows] == uuids
    for row in rows:
        report = stored[row["uuid"]]
        assert tuple(row) == CSV_COLUMNS
        assert json.loads(row["config"]) == report["config"]
        assert row["endpoint_port"] == str(report["endpoint_port"])
        assert row["failure_op"] == ((report["failure"] or {}).get("op") or "")
        assert row["client_asn"] == report["client_asn"]


def test_same_output_on_sqlite_and_postgresql(runner, tmp_path, pg_url):
    sqlite_url = f"sqlite:///{tmp_path}/reports.db"
    reports = [make_report(uuid=str(uuid.uuid4()), proto="ss", endpoint_port=443 + i,
                           endpoint_asn="AS13335", endpoint_cc="AU", client_asn="AS3320",
                           client_cc="DE", t_received=moment(time.time()),
                           config={"zeta": "1", "alpha": "ü", "mid": "x"}, duration_ms=i,
                           failure={"op": "tcp.connect", "msg": "refused"} if i % 2 else None,
                           sampling_rate=0.5, endpoint=None)
               for i in range(6)]
    reports[2]["ooni-measurement-id"] = "20261207T000000Z_tunneltelemetry_DE_3320_n1_x"
    for url in (sqlite_url, pg_url):
        store = open_store(url)
        for report in reports:
            store.add(report)
        store.close()
    for args in ([], ["--format", "csv"], ["--failed"], ["--client-asn", "AS3320"]):
        assert export(runner, sqlite_url, *args) == export(runner, pg_url, *args)
    first = export(runner, pg_url).splitlines()[0]
    assert first.startswith('{"report-type":"tunnel-telemetry","uuid":')
    assert '"config":{"alpha":"ü","mid":"x","zeta":"1"}' in first


def fill(db_url, backend, count):
    """``count`` reports of ~1 kB written straight into the table (fast)."""
    body = {"report-type": "tunnel-telemetry", "proto": "ss", "client_cc": "DE",
            "config": {"pad": "p" * 900}, "failure": None}
    rows = [(f"u{i:08d}", float(i), json.dumps({**body, "uuid": f"u{i:08d}"}))
            for i in range(count)]
    if backend == "sqlite":
        import sqlite3

        with sqlite3.connect(db_url[len("sqlite:///"):]) as conn:
            conn.executemany("INSERT INTO reports VALUES (?, ?, ?)", rows)
    else:
        with psycopg.connect(db_url) as conn, conn.cursor() as cur:
            with cur.copy("COPY reports (uuid, received, body) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)


def test_export_streams_in_constant_memory(db_url, backend):
    store = open_store(db_url)
    count = 8_000  # 8 MB of reports
    fill(db_url, backend, count)
    tracemalloc.start()
    try:
        seen = 0
        for report in store.export(ExportFilter(client_cc="DE")):
            seen += 1
            assert len(report["config"]["pad"]) == 900
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        store.close()
    assert seen == count
    assert peak < 3 * 2**20, peak  # the table is 8 MB on disk, 25 MB as objects


def test_output_file_and_bad_filters(runner, tmp_path):
    url = f"sqlite:///{tmp_path}/reports.db"
    store = open_store(url)
    store.add(make_report(uuid=str(uuid.uuid4()), client_cc="DE"))
    store.close()
    out = tmp_path / "out.jsonl"
    result = runner.invoke(main, ["export", "--database-url", url, "-o", str(out)])
    assert result.exit_code == 0 and "1 reports written" in result.output
    assert json.loads(out.read_text())["client_cc"] == "DE"
    for args in (["--since", "last tuesday"], ["--client-asn", "ASX"], ["--client-cc", "DEU"],
                 ["--format", "xml"]):
        result = runner.invoke(main, ["export", "--database-url", url, *args])
        assert result.exit_code == 2, (args, result.output)


def test_parse_when():
    now = 1_800_000_000.0
    assert parse_when("2026-01-02", now) == datetime(2026, 1, 2, tzinfo=UTC).timestamp()
    assert parse_when("2026-01-02T03:04:05Z", now) == datetime(2026, 1, 2, 3, 4, 5,
                                                               tzinfo=UTC).timestamp()
    assert parse_when("36h", now) == now - 36 * 3600
    with pytest.raises(ValueError, match="RFC 3339"):
        parse_when("soon", now)
