"""Relay to OONI as OONI's backend answers: {} from its fallback store, answers later than
relay-attempt-timeout, canonical ASN / CC (issue 22), through the Flask app and a fake OONI."""

import time
import uuid as uuidlib

import pytest
from test_relay import post, svc  # the same app helpers

from tunnel_telemetry.relay.ooni import OONIClient
from tunnel_telemetry.testing.reports import make_report
from tunnel_telemetry.testing.scripted import Reply, ScriptedCollector
from tunnel_telemetry.testing.server import wait_until

IT = {"client_asn": "AS30722", "client_cc": "IT"}
CONFIRM = {"relay-interval": "50ms", "relay-retry-min": "50ms", "relay-retry-max": "100ms",
           "relay-confirm-delay": "300ms"}


@pytest.fixture
def relay_defaults():
    return CONFIRM


def row(app, uid):
    return svc(app).store.relay_state(uid)["ooni"]


def delivered(app, uid):
    return row(app, uid)["state"] == "delivered"


def test_fallback_is_accepted_without_id_then_confirmed_not_resent(make_app, fake):
    fake.fail("fallback", ops=["submit"])
    app = make_app()
    before = time.time()
    body = post(app)
    assert (body["relay"]["ooni"], body["relay"]["ooni-reason"].split(":")[0]) == (
        "pending", "accepted-without-id")
    assert "ooni-measurement-link" not in body
    first = row(app, body["uuid"])
    assert first["next_attempt"] >= before + 0.3 and first["result"]["maybe"]
    assert svc(app).relay.health()["maybe_delivered"] == {"accepted-without-id": 1}
    svc(app).relay.start()
    wait_until(lambda: delivered(app, body["uuid"]), what="confirmed through the API")
    stored = svc(app).store.get(body["uuid"])
    [kept] = fake.measurements
    assert stored["ooni-measurement-id"] == kept.measurement_uid
    assert fake.uuids()[body["uuid"]] == 1 and fake.stats()["submissions"] == 1
    assert fake.stats()["api"] >= 2  # searched, then read the raw measurement
    assert svc(app).relay.health()["maybe_delivered"]["confirmed"] == 1


def test_lost_in_the_fallback_store_is_sent_again_after_the_delay(make_app, fake):
    fake.fail("empty", ops=["submit"], times=1)  # {} and the measurement lost
    app = make_app()
    body = post(app)
    assert body["relay"]["ooni"] == "pending"
    svc(app).relay.start()
    wait_until(lambda: delivered(app, body["uuid"]), what="sent again")
    assert fake.uuids()[body["uuid"]] == 1
    assert fake.stats()["dropped"] == 1 and fake.stats()["submissions"] == 1


def test_an_answer_later_than_the_attempt_timeout_is_confirmed_not_resent(make_app, fake):
    fake.set_latency(1.0, ops=["submit"])
    app = make_app(**{"relay-attempt-timeout": "300ms", "relay-timeout": "2s",
                      "relay-confirm-delay": "1500ms", "relay-retry-min": "1s",
                      "relay-retry-max": "1s"})
    body = post(app)
    assert body["relay"]["ooni-reason"].startswith("timeout")
    assert row(app, body["uuid"])["result"]["maybe"]
    assert svc(app).relay.health()["backing_off_s"].get("ooni", 0) > 0  # per destination
    fake.wait_for(lambda s: s["submissions"] == 1)  # OONI carried it out all the same
    fake.set_latency(0)
    svc(app).relay.start()
    wait_until(lambda: delivered(app, body["uuid"]), what="confirmed")
    assert fake.uuids()[body["uuid"]] == 1 and fake.stats()["submissions"] == 1


def test_a_collector_answering_too_late_gets_the_report_again_only_after_the_delay(make_app):
    with ScriptedCollector(Reply(action="hang")) as srv:
        app = make_app(**{"ooni-relay": False, "relay-url": [srv.url],
                          "relay-token": "relay-token-0123456789",
                          "relay-attempt-timeout": "300ms", "relay-confirm-delay": "1h"})
        before = time.time()
        body = post(app)
        state = svc(app).store.relay_state(body["uuid"])[f"collector:{srv.url}"]
        assert state["error"].startswith("timeout") and state["next_attempt"] >= before + 3600
        svc(app).relay.run_once()  # the retry loop's pass: not due, not sent again
        assert len(srv.requests) == 1


def test_a_restart_in_the_middle_sends_nothing_already_accepted_again(make_app, fake):
    fake.fail("fallback", ops=["submit"])
    first = make_app("r", **{"relay-confirm-delay": "1h"})
    bodies = [post(first) for _ in range(3)]
    svc(first).relay.close()
    assert fake.stats()["submissions"] == 3
    fake.clear_faults()
    again = make_app("r")  # same database, a new process's relay; confirm-delay 300 ms
    svc(again).relay.run_once(now_all=True)  # relay --once: what is due is confirmed first
    assert all(delivered(again, b["uuid"]) for b in bodies)
    assert fake.stats()["submissions"] == 3 and set(fake.uuids().values()) == {1}


def test_confirm_against_the_fake_finds_only_the_report_itself(fake):
    report = {**make_report(**IT), "uuid": str(uuidlib.uuid4())}
    other = {**report, "uuid": str(uuidlib.uuid4())}
    client = OONIClient(fake.url, timeout=5)
    try:
        fake.fail("fallback", ops=["submit"])
        out = client.send(report)
        assert (out.reason, out.maybe) == ("accepted-without-id", True)
        client.send(other)  # same second, same report id: a candidate to tell apart
        found = client.confirm(report, out.result["report_id"])
        assert found.state == "delivered" and found.result["confirmed"]
        fake.clear_faults()
        lost = {**report, "uuid": str(uuidlib.uuid4())}
        assert client.confirm(lost, out.result["report_id"]) is None
    finally:
        client.close()


@pytest.mark.parametrize("given, stored, ooni", [
    ("AS03215", "AS3215", "delivered"),
    ("AS00", "AS0", "skipped"),
    ("AS4294967295", "AS4294967295", "delivered"),
])
def test_self_reported_asns_are_canonical(make_app, fake, given, stored, ooni):
    app = make_app()
    body = post(app, client_asn=given)
    assert body["client_asn"] == stored
    assert row(app, body["uuid"])["state"] == ooni
    assert fake.rejections() == []
    if ooni == "delivered":
        assert fake.measurements[0].content["probe_asn"] == stored


@pytest.mark.parametrize("field, value", [("client_asn", "AS4294967296"), ("client_cc", "12"),
                                          ("client_cc", "it")])
def test_malformed_self_reported_locations_are_refused(make_app, field, value):
    resp = make_app().test_client().post("/report", json=make_report(**{**IT, field: value}))
    assert resp.status_code == 400
    assert resp.get_json()["errors"][0]["path"] == f"$.{field}"
