"""The web face: the app factory, the per-process services and the HTTP answers."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from flask import Flask, Request
    from werkzeug.local import LocalProxy

    from ..config import Config
    from ..housekeeping import Housekeeping
    from ..pipeline.geo import Geo
    from ..relay import NullRelay, Relay
    from ..relay.aggregates import AggregateRelay
    from ..store import Store
    from .limits import Limits

log = logging.getLogger(__name__)

ROUTE_KEY = "tunnel_telemetry.route"  # WSGI environ: the rule of the route that matched


@dataclass
class Services:
    """Everything built once per process at start-up and shared by requests."""

    config: Config
    geo: Geo
    store: Store
    relay: Relay | NullRelay
    limits: Limits
    housekeeping: Housekeeping  # the leader's work: metrics, retention purge (housekeeping.py)
    report_id_key: bytes  # derives the uuid of a report that has none (pipeline/outline)
    commit: str | None = None
    started_pid: int | None = None
    aggregate_relay: AggregateRelay | None = None  # relay-aggregates-url's sender

    def start(self) -> None:
        """Start background work in this process (after gunicorn's fork); idempotent."""
        if self.started_pid != os.getpid():
            self.started_pid = os.getpid()
            self.relay.start()
            self.housekeeping.start()
            if self.aggregate_relay is not None:
                self.aggregate_relay.start()

    def reload_geo(self) -> None:
        """SIGHUP in the master: reopen the geo databases (those `geo update` installed
        since start-up included); the workers forked next use them."""
        self.geo.reload(geo_paths(self.config))

    def close(self) -> None:
        self.housekeeping.close()
        self.relay.close()
        if self.aggregate_relay is not None:
            self.aggregate_relay.close()
        self.store.close()
        self.geo.close()


def git_commit() -> str | None:
    """The deployed commit: from the environment (Heroku and others) or the source checkout."""
    for var in ("TT_GIT_COMMIT", "SOURCE_VERSION", "HEROKU_SLUG_COMMIT", "GIT_COMMIT"):
        if os.environ.get(var):
            return os.environ[var][:40]
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.isdir(os.path.join(here, ".git")):
        return None
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def geo_paths(config: Config) -> tuple[str | None, str | None]:
    """The geo databases to open: geoip-country-db / geoip-asn-db, else what `tt-server geo
    update` installed in geo-dir."""
    from ..geo_update import geo_dir, installed

    country, asn = config.geoip_country_db, config.geoip_asn_db
    if country is None or asn is None:
        found = installed(geo_dir(config))
        country = country or found[0]
        asn = asn or found[1]
    return country, asn


def check_relay_geo(config: Config, geo: Geo) -> None:
    """OONI discards reports located AS0 / ZZ: with ooni-relay, no country or no ASN database
    is a configuration error unless ooni-relay-without-geo accepts it."""
    if not config.ooni_relay or config.ooni_relay_without_geo:
        return
    missing = [name for name, present in (("country", geo.has_country), ("ASN", geo.has_asn))
               if not present]
    if missing:
        from ..config import ConfigError
        from ..geo_update import geo_dir

        raise ConfigError(
            f"ooni-relay: no {' and no '.join(missing)} database, so OONI would get no "
            f"reports (it drops AS0/ZZ): run `tt-server geo update` (into "
            f"{geo_dir(config)}), or set geoip-country-db and geoip-asn-db, or accept it "
            "with --ooni-relay-without-geo")


def create_app(config: Config | Mapping[str, Any] | None = None) -> Flask:
    """Build the Flask app. ``config``: a Config, a mapping of option names, or None (env/file)."""
    from flask import Flask, request
    from flask.json.provider import DefaultJSONProvider

    from .. import metrics
    from ..config import Config, load_config
    from ..housekeeping import Housekeeping, run_directory
    from ..logs import setup_logging
    from ..pipeline.geo import open_geo
    from ..pipeline.outline import SCHEMA as OUTLINE_SCHEMA
    from ..protocol.schema import prepare as prepare_schema
    from ..relay import build_relay
    from ..relay.aggregates import build_aggregate_relay
    from ..store import open_store
    from .dashboard import bp as aggregates_bp
    from .errors import register as register_errors
    from .limits import build_limits
    from .limits import init_app as init_limits
    from .proxy import ProxyHeaders
    from .views import bp

    if config is None:
        config = load_config()
    elif isinstance(config, Mapping):
        config = Config.from_mapping(config)
    setup_logging(config.debug)

    store = open_store(config.database_url)  # first: a bad store is one line, no geo warning
    limits = build_limits(config)  # in the master: its client-hash key is every worker's
    run_dir = run_directory()  # the leader lock, the metrics' files: made before the fork
    metrics.setup(config.metrics_listen, os.path.join(run_dir, "metrics"))
    geo = open_geo(*geo_paths(config))
    try:
        check_relay_geo(config, geo)
    except Exception:
        geo.close()
        store.close()
        raise
    prepare_schema()
    prepare_schema(OUTLINE_SCHEMA)
    relay = build_relay(config, store)
    metrics.set_destinations(relay.destinations())

    class CollectorJSON(DefaultJSONProvider):
        sort_keys = False
        ensure_ascii = False

    class CollectorApp(Flask):
        json_provider_class = CollectorJSON

        def ensure_sync(self, func: Callable[..., Any]) -> Callable[..., Any]:
            """No view or hook here is async: skip Flask's coroutine check of each one on
            every request."""
            return func

    app = CollectorApp(__name__)
    # One byte of slack: the view reads limit + 1 bytes to tell "exactly the limit" from "over".
    app.config["MAX_CONTENT_LENGTH"] = config.max_report_size + 1
    app.extensions["tunnel_telemetry"] = Services(
        config, geo, store, relay, limits=limits,
        housekeeping=Housekeeping(config, store, geo, run_dir),
        report_id_key=(config.report_id_key or "").encode() or os.urandom(32),
        commit=git_commit(), aggregate_relay=build_aggregate_relay(config, store))
    app.register_blueprint(bp)
    app.register_blueprint(aggregates_bp)

    @app.before_request
    def _name_route() -> None:
        # Logs name the route, never the path a client typed (server.ScrubbingLogger); first,
        # so that requests the limits refuse are named too.
        req = cast("LocalProxy[Request]", request)._get_current_object()
        req.environ[ROUTE_KEY] = req.url_rule.rule if req.url_rule is not None else None

    metrics.init_app(app)  # before the limits: a refused request is timed too
    init_limits(app, limits)

    @app.before_request
    def _start_background() -> None:
        app.extensions["tunnel_telemetry"].start()

    register_errors(app)
    # Flask's documented way to wrap the WSGI app (its type says method: hence the ignore).
    app.wsgi_app = ProxyHeaders(  # type: ignore[method-assign]
        app.wsgi_app, config.proxy_hops, config.proxy_header)
    return app
