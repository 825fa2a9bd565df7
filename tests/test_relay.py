"""Relay step through the Flask app: OONI relay, retries, /relay, collector relay, CLI."""

import json
import sqlite3
import threading
import time
import uuid as uuidlib

import pytest
from werkzeug.serving import make_server

from tunnel_telemetry.cli import main
from tunnel_telemetry.httpclient import backoff
from tunnel_telemetry.relay import NullRelay, Relay
from tunnel_telemetry.relay.outcome import Outcome, is_destination_failure
from tunnel_telemetry.relay.senders import CollectorSender
from tunnel_telemetry.store import dumps
from tunnel_telemetry.testing.reports import make_report
from tunnel_telemetry.testing.server import free_port, wait_until
from tunnel_telemetry.web import create_app
from tunnel_telemetry.web.relayed import MAX_BATCH

TOKEN = "relay-token-0123456789"
FAST = {"relay-interval": "50ms", "relay-retry-min": "50ms", "relay-retry-max": "200ms"}
SLOW = {"relay-interval": "1h", "relay-retry-min": "1h", "relay-retry-max": "2h"}
IT = {"client_asn": "AS30722", "client_cc": "IT"}


@pytest.fixture
def relay_defaults():
    return SLOW  # the retry loop stays out of the way unless a test asks for it


def svc(app):
    return app.extensions["tunnel_telemetry"]


def post(app, **fields):
    resp = app.test_client().post("/report", json=make_report(**{**IT, **fields}))
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()


def ooni_state(app, uid):
    return svc(app).store.relay_state(uid)["ooni"]


# -- OONI relay from POST /report ---------------------------------------------------------------

def test_relay_is_off_by_default_and_sends_nothing(tmp_path, fake):
    app = create_app({"database-url": f"sqlite:///{tmp_path}/r.db", "ooni-api": fake.url})
    try:
        assert isinstance(svc(app).relay, NullRelay)
        for _ in range(3):
            body = post(app)
            assert not {"relay", "ooni-measurement-id", "ooni-measurement-link"} & set(body)
            assert svc(app).store.relay_state(body["uuid"]) == {}
        health = app.test_client().get("/healthz").get_json()["relay"]
        assert health["destinations"] == [] and health["backlog"] == {}
    finally:
        svc(app).close()
    assert fake.stats()["requests"] == 0


def test_happy_path_returns_explorer_link_and_persists_it(make_app, fake):
    app = make_app()
    body = post(app, endpoint="ss://198.51.100.9:443", duration_ms=1500)
    uid = body["ooni-measurement-id"]
    assert body["ooni-measurement-link"] == f"https://explorer.ooni.org/m/{uid}"
    assert "relay" not in body
    stored = svc(app).store.get(body["uuid"])
    assert stored == body
    state = ooni_state(app, body["uuid"])
    assert state["state"] == "delivered" and state["result"]["measurement_uid"] == uid
    [m] = fake.measurements
    assert m.measurement_uid == uid and fake.rejections() == []
    expected = {k: v for k, v in body.items() if k not in ("report-type", "ooni-measurement-id",
                                                           "ooni-measurement-link")}
    assert m.content["test_keys"] == expected
    assert m.content["annotations"] == {"report_uuid": body["uuid"], "collector_id": "col-a"}
    assert m.content["test_runtime"] == 1.5


def test_answer_is_the_stored_text_with_the_relay_fields_after_it(make_app, fake):
    app = make_app()
    resp = app.test_client().post("/report", json=make_report(**IT, config={"prefix": "é"}))
    body = resp.get_json()
    assert body["config"] == {"prefix": "é"}
    assert list(body)[-2:] == ["ooni-measurement-id", "ooni-measurement-link"]
    report = {k: v for k, v in body.items() if not k.startswith("ooni-")}
    text = resp.get_data(as_text=True)
    # Encoded once, as with the relay off (UTF-8 as it is, not \u escapes).
    assert text.startswith(dumps(report)[:-1] + ',"ooni-measurement-id":')
    assert list(post(app, client_cc="ZZ", client_asn="AS0"))[-1] == "relay"


def test_n_reports_reuse_one_open_report_and_connection(make_app, fake):
    app = make_app()
    bodies = [post(app) for _ in range(10)]
    assert all("ooni-measurement-id" in b for b in bodies)
    s = fake.stats()
    assert (s["opens"], s["submissions"], s["uuids"], s["connections"]) == (1, 10, 10, 1)


