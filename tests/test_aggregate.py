"""Aggregates: the k floor, folding, rounding and vocabulary (tunnel_telemetry.aggregate), the
store's grouping on both backends, GET /aggregates, /dashboard's token and tt-server aggregate."""

import base64
import csv
import io
import json
import sqlite3
import uuid

import pytest

from tunnel_telemetry import aggregate as ag
from tunnel_telemetry.cli import main
from tunnel_telemetry.errors import ReportError
from tunnel_telemetry.store import open_store

DAY = 86400
T0 = 1_796_342_400  # 2026-12-04T00:00:00Z
NOW = T0 + 3 * DAY + 600  # 2026-12-07T00:10:00Z: the 4th, 5th and 6th are closed
TOKEN = "dashboard-token-0123456789"
RELAY_TOKEN = "relay-token-0123456789abcdef"


def report(cc="DE", asn="AS3320", proto="ss", easn="AS13335", ecc="US", failure=None,
           rate=1, **extra):
    return {"report-type": "tunnel-telemetry", "uuid": str(uuid.uuid4()), "client_cc": cc,
            "client_asn": asn, "proto": proto, "endpoint_asn": easn, "endpoint_cc": ecc,
            "failure": failure, "sampling_rate": rate, "endpoint": "ss://1.1.1.77:443",
            "endpoint_addr": "1.1.1.77", **extra}


def set_received(db_url, received):
    """Move every stored report to ``received`` (a store only stamps the time of now)."""
    if db_url.startswith("sqlite"):
        with sqlite3.connect(db_url[len("sqlite:///"):]) as conn:
            conn.execute("UPDATE reports SET received = ?", (received,))
        return
    import psycopg

    with psycopg.connect(db_url) as conn:
        conn.execute("UPDATE reports SET received = %s", (received,))


def fill(store, db_url, day, reports):
    for item in reports:
        store.add(item)
    set_received(db_url, T0 + day * DAY)


# -- the plain module ------------------------------------------------------------------------

ROW = (T0, "DE", "AS3320", "ss", "AS13335", "US", 1, "connect", "ECONNREFUSED", 3, 3.0)


@pytest.mark.parametrize(("field", "value", "published"), [
    (1, "de", "ZZ"), (1, "1.2.3.4", "ZZ"), (2, "AS01", "AS0"), (2, "secret.example", "AS0"),
    (3, "vless", "vless"), (3, "a.b", "other"), (3, "x" * 17, "other"),
    (7, "tcp-connect", "tcp-connect"), (7, "dial 1.1.1.77:443", "other"),
    (7, "tcp.connect", "tcp.connect"), (7, "udp.receive", "udp.receive"),
    (7, "example.org", "other"), (7, "tcp.connect.example", "other"),
    (7, "proxy.example.org", "other"), (7, str(uuid.uuid4()), "other"),
    (8, "ETIMEDOUT", "ETIMEDOUT"), (8, "refused by 1.1.1.77", "other"), (8, None, None),
])
def test_values_come_from_a_closed_vocabulary(field, value, published):
    row = list(ROW)
    row[field] = value
    key = ag.clean_key(tuple(row))
    assert key[field - 1] == published


def test_success_has_no_operation():
    assert ag.clean_key((T0, "DE", "AS1", "ss", "AS2", "US", 0, None, None, 1, 1)) == (
        "DE", "AS1", "ss", "AS2", "US", "success", None, None)


@pytest.mark.parametrize(("value", "floor", "published"), [
    (0, 0, 0), (4, 0, 0), (5, 0, 10), (14, 0, 10), (15, 0, 20), (3, 10, 10), (1234.5, 10, 1230),
])
def test_rounding(value, floor, published):
    assert ag.round_count(value, floor) == published


def key(cc="DE", asn="AS1", proto="ss", outcome="success"):
    return (cc, asn, proto, "AS9", "US", outcome, None, None)


def test_small_cells_fold_network_then_country_then_suppressed():
    cells = {
        key(asn="AS1"): [12, 12.0],                  # published as it is
        key(asn="AS2"): [6, 6.0], key(asn="AS3"): [5, 50.0],   # together 11: DE's other networks
        key(cc="FR", asn="AS4"): [4, 4.0],           # FR's 4 + IT's 7 = 11 at "all"
        key(cc="IT", asn="AS5"): [7, 7.0],
        key(proto="vless"): [3, 3.0],                # alone at every level: suppressed
    }
    published, folded, suppressed = ag.fold(cells, k=10)
    by_level = {(c["level"], c["key"]): c["count"] for c in published}
    assert by_level == {
        ("network", key(asn="AS1")): 12,
        ("country", ("DE", None, "ss", None, "US", "success", None, None)): 11,
        ("all", (None, None, "ss", None, None, "success", None, None)): 11,
    }
    assert [c["weighted"] for c in published if c["level"] == "country"] == [56.0]
    assert (folded, suppressed) == (22, 3)
    assert sum(c["count"] for c in published) + suppressed == 12 + 6 + 5 + 4 + 7 + 3


