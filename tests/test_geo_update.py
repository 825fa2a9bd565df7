"""`tt-server geo update` against a local mirror of each provider (never the internet), the
collector picking the databases up (SIGHUP, geo-update-interval), the loud start-up check
with --ooni-relay and /healthz's age and "stale"."""

import base64
import datetime
import gzip
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs

import pytest
import requests

from tunnel_telemetry.cli import main
from tunnel_telemetry.config import Config, ConfigError
from tunnel_telemetry.geo_update import (
    GeoUpdateConfigError,
    GeoUpdateError,
    _dbip_months,
    update,
)
from tunnel_telemetry.pipeline.geo import Geo
from tunnel_telemetry.testing.fake_ooni import FakeOONI
from tunnel_telemetry.testing.geodb import (
    GeoMirror,
    gzipped,
    maxmind_tarball,
    write_asn_db,
    write_country_db,
    write_ipinfo_db,
)
from tunnel_telemetry.testing.reports import make_report
from tunnel_telemetry.testing.server import TTServer, free_port, wait_for

NOW = datetime.datetime(2026, 12, 7, 3, 0, tzinfo=datetime.UTC)
DAY = 86400
BUILT = int(NOW.timestamp()) - 6 * DAY
NET = "1.1.1.0/24"
ADDRESS = "1.1.1.7"


@pytest.fixture(scope="module")
def mirror():
    with GeoMirror() as server:
        yield server


@pytest.fixture
def served(mirror):
    mirror.routes.clear()
    mirror.requests.clear()
    return mirror


class Builder:
    """Databases in each provider's layout and packaging, written under one folder."""

    def __init__(self, folder):
        self.folder = folder
        self.n = 0

    def _path(self):
        self.n += 1
        return self.folder / f"db{self.n}.mmdb"

    def country(self, cc, built=BUILT, kind="DBIP-Country-Lite"):
        return write_country_db(self._path(), {NET: cc}, database_type=kind, build_epoch=built)

    def asn(self, number, built=BUILT, kind="DBIP-ASN-Lite"):
        return write_asn_db(self._path(), {NET: (number, f"AS-{number}")}, database_type=kind,
                            build_epoch=built)

    def ipinfo(self, cc, number, built=BUILT):
        return write_ipinfo_db(self._path(), {NET: (f"AS{number}", "X", cc)},
                               database_type="ipinfo_lite.mmdb", build_epoch=built)


@pytest.fixture
def build(tmp_path):
    folder = tmp_path / "built"
    folder.mkdir()
    return Builder(folder)


def make_config(tmp_path, mirror, **options):
    return Config.from_mapping({"database-url": f"sqlite:///{tmp_path}/r.db",
                                "geo-download-url": mirror.url, **options})


def geo_dir(tmp_path):
    return tmp_path / "geo"


def answers(directory):
    geo = Geo(str(directory / "country.mmdb"), str(directory / "asn.mmdb"))
    try:
        return geo.lookup(ADDRESS), [db["role"] for db in geo.info()]
    finally:
        geo.close()


def serve_dbip(mirror, build, cc="AU", number=13335, month="2026-12", built=BUILT):
    mirror.routes[f"/free/dbip-country-lite-{month}.mmdb.gz"] = (
        200, gzipped(build.country(cc, built)))
    mirror.routes[f"/free/dbip-asn-lite-{month}.mmdb.gz"] = (200, gzipped(build.asn(number,
                                                                                    built)))


def serve_maxmind(mirror, build, cc="AU", number=13335, date="2026-12-04", md5=None):
    dbs = {"GeoLite2-Country": build.country(cc, kind="GeoLite2-Country"),
           "GeoLite2-ASN": build.asn(number, kind="GeoLite2-ASN")}

    def metadata(handler):
        edition = parse_qs(handler.path.partition("?")[2])["edition_id"][0]
        with open(dbs[edition], "rb") as fh:
            digest = md5 or hashlib.md5(fh.read()).hexdigest()  # noqa: S324 - MaxMind's
        body = json.dumps({"databases": [{"edition_id": edition, "md5": digest,
                                          "date": date}]}).encode()
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    mirror.routes["/geoip/updates/metadata"] = metadata
    for edition, path in dbs.items():
        mirror.routes[f"/geoip/databases/{edition}/download"] = (
            200, maxmind_tarball(path, edition, date))


