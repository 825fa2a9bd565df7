import uuid

import pytest
from click.testing import CliRunner

from tunnel_telemetry import create_app
from tunnel_telemetry.testing.reports import iso, make_report  # noqa: F401
from tunnel_telemetry.testing.server import TTServer


@pytest.fixture
def db_url(tmp_path):
    return f"sqlite:///{tmp_path}/reports.db"


@pytest.fixture
def app_config(db_url):
    """Options for the app fixture; tests override entries by mutating it first."""
    return {"database-url": db_url, "collector-id": "test-collector"}


@pytest.fixture
def app(app_config):
    app = create_app(app_config)
    app.config["TESTING"] = True
    yield app
    app.extensions["tunnel_telemetry"].close()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def new_uuid():
    return str(uuid.uuid4())


@pytest.fixture
def tt_server(tmp_path):
    """Factory: start real tt-server processes; all are stopped at the end of the test."""
    servers = []

    def start(*args, env=None, name="server", **kwargs):
        workdir = tmp_path / name
        server = TTServer(workdir, list(args), env=env, **kwargs)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def geo_dbs(tmp_path_factory):
    """PROVISIONAL (replaced by the geo branch): (country_db, asn_db) with known networks."""
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    nets = {"1.1.1.0/24": (13335, "AU"), "2.3.4.0/24": (50304, "NO"), "6.6.6.0/24": (666, "US"),
            "2001:db8:1::/48": (64500, "DE")}
    folder = tmp_path_factory.mktemp("geo")
    country = MMDBWriter(6, "GeoLite2-Country", ipv4_compatible=True, int_type="u32")
    asn = MMDBWriter(6, "GeoLite2-ASN", ipv4_compatible=True, int_type="u32")
    for net, (number, cc) in nets.items():
        country.insert_network(IPSet([net]), {"country": {"iso_code": cc}})
        asn.insert_network(IPSet([net]), {"autonomous_system_number": number})
    country.to_db_file(str(folder / "country.mmdb"))
    asn.to_db_file(str(folder / "asn.mmdb"))
    return folder / "country.mmdb", folder / "asn.mmdb"
