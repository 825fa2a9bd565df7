import json
import os

import pytest

from tunnel_telemetry.protocol.schema import load_schema
from tunnel_telemetry.testing.reports import make_report

STORED_FIELDS = ["report-type", "uuid", "time", "t_received", "collector_id", "proto",
                 "endpoint_port", "endpoint_asn", "endpoint_cc", "client_asn", "client_cc",
                 "config", "duration_ms", "failure", "sampling_rate"]


def post(client, payload, **kwargs):
    kwargs.setdefault("content_type", "application/json")
    data = payload if isinstance(payload, bytes | str) else json.dumps(payload)
    return client.post("/report", data=data, **kwargs)


def test_post_report_201_exact_fields(client, app):
    resp = post(client, make_report(duration_ms=3000,
                                    failure={"op": "tcp.connect", "msg": "timeout"}))
    assert resp.status_code == 201
    body = resp.get_json()
    assert list(body) == STORED_FIELDS
    assert body["collector_id"] == "test-collector"
    assert (body["proto"], body["endpoint_port"]) == ("ss", 443)
    assert (body["client_asn"], body["client_cc"]) == ("AS0", "ZZ")
    assert body["failure"] == {"op": "tcp.connect", "msg": "timeout"}
    stored = app.extensions["tunnel_telemetry"].store.get(body["uuid"])
    assert stored == body


def test_server_owned_and_unknown_fields_are_not_trusted(client):
    resp = post(client, make_report(collector_id="evil", t_received="x", endpoint_asn="AS1",
                                    **{"ooni-measurement-id": "fake", "future-field": 1,
                                       "endpoint_addr": "9.9.9.9"}))
    body = resp.get_json()
    assert resp.status_code == 201
    assert body["collector_id"] == "test-collector"
    assert body["endpoint_asn"] == "AS0"
    for key in ("ooni-measurement-id", "future-field", "endpoint_addr", "endpoint"):
        assert key not in body


def test_duplicate_uuid_is_idempotent(client, app, new_uuid):
    first = post(client, make_report(uuid=new_uuid))
    second = post(client, make_report(uuid=new_uuid, config={"other": "value"}))
    assert first.status_code == second.status_code == 201
    assert first.get_json() == second.get_json()
    assert app.extensions["tunnel_telemetry"].store.count() == 1


@pytest.mark.parametrize("app_config_extra, present", [({}, False),
                                                      ({"allow-public-endpoint": True}, True)])
def test_public_endpoint_option(app_config, app_config_extra, present):
    from tunnel_telemetry.web import create_app

    app = create_app({**app_config, **app_config_extra})
    body = post(app.test_client(), make_report(endpoint="obfs4://[2001:db8::1]:9001")).get_json()
    assert ("endpoint" in body) is present and ("endpoint_addr" in body) is present
    if present:
        assert body["endpoint"] == "obfs4://[2001:db8::1]:9001"
        assert body["endpoint_addr"] == "2001:db8::1"
    app.extensions["tunnel_telemetry"].close()


@pytest.mark.parametrize("data, headers, status, code_in_msg", [
    (b"{}", {"content_type": "text/plain"}, 415, "application/json"),
    (b"{}", {"content_type": None}, 415, "application/json"),
    (b"{}", {"content_type": "application/json; charset=latin-1"}, 415, "utf-8"),
    (b"not json", {}, 400, "not valid JSON"),
    (b'{"a":1,"a":2}', {}, 400, "duplicate"),
    (b"x" * (64 * 1024 + 1), {}, 413, "larger"),
    (b"[]", {}, 400, "object"),
    (json.dumps(make_report(endpoint="ss://1.1.1.1")), {}, 400, "endpoint"),
])
def test_bad_requests(client, data, headers, status, code_in_msg):
    kwargs = {"content_type": "application/json", **headers}
    if kwargs["content_type"] is None:
        del kwargs["content_type"]
    resp = client.post("/report", data=data, **kwargs)
    assert resp.status_code == status
    body = resp.get_json()
    assert body["ok"] is False and code_in_msg in json.dumps(body)
    assert isinstance(body["errors"], list)


def test_errors_list_paths(client):
    body = post(client, {"report-type": "x"}).get_json()
    paths = {e["path"] for e in body["errors"]}
    assert {"$['report-type']", "$.time", "$.endpoint"} <= paths


def test_methods_and_unknown_paths_are_json(client):
    resp = client.get("/report")
    assert resp.status_code == 405 and resp.get_json()["ok"] is False
    assert "POST" in resp.headers["Allow"]
    resp = client.get("/nope")
    assert resp.status_code == 404 and resp.get_json()["ok"] is False


def test_index_is_harmless_html(client):
    resp = client.get("/")
    assert resp.status_code == 200 and resp.mimetype == "text/html"
    assert b"tunnel" not in resp.data.lower()


def test_version(client):
    body = client.get("/version").get_json()
    assert body["version"] == "0.1.0" and "commit" in body


def test_healthz(client):
    body = client.get("/healthz").get_json()
    assert body["ok"] is True
    if os.environ.get("TT_TEST_BACKEND") == "postgres":
        assert body["store"] == {"backend": "postgresql", "ok": True}
    else:
        assert body["store"] == {"backend": "sqlite", "ok": True, "disk": "ok"}
    assert body["relay"]["backlog"] == {}


def test_healthz_is_503_when_the_database_disk_is_nearly_full(tmp_path):
    from tunnel_telemetry.web import create_app

    app = create_app({"database-url": f"sqlite:///{tmp_path}/r.db?min_free_mb=1e12"})
    resp = app.test_client().get("/healthz")
    assert resp.status_code == 503
    assert resp.get_json()["store"] == {"backend": "sqlite", "ok": False, "disk": "low"}


def test_schema_endpoint(client):
    resp = client.get("/report.schema.json")
    assert resp.status_code == 200 and resp.mimetype == "application/schema+json"
    assert resp.get_json() == load_schema()


def test_store_failure_is_503_and_json(client, app, monkeypatch):
    import sqlite3

    store = app.extensions["tunnel_telemetry"].store
    if store.backend != "sqlite":
        pytest.skip("fakes SQLite internals; PostgreSQL's 503s are in test_store*.py")
    writer = store._writer  # the group commit's connection: every report goes through it
    conn, lock = store._handles(writer)

    class FullDisk:
        in_transaction = False

        def execute(self, *args):
            raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(writer, "handles", (FullDisk(), lock))
    resp = post(client, make_report())
    assert resp.status_code == 503
    assert resp.headers["Retry-After"]
    assert resp.get_json()["ok"] is False
    monkeypatch.setattr(writer, "handles", (conn, lock))
    assert store.count() == 0


def test_healthz_does_not_publish_relay_urls(app_config):
    from tunnel_telemetry.web import create_app

    url = "http://127.0.0.1:9/private-secondary"
    app = create_app({**app_config, "relay-url": (url,), "relay-token": "t" * 32,
                      "relay-timeout": "0.2s"})
    client = app.test_client()
    post(client, make_report())
    body = client.get("/healthz").get_json()
    assert body["relay"]["destinations"] == ["collector-1"]
    assert body["relay"]["backlog"]["collector-1"]["pending"] == 1
    assert "private-secondary" not in json.dumps(body)
    app.extensions["tunnel_telemetry"].close()