def serve_ipinfo(mirror, build, cc="AU", number=13335, sha256=None):
    with open(build.ipinfo(cc, number), "rb") as fh:
        data = fh.read()
    body = json.dumps({"checksums": {"md5": hashlib.md5(data).hexdigest(),  # noqa: S324
                                     "sha1": hashlib.sha1(data).hexdigest(),  # noqa: S324
                                     "sha256": sha256 or hashlib.sha256(data).hexdigest()}})
    mirror.routes["/data/ipinfo_lite.mmdb/checksums"] = (200, body.encode())
    mirror.routes["/data/ipinfo_lite.mmdb"] = (200, data)


def downloads(mirror):
    return [path for path, _, _ in mirror.requests if "/checksums" not in path
            and "metadata" not in path]


def snapshot(directory):
    """Every file of geo-dir (temporary ones included) and its bytes."""
    if not directory.exists():
        return {}
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.name != ".geo-update.lock"}


# --- the three providers ----------------------------------------------------------------------


def test_dbip_installs_then_is_up_to_date_then_keeps_the_previous_month(tmp_path, served,
                                                                        build):
    config = make_config(tmp_path, served)
    serve_dbip(served, build, "AU", 13335, "2026-12")
    result = update(config, now=NOW)
    assert result.installed and result.provider.name == "dbip"
    assert answers(geo_dir(tmp_path)) == (("AS13335", "AU"), ["country", "asn"])
    assert [line.split(" built")[0] for line in result.lines] == [
        "country: installed DBIP-Country-Lite", "asn: installed DBIP-ASN-Lite"]

    served.requests.clear()
    again = update(config, now=NOW)
    assert not again.installed and served.requests == []  # this month's files: no download
    assert again.lines == ["country: up to date (dbip-country-lite-2026-12.mmdb.gz)",
                           "asn: up to date (dbip-asn-lite-2026-12.mmdb.gz)"]

    serve_dbip(served, build, "NZ", 64500, "2027-01", built=BUILT + 30 * DAY)
    assert update(config, now=NOW + datetime.timedelta(days=30)).installed
    assert answers(geo_dir(tmp_path))[0] == ("AS64500", "NZ")
    previous = Geo(str(geo_dir(tmp_path) / "country.previous.mmdb"),
                   str(geo_dir(tmp_path) / "asn.previous.mmdb"))
    assert previous.lookup(ADDRESS) == ("AS13335", "AU")
    previous.close()
    manifest = json.loads((geo_dir(tmp_path) / "geo-update.json").read_text())
    assert manifest["provider"] == "dbip"
    assert manifest["databases"]["country"]["source"] == "dbip-country-lite-2027-01.mmdb.gz"
    assert sorted(snapshot(geo_dir(tmp_path))) == [
        "asn.mmdb", "asn.previous.mmdb", "country.mmdb", "country.previous.mmdb",
        "geo-update.json"]


def test_dbip_takes_last_month_until_this_month_is_out(tmp_path, served, build):
    serve_dbip(served, build, "AU", 13335, "2026-11")
    assert update(make_config(tmp_path, served), now=NOW).installed
    assert downloads(served) == [
        "/free/dbip-country-lite-2026-12.mmdb.gz", "/free/dbip-country-lite-2026-11.mmdb.gz",
        "/free/dbip-asn-lite-2026-12.mmdb.gz", "/free/dbip-asn-lite-2026-11.mmdb.gz"]
    assert _dbip_months(datetime.datetime(2027, 1, 1, tzinfo=datetime.UTC)) == [
        "2027-01", "2026-12"]


def test_maxmind_as_geoipupdate_metadata_md5_then_dated_tarball(tmp_path, served, build):
    config = make_config(tmp_path, served, **{"geo-provider": "maxmind",
                                              "maxmind-account-id": "123456",
                                              "maxmind-license-key": "k3y-k3y-k3y"})
    serve_maxmind(served, build, "DE", 64501)
    result = update(config, now=NOW)
    assert result.installed
    assert answers(geo_dir(tmp_path)) == (("AS64501", "DE"), ["country", "asn"])
    auth = "Basic " + base64.b64encode(b"123456:k3y-k3y-k3y").decode()
    assert {header for _, _, header in served.requests} == {auth}
    assert ("/geoip/databases/GeoLite2-ASN/download", "date=20261204&suffix=tar.gz",
            auth) in served.requests
    served.requests.clear()
    assert not update(config, now=NOW).installed  # the MD5 of what is installed: no download
    assert downloads(served) == []


