"""Prometheus metrics: counted in every worker, served by one, on their own address."""

import json
import os
import re
import signal
import subprocess
import sys
import uuid

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tunnel_telemetry import metrics
from tunnel_telemetry.cli import main
from tunnel_telemetry.testing.fake_ooni import FakeOONI
from tunnel_telemetry.testing.reports import make_report
from tunnel_telemetry.testing.server import answers_200, free_port, wait_for, wait_until

CLIENT_IP = "1.1.1.77"  # AU, AS13335 in the test geo databases
ENDPOINT_HOST = "secret-bridge.example.org"
PASSWORD = "hunter2-metrics-secret"
TOKEN = "metrics-relay-token-0123456789"


def scrape(url):
    """{(sample name, frozenset of labels): value} from a metrics page."""
    with requests.get(url, timeout=5) as resp:
        assert resp.status_code == 200
        text = resp.text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return text, samples


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0.0)


def leader(server, exclude=()):
    pids = re.findall(r"housekeeping: worker (\d+) leads", server.logs())
    pids = [int(p) for p in pids if int(p) not in exclude]
    return pids[-1] if pids else None


def post(server, report, expect=201, data=None, content_type="application/json"):
    body = data if data is not None else json.dumps(report).encode()
    with requests.post(server.url + "/report", data=body, timeout=10, headers={
            "X-Forwarded-For": CLIENT_IP, "Content-Type": content_type}) as resp:
        assert resp.status_code == expect, resp.text
        return resp


def a_report(**fields):
    return make_report(uuid=str(uuid.uuid4()), endpoint=f"ss://{ENDPOINT_HOST}:443",
                       config={"password": PASSWORD, "prefix": "xx", "sni": ENDPOINT_HOST},
                       failure={"op": "tcp.connect", "msg": f"dial {ENDPOINT_HOST} from "
                                f"{CLIENT_IP}: refused"}, **fields)


@pytest.mark.e2e
def test_counts_add_up_across_workers_and_leak_nothing(tt_server, geo_dbs):
    country, asn = geo_dbs
    port = free_port()
    metrics_url = f"http://127.0.0.1:{port}/metrics"
    closed = free_port()  # the secondary collector: never up, its reports stay pending
    with FakeOONI() as fake:
        server = tt_server("--workers", "2", "--proxy-hops", "1",
                           "--metrics-listen", f"127.0.0.1:{port}",
                           "--geoip-country-db", str(country), "--geoip-asn-db", str(asn),
                           "--ooni-relay", "--ooni-api", fake.url,
                           "--relay-url", f"http://127.0.0.1:{closed}", "--relay-token", TOKEN,
                           "--relay-retry-min", "1h")
        wait_until(lambda: leader(server), 10, "a leader")
        first = leader(server)
        wait_until(lambda: wait_for(lambda: answers_200(metrics_url), 5), 10, "metrics served")
        reports = [a_report() for _ in range(12)]
        for report in reports[:6]:
            post(server, report)
        post(server, make_report(endpoint=None), expect=400)  # schema
        post(server, None, expect=400, data=b"{not json")  # bad_json
        # The leader dies: its counts stay, another worker serves the metrics.
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: leader(server, exclude=(first,)), 15, "a new leader")
        for report in reports[6:]:
            post(server, report)
        post(server, reports[0])  # a duplicate
        post(server, make_report(time="yesterday"), expect=400)  # schema
        post(server, None, expect=415, data=b"{}", content_type="text/plain")
        wait_until(lambda: answers_200(metrics_url), 10, "metrics served again")
        wait_until(lambda: fake.stats()["submissions"] >= 12, 10, "OONI got the reports")
        text, samples = scrape(metrics_url)

    assert value(samples, "tt_reports_accepted_total", source="report") == 12
    assert value(samples, "tt_reports_duplicate_total") == 1
    assert value(samples, "tt_reports_rejected_total", reason="schema") == 2
    assert value(samples, "tt_reports_rejected_total", reason="bad_json") == 1
    assert value(samples, "tt_reports_rejected_total", reason="content_type") == 1
    # Every report that got through validation is scrubbed: the duplicate too.
    assert value(samples, "tt_scrubbed_fields_total", kind="endpoint") == 13
    assert value(samples, "tt_scrubbed_fields_total", kind="config") == 26  # password, sni
    assert value(samples, "tt_scrubbed_fields_total", kind="failure") == 13
    assert value(samples, "tt_relay_outcomes_total", destination="ooni",
                 outcome="delivered") == 12
    # The secondary refused: it is held back after a first failure, the rest wait unattempted.
    pending = value(samples, "tt_relay_outcomes_total", destination="collector-1",
                    outcome="pending")
    assert 1 <= pending == value(samples, "tt_relay_attempts_total", destination="collector-1")
    assert value(samples, "tt_relay_backlog", destination="collector-1") == 12
    assert value(samples, "tt_relay_backlog", destination="ooni") == 0
    assert value(samples, "tt_store_commit_seconds_count") == 13  # 12 new, 1 duplicate
    assert value(samples, "tt_request_duration_seconds_count", route="/report",
                 method="POST") == 17
    assert value(samples, "tt_geo_database_age_seconds", role="country") > 0
    assert value(samples, "tt_geo_database_age_seconds", role="asn") > 0
    for needle in (CLIENT_IP, ENDPOINT_HOST, PASSWORD, "127.0.0.1", str(closed), fake.url,
                   "AS13335", TOKEN):
        assert needle not in text
    for (name, labels), _ in samples.items():  # every label from a closed vocabulary
        for label, got in labels:
            assert re.fullmatch(LABEL_VALUES[label], got), (name, label, got)
    with requests.get(server.url + "/metrics", timeout=5) as resp:
        assert resp.status_code == 404  # never on the public port