def count_writes(monkeypatch, store):
    """Calls of the store's relay-row writes after ``add`` (the behaviour is unchanged)."""
    calls = []
    for name in ("finish", "release"):
        real = getattr(store, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(store, name, counted)
    return calls


def test_unknown_client_location_is_not_sent_and_marked_skipped(make_app, fake, monkeypatch):
    app = make_app()
    writes = count_writes(monkeypatch, svc(app).store)
    body = post(app, client_asn="AS0", client_cc="ZZ")
    assert body["relay"] == {"ooni": "skipped", "ooni-reason": "client-location-unknown"}
    state = ooni_state(app, body["uuid"])
    assert (state["state"], state["error"], state["attempts"]) == (
        "skipped", "client-location-unknown", 0)
    assert writes == []  # stored skipped with the report: no second write records it
    assert fake.stats()["requests"] == 0
    again = app.test_client().post("/report", json=make_report(
        uuid=body["uuid"], client_asn="AS0", client_cc="ZZ"))
    assert (again.status_code, again.get_json()["relay"]) == (201, body["relay"])
    assert writes == [] and svc(app).store.backlog() == {}  # nothing left for the retry loop


@pytest.mark.parametrize("fault, kwargs, state, reason", [
    (503, {}, "pending", "http-503"),
    (500, {"ops": ["open"]}, "pending", "http-500"),
    (429, {"retry_after": 7200}, "pending", "rate-limited"),
    ("reset", {}, "pending", "connection-error"),
    ("disconnect", {}, "pending", "connection-error"),
    ("empty", {"ops": ["submit"]}, "pending", "accepted-without-id"),
    (400, {"ops": ["submit"]}, "failed", "http-400"),
    (422, {"ops": ["open"]}, "failed", "http-422"),
])
def test_failure_classes(make_app, fake, fault, kwargs, state, reason):
    app = make_app()
    fake.fail(fault, **kwargs)
    before = time.time()
    body = post(app)
    assert body["relay"]["ooni"] == state
    assert body["relay"]["ooni-reason"].startswith(reason)
    assert "ooni-measurement-id" not in body
    row = ooni_state(app, body["uuid"])
    assert row["state"] == state and row["error"].startswith(reason)
    if fault == 429:
        assert row["next_attempt"] >= before + 7200  # Retry-After honoured
    elif state == "pending":
        assert row["next_attempt"] > before + 1800  # backoff from relay-retry-min (1h)
    fake.clear_faults()
    summary = svc(app).relay.run_once(now_all=True)
    if state == "failed":  # permanent: kept, never retried
        assert summary["ooni"] == {}
        assert svc(app).store.get(body["uuid"])["uuid"] == body["uuid"]
        assert fake.stats()["submissions"] == 0
    else:
        assert summary["ooni"]["delivered"] == 1
        assert "ooni-measurement-id" in svc(app).store.get(body["uuid"])


def test_failed_reason_carries_oonis_words(make_app, fake):
    app = make_app()
    fake.fail(400, ops=["submit"])
    body = post(app)
    assert body["relay"] == {"ooni": "failed", "ooni-reason": "http-400: submit: Injected failure"}


def test_slow_ooni_answers_pending_and_completes_in_the_background(make_app, fake):
    app = make_app(**{"relay-timeout": "100ms"})
    fake.set_latency(0.4)
    body = post(app)
    assert body["relay"]["ooni"] == "pending"
    assert body["relay"]["ooni-reason"].startswith("relay-timeout")
    store = svc(app).store
    wait_until(lambda: "ooni-measurement-id" in store.get(body["uuid"]), what="background delivery")
    assert ooni_state(app, body["uuid"])["state"] == "delivered"
    assert fake.stats()["submissions"] == 1


def test_relay_timeout_zero_never_waits(make_app, fake):
    app = make_app(**{"relay-timeout": "0"})
    body = post(app)
    assert body["relay"]["ooni-reason"].startswith("relay-timeout")
    store = svc(app).store
    wait_until(lambda: "ooni-measurement-id" in store.get(body["uuid"]), what="delivery")


def test_a_failing_destination_is_not_tried_again_at_once(make_app, fake):
    app = make_app()
    fake.fail("reset", times=1)
    first = post(app)
    second = post(app)
    assert first["relay"]["ooni-reason"] == "connection-error"
    assert second["relay"] == {"ooni": "pending",
                               "ooni-reason": "backing-off: the destination failed recently"}
    assert fake.stats()["requests"] == 1
    assert svc(app).relay.health()["backing_off_s"]["ooni"] > 0
    assert ooni_state(app, second["uuid"])["attempts"] == 0


def test_retry_loop_delivers_pending_reports(make_app, fake):
    app = make_app(**FAST)
    fake.fail(503, times=4)
    bodies = [post(app) for _ in range(3)]
    assert any("relay" in b for b in bodies)
    store = svc(app).store
    wait_until(lambda: all(ooni_state(app, b["uuid"])["state"] == "delivered" for b in bodies),
               what="all delivered")
    for b in bodies:
        stored = store.get(b["uuid"])
        assert stored["ooni-measurement-link"].endswith(stored["ooni-measurement-id"])
    s = fake.stats()
    assert (s["uuids"], s["duplicates"]) == (3, 0)
    assert store.backlog() == {}


def test_reports_older_than_max_age_expire(make_app, fake):
    app = make_app(**{**FAST, "relay-max-age": "200ms"})
    fake.fail(503)
    body = post(app)
    wait_until(lambda: ooni_state(app, body["uuid"])["state"] == "expired", what="expired")
    assert ooni_state(app, body["uuid"])["error"] == "max-age"
    assert svc(app).store.backlog() == {}


def test_duplicate_post_is_not_sent_again(make_app, fake):
    app = make_app()
    uid = str(uuidlib.uuid4())
    first = post(app, uuid=uid)
    second = post(app, uuid=uid)
    assert second == first and "ooni-measurement-id" in second
    assert fake.stats()["submissions"] == 1


def test_duplicate_of_a_pending_report_shows_its_state(make_app, fake):
    app = make_app()
    fake.fail(503)
    uid = str(uuidlib.uuid4())
    post(app, uuid=uid)
    again = post(app, uuid=uid)
    assert again["relay"]["ooni"] == "pending" and again["relay"]["ooni-reason"].startswith("http")
    assert fake.stats()["requests"] == 1


def test_relay_trouble_never_fails_the_request(make_app, fake, monkeypatch):
    app = make_app()

    def broken(self, report):
        raise RuntimeError("bug")

    monkeypatch.setattr(Relay, "_attempt_now", broken)
    body = post(app)
    assert body["relay"] == {"ooni": "pending", "ooni-reason": "internal-error"}
    assert svc(app).store.get(body["uuid"]) is not None


@pytest.mark.parametrize("allow", [False, True])
def test_privacy_of_every_request_ooni_received(make_app, fake, allow):
    app = make_app(**{"proxy-hops": 1, "allow-public-endpoint": allow})
    client = app.test_client()
    resp = client.post("/report", json=make_report(
        endpoint="ss://198.51.100.9:443", config={"server": "198.51.100.9", "mode": "x"},
        failure={"op": "tcp.connect", "msg": "dial 198.51.100.9:443: refused by 203.0.113.77"},
        **IT), headers={"X-Forwarded-For": "203.0.113.77"})
    assert "ooni-measurement-id" in resp.get_json()
    text = fake.all_text()
    assert "203.0.113.77" not in text
    assert ("198.51.100.9" in text) is allow
    [m] = fake.measurements
    assert m.content["probe_ip"] == "127.0.0.1"


def test_healthz_shows_backlog_and_oldest_age(make_app, fake):
    app = make_app()
    fake.fail(503)
    post(app)
    time.sleep(0.05)
    post(app)
    relay = app.test_client().get("/healthz").get_json()["relay"]
    assert relay["destinations"] == ["ooni"]
    assert relay["backlog"]["ooni"]["pending"] == 2
    assert relay["backlog"]["ooni"]["oldest_age_s"] >= 0.05
    assert relay["retry_loop"] is True


def test_run_once_ignores_backoff(make_app, fake):
    app = make_app()
    fake.fail(503, times=1)
    body = post(app)
    assert svc(app).relay.run_once()["ooni"] == {}  # not due yet
    summary = svc(app).relay.run_once(now_all=True)
    assert summary["ooni"]["delivered"] == 1
    assert ooni_state(app, body["uuid"])["attempts"] == 2


def test_close_closes_open_ooni_reports(make_app, fake):
    app = make_app()
    post(app)
    post(app, client_cc="DE")
    svc(app).relay.close()
    s = fake.stats()
    assert (s["closes"], s["open_reports"]) == (2, 0)


@pytest.mark.parametrize("attempts, low, high", [(0, 15, 30), (1, 30, 60), (3, 120, 240),
                                                 (30, 1800, 3600)])
def test_backoff_is_exponential_capped_and_jittered(attempts, low, high):
    values = [backoff(attempts, 30, 3600) for _ in range(50)]
    assert all(low <= v <= high for v in values)
    assert len(set(values)) > 1


@pytest.mark.parametrize("outcome, expected", [
    (Outcome.retry("timeout"), True), (Outcome.retry("http-502"), True),
    (Outcome.retry("rate-limited"), True),
    (Outcome.maybe_delivered("accepted-without-id"), False),
    (Outcome.failed("http-400"), False), (Outcome.delivered(), False),
])
def test_destination_level_failures(outcome, expected):
    assert is_destination_failure(outcome) is expected


# -- POST /relay (receiving side) -------------------------------------------------------------

def relayed(**over):
    item = {
        "report-type": "tunnel-telemetry", "uuid": str(uuidlib.uuid4()),
        "time": "2024-04-18T09:59:58Z", "t_received": "2024-04-18T10:00:01.250Z",
        "collector_id": "primary-1", "proto": "ss", "endpoint_port": 443,
        "endpoint_asn": "AS13335", "endpoint_cc": "AU", "client_asn": "AS50304",
        "client_cc": "NO", "config": {"prefix": "xx"}, "duration_ms": None, "failure": None,
        "sampling_rate": 1,
    }
    item.update(over)
    return {k: v for k, v in item.items() if v != "DROP"}


def relay_post(app, items, token=TOKEN, headers=None):
    headers = {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
    return app.test_client().post("/relay", json=items, headers=headers)


@pytest.fixture
def secondary(make_app):
    return make_app("b", **{"ooni-relay": False, "relay-tokens": [TOKEN, "other-token-0123456789"]})


@pytest.mark.parametrize("token, header", [
    (None, None), ("wrong-token-0123456789", None), (None, f"Basic {TOKEN}"),
    (None, "Bearer"), (None, f"Bearer {TOKEN}x"),
])
def test_relay_requires_a_valid_bearer_token(secondary, token, header):
    client = secondary.test_client()
    headers = {"Authorization": header} if header else (
        {"Authorization": f"Bearer {token}"} if token else {})
    resp = client.post("/relay", json=[relayed()], headers=headers)
    assert resp.status_code == 401
    assert resp.get_json()["ok"] is False
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert svc(secondary).store.count() == 0


def test_relay_is_closed_without_relay_tokens(make_app):
    app = make_app("c", **{"ooni-relay": False})
    assert relay_post(app, [relayed()]).status_code == 401
    assert relay_post(app, [relayed()], token="").status_code == 401


def test_relay_accepts_any_configured_token_case_insensitive_scheme(secondary):
    resp = secondary.test_client().post("/relay", json=[relayed()],
                                        headers={"Authorization": "bearer other-token-0123456789"})
    assert resp.status_code == 200


def test_relay_stores_reports_as_sent_by_the_primary(secondary):
    items = [relayed(), relayed(failure={"op": "tls.handshake", "msg": "reset"}, duration_ms=30)]
    resp = relay_post(secondary, items, headers={"X-Forwarded-For": "203.0.113.1"})
    assert resp.status_code == 200
    body = resp.get_json()
    assert body == {"ok": True, "stored": [i["uuid"] for i in items], "created": 2,
                    "rejected": []}
    for item in items:
        assert svc(secondary).store.get(item["uuid"]) == item  # geolocation, collector id kept


def test_relay_stores_each_uuid_once(secondary):
    item = relayed()
    assert relay_post(secondary, [item, item]).get_json()["created"] == 1
    again = relay_post(secondary, [item]).get_json()
    assert (again["stored"], again["created"]) == ([item["uuid"]], 0)
    assert svc(secondary).store.count() == 1


def test_relay_normalises_uuid_case(secondary):
    item = relayed()
    upper = dict(item, uuid=item["uuid"].upper())
    assert relay_post(secondary, [upper]).get_json()["stored"] == [item["uuid"]]


@pytest.mark.parametrize("over, path", [
    ({"client_ip": "203.0.113.1"}, "$[1]"),
    ({"uuid": "not-a-uuid"}, "$[1].uuid"),
    ({"time": "yesterday"}, "$[1].time"),
    ({"t_received": "2024-02-30T10:00:00Z"}, "$[1].t_received"),
    ({"client_cc": "DROP"}, "$[1].client_cc"),
    ({"client_cc": "NO\n"}, "$[1].client_cc"),
    ({"uuid": "12345678-1234-1234-1234-123456789abc\n"}, "$[1].uuid"),
    ({"endpoint_port": 0}, "$[1].endpoint_port"),
    ({"failure": {"op": "x", "error": "alias not stored"}}, "$[1].failure"),
    ({"config": {"k": 1}}, "$[1].config.k"),
    ({"ooni-measurement-link": "https://explorer.ooni.org/m/x"}, "$[1].ooni-measurement-link"),
    ({"ooni-measurement-id": "a", "ooni-measurement-link": "https://evil.example/m/a"},
     "$[1]['ooni-measurement-link']"),
])
def test_relay_validates_each_report_strictly(secondary, over, path):
    good, bad = relayed(), relayed(**over)
    body = relay_post(secondary, [good, bad]).get_json()
    assert body["stored"] == [good["uuid"]]
    [rejected] = body["rejected"]
    assert rejected["index"] == 1
    assert any(e["path"] == path for e in rejected["errors"]), rejected
    assert svc(secondary).store.count() == 1


@pytest.mark.parametrize("payload, status", [
    ({"not": "a list"}, 400), ([], 400), ([relayed()] * (MAX_BATCH + 1), 400), ("x", 400),
])
def test_relay_batch_shape(secondary, payload, status):
    resp = relay_post(secondary, payload)
    assert resp.status_code == status and resp.get_json()["ok"] is False


def test_relay_body_size_limit_is_413(secondary):
    resp = secondary.test_client().post(
        "/relay", data=b"[" + b" " * (MAX_BATCH * 64 * 1024) + b"]",
        headers={"Authorization": f"Bearer {TOKEN}"}, content_type="application/json")
    assert resp.status_code == 413 and resp.get_json()["ok"] is False


def test_relay_body_of_exactly_the_limit_is_read(secondary):
    limit = MAX_BATCH * 64 * 1024
    resp = secondary.test_client().post(
        "/relay", data=b"[" + b" " * (limit - 2) + b"]",
        headers={"Authorization": f"Bearer {TOKEN}"}, content_type="application/json")
    assert resp.status_code == 400, resp.get_json()  # an empty batch, not "too large"


def test_relay_batch_larger_than_one_report_is_accepted(secondary):
    items = [relayed(config={f"k{i}": "v" * 1000 for i in range(60)}) for _ in range(3)]
    assert len(json.dumps(items)) > 64 * 1024
    assert relay_post(secondary, items).status_code == 200


@pytest.mark.parametrize("allow", [False, True])
def test_relay_keeps_endpoint_address_only_if_allowed_here(make_app, allow):
    app = make_app("b", **{"ooni-relay": False, "relay-tokens": [TOKEN],
                           "allow-public-endpoint": allow})
    item = relayed(endpoint="ss://198.51.100.9:443", endpoint_addr="198.51.100.9")
    assert relay_post(app, [item]).status_code == 200
    stored = svc(app).store.get(item["uuid"])
    assert ("endpoint" in stored, "endpoint_addr" in stored) == (allow, allow)


def test_relay_scrubs_config_again(secondary):
    item = relayed(config={"password": "hunter2", "via": "198.51.100.3", "mode": "tcp"})
    relay_post(secondary, [item])
    assert svc(secondary).store.get(item["uuid"])["config"] == {"mode": "tcp"}


def test_relayed_reports_are_relayed_further(make_app, fake, monkeypatch):
    app = make_app("b", **{**FAST, "relay-tokens": [TOKEN]})
    client = app.test_client()
    client.get("/healthz")  # starts the retry loop, as a first request does
    fresh, known = relayed(), relayed(**{"ooni-measurement-id": "m1",
                                         "ooni-measurement-link":
                                         "https://explorer.ooni.org/m/m1"})
    writes = count_writes(monkeypatch, svc(app).store)
    assert relay_post(app, [fresh, known]).get_json()["created"] == 2
    assert ooni_state(app, known["uuid"])["state"] == "skipped"  # stored so, nothing to do
    wait_until(lambda: ooni_state(app, fresh["uuid"])["state"] == "delivered", what="relayed on")
    assert ooni_state(app, known["uuid"]) | {"error": "already-in-ooni"} == ooni_state(
        app, known["uuid"])
    assert ooni_state(app, known["uuid"])["state"] == "skipped"
    assert writes == ["finish"]  # the fresh report's delivery; none for the known one
    [m] = fake.measurements
    assert m.uuid == fresh["uuid"]
    assert m.content["annotations"]["collector_id"] == "primary-1"  # the primary's id
    assert (m.content["probe_cc"], m.content["probe_asn"]) == ("NO", "AS50304")


# -- relay to a secondary collector over HTTP ---------------------------------------------------

class Served:
    """A WSGI app on 127.0.0.1 in a thread, counting POST /relay calls."""

    def __init__(self, app, port=0):
        self.app = app
        self.calls = []
        self.server = make_server("127.0.0.1", port, self._wsgi, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _wsgi(self, environ, start_response):
        if environ["PATH_INFO"] == "/relay":
            self.calls.append(environ.get("HTTP_AUTHORIZATION"))
        return self.app(environ, start_response)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def test_primary_relays_to_secondary_collector(make_app, secondary):
    with Served(secondary) as b:
        a = make_app("a", **{"ooni-relay": False, "relay-url": [b.url], "relay-token": TOKEN})
        body = post(a, endpoint="ss://198.51.100.9:443")
        assert "relay" not in body
        dest = f"collector:{b.url}"
        assert svc(a).store.relay_state(body["uuid"])[dest]["state"] == "delivered"
        stored_b = svc(secondary).store.get(body["uuid"])
        assert stored_b == {k: v for k, v in body.items()}
        assert b.calls == [f"Bearer {TOKEN}"]


def test_collector_relay_is_batched_when_several_are_pending(make_app, secondary):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    a = make_app("a", **{"ooni-relay": False, "relay-url": [url], "relay-token": TOKEN,
                         "relay-batch": 3})
    bodies = [post(a) for _ in range(7)]  # the secondary is down for a while
    assert {x["relay"]["collectors"] for x in bodies} == {"pending"}
    with Served(secondary, port) as b:
        summary = svc(a).relay.run_once(now_all=True)
        assert summary[f"collector:{url}"]["delivered"] == 7
        assert len(b.calls) == 3  # 3 + 3 + 1
        assert svc(secondary).store.count() == 7


def test_wrong_token_stays_pending_until_fixed(make_app, secondary):
    with Served(secondary) as b:
        a = make_app("a", **{"ooni-relay": False, "relay-url": [b.url],
                             "relay-token": "wrong-token-0123456789"})
        body = post(a)
        assert body["relay"] == {"collectors": "pending",
                                 "collectors-reason": "unauthorized: a valid relay token is "
                                                      "required"}
        assert svc(a).store.backlog()[f"collector:{b.url}"]["pending"] == 1


def test_secondary_rejection_is_permanent(make_app):
    from flask import Flask, request

    stub = Flask("stub")

    @stub.post("/relay")
    def reject():
        items = request.get_json()
        return {"ok": True, "stored": [], "rejected": [
            {"index": 0, "uuid": items[0]["uuid"],
             "errors": [{"path": "$[0].client_cc", "message": "has the wrong format"}]}]}

    with Served(stub) as b:
        a = make_app("a", **{"ooni-relay": False, "relay-url": [b.url], "relay-token": TOKEN})
        body = post(a)
        assert body["relay"] == {"collectors": "failed",
                                 "collectors-reason": "rejected: $[0].client_cc has the "
                                                      "wrong format"}


def test_collector_sender_unacknowledged_reports_are_retried(make_app):
    from flask import Flask

    stub = Flask("stub")
    stub.post("/relay")(lambda: {"ok": True, "stored": [], "rejected": []})
    with Served(stub) as b:
        a = make_app("a", **{"ooni-relay": False, "relay-url": [b.url], "relay-token": TOKEN})
        sender = CollectorSender(b.url, svc(a).config)
        try:
            out = sender.send([{"uuid": "u1"}], 5, lambda: False)
        finally:
            sender.close()
        assert out["u1"].reason == "not-acknowledged" and out["u1"].retryable


def test_ooni_and_collector_together(make_app, secondary, fake):
    with Served(secondary) as b:
        a = make_app("a", **{"relay-url": [b.url], "relay-token": TOKEN})
        body = post(a)
        assert "ooni-measurement-id" in body and "relay" not in body
        # the secondary receives the report before OONI's id is known
        assert svc(secondary).store.get(body["uuid"])["uuid"] == body["uuid"]
        assert fake.stats()["submissions"] == 1


# -- tt-server relay --once ---------------------------------------------------------------------

@pytest.fixture
def backlog(make_app, fake, db_url):
    """Two reports pending for OONI in database 'a'."""
    app = make_app("a")
    fake.fail(503)
    bodies = [post(app) for _ in range(2)]
    svc(app).close()
    fake.clear_faults()
    return app, bodies


def cli(runner, tmp_path, fake, *args):
    db = f"sqlite:///{tmp_path}/a.db"
    return runner.invoke(main, [*args[:1], "--database-url", db, "--ooni-relay",
                                "--ooni-api", fake.url, *args[1:]], env={"TT_CONFIG": ""})


def test_relay_once_delivers_the_backlog(backlog, runner, tmp_path, fake):
    app, bodies = backlog
    result = cli(runner, tmp_path, fake, "relay", "--once")
    assert result.exit_code == 0, result.output
    assert "ooni: 2 delivered; 0 still pending" in result.output
    for b in bodies:
        assert "ooni-measurement-id" in svc(app).store.get(b["uuid"])
    assert fake.stats()["uuids"] == 2


def test_relay_once_options_before_the_subcommand_and_json(backlog, runner, tmp_path, fake):
    fake.fail("reset")
    db = f"sqlite:///{tmp_path}/a.db"
    result = runner.invoke(main, ["--database-url", db, "--ooni-relay", "--ooni-api", fake.url,
                                  "relay", "--once", "--json"], env={"TT_CONFIG": ""})
    assert result.exit_code == 1, result.output
    out = json.loads(result.output)
    assert out["destinations"]["ooni"]["pending"] == 2
    assert out["destinations"]["ooni"]["results"]["pending:connection-error"] == 1


def test_relay_once_retry_failed(make_app, fake, runner, tmp_path):
    app = make_app("a")
    fake.fail(400, times=1)
    body = post(app)
    assert body["relay"]["ooni"] == "failed"
    svc(app).close()
    result = cli(runner, tmp_path, fake, "relay", "--once")
    assert "nothing due" in result.output and result.exit_code == 0
    result = cli(runner, tmp_path, fake, "relay", "--once", "--retry-failed")
    assert "ooni: 1 delivered" in result.output, result.output


def test_relay_without_once_is_a_usage_error(runner, tmp_path, fake):
    result = cli(runner, tmp_path, fake, "relay")
    assert result.exit_code == 2 and "--once" in result.output


def test_relay_once_with_relay_off(runner, tmp_path, backlog):
    db = f"sqlite:///{tmp_path}/a.db"
    result = runner.invoke(main, ["relay", "--once", "--database-url", db], env={"TT_CONFIG": ""})
    assert result.exit_code == 0
    assert "relay is off" in result.output
    assert "ooni: 2 pending, but this destination is no longer configured" in result.output


# -- retry loop: concurrent batches ---------------------------------------------------------------

def pending_backlog(app, fake, n):
    """``n`` reports pending for OONI (OONI was down when they came); the fake's records reset."""
    fake.fail(503)
    bodies = [post(app) for _ in range(n)]
    assert {b["relay"]["ooni"] for b in bodies} == {"pending"}
    fake.reset()
    return [b["uuid"] for b in bodies]


@pytest.mark.parametrize("concurrency", [1, 8])
def test_retry_loop_sends_a_claimed_batch_concurrently(make_app, fake, concurrency):
    app = make_app(**{"relay-concurrency": str(concurrency)})
    uuids = pending_backlog(app, fake, 40)
    fake.set_latency(0.02)
    summary = svc(app).relay.run_once(now_all=True)
    assert summary["ooni"] == {"delivered": 40}
    s = fake.stats()
    assert (s["uuids"], s["duplicates"], s["opens"]) == (40, 0, 1)
    assert set(fake.uuids()) == set(uuids)
    if concurrency == 1:
        assert s["max_in_flight"] == 1
    else:
        assert 1 < s["max_in_flight"] <= concurrency  # the loop pool bounds it
    assert all(ooni_state(app, u)["state"] == "delivered" for u in uuids)
    assert svc(app).store.backlog() == {}


@pytest.mark.parametrize("attempt_timeout, lease", [
    ("10s", 4 * 10 + 10),  # the margin: relay-attempt-timeout, at least 10 s
    ("1s", 4 * 1 + 10),
    ("30s", 4 * 30 + 30),
])
def test_loop_lease_covers_the_batch_at_its_concurrency(make_app, attempt_timeout, lease):
    app = make_app(**{"relay-concurrency": "8", "relay-attempt-timeout": attempt_timeout})
    relay = svc(app).relay
    sender = relay._state().senders["ooni"]
    assert sender.batch_size == 32  # 4 rounds of 8
    assert relay.loop_lease(sender) == lease


def test_destination_failing_mid_batch_releases_the_rest(make_app, fake):
    app = make_app(**{"relay-concurrency": "4"})
    store = svc(app).store
    uuids = pending_backlog(app, fake, 40)
    attempts = {u: ooni_state(app, u)["attempts"] for u in uuids}
    fake.set_latency(0.05)
    summary = {}
    worker = threading.Thread(target=lambda: summary.update(svc(app).relay.run_once(now_all=True)))
    worker.start()
    fake.wait_for(lambda s: s["submissions"] >= 6)
    fake.fail(503)
    worker.join(10)
    assert not worker.is_alive()
    counts = summary["ooni"]
    delivered, failed = counts["delivered"], counts["pending:http-503"]
    assert delivered >= 6 and 1 <= failed <= 4  # at most the reports in flight failed
    assert delivered + failed < 40  # the rest of the batch was not sent ...
    assert fake.stats()["faults"] == failed
    rows = {u: ooni_state(app, u) for u in uuids}
    assert sum(r["state"] == "delivered" for r in rows.values()) == delivered
    untried = [r for u, r in rows.items() if r["state"] == "pending"
               and r["attempts"] == attempts[u]]
    assert len(untried) == 40 - delivered - failed  # ... and released
    assert svc(app).relay.health()["backing_off_s"]["ooni"] > 0  # the destination backs off
    # Released, not leased: another owner can claim every report still pending at once.
    claims = store.claim("ooni", 100, "someone-else", 10, due_only=False)
    assert len(claims) == 40 - delivered
    store.release([c.uuid for c in claims], "ooni", "someone-else")
    fake.clear_faults()
    assert svc(app).relay.run_once(now_all=True)["ooni"]["delivered"] == 40 - delivered
    s = fake.stats()
    assert (s["uuids"], s["duplicates"]) == (40, 0)


def test_two_workers_draining_concurrently_never_send_a_report_twice(make_app, fake):
    first = make_app("shared", **{"relay-concurrency": "8"})
    second = make_app("shared", **{"relay-concurrency": "8"})  # same database: another worker
    uuids = pending_backlog(first, fake, 100)
    fake.set_latency(0.01)
    summaries = [{}, {}]
    start = threading.Barrier(2)

    def drain(app, out):
        start.wait()
        out.update(svc(app).relay.run_once(now_all=True))

    workers = [threading.Thread(target=drain, args=(a, out))
               for a, out in zip((first, second), summaries, strict=True)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(20)
    assert sum(s["ooni"]["delivered"] for s in summaries) == 100
    s = fake.stats()
    assert (s["uuids"], s["duplicates"]) == (100, 0)
    assert set(fake.uuids()) == set(uuids)
    assert svc(first).store.backlog() == {}


def test_an_attempt_overlapping_a_failure_neither_ends_nor_doubles_the_backoff(make_app):
    relay = svc(make_app()).relay
    ps = relay._state()
    uid = str(uuidlib.uuid4())  # not leased: only the backoff bookkeeping matters here
    before = time.time()
    relay._record(ps, "ooni", uid, 0, Outcome.retry("http-503"), started=before)
    relay._record(ps, "ooni", uid, 0, Outcome.retry("timeout"), started=before)  # in flight too
    assert ps.holds._holds["ooni"].failures == 1
    relay._record(ps, "ooni", uid, 0, Outcome.delivered(), started=before)  # sent before it
    assert relay.health()["backing_off_s"]["ooni"] > 0
    relay._record(ps, "ooni", uid, 0, Outcome.delivered(), started=time.time())  # sent after
    assert relay.health()["backing_off_s"] == {}


def test_after_an_outage_the_backlog_goes_out_oldest_first(make_app, fake, tmp_path):
    app = make_app(**{"relay-retry-min": "50ms", "relay-retry-max": "50ms",
                      "relay-concurrency": "1"})  # one at a time: the order is observable
    fake.fail("reset")
    bodies = [post(app) for _ in range(4)]
    # While OONI was down the reports' own backoffs grew unevenly: here the oldest is due last.
    conn = sqlite3.connect(tmp_path / "a.db", isolation_level=None)
    for age, body in enumerate(bodies):
        conn.execute("UPDATE relays SET next_attempt = ? WHERE uuid = ?",
                     (time.time() + 3600 - age, body["uuid"]))
    conn.close()
    fake.clear_faults()
    time.sleep(0.1)  # the destination's own hold (at most 50 ms) is over
    svc(app).relay.run_once()
    assert [m.uuid for m in fake.measurements] == [b["uuid"] for b in bodies]
    assert svc(app).store.backlog() == {}
