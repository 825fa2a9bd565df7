"""The shipped deployment files work: nginx's site in front of a real tt-server, the systemd
unit's settings, the sample config file."""

import configparser
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import requests

from tunnel_telemetry.testing.listeners import make_certificate
from tunnel_telemetry.testing.reports import make_report
from tunnel_telemetry.testing.server import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "deploy" / "nginx-tt-server.conf"
UNIT = ROOT / "deploy" / "tt-server.service"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)

# Stands in for the internet: nginx's realip module, trusted for loopback peers only in this
# test's main config (never in the shipped site), sets the address nginx "sees" from this
# header, as if the client connected from it.
PUBLIC_HEADER = "X-Test-Public-Address"
MAIN_CONF = """
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 64; }}
http {{
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    set_real_ip_from 127.0.0.0/8;
    real_ip_header {header};
    include {prefix}/site.conf;
}}
"""


def site_for_test(text: str, https_port: int, http_port: int, upstream: int, cert: Path,
                  key: Path, prefix: Path) -> str:
    """The shipped site with this machine's ports, a test certificate and loopback only."""
    text = text.replace("listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl;")
    text = text.replace("listen 80;", f"listen 127.0.0.1:{http_port};")
    text = re.sub(r"\n\s*listen \[::\]:\d+[^;]*;", "", text)
    text = text.replace("server 127.0.0.1:8080;", f"server 127.0.0.1:{upstream};")
    text = re.sub(r"ssl_certificate\s+\S+;", f"ssl_certificate {cert};", text)
    text = re.sub(r"ssl_certificate_key\s+\S+;", f"ssl_certificate_key {key};", text)
    text = text.replace("/var/log/nginx/tt-server.error.log", str(prefix / "site-error.log"))
    text = text.replace("/var/www/letsencrypt", str(prefix / "webroot"))
    return text.replace("collector.example.org", "localhost")


@pytest.fixture
def nginx_in_front(tmp_path, tt_server, geo_dbs):
    if NGINX is None:
        if os.environ.get("TT_REQUIRE_NGINX"):
            pytest.fail("nginx is required here (TT_REQUIRE_NGINX) but not installed")
        pytest.skip("nginx is not installed (apt-get install nginx)")
    country, asn = geo_dbs
    server = tt_server("--proxy-hops", "1", "--geoip-country-db", str(country),
                       "--geoip-asn-db", str(asn))
    prefix = tmp_path / "nginx"
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi", "webroot"):
        (prefix / sub).mkdir(parents=True)
    cert, key = make_certificate(prefix)
    https_port, http_port = free_port(), free_port()
    (prefix / "site.conf").write_text(site_for_test(
        SITE.read_text(), https_port, http_port, server.port, cert, key, prefix))
    (prefix / "nginx.conf").write_text(MAIN_CONF.format(prefix=prefix, header=PUBLIC_HEADER))
    with open(prefix / "stderr.log", "wb") as err:
        proc = subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
                                stdout=subprocess.DEVNULL, stderr=err)
    url = f"https://localhost:{https_port}"

    def up():
        try:
            return requests.get(url + "/healthz", verify=str(cert), timeout=2).ok
        except requests.RequestException:
            return proc.poll() is not None
    assert wait_for(up, timeout=20) and proc.poll() is None, (prefix / "stderr.log").read_text()
    yield url, cert, server, http_port
    proc.send_signal(signal.SIGQUIT)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.mark.e2e
def test_nginx_site_geolocates_the_address_nginx_saw(nginx_in_front):
    url, cert, server, http_port = nginx_in_front
    # 1.1.1.1 is in the test databases (AU, AS13335); 2.3.4.5 (NO) is what a client forges.
    resp = requests.post(url + "/report", json=make_report(), verify=str(cert), timeout=10,
                         headers={PUBLIC_HEADER: "1.1.1.1", "X-Forwarded-For": "2.3.4.5"})
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert (body["client_asn"], body["client_cc"]) == ("AS13335", "AU")
    # Without the stand-in, nginx saw the loopback peer: nothing to geolocate, and the
    # forged header still counts for nothing.
    resp = requests.post(url + "/report", json=make_report(), verify=str(cert), timeout=10,
                         headers={"X-Forwarded-For": "1.1.1.1"})
    assert (resp.json()["client_asn"], resp.json()["client_cc"]) == ("AS0", "ZZ")
    # Plain HTTP is sent to HTTPS with the method kept (308), except ACME's challenges.
    resp = requests.post(f"http://127.0.0.1:{http_port}/report", json=make_report(),
                         allow_redirects=False, timeout=10)
    assert resp.status_code == 308
    assert resp.headers["Location"].startswith("https://")
    # nginx's limit is the collector's: a body over 64 KiB stops at nginx.
    resp = requests.post(url + "/report", data=b"x" * (65 * 1024), verify=str(cert),
                         headers={"Content-Type": "application/json"}, timeout=10)
    assert resp.status_code == 413
    logs = server.logs()
    assert "1.1.1.1" not in logs and "2.3.4.5" not in logs


def test_systemd_unit_is_hardened_and_complete():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read_string(UNIT.read_text())
    service = unit["Service"]
    assert service["ExecStart"].endswith("/tt-server")
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"  # geo databases, no restart
    assert service["DynamicUser"] == "yes" and service["ProtectSystem"] == "strict"
    assert service["StateDirectory"] == "tunnel-telemetry"
    assert service["NoNewPrivileges"] == "yes"
    assert service["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    # ProtectSystem=strict leaves only the state directory writable: every path tt-server
    # writes by default must be moved there.
    envs = dict(line.split("=", 2)[1:] for line in UNIT.read_text().splitlines()
                if line.startswith("Environment="))
    assert envs["TT_DATABASE_URL"].startswith("sqlite:////var/lib/tunnel-telemetry/")
    assert envs["TT_AUTOTLS_CACHE_DIR"].startswith("/var/lib/tunnel-telemetry/")
    assert unit["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_unit_verifies(tmp_path):
    unit = tmp_path / "tt-server.service"
    exe = tmp_path / "tt-server"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    unit.write_text(UNIT.read_text().replace("/opt/tunnel-telemetry/bin/tt-server", str(exe)))
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                         text=True)
    problems = [line for line in (out.stdout + out.stderr).splitlines()
                if "tt-server.service" in line and "Unknown" in line]
    assert not problems, problems


def test_sample_config_names_every_option_and_loads_as_written(tmp_path):
    """examples/config.yaml shows every option; uncommented, its defaults load unchanged."""
    from tunnel_telemetry.config import OPTIONS, load_config

    sample = ROOT / "examples" / "config.yaml"
    text = sample.read_text()
    keys = set(re.findall(r"^(?:# )?([a-z][a-z0-9-]*):", text, re.M))
    assert {opt.name for opt in OPTIONS} <= keys, {opt.name for opt in OPTIONS} - keys
    as_written = load_config(env={}, path=str(sample))
    assert as_written.collector_id == "my-collector"
    uncommented = tmp_path / "all.yaml"
    names = "|".join(re.escape(opt.name) for opt in OPTIONS)
    uncommented.write_text(re.sub(rf"^# ((?:{names}): \S.*)$", r"\1", text, flags=re.M))
    everything = load_config(env={}, path=str(uncommented))
    assert everything == as_written
