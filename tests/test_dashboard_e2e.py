"""A real tt-server filled with reports over HTTP: /aggregates, tt-server aggregate and the
dashboard in headless Chromium (Debian's chromium and chromium-driver), which must plot the
series the aggregates hold; then every output is searched for client addresses, endpoint
addresses and host names, and report uuids. The screenshot is kept in test-artifacts/."""

import ipaddress
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

from tunnel_telemetry.testing.reports import make_report
from tunnel_telemetry.testing.server import TTServer, free_port

pytestmark = pytest.mark.e2e

TOKEN = "dashboard-operator-token-0123456789"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
REQUIRE = "TT_REQUIRE_BROWSER"  # set by CI: a missing chromium fails instead of skipping
ARTIFACTS = Path(os.environ.get("TT_TEST_ARTIFACTS",
                                Path(__file__).resolve().parent.parent / "test-artifacts"))
DAY = 86400
CLIENT_V4, CLIENT_V6 = "2.3.4.5", "2a01:4f8:1::1234"  # NO / AS50304 and DE / AS64500
ENDPOINT_V4, ENDPOINT_V6, ENDPOINT_HOST = "1.1.1.77", "2a01:4f8:1::beef", "secret-proxy.example.org"
# (client address, self-geolocation, endpoint, failed, succeeded) per UTC day, three days.
GROUPS = [
    (CLIENT_V4, {}, f"ss://{ENDPOINT_V4}:443", 20, 10),
    (CLIENT_V6, {}, f"obfs4://[{ENDPOINT_V6}]:9001", 10, 20),
    (CLIENT_V4, {"client_cc": "IR", "client_asn": "AS58224"}, f"vless://{ENDPOINT_HOST}:443",
     25, 5),
]
RATIOS = {"NO": "67%", "DE": "33%", "IR": "100%"}  # failures / reports, published cells only


def spellings(address):
    parsed = ipaddress.ip_address(address)
    out = {str(parsed), parsed.exploded}
    return out | ({f"::ffff:{parsed}"} if parsed.version == 4 else set())


SECRETS = set().union(*(spellings(a) for a in (CLIENT_V4, CLIENT_V6, ENDPOINT_V4, ENDPOINT_V6)))
SECRETS |= {ENDPOINT_HOST, "secret-proxy", "ss://", "vless://"}