@pytest.mark.parametrize(("args", "message"), [
    ({"period": "week"}, "period: must be hour or day"),
    ({"from": "yesterday"}, "from: expected a UTC date"),
    ({"to": "2026-13-01"}, "to: expected a UTC date"),
    ({"from": "2026-12-06", "to": "2026-12-01"}, "from: must not be after to"),
    ({"from": "1990-01-01"}, "from: at most 1000 periods"),
    ({"k": "1"}, "k: unknown parameter"),
])
def test_bad_parameters(args, message):
    with pytest.raises(ReportError) as info:
        ag.parse_query(args, NOW)
    assert info.value.code == "bad_parameter"
    assert info.value.msg.startswith(message)


@pytest.mark.parametrize(("args", "bounds"), [
    ({}, (NOW // DAY * DAY - 30 * DAY, NOW // DAY * DAY)),
    ({"from": "2026-12-04", "to": "2026-12-05T01:00:00Z"}, (T0, T0 + 2 * DAY)),
    ({"from": "2026-12-04T13:00:00+02:00", "to": "2030-01-01"}, (T0, T0 + 3 * DAY)),
    ({"period": "hour", "from": "2026-12-06T23:30:00Z"}, (T0 + 3 * DAY - 3600, T0 + 3 * DAY)),
])
def test_ranges_are_whole_closed_periods(args, bounds):
    query = ag.parse_query(args, NOW)
    assert (query.start, query.end) == bounds


# -- the store's grouping, both backends -----------------------------------------------------

@pytest.fixture
def store_url(each_backend_url):
    return each_backend_url


def test_store_groups_by_period_and_cell(store_url):
    store = open_store(store_url)
    try:
        fill(store, store_url, 1, [report(rate=0.1) for _ in range(4)]
             + [report(failure={"op": "connect", "msg": "refused 1.1.1.77"}) for _ in range(3)]
             + [report(failure={"op": "connect", "posix_error": "ECONNREFUSED"})]
             + [report(rate="junk")])
        rows = store.aggregate(T0, T0 + 3 * DAY, DAY)
        hours = store.aggregate(T0 + DAY, T0 + DAY + 3600, 3600)
    finally:
        store.close()
    got = {(r[0], *r[1:6], bool(r[6]), r[7], r[8], r[9], round(r[10], 6)) for r in rows}
    cell = ("DE", "AS3320", "ss", "AS13335", "US")
    assert got == {
        (T0 + DAY, *cell, False, None, None, 5, 41.0),
        (T0 + DAY, *cell, True, "connect", None, 3, 3.0),
        (T0 + DAY, *cell, True, "connect", "ECONNREFUSED", 1, 1.0),
    }
    assert {r[0] for r in hours} == {T0 + DAY}


def test_document_has_every_period_and_no_report_text(store_url):
    store = open_store(store_url)
    try:
        fill(store, store_url, 1, [report() for _ in range(12)]
             + [report(asn="AS7", failure={"op": "dial proxy.example.org"}) for _ in range(3)])
        document = ag.build(store, ag.parse_query({"from": "2026-12-04"}, NOW), k=10)
    finally:
        store.close()
    assert [p["start"] for p in document["periods"]] == [
        "2026-12-04T00:00:00Z", "2026-12-05T00:00:00Z", "2026-12-06T00:00:00Z"]
    day = document["periods"][1]
    assert (day["reports"], day["folded"], day["suppressed"]) == (20, 0, 0)  # 15, rounded
    assert [(c["level"], c["client_asn"], c["count"]) for c in day["cells"]] == [
        ("network", "AS3320", 10)]
    text = json.dumps(document)
    for secret in ("1.1.1.77", "proxy.example.org", "ss://"):
        assert secret not in text
    assert document["periods"][0]["cells"] == [] and document["periods"][0]["reports"] == 0


def test_cache_reads_a_closed_period_once(tmp_path):
    url = f"sqlite:///{tmp_path}/reports.db"
    store = open_store(url)
    query = ag.parse_query({"from": "2026-12-04"}, NOW)
    cache, fresh = ag.PeriodCache(), ag.PeriodCache(seconds=0)
    try:
        fill(store, url, 1, [report() for _ in range(10)])
        first = ag.build(store, query, cache=cache)
        fill(store, url, 1, [report() for _ in range(10)])
        assert ag.build(store, query, cache=cache) == first
        assert ag.build(store, query, cache=fresh)["periods"][1]["reports"] == 20
        assert ag.build(store, query) == ag.build(store, query, cache=fresh)
    finally:
        store.close()
    assert first["periods"][1]["reports"] == 10


@pytest.mark.parametrize(("flags", "message"), [
    ({"aggregate-k": "1"}, "aggregate-k: must be between 2 and 1000000"),
    ({"aggregate-k": "ten"}, "aggregate-k: expected a whole number"),
    ({"dashboard-token": "short"}, "dashboard-token: must be 16-512 printable characters"),
    ({"dashboard-token": "with a space in it, long enough"}, "dashboard-token: must be 16"),
    ({"relay-aggregates-url": "https://b.example"}, "relay-aggregates-url: needs relay-token"),
    ({"relay-aggregates-url": "https://b.example", "relay-token": RELAY_TOKEN},
     "relay-aggregates-url: needs relay-token (the secondary's relay-tokens) and collector-id"),
    ({"relay-aggregates-url": "ftp://b.example", "relay-token": RELAY_TOKEN,
      "collector-id": "a"}, "relay: not an http(s) URL"),
    ({"relay-aggregates-url": "https://u:p@b.example", "relay-token": RELAY_TOKEN,
      "collector-id": "a"}, "relay: no credentials in URLs"),
])
def test_bad_options_fail_at_start(flags, message):
    from tunnel_telemetry.config import ConfigError, load_config

    with pytest.raises(ConfigError) as info:
        load_config(flags=flags, env={})
    assert str(info.value).startswith(message)


# -- HTTP and CLI ----------------------------------------------------------------------------

@pytest.fixture
def app_config(db_url):
    return {"database-url": db_url, "dashboard-token": TOKEN}


@pytest.mark.parametrize(("query", "path"), [
    ("period=month", "period"), ("from=soon", "from"), ("to=2026-12-01&from=2026-12-02", "from"),
    ("uuid=x", "uuid"),
])
def test_aggregates_bad_parameters_are_json_400(client, query, path):
    response = client.get(f"/aggregates?{query}")
    assert response.status_code == 400
    assert response.json["ok"] is False
    assert response.json["errors"][0]["path"] == path


def test_aggregates_answer_is_cacheable(client):
    response = client.get("/aggregates?period=hour")
    assert response.status_code == 200
    assert response.json["format"] == ag.FORMAT and len(response.json["periods"]) == 48
    assert response.cache_control.public and 60 <= response.cache_control.max_age <= 3600
    again = client.get("/aggregates?period=hour",
                       headers={"If-None-Match": response.headers["ETag"]})
    assert again.status_code == 304
    past = client.get("/aggregates?from=2026-01-01&to=2026-01-03")
    assert past.cache_control.max_age == 86400 and len(past.json["periods"]) == 2


def basic(password, user="operator"):
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(("header", "status"), [
    (None, 401), ("Bearer wrong-token-0123456789", 401), (basic("nope"), 401),
    ("Basic !!!", 401), (f"Bearer {TOKEN}", 200), (basic(TOKEN), 200), (basic(TOKEN, ""), 200),
])
def test_dashboard_needs_the_operator_token(client, header, status):
    response = client.get("/dashboard", headers={"Authorization": header} if header else {})
    assert response.status_code == status
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Basic")
        assert response.json["ok"] is False
    else:
        assert "default-src 'none'" in response.headers["Content-Security-Policy"]
        assert response.data.count(b'class="chart"') == 3


def test_dashboard_is_off_without_a_token(db_url):
    from tunnel_telemetry.web import create_app

    app = create_app({"database-url": db_url})
    try:
        response = app.test_client().get("/dashboard", headers={"Authorization": basic(TOKEN)})
    finally:
        app.extensions["tunnel_telemetry"].close()
    assert response.status_code == 404


DBIP = "IP Geolocation by DB-IP (https://db-ip.com), CC BY 4.0"
GEOLITE2 = ("This product includes GeoLite2 data created by MaxMind, available from "
            "https://www.maxmind.com, GeoLite2 EULA")


@pytest.mark.parametrize(("types", "expected"), [
    (("DBIP-Country-Lite", "DBIP-ASN-Lite"), [DBIP]),
    (("DBIP-Country-Lite", "GeoLite2-ASN"), [DBIP, GEOLITE2]),
    (("GeoLite2-Country", None), [GEOLITE2]),
    (("Private-Country", None), []),
    ((None, None), []),
])
def test_the_geo_data_attribution_is_shown_with_the_aggregates(db_url, tmp_path, types,
                                                               expected):
    """Where the countries and networks are shown (GET /aggregates, /dashboard), the
    licence's attribution of the databases they came from is too (DB-IP's CC BY 4.0)."""
    from tunnel_telemetry.testing.geodb import write_asn_db, write_country_db
    from tunnel_telemetry.web import create_app

    country, asn = types
    options = {"database-url": db_url, "dashboard-token": TOKEN}
    if country:
        options["geoip-country-db"] = write_country_db(
            tmp_path / "c.mmdb", {"1.1.1.0/24": "AU"}, database_type=country)
    if asn:
        options["geoip-asn-db"] = write_asn_db(
            tmp_path / "a.mmdb", {"1.1.1.0/24": (13335, "X")}, database_type=asn)
    app = create_app(options)
    try:
        client = app.test_client()
        document = client.get("/aggregates?period=hour").json
        page = client.get("/dashboard", headers={"Authorization": basic(TOKEN)}).text
    finally:
        app.extensions["tunnel_telemetry"].close()
    assert document.get("attribution", []) == expected
    assert document["format"] == ag.FORMAT
    assert ('id="attribution"' in page) == bool(expected)
    for credit in expected:
        assert credit in page


def test_cli_prints_the_same_cells(runner, tmp_path, monkeypatch):
    monkeypatch.setattr(ag, "DEFAULT_SPAN", {"hour": 48, "day": 30})
    url = f"sqlite:///{tmp_path}/reports.db"
    store = open_store(url)
    try:
        fill(store, url, 1, [report() for _ in range(10)] + [report(cc="IR") for _ in range(10)])
        expected = ag.build(store, ag.parse_query({"from": "2026-12-04", "to": "2026-12-06"},
                                                  NOW), k=10)
    finally:
        store.close()
    args = ["aggregate", "--database-url", url, "--from", "2026-12-04", "--to", "2026-12-06"]
    lines = runner.invoke(main, [*args, "--format", "jsonl"], env={"CONFIG": ""})
    assert lines.exit_code == 0, lines.output
    periods = [json.loads(line) for line in lines.output.splitlines()]
    assert [p["cells"] for p in periods] == [p["cells"] for p in expected["periods"]]
    table = runner.invoke(main, [*args, "--format", "csv"], env={"CONFIG": ""})
    rows = list(csv.DictReader(io.StringIO(table.output)))
    assert sorted(r["client_cc"] for r in rows) == ["DE", "IR"]
    assert {r["count"] for r in rows} == {"10"}
    bad = runner.invoke(main, [*args[:3], "--from", "nonsense"], env={"CONFIG": ""})
    assert bad.exit_code == 2 and "aggregate: from:" in bad.output


# -- relayed aggregates: the receiving side ---------------------------------------------------

def sent_document(store_url, tmp_path=None):
    """A document as a primary sends it: built from a store with a day of reports."""
    store = open_store(store_url)
    try:
        fill(store, store_url, 1, [report() for _ in range(12)]
             + [report(cc="IR", failure={"op": "tcp.connect", "posix_error": "ETIMEDOUT"})
                for _ in range(10)])
        return {"source": "primary-1",
                **ag.build(store, ag.parse_query({"from": "2026-12-04"}, NOW))}
    finally:
        store.close()


@pytest.fixture
def sent(tmp_path):
    return sent_document(f"sqlite:///{tmp_path}/primary.db")


def edit(document, path, value):
    """A copy of ``document`` with ``path`` (keys and indexes) set to ``value``."""
    copy = json.loads(json.dumps(document))
    target = copy
    for step in path[:-1]:
        target = target[step]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return copy


@pytest.mark.parametrize(("path", "value", "error"), [
    (("format",), "other/1", "$.format"),
    (("source",), "primary 1", "$.source"),
    (("source",), KeyError, "$.source"),
    (("k",), 5, "$.k"),
    (("period",), "week", "$.period"),
    (("periods",), [], "$.periods"),
    (("periods", 0, "start"), "2026-12-04T00:00:01Z", "$.periods[0].start"),
    (("periods", 2, "end"), "2026-12-08T00:00:00Z", "$.periods[2].start"),
    (("periods", 1, "reports"), 25, "$.periods[1].reports"),
    (("periods", 1, "extra"), 1, "$.periods[1]"),
    (("periods", 1, "cells", 0, "op"), "connect", "$.periods[1].cells[0].op"),
    (("periods", 1, "cells", 1, "client_asn"), "1.1.1.77", "$.periods[1].cells[1].client_asn"),
    (("periods", 1, "cells", 1, "count"), 5, "$.periods[1].cells[1].count"),
    (("periods", 1, "cells", 1, "level"), "city", "$.periods[1].cells[1].level"),
    (("periods", 1, "cells", 1, "uuid"), str(uuid.uuid4()), "$.periods[1].cells[1]"),
])
def test_relayed_documents_are_checked(sent, path, value, error):
    ag.check_document(sent, 10, NOW)  # as sent: accepted
    with pytest.raises(ReportError) as info:
        ag.check_document(edit(sent, path, value), 10, NOW)
    assert info.value.code == "bad_aggregates"
    assert error in [e["path"] for e in info.value.errors]


def test_store_keeps_relayed_periods(store_url, sent):
    source, period, periods = ag.check_document(sent, 10, NOW)
    store = open_store(store_url)
    try:
        assert store.add_relayed_aggregates(source, period, periods) == 3
        assert store.add_relayed_aggregates(source, period, periods[1:2]) == 1  # replaces
        kept = store.relayed_aggregates("primary-1", "day", T0, T0 + 3 * DAY)
        assert store.relayed_aggregates("primary-2", "day", T0, T0 + 3 * DAY) == []
        assert store.relayed_aggregates("primary-1", "day", T0 + DAY, T0 + 2 * DAY) == kept[1:2]
    finally:
        store.close()
    assert [p["start"] for p in kept] == [p["start"] for p in sent["periods"]]
    assert kept[1]["cells"] == sent["periods"][1]["cells"] and kept[1]["k"] == 10


@pytest.mark.parametrize(("header", "status"), [
    (None, 401), ("Bearer wrong-token-0123456789", 401), (f"Bearer {RELAY_TOKEN}", 200)])
def test_post_aggregates_needs_a_relay_token(db_url, sent, header, status):
    from tunnel_telemetry.web import create_app

    app = create_app({"database-url": db_url, "relay-tokens": [RELAY_TOKEN]})
    client = app.test_client()
    try:
        answer = client.post("/aggregates", json=sent,
                             headers={"Authorization": header} if header else {})
        assert answer.status_code == status, answer.json
        bad = client.post("/aggregates", json=edit(sent, ("k",), 2),
                          headers={"Authorization": f"Bearer {RELAY_TOKEN}"})
        published = client.get("/aggregates?source=primary-1&from=2026-12-04&to=2026-12-07")
        wrong = client.get("/aggregates?source=no%20such")
    finally:
        app.extensions["tunnel_telemetry"].close()
    assert bad.status_code == 400 and bad.json["errors"][0]["path"] == "$.k"
    assert wrong.status_code == 400 and wrong.json["errors"][0]["path"] == "source"
    periods = published.json["periods"]
    assert published.json["source"] == "primary-1"
    assert periods == ([{**p, "k": 10} for p in sent["periods"]] if status == 200 else [])


@pytest.mark.parametrize(("retention", "sent_until", "days"), [
    (0, None, 7), (180 * DAY, None, 7), (3 * DAY, None, 2), (0, T0 + 2 * DAY, 1),
    (0, T0 + 3 * DAY, 0),
])
def test_sender_sends_closed_days_not_delivered_nor_purged(retention, sent_until, days):
    from tunnel_telemetry.config import load_config
    from tunnel_telemetry.relay.aggregates import AggregateRelay

    config = load_config(flags={"relay-aggregates-url": "http://127.0.0.1:9",
                                "relay-token": RELAY_TOKEN, "collector-id": "a",
                                "retention": retention}, env={})
    sender = AggregateRelay(config, store=None)
    sender.sent_until = sent_until
    due = sender.due(NOW)
    assert (0 if due is None else (due.end - due.start) // DAY) == days
    if due is not None:
        assert due.end == T0 + 3 * DAY and due.period == "day"