def test_ipinfo_one_file_with_both_checked_against_its_sha256(tmp_path, served, build):
    config = make_config(tmp_path, served, **{"geo-provider": "ipinfo",
                                              "ipinfo-token": "t0ken"})
    serve_ipinfo(served, build, "BR", 28573)
    result = update(config, now=NOW)
    assert result.installed and result.lines[0].startswith(
        "country+asn: installed ipinfo_lite.mmdb built 2026-12-01")
    directory = geo_dir(tmp_path)
    assert os.path.samefile(directory / "country.mmdb", directory / "asn.mmdb")
    assert answers(directory) == (("AS28573", "BR"), ["country+asn"])
    assert {query for _, query, _ in served.requests} == {"token=t0ken"}
    served.requests.clear()
    assert not update(config, now=NOW).installed
    assert downloads(served) == []


# --- everything that must fail, leaving geo-dir as it was -------------------------------------


def truncated(data):
    return data[: len(data) // 2]


COUNTRY_GZ = "/free/dbip-country-lite-2026-12.mmdb.gz"
ASN_GZ = "/free/dbip-asn-lite-2026-12.mmdb.gz"


def failure(case, mirror, build):
    """(path, answer) serving one kind of bad download in place of a good one."""
    if case == "broken gzip":
        return COUNTRY_GZ, (200, b"\x1f\x8b garbage" * 50)
    if case == "truncated gzip":
        return ASN_GZ, (200, truncated(gzipped(build.asn(1))))
    if case == "not a database":
        return COUNTRY_GZ, (200, gzip.compress(b"<html>hi</html>"))
    if case == "truncated database":
        with open(build.country("FR"), "rb") as fh:
            return COUNTRY_GZ, (200, gzip.compress(truncated(fh.read())))
    if case == "wrong type":
        return COUNTRY_GZ, (200, gzipped(build.asn(7)))
    if case == "older than in place":
        return ASN_GZ, (200, gzipped(build.asn(7, built=BUILT - 60 * DAY)))
    if case == "HTTP 500":
        return ASN_GZ, (500, b"oops")
    return ASN_GZ, mirror.hang


MESSAGES = {
    "broken gzip": "not a valid gzip file",
    "truncated gzip": "truncated or oversized gzip file",
    "not a database": "not a MaxMind DB (.mmdb) file",
    "truncated database": "not a MaxMind DB (.mmdb) file",
    "wrong type": "got a 'DBIP-ASN-Lite' database, expected dbip-country",
    "older than in place": "older than the asn database in place",
    "HTTP 500": "answered HTTP 500",
    "hangs": "no answer from 127.0.0.1",
}


@pytest.mark.parametrize("case", MESSAGES)
def test_a_bad_download_changes_nothing(tmp_path, served, build, case):
    config = make_config(tmp_path, served)
    serve_dbip(served, build, "AU", 13335, "2026-11")  # in place: last month's
    update(config, now=NOW)
    before = snapshot(geo_dir(tmp_path))
    serve_dbip(served, build, "NZ", 64500, "2026-12", built=BUILT + DAY)
    path, answer = failure(case, served, build)
    served.routes[path] = answer
    with pytest.raises(GeoUpdateError) as caught:
        update(config, now=NOW, timeout=0.5)
    message = str(caught.value)
    assert MESSAGES[case] in message and "\n" not in message
    assert snapshot(geo_dir(tmp_path)) == before, "nothing installed, no file left behind"
    assert answers(geo_dir(tmp_path))[0] == ("AS13335", "AU")


@pytest.mark.parametrize("provider, options, corrupt, message", [
    ("maxmind", {"maxmind-account-id": "1", "maxmind-license-key": "k"}, "md5",
     "md5 checksum mismatch"),
    ("ipinfo", {"ipinfo-token": "t0ken"}, "sha256", "sha256 checksum mismatch"),
])
def test_a_checksum_mismatch_changes_nothing(tmp_path, served, build, provider, options,
                                             corrupt, message):
    config = make_config(tmp_path, served, **{"geo-provider": provider, **options})
    serve = serve_maxmind if provider == "maxmind" else serve_ipinfo
    serve(served, build, **{corrupt: "0" * (32 if corrupt == "md5" else 64)})
    with pytest.raises(GeoUpdateError, match=message):
        update(config, now=NOW)
    assert snapshot(geo_dir(tmp_path)) == {}


def test_a_trickling_server_is_cut_off_and_the_token_never_shows(tmp_path, served, build):
    def trickle(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", "100000")
        handler.end_headers()
        while not served.release.wait(0.01):
            handler.wfile.write(b"x")
            handler.wfile.flush()

    serve_ipinfo(served, build)
    served.routes["/data/ipinfo_lite.mmdb"] = trickle
    config = make_config(tmp_path, served, **{"geo-provider": "ipinfo",
                                              "ipinfo-token": "s3cret-t0ken"})
    with pytest.raises(GeoUpdateError, match="took longer than 1.5s") as caught:
        update(config, now=NOW, timeout=0.05)
    assert "s3cret" not in str(caught.value)
    served.routes["/data/ipinfo_lite.mmdb/checksums"] = served.hang
    with pytest.raises(GeoUpdateError, match="no answer from") as caught:
        update(config, now=NOW, timeout=0.2)
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize("provider, options, message", [
    ("maxmind", {}, "set MAXMIND_ACCOUNT_ID and MAXMIND_LICENSE_KEY"),
    ("maxmind", {"maxmind-account-id": "me", "maxmind-license-key": "k"}, "must be a number"),
    ("ipinfo", {}, "set IPINFO_TOKEN"),
])
def test_missing_credentials_are_a_config_error(tmp_path, served, provider, options, message):
    with pytest.raises(GeoUpdateConfigError, match=message):
        update(make_config(tmp_path, served, **{"geo-provider": provider, **options}))
    assert served.requests == []


def test_wrong_credentials_say_so(tmp_path, served):
    served.routes["/geoip/updates/metadata"] = (401, b'{"code":"ACCOUNT_ID_REQUIRED"}')
    config = make_config(tmp_path, served, **{"geo-provider": "maxmind",
                                              "maxmind-account-id": "1",
                                              "maxmind-license-key": "wrong"})
    with pytest.raises(GeoUpdateError, match=r"answered HTTP 401 \(check the credentials\)"):
        update(config)


@pytest.mark.parametrize("options, message", [
    ({"geo-provider": "geoip"}, "geo-provider: expected dbip, maxmind or ipinfo"),
    ({"geo-download-url": "ftp://mirror"}, "geo-download-url: not an http(s) URL"),
    ({"geo-download-url": "https://u:p@mirror"}, "geo-download-url: no credentials"),
    ({"geo-update-interval": "0.5s"}, "geo-update-interval: must be 0 (off) or at least 1s"),
    ({"geo-stale-after": "1h"}, "geo-stale-after: must be at least 1d"),
])
def test_bad_geo_options(options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Config.from_mapping(options)


# --- the command ------------------------------------------------------------------------------


def test_command_lines_and_exit_status(tmp_path, served, build, runner):
    base = ["--database-url", f"sqlite:///{tmp_path}/r.db", "geo", "update",
            "--geo-download-url", served.url]
    months = _dbip_months(datetime.datetime.now(datetime.UTC))
    served.routes[f"/free/dbip-country-lite-{months[0]}.mmdb.gz"] = (500, b"")
    result = runner.invoke(main, base)
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(
        "tt-server: error: geo update: dbip country (dbip-country-lite-")
    serve_dbip(served, build, month=months[0])
    result = runner.invoke(main, base)
    assert result.exit_code == 0, result.output
    assert "country: installed DBIP-Country-Lite" in result.stdout
    assert ("data: DB-IP Lite, CC BY 4.0: IP Geolocation by DB-IP (https://db-ip.com); "
            "updated monthly") in result.stdout
    result = runner.invoke(main, [*base, "--provider", "ipinfo"])
    assert result.exit_code == 2 and "set IPINFO_TOKEN" in result.stderr
    result = runner.invoke(main, [*base, "--reload-pid", str(tmp_path / "none.pid")])
    assert result.exit_code == 2 and "cannot read pidfile" in result.stderr
    served.requests.clear()
    result = runner.invoke(main, [*base, "--reload-pid", "1"])
    assert result.exit_code == 0 and "reload" not in result.stdout, "nothing new: no SIGHUP"
    assert "up to date" in result.stdout


# docs/geo.md's commands that need a running systemd unit: run by the named test instead.
DOC_COVERED = {'tt-server geo update --reload-pid "$(systemctl':
               "test_update_and_reload_while_serving_drops_no_request"}
DOC_MIRROR = "https://mirror.example.org/dbip"  # the doc's example mirror: the local one here


def test_docs_geo_commands_run_as_written(tmp_path, served, build):
    """Every tt-server line of docs/geo.md, run by bash as written (the provider's address
    swapped for the local mirror through TT_GEO_DOWNLOAD_URL), installs or is up to date."""
    from pathlib import Path

    from test_readme import commands, ours

    month = _dbip_months(datetime.datetime.now(datetime.UTC))[0]
    serve_dbip(served, build, month=month)
    for path, answer in list(served.routes.items()):
        served.routes["/dbip" + path] = answer
    serve_maxmind(served, build)
    serve_ipinfo(served, build)
    doc = Path(__file__).resolve().parent.parent / "docs" / "geo.md"
    lines = [cmd for cmd in commands(doc) if ours(cmd)]
    run = [cmd for cmd in lines if not any(cmd.startswith(p) for p in DOC_COVERED)]
    assert len(run) >= 5 and len(lines) - len(run) == len(DOC_COVERED)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TT_GEO_DOWNLOAD_URL": served.url, "PYTHONPATH": root}
    for name in ("TT_CONFIG", "DATABASE_URL", "MAXMIND_ACCOUNT_ID", "MAXMIND_LICENSE_KEY",
                 "IPINFO_TOKEN", "TT_GEO_DIR", "GEO_DIR", "TT_GEO_PROVIDER", "GEO_PROVIDER"):
        env.pop(name, None)
    shell = f'tt-server() {{ "{sys.executable}" -m tunnel_telemetry.cli "$@"; }}\n'
    for cmd in run:
        out = subprocess.run(["bash", "-euo", "pipefail", "-c",
                              shell + cmd.replace(DOC_MIRROR, served.url + "/dbip")],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
                             check=False)
        assert out.returncode == 0, (cmd, out.stdout, out.stderr)
        assert "installed" in out.stdout or "up to date" in out.stdout, (cmd, out.stdout)
        assert out.stdout.splitlines()[-1].startswith("data: "), (cmd, out.stdout)
    assert {"country.mmdb", "asn.mmdb"} <= set(os.listdir(tmp_path / "tt-data" / "geo"))
    assert {"country.mmdb", "asn.mmdb"} <= set(os.listdir(tmp_path / "geo-databases"))
    providers = {path.split("/")[1] for path in downloads(served)}
    assert providers == {"free", "geoip", "data", "dbip"}, "every provider and the mirror"
    for covered in DOC_COVERED.values():
        assert callable(globals()[covered])


# --- the collector ----------------------------------------------------------------------------


def post(server, session=None, address=ADDRESS):
    send = session.post if session else requests.post
    with send(server.url + "/report", json=make_report(), timeout=10,
              headers={"X-Forwarded-For": address}) as resp:
        assert resp.status_code == 201, resp.text
        body = resp.json()
    return body["client_asn"], body["client_cc"]


@pytest.mark.e2e
def test_ooni_relay_without_geo_stops_at_start_up(tmp_path):
    env = {**os.environ, "OONI_RELAY_WITHOUT_GEO": ""}
    out = subprocess.run([sys.executable, "-m", "tunnel_telemetry.cli", "--database-url",
                          f"sqlite:///{tmp_path}/r.db", "--ooni-relay", "--listen",
                          "127.0.0.1:1"], capture_output=True, text=True, env=env, timeout=60,
                         check=False)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("tt-server: error: ooni-relay: no country and no ASN "
                                "database") and "`tt-server geo update`" in lines[-1]
    assert "--ooni-relay-without-geo" in lines[-1]


@pytest.mark.parametrize("dbs, accept, error", [
    ((), False, "ooni-relay: no country and no ASN database"),
    (("country",), False, "ooni-relay: no ASN database"),
    (("asn",), False, "ooni-relay: no country database"),
    (("country", "asn"), False, None),
    ((), True, None),
    (("country",), True, None),
])
def test_ooni_relay_needs_both_databases_unless_accepted(tmp_path, build, dbs, accept, error):
    from tunnel_telemetry.web import create_app

    options = {"database-url": f"sqlite:///{tmp_path}/r.db", "ooni-relay": True,
               "ooni-relay-without-geo": accept}
    if "country" in dbs:
        options["geoip-country-db"] = build.country("AU")
    if "asn" in dbs:
        options["geoip-asn-db"] = build.asn(13335)
    if error:
        with pytest.raises(ConfigError) as caught:
            create_app(options)
        assert str(caught.value).startswith(error) and "`tt-server geo update`" in str(
            caught.value)
        return
    create_app(options).extensions["tunnel_telemetry"].close()


@pytest.mark.e2e
def test_update_and_reload_while_serving_drops_no_request(tmp_path, tt_server, served, build):
    """geo update into geo-dir, the collector (--ooni-relay, no geoip-* options) reads it;
    an update with --reload-pid goes live while reports keep coming, none failing."""
    months = _dbip_months(datetime.datetime.now(datetime.UTC))
    db = tmp_path / "server" / "reports.db"
    db.parent.mkdir()
    common = ["--database-url", f"sqlite:///{db}", "--geo-download-url", served.url]
    cli = [sys.executable, "-m", "tunnel_telemetry.cli", *common, "geo", "update"]
    serve_dbip(served, build, "AU", 13335, months[1])
    subprocess.run(cli, check=True, capture_output=True, timeout=60)
    pidfile = tmp_path / "tt-server.pid"
    server = tt_server(*common, "--workers", "2", "--proxy-hops", "1", "--ooni-relay",
                       "--ooni-api", "http://127.0.0.1:9", "--pidfile", str(pidfile),
                       env={"OONI_RELAY_WITHOUT_GEO": ""})
    master = server.proc.pid
    assert wait_for(lambda: pidfile.exists() and pidfile.read_text().strip() == str(master))
    assert post(server) == ("AS13335", "AU")

    seen, errors, stop = [], [], threading.Event()

    def keep_posting():
        with requests.Session() as session:
            while not stop.is_set():
                try:
                    seen.append(post(server, session))
                except (AssertionError, requests.RequestException) as exc:
                    errors.append(repr(exc))

    thread = threading.Thread(target=keep_posting)
    thread.start()
    try:
        serve_dbip(served, build, "NZ", 64500, months[0], built=BUILT + DAY)
        out = subprocess.run([*cli, "--reload-pid", str(pidfile)], capture_output=True,
                             text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stderr
        assert f"reload: sent SIGHUP to {master}" in out.stdout
        assert wait_for(lambda: seen and seen[-1] == ("AS64500", "NZ"), timeout=20), seen[-3:]
        count = len(seen)
        assert wait_for(lambda: len(seen) > count + 20)
    finally:
        stop.set()
        thread.join()
    assert errors == [], errors[:3]
    assert seen[-20:] == [("AS64500", "NZ")] * 20, "every worker has it"
    assert server.proc.poll() is None and server.proc.pid == master, "never restarted"
    with requests.get(server.url + "/healthz", timeout=10) as resp:
        geo = resp.json()["geo"]
    assert [(d["role"], d["file"], d["stale"]) for d in geo] == [
        ("country", "country.mmdb", False), ("asn", "asn.mmdb", False)]
    assert geo[0]["attribution"] == "IP Geolocation by DB-IP (https://db-ip.com), CC BY 4.0"
    server.stop()
    assert not pidfile.exists(), "the pidfile goes with the collector"


@pytest.mark.e2e
def test_the_heroku_procfile_line_of_the_docs_relays_with_fresh_databases(tmp_path, served,
                                                                           build):
    """docs/geo.md's Procfile line for a disk that does not survive a restart, run by a shell
    as written and configured by the environment as on Heroku: geo update, then gunicorn, with
    ooni-relay (which refuses to start without databases); OONI gets the client's location."""
    repo = Path(__file__).resolve().parent.parent
    lines = {found for doc in ("geo.md", "deploy.md")
             for found in re.findall(r"`web: ([^`]+)`", (repo / "docs" / doc).read_text())}
    assert lines == {"tt-server geo update && gunicorn app:app"}, "both docs give one line"
    [line] = lines
    serve_dbip(served, build, "AU", 13335, _dbip_months(datetime.datetime.now(datetime.UTC))[0])
    with FakeOONI() as fake:
        env = {"DATABASE_URL": f"sqlite:///{tmp_path}/r.db", "OONI_RELAY": "true",
               "OONI_API": fake.url, "OONI_RELAY_WITHOUT_GEO": "", "PROXY_HOPS": "1",
               "WORKERS": "2", "TT_GEO_DOWNLOAD_URL": served.url,
               "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
        port = free_port()
        server = TTServer(tmp_path / "dyno", command=["sh", "-c", line], port=port,
                          env={**env, "PORT": str(port)}, cwd=repo)
        server.start(timeout=60)
        try:
            assert post(server) == ("AS13335", "AU")
            assert wait_for(lambda: fake.stats()["submissions"] == 1, timeout=10)
        finally:
            server.stop(signal.SIGINT)
        [measurement] = fake.measurements
        assert (measurement.content["probe_cc"], measurement.content["probe_asn"]) == (
            "AU", "AS13335")
    logs = server.logs()
    assert "installed" in logs and "Listening at" in logs
    assert {"country.mmdb", "asn.mmdb"} <= set(os.listdir(tmp_path / "geo"))
    assert not (repo / "tt-data").exists()


@pytest.mark.e2e
def test_the_collector_updates_itself(tmp_path, tt_server, served, build):
    """geo-update-interval: the master runs geo update at start-up and reloads; only it."""
    months = _dbip_months(datetime.datetime.now(datetime.UTC))
    serve_dbip(served, build, "NO", 50304, months[0])
    server = tt_server("--geo-download-url", served.url, "--geo-update-interval", "1h",
                       "--workers", "2", "--proxy-hops", "1")
    assert wait_for(lambda: post(server) == ("AS50304", "NO"), timeout=30), server.logs()[-2000:]
    assert len(downloads(served)) == 2, "one process updates, once"
    assert "geo_reloaded" in server.logs()


@pytest.mark.parametrize("age_days, stale_after, stale", [
    (10, None, False), (60, None, True), (60, "90d", False)])
def test_healthz_shows_age_and_stale(tmp_path, app_config, age_days, stale_after, stale):
    from tunnel_telemetry.web import create_app

    built = int(datetime.datetime.now(datetime.UTC).timestamp()) - age_days * DAY
    country = write_country_db(tmp_path / "c.mmdb", {NET: "AU"}, build_epoch=built)
    asn = write_asn_db(tmp_path / "a.mmdb", {NET: (1, "X")}, build_epoch=built)
    app = create_app({**app_config, "geoip-country-db": country, "geoip-asn-db": asn,
                      **({"geo-stale-after": stale_after} if stale_after else {})})
    try:
        geo = app.test_client().get("/healthz").get_json()["geo"]
    finally:
        app.extensions["tunnel_telemetry"].close()
    assert [(d["age_days"] // 1, d["stale"]) for d in geo] == [(age_days, stale)] * 2
    assert geo[0]["attribution"].startswith("This product includes GeoLite2 data")


def test_sighup_picks_up_databases_installed_after_start_up(tmp_path, app_config, build):
    """Started with none (a warning), a SIGHUP after `geo update` opens them."""
    from tunnel_telemetry.server import on_reload
    from tunnel_telemetry.web import create_app

    app_config["geo-dir"] = str(geo_dir(tmp_path))  # beside a SQLite store by default; PG too
    app = create_app(app_config)
    svc = app.extensions["tunnel_telemetry"]
    try:
        assert not svc.geo.enabled
        directory = geo_dir(tmp_path)
        directory.mkdir()
        os.link(build.country("AU"), directory / "country.mmdb")
        os.link(build.asn(13335), directory / "asn.mmdb")

        on_reload(SimpleNamespace(app=SimpleNamespace(callable=app)))  # gunicorn's SIGHUP
        assert svc.geo.lookup(ADDRESS) == ("AS13335", "AU")
    finally:
        svc.close()
