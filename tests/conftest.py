import os
import signal
import uuid

import pytest
from click.testing import CliRunner

from tunnel_telemetry.store import open_store
from tunnel_telemetry.testing import postgres
from tunnel_telemetry.testing.fake_ooni import FakeOONI
from tunnel_telemetry.testing.reports import iso, make_report  # noqa: F401
from tunnel_telemetry.testing.server import TTServer
from tunnel_telemetry.web import create_app


@pytest.fixture
def db_url(tmp_path, request):
    """The app's database: SQLite, or PostgreSQL for the whole suite with TT_TEST_BACKEND."""
    if os.environ.get("TT_TEST_BACKEND") == "postgres":
        return request.getfixturevalue("pg_url")
    return f"sqlite:///{tmp_path}/reports.db"


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request):
    """Each store backend in turn, for the tests that ask for it (pin one with
    ``@pytest.mark.parametrize("backend", ["sqlite"])``)."""
    return request.param


@pytest.fixture
def each_backend_url(backend, tmp_path, request):
    """An empty database of ``backend``. A module whose tests all run on both backends says
    so with a ``db_url`` fixture that returns this one."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/reports.db"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def store(db_url):
    """The store at ``db_url``, closed after the test."""
    store = open_store(db_url)
    yield store
    store.close()


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
        # Gunicorn's quick shutdown: the test is over, so waiting out a graceful stop (~2 s: a
        # gevent worker checks its connections once a second) only costs time. Tests of a
        # graceful stop call server.stop() themselves.
        server.stop(signal.SIGINT)


@pytest.fixture
def fake():
    """A fake OONI collector on 127.0.0.1 (tunnel_telemetry.testing.fake_ooni)."""
    with FakeOONI() as f:
        yield f


@pytest.fixture
def relay_defaults():
    """Options every make_app app gets (a module overrides this fixture)."""
    return {}


@pytest.fixture
def make_app(tmp_path, fake, relay_defaults):
    """Factory: an app relaying to the fake OONI, one SQLite store per name; closed at the end.
    All test clients are 127.0.0.1: per-client rate limiting off (test_limits.py has it)."""
    apps = []

    def make(name="a", **options):
        config = {"database-url": f"sqlite:///{tmp_path}/{name}.db", "collector-id": f"col-{name}",
                  "ooni-relay": True, "ooni-api": fake.url, "rate-limit": 0,
                  "ooni-relay-without-geo": True, **relay_defaults, **options}
        app = create_app(config)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["tunnel_telemetry"].close()


@pytest.fixture(scope="session")
def geo_dbs(tmp_path_factory):
    """(country_db, asn_db): a GeoLite2-layout pair with known networks (see GEO_NETWORKS)."""
    from tunnel_telemetry.testing.geodb import GEO_NETWORKS, write_asn_db, write_country_db

    folder = tmp_path_factory.mktemp("geo")
    country = folder / "country.mmdb"
    asn = folder / "asn.mmdb"
    write_country_db(country, {net: cc for net, (_, _, cc) in GEO_NETWORKS.items()})
    write_asn_db(asn, {net: (number, org) for net, (number, org, _) in GEO_NETWORKS.items()})
    return country, asn


# PostgreSQL: one server per session (a throwaway cluster, or $TT_TEST_DATABASE_URL), one
# fresh schema per test. Tests using them are skipped only when no PostgreSQL is found.
postgres_server = pytest.fixture(scope="session")(postgres.postgres_server_fixture)
pg_url = pytest.fixture(postgres.pg_url_fixture)