LABEL_VALUES = {
    "source": "report|relay", "reason": "[a-z][a-z0-9_-]{0,39}",
    "kind": "endpoint|config|failure", "destination": "ooni|collector-[1-9][0-9]*",
    "outcome": "delivered|pending|failed|skipped|expired", "role": "country|asn|country_asn",
    "route": "/[a-z/.-]*|unmatched", "method": "GET|POST|HEAD", "le": r"[0-9.]+|\+Inf",
}



@pytest.mark.e2e
def test_off_by_default(tt_server):
    server = tt_server("--workers", "1")
    with requests.get(server.url + "/metrics", timeout=5) as resp:
        assert resp.status_code == 404
    assert "PROMETHEUS_MULTIPROC_DIR" not in server.logs()


@pytest.mark.parametrize("args, message", [
    (["--listen", "127.0.0.1:{port}", "--metrics-listen", "127.0.0.1:{port}"],
     "metrics-listen: must not be the public listen port"),
    (["--metrics-listen", "nowhere"], "metrics-listen: expected HOST:PORT"),
    (["--metrics-listen", "127.0.0.1:{busy}"], "metrics-listen: cannot listen on"),
])
def test_bad_metrics_listen_is_one_line(runner, tmp_path, args, message):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = free_port()
        args = [a.format(port=port, busy=busy.getsockname()[1]) for a in args]
        result = runner.invoke(main, [*args, "--database-url", f"sqlite:///{tmp_path}/r.db"])
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("\n") == 1


def test_public_labels_and_codes():
    dests = ["ooni", "collector:https://a.example/", "collector:https://b.example/"]
    assert metrics.public_labels(dests) == {
        "ooni": "ooni", dests[1]: "collector-1", dests[2]: "collector-2"}
    assert metrics.code("time_old") == "time_old"
    for text in ("198.51.100.1", "has space", "x" * 80, None, "Upper"):
        assert metrics.code(text) == "other"


def test_off_is_a_no_op():
    assert not metrics.enabled()
    metrics.accepted(True)
    metrics.rejected("schema")
    metrics.relay_outcome("ooni", "delivered")
    with metrics.store_commit():
        pass
    assert metrics.totals() == {}
    assert "prometheus_client.values" not in sys.modules or not metrics.enabled()


TOTALS = """
import json, sys, tempfile
from tunnel_telemetry import metrics
with tempfile.TemporaryDirectory() as folder:
    metrics.setup(sys.argv[1], folder)  # as create_app: before any metric
    metrics.set_destinations(["ooni"])
    metrics.rejected("schema"); metrics.rejected("schema"); metrics.rejected("time_old")
    metrics.accepted(True); metrics.relay_outcome("ooni", "delivered")
    json.dump(metrics.totals(), sys.stdout)
"""


def test_totals_reads_the_multiprocess_counts():
    """What another page of this collector (a dashboard) reads: current totals by label."""
    root = os.path.dirname(os.path.dirname(metrics.__file__))
    out = subprocess.run([sys.executable, "-c", TOTALS, f"127.0.0.1:{free_port()}"],
                         capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": root})
    totals = json.loads(out.stdout)
    assert totals["tt_reports_rejected_total"] == {"schema": 2.0, "time_old": 1.0}
    assert totals["tt_reports_accepted_total"] == {"report": 1.0}
    assert totals["tt_relay_outcomes_total"] == {"ooni,delivered": 1.0}


def test_docs_name_every_metric_and_only_real_ones():
    """docs/operations.md's table lists each tt_ metric metrics.py defines, and its scrape
    examples and alert rules use no other name."""
    from pathlib import Path

    source = Path(metrics.__file__).read_text()
    defined = set(re.findall(r'"(tt_[a-z_]+)",', source))  # a metric name, then its help
    histograms = set(re.findall(r'Histogram\("(tt_[a-z_]+)"', source))
    doc = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    table = set(re.findall(r"^\| `(tt_[a-z_]+)` \|", doc, re.M))
    assert table == defined
    series = defined | {f"{h}_{suffix}" for h in histograms for suffix in ("bucket", "sum",
                                                                            "count")}
    used = set(re.findall(r"\btt_[a-z_]+\b", doc))
    assert used - series == set(), "names the collector does not export"
    rules = re.search(r"```yaml\n(groups:.*?)```", doc, re.S).group(1)
    assert set(re.findall(r"\btt_[a-z_]+\b", rules)) >= {
        "tt_relay_backlog", "tt_relay_outcomes_total", "tt_geo_database_age_seconds",
        "tt_reports_rejected_total"}, "backlog, relay failing, geo stale, rejections"