@pytest.fixture(scope="module")
def filled(tmp_path_factory, geo_dbs):
    """A server, and the uuids of the reports it stored (aged into the last three days)."""
    folder = tmp_path_factory.mktemp("dashboard")
    db = folder / "reports.db"
    country, asn = geo_dbs
    server = TTServer(folder / "server", [
        "--database-url", f"sqlite:///{db}", "--geoip-country-db", str(country),
        "--geoip-asn-db", str(asn), "--proxy-hops", "1", "--allow-public-endpoint",
        "--dashboard-token", TOKEN, "--workers", "1",
        "--metrics-listen", f"127.0.0.1:{free_port()}"]).start()
    day_of: dict[str, int] = {}
    try:
        with requests.Session() as session:
            for day in (1, 2, 3):
                rare = 5 if day == 1 else 0  # a cell under k with free text in op and msg
                for client, geo, endpoint, failed, succeeded in GROUPS:
                    for n in range(failed + succeeded + rare):
                        failure = None
                        if n < failed:
                            failure = {"op": "connect", "posix_error": "ECONNREFUSED",
                                       "msg": f"dial {endpoint}: refused by {ENDPOINT_V4}"}
                        elif n >= failed + succeeded:
                            failure = {"op": f"dial {ENDPOINT_HOST}", "msg": CLIENT_V6}
                        report = make_report(uuid=str(uuid.uuid4()), endpoint=endpoint,
                                             failure=failure, **geo)
                        response = session.post(server.url + "/report", json=report,
                                                headers={"X-Forwarded-For": client}, timeout=10)
                        assert response.status_code == 201, response.text
                        day_of[report["uuid"]] = day
                    rare = 0
        # The store stamps reports with the time received: move them into closed days.
        today = int(time.time() // DAY) * DAY
        with sqlite3.connect(db) as conn:
            conn.executemany("UPDATE reports SET received = ? WHERE uuid = ?",
                             [(today - day * DAY + 3600, uid) for uid, day in day_of.items()])
        yield server, db, sorted(day_of)
    finally:
        server.stop()


def browser():
    """Headless Chromium through chromedriver; skipped only when not installed (locally)."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    if missing:
        if os.environ.get(REQUIRE):
            pytest.fail(f"{REQUIRE} is set but {', '.join(missing)} is missing")
        pytest.skip(f"not installed: {', '.join(missing)} (apt-get install chromium "
                    "chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=412,915", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def test_dashboard_plots_the_aggregates_in_a_browser(filled):
    server, _, _ = filled
    aggregates = requests.get(server.url + "/aggregates", timeout=10).json()
    cells = [c for p in aggregates["periods"] for c in p["cells"]]
    assert {c["client_cc"] for c in cells} == {"NO", "DE", "IR"}
    driver = browser()
    try:
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd("Network.setExtraHTTPHeaders",
                               {"headers": {"Authorization": f"Bearer {TOKEN}"}})
        driver.get(server.url + "/dashboard")
        assert driver.title.startswith("Tunnel telemetry")
        plotted = driver.execute_script("""
            const out = {};
            for (const svg of document.querySelectorAll('svg.chart')) {
              out[svg.dataset.chart] = [...svg.querySelectorAll('g.series, g.bar')].map(g => ({
                label: g.dataset.series || g.dataset.label, points: g.dataset.points,
                titles: [...g.querySelectorAll('circle title')].map(t => t.textContent),
                width: g.getBoundingClientRect().width}));
            }
            return out;""")
        layout = driver.execute_script(
            "return [document.documentElement.scrollWidth, window.innerWidth,"
            " performance.getEntriesByType('resource').length,"
            " [...document.querySelectorAll('ul.legend')].map("
            "   u => [...u.children].map(li => li.textContent))]")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(ARTIFACTS / "dashboard-phone.png"))
        html = driver.page_source
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(412, height + 120)  # the whole page, still a phone's width
        assert driver.save_screenshot(str(ARTIFACTS / "dashboard-phone-full.png"))
    finally:
        driver.quit()
    by_cc = {s["label"]: s for s in plotted["failure-client_cc"]}
    assert set(by_cc) == {"NO", "DE", "IR"}
    for cc, ratio in RATIOS.items():
        assert by_cc[cc]["points"] == "3" and by_cc[cc]["width"] > 0
        assert all(title.endswith(f": {ratio}") for title in by_cc[cc]["titles"]), by_cc[cc]
    assert {s["label"] for s in plotted["failure-client_asn"]} == {"AS50304", "AS64500",
                                                                   "AS58224"}
    assert {s["label"] for s in plotted["failure-proto"]} == {"ss", "obfs4", "vless"}
    bars = [b["label"] for b in plotted["failing-endpoint-networks"]]
    assert bars[0] == "AS0" and set(bars) == {"AS0", "AS13335", "AS64500"}  # vless: 75 fails
    assert layout[0] <= layout[1], "the page scrolls sideways on a phone"
    assert layout[2] == 0, "the dashboard loaded something"
    assert layout[3][0] == [s["label"] for s in plotted["failure-client_cc"]]  # the legend
    assert "Nothing waiting to be relayed" in html
    for secret in SECRETS:
        assert secret not in html


def test_no_address_host_or_uuid_in_any_output(filled):
    server, db, uuids = filled
    outputs = {}
    for query in ("period=day", "period=hour&from=" + time.strftime(
            "%Y-%m-%d", time.gmtime(time.time() - 3 * DAY))):
        outputs[query] = requests.get(f"{server.url}/aggregates?{query}", timeout=10).text
    for view in ("", "?period=hour"):
        page = requests.get(server.url + "/dashboard" + view, timeout=10,
                            headers={"Authorization": f"Bearer {TOKEN}"})
        assert page.status_code == 200 and page.text.count('class="series"') >= 9
        outputs["dashboard" + view] = page.text
    for fmt in ("json", "jsonl", "csv"):
        done = subprocess.run([sys.executable, "-m", "tunnel_telemetry.cli", "aggregate",
                               "--database-url", f"sqlite:///{db}", "--format", fmt],
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "CONFIG": ""})
        assert done.returncode == 0, done.stderr
        outputs[fmt] = done.stdout
    document = json.loads(outputs["json"])
    assert sum(p["suppressed"] for p in document["periods"]) >= 10  # the rare cell and IR's
    assert json.loads(outputs["period=day"])["periods"] == document["periods"]
    stored = sqlite3.connect(db).execute("SELECT group_concat(body) FROM reports").fetchone()[0]
    assert ENDPOINT_HOST in stored and ENDPOINT_V4 in stored  # allow-public-endpoint kept them
    for name, text in outputs.items():
        assert "AS50304" in text, name
        for secret in SECRETS | set(uuids) | {u.upper() for u in uuids} | {u[:8] for u in uuids}:
            assert secret not in text, (name, secret)


def test_dashboard_shows_reject_reasons_from_the_metrics(filled):
    server, _, _ = filled
    for body in (b"{not json", b"[]", json.dumps(make_report(time="2020-01-01T00:00:00Z"))):
        answer = requests.post(server.url + "/report", data=body, timeout=10,
                               headers={"Content-Type": "application/json"})
        assert answer.status_code == 400
    page = requests.get(server.url + "/dashboard", timeout=10,
                        headers={"Authorization": f"Bearer {TOKEN}"}).text
    table = page[page.index('<table id="rejects">'):]
    table = table[:table.index("</table>")]
    for reason in ("bad_json", "not_object", "time_old"):
        assert f"<tr><td>{reason}</td><td>1</td></tr>" in table, table
