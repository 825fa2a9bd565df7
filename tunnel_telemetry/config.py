"""Server configuration: one option table read from flags, environment and a YAML file.

Precedence is flag > environment > file > default (SPEC). Every option is validated at
start-up so a bad value fails fast with one clear line.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, dataclass_transform
from urllib.parse import urlsplit

import yaml

from .durations import format_duration, parse_duration
from .pipeline.scrub import secret_key

DEFAULT_CONFIG_FILE = "/etc/tunneltelemetry/config.yaml"
ENV_PREFIX = "TT_"
CONFIG_ENV = "TT_CONFIG"  # the config file's path (no bare CONFIG: too common a name)
LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
LETS_ENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"


class ConfigError(Exception):
    """A bad option; the message is one line naming the option."""


def parse_bool(value: Any) -> bool:
    """Parse true/false/yes/no/on/off/1/0."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def parse_int(value: Any) -> int:
    """Parse a whole number (no booleans, no fractions)."""
    if isinstance(value, bool):
        raise ValueError("expected a whole number")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if not re.fullmatch(r"-?\d+", text):
        raise ValueError(f"expected a whole number, got {value!r}")
    return int(text)


def parse_list(value: Any) -> tuple[str, ...]:
    """Parse a list from a YAML list, a repeated flag or a comma-separated string."""
    if value is None:
        return ()
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, list | tuple):
        items = [str(v) for v in value]
    else:
        raise ValueError(f"expected a list, got {value!r}")
    return tuple(item.strip() for item in items if item.strip())


def parse_str(value: Any) -> str | None:
    """Parse an optional string; empty means unset."""
    if value is None:
        return None
    if isinstance(value, dict | list):
        raise ValueError("expected a string")
    text = str(value).strip()
    return text or None


PARSERS: dict[str, Callable[[Any], Any]] = {
    "str": parse_str,
    "bool": parse_bool,
    "int": parse_int,
    "duration": parse_duration,
    "list": parse_list,
}


@dataclass(frozen=True)
class Option:
    """One configuration option: flag --name, env NAME, YAML key name."""

    name: str
    type: str
    default: Any
    help: str
    env: tuple[str, ...] = ()
    secret: bool = False

    @property
    def attr(self) -> str:
        return self.name.replace("-", "_")

    @property
    def envvars(self) -> tuple[str, ...]:
        """Environment names, first wins: TT_NAME, then the bare NAME of the Go proof of
        concept (AUTOTLS, HOSTNAME, ...), then any extra (DATABASE_URL)."""
        bare = self.name.upper().replace("-", "_")
        return (f"{ENV_PREFIX}{bare}", bare, *self.env)

    @property
    def shown_default(self) -> str | None:
        """The default as it is written in a config file (7d, 5s), for --help and docs."""
        if self.default in (None, ()):
            return None
        if self.type == "duration":
            return format_duration(self.default)
        if self.type == "bool":
            return "true" if self.default else "false"
        return str(self.default)


OPTIONS: tuple[Option, ...] = (
    Option("listen", "str", None,
           "Address to listen on, HOST:PORT or :PORT (default :8080, :443 with autotls; "
           "$PORT sets the port when unset)."),
    Option("collector-id", "str", None, "Identifier added to every report this collector stores."),
    Option("allow-public-endpoint", "bool", False,
           "Keep the endpoint address in stored and relayed reports."),
    Option("scrub-allow-config-keys", "list", (),
           "More config keys to keep (besides the built-in allow-list of protocol settings, "
           "docs/privacy.md); their values are still checked (repeatable; comma-separated)."),
    Option("geoip-country-db", "str", None,
           "MaxMind-format country database (GeoLite2, DB-IP Lite or IPinfo Lite)."),
    Option("geoip-asn-db", "str", None,
           "MaxMind-format ASN database (GeoLite2, DB-IP Lite or IPinfo Lite)."),
    Option("geo-dir", "str", None,
           "Where `tt-server geo update` puts country.mmdb and asn.mmdb, read from there "
           "when geoip-country-db / geoip-asn-db are unset (default: geo/ beside the SQLite "
           "store, else tt-data/geo)."),
    Option("geo-provider", "str", "dbip",
           "Where `geo update` gets them: dbip (DB-IP Lite, no account), maxmind (GeoLite2: "
           "maxmind-account-id and maxmind-license-key) or ipinfo (IPinfo Lite: ipinfo-token)."),
    Option("geo-download-url", "str", None,
           "Base URL of a mirror of the provider's download service, same paths (default: the "
           "provider's own)."),
    Option("geo-update-interval", "duration", 0.0,
           "Update the geo databases from the running collector this often, e.g. 7d (the "
           "master runs `geo update` and reloads; 0: off)."),
    Option("geo-stale-after", "duration", 45 * 86400.0,
           "/healthz marks a geo database built longer ago than this \"stale\"."),
    Option("ooni-relay-without-geo", "bool", False,
           "Start with ooni-relay and no country or ASN database (OONI then gets only the "
           "reports that carry the client's network)."),
    Option("maxmind-account-id", "str", None, "MaxMind account id, for geo-provider maxmind."),
    Option("maxmind-license-key", "str", None,
           "MaxMind licence key, for geo-provider maxmind.", secret=True),
    Option("ipinfo-token", "str", None, "IPinfo access token, for geo-provider ipinfo.",
           secret=True),
    Option("proxy-hops", "int", 0,
           "How many trusted proxies append to the proxy header (0: use the socket peer)."),
    Option("proxy-header", "str", "X-Forwarded-For",
           "Header carrying the client address: X-Forwarded-For, Forwarded, X-Real-IP or any "
           "single-address header such as CF-Connecting-IP."),
    Option("database-url", "str", "sqlite:///tt-data/reports.db",
           "Where reports and the relay queue live: sqlite:///relative, sqlite:////absolute or "
           "postgresql://user:password@host/db (also postgres://; docs/postgres.md).",
           secret=True),
    Option("ooni-relay", "bool", False, "Relay reports to OONI's collector."),
    Option("ooni-api", "str", "https://api.ooni.io", "OONI collector base URL."),
    Option("relay-url", "list", (), "Base URL of a secondary tunnel-telemetry collector "
           "(repeatable; comma-separated in the environment)."),
    Option("relay-token", "str", None, "Bearer token sent with relayed batches.", secret=True),
    Option("relay-tokens", "list", (),
           "Tokens accepted on POST /relay (repeatable; none: /relay is closed).", secret=True),
    Option("report-id-key", "str", None,
           "Secret that derives the uuid of a report sent without one (outline-sdk's "
           "test-connectivity), so a retry is stored once; the same on every collector "
           "sharing a database (default: random at each start).", secret=True),
    Option("relay-timeout", "duration", 5.0,
           "How long POST /report waits for the relay before answering 'pending' (the attempt "
           "goes on in the background; 0: never wait)."),
    Option("relay-attempt-timeout", "duration", 30.0,
           "Most time one delivery attempt to a secondary collector may take."),
    Option("relay-max-age", "duration", 7 * 86400.0,
           "Stop retrying a report this long after it was stored (marked expired)."),
    Option("relay-retry-min", "duration", 30.0,
           "First retry delay; it doubles with every attempt, with jitter."),
    Option("relay-retry-max", "duration", 6 * 3600.0, "Longest retry delay."),
    Option("relay-confirm-delay", "duration", 6 * 3600.0,
           "How long a report that may have arrived (the destination took longer than "
           "relay-attempt-timeout to answer, or OONI answered {}: kept in its fallback store) "
           "waits before it is confirmed through OONI's measurements API or sent again."),
    Option("relay-interval", "duration", 10.0,
           "How often each worker's retry loop looks for reports due for a retry."),
    Option("relay-batch", "int", 50, "Reports per batch sent to a secondary collector (1-100)."),
    Option("relay-concurrency", "int", 32,
           "Reports each worker sends to one destination at once: first attempts of new "
           "reports, and the retry loop's OONI submissions (1-256)."),
    Option("autotls", "bool", False, "Obtain and renew TLS certificates automatically (ACME)."),
    Option("hostname", "str", None, "Host name to get the autotls certificate for."),
    Option("autotls-cache-dir", "str", "/var/www/.cache",
           "Directory caching the ACME account key and certificates."),
    Option("acme-directory", "str", LETS_ENCRYPT,
           f"ACME directory URL (Let's Encrypt staging: {LETS_ENCRYPT_STAGING})."),
    Option("acme-ca-bundle", "str", None,
           "CA file trusted for the ACME directory's HTTPS (private ACME servers, pebble)."),
    Option("acme-email", "str", None, "Contact e-mail for the ACME account (optional)."),
    Option("acme-http-port", "int", 80,
           "Port of the short-lived HTTP-01 challenge listener (on the listen host); the "
           "CA connects to port 80, so change it only behind a port forward or for tests."),
    Option("renew-before-days", "int", 30,
           "Renew the autotls certificate when fewer than this many days remain (a third "
           "of its lifetime for certificates shorter than that)."),
    Option("autotls-check-interval", "duration", 12 * 3600.0,
           "How often the server re-checks its certificate (e.g. 12h); failed renewals are "
           "retried sooner, with back-off."),
    Option("certfile", "str", None, "Serve HTTPS with this certificate chain (PEM)."),
    Option("keyfile", "str", None, "Private key (PEM) for --certfile."),
    Option("max-report-age", "duration", 7 * 86400.0,
           "Reject reports whose time is older than this (e.g. 7d)."),
    Option("max-clock-skew", "duration", 300.0,
           "Reject reports whose time is further than this in the future (e.g. 5m)."),
    Option("max-report-size", "int", 64 * 1024, "Largest accepted report body, in bytes."),
    Option("rate-limit", "int", 120,
           "POST requests a minute per client address (IPv6: per /64); more get 429 with "
           "Retry-After (0: off)."),
    Option("rate-limit-burst", "int", 60,
           "POST requests a client may send at once before rate-limit applies."),
    Option("rate-limit-storage", "str", "memory://",
           "Where rate-limit counts live: memory:// (each worker process counts alone: a "
           "client gets up to workers x rate-limit), or redis://HOST:PORT[/DB], "
           "rediss://, redis+unix://, memcached://HOST:PORT (one count for every worker and "
           "instance using it).", secret=True),
    Option("rate-limit-key", "str", None,
           "Secret keying the hash that names a client in rate-limit-storage (16-512 "
           "characters); give instances sharing a storage the same one (default: random at "
           "each start, so each instance counts a client alone).", secret=True),
    Option("max-in-flight", "int", 256,
           "POST requests in progress at once in one worker process (waits on the relay and "
           "the store included); more get 503 with Retry-After (0: off)."),
    Option("max-in-flight-per-client", "int", 2,
           "Request bodies one client address may be sending to one worker process at once "
           "(a slow upload holds a connection); more get 429 (0: off)."),
    Option("header-timeout", "duration", 10.0,
           "Time a client has to send a request's line and headers, from the connection's "
           "start (TLS handshake included) or the previous answer; then the connection is "
           "closed."),
    Option("request-timeout", "duration", 30.0,
           "Time a client has to send a request's body once its head arrived (slow clients "
           "are cut off with 408)."),
    Option("min-upload-rate", "int", 1024,
           "Bytes a second a request body must arrive at, on average after its first 2 s; "
           "slower ones are cut off with 408 (0: off)."),
    Option("max-connections-per-client", "int", 8,
           "Open connections one client address (IPv6: per /64) may hold in each worker "
           "process; more are answered 429 and closed (0: off). Only with proxy-hops 0."),
    Option("max-connections-per-network", "int", 32,
           "Open connections the clients of one network (IPv4 /24, IPv6 /48) may hold "
           "together in each worker process; more are answered 429 and closed (0: off). "
           "Only with proxy-hops 0."),
    Option("workers", "int", None, "Gunicorn worker processes (default: CPU count)."),
    Option("worker-connections", "int", 1000,
           "Connections one worker serves at once (gevent worker: a greenlet each); more "
           "wait to be accepted."),
    Option("access-log", "bool", True,
           "Log one line per request (no addresses); costs ~7% CPU per report at high rates."),
    Option("pidfile", "str", None,
           "Write the master's process id to this file (for `kill -HUP` and `tt-server geo "
           "update --reload-pid FILE`); removed when it stops."),
    Option("debug", "bool", False, "Debug logging."),
    Option("aggregate-k", "int", 10,
           "Fewest reports a published aggregate cell may count; smaller cells are folded "
           "into coarser ones or suppressed (docs/aggregates.md)."),
    Option("relay-aggregates-url", "str", None,
           "Base URL of a secondary collector to send each closed day's aggregates to (POST "
           "/aggregates with relay-token; needs collector-id; docs/aggregates.md)."),
    Option("dashboard-token", "str", None,
           "Operator token for /dashboard (HTTP Basic password or Bearer token; none: the "
           "dashboard is off).", secret=True),
    Option("metrics-listen", "str", None,
           "Serve Prometheus metrics on this HOST:PORT (e.g. 127.0.0.1:9100), apart from the "
           "public listen address; unset: no metrics (docs/operations.md)."),
    Option("retention", "duration", 180 * 86400.0,
           "Delete stored reports received longer ago than this (e.g. 180d), except those "
           "still waiting to be relayed (0: keep forever)."),
    Option("purge-interval", "duration", 3600.0,
           "How often the retention purge runs (one process of the collector does it)."),
)

OPTION_BY_NAME = {opt.name: opt for opt in OPTIONS}
OPTION_BY_ATTR = {opt.attr: opt for opt in OPTIONS}


# The attribute types each option type may declare (Config's annotations, checked at import).
_DECLARED = {"bool": ("bool",), "int": ("int", "int | None"), "duration": ("float",),
             "list": ("tuple[str, ...]",), "str": ("str", "str | None")}
C = TypeVar("C")


@dataclass_transform(frozen_default=True)
def _option_fields(cls: type[C]) -> type[C]:
    """A frozen dataclass whose fields are the option table's, in order, with its defaults."""
    declared = dict(cls.__annotations__)
    if list(declared) != [opt.attr for opt in OPTIONS]:
        raise TypeError("Config: its fields must be OPTIONS' attributes, in order")
    for opt in OPTIONS:
        if declared[opt.attr] not in _DECLARED[opt.type]:
            raise TypeError(f"Config.{opt.attr}: a {opt.type} option, not {declared[opt.attr]}")
        setattr(cls, opt.attr, opt.default)
    return dataclass(frozen=True)(cls)


@_option_fields
class Config:
    """Validated server configuration; attributes are option names in snake_case."""

    listen: str  # load_config sets it (:8080, :443 or :$PORT)
    collector_id: str | None
    allow_public_endpoint: bool
    scrub_allow_config_keys: tuple[str, ...]
    geoip_country_db: str | None
    geoip_asn_db: str | None
    geo_dir: str | None
    geo_provider: str
    geo_download_url: str | None
    geo_update_interval: float
    geo_stale_after: float
    ooni_relay_without_geo: bool
    maxmind_account_id: str | None
    maxmind_license_key: str | None
    ipinfo_token: str | None
    proxy_hops: int
    proxy_header: str
    database_url: str
    ooni_relay: bool
    ooni_api: str
    relay_url: tuple[str, ...]
    relay_token: str | None
    relay_tokens: tuple[str, ...]
    report_id_key: str | None
    relay_timeout: float
    relay_attempt_timeout: float
    relay_max_age: float
    relay_retry_min: float
    relay_retry_max: float
    relay_confirm_delay: float
    relay_interval: float
    relay_batch: int
    relay_concurrency: int
    autotls: bool
    hostname: str | None
    autotls_cache_dir: str
    acme_directory: str
    acme_ca_bundle: str | None
    acme_email: str | None
    acme_http_port: int
    renew_before_days: int
    autotls_check_interval: float
    certfile: str | None
    keyfile: str | None
    max_report_age: float
    max_clock_skew: float
    max_report_size: int
    rate_limit: int
    rate_limit_burst: int
    rate_limit_storage: str
    rate_limit_key: str | None
    max_in_flight: int
    max_in_flight_per_client: int
    header_timeout: float
    request_timeout: float
    min_upload_rate: int
    max_connections_per_client: int
    max_connections_per_network: int
    workers: int | None
    worker_connections: int
    access_log: bool
    pidfile: str | None
    debug: bool
    aggregate_k: int
    relay_aggregates_url: str | None
    dashboard_token: str | None
    metrics_listen: str | None
    retention: float
    purge_interval: float

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> Config:
        """Load from option names (dashes or underscores) only: no environment, no file."""
        return load_config(flags=mapping, env={})

    def replace(self, **changes: Any) -> Config:
        """A copy with some options changed (not re-validated)."""
        return dataclasses.replace(self, **changes)


# Options that must not be empty: a string with a default (an empty value would unset it).
REQUIRED = tuple(opt for opt in OPTIONS if opt.type == "str" and opt.default is not None)


def read_config_file(path: str) -> dict[str, Any]:
    """Read a YAML config file; unknown keys are an error."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config: {path}{where}: not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path}: expected a mapping of option: value")
    out = {}
    for key, value in data.items():
        name = str(key).replace("_", "-").lower()
        if name not in OPTION_BY_NAME:
            raise ConfigError(f"config: {path}: unknown option {key!r}")
        out[name] = value
    return out


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for opt in OPTIONS:
        for var in opt.envvars:
            if var in env and env[var] != "":
                out[opt.name] = env[var]
                break
    return out


def load_config(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    path: str | None = None,
) -> Config:
    """Build a validated Config from flags > environment > YAML file > defaults.

    ``flags`` maps option names (dashes or underscores) to values given explicitly. ``env``
    defaults to ``os.environ``; ``path`` to $TT_CONFIG or the default file when it exists.
    """
    env = os.environ if env is None else env
    if path is None:
        path = env.get(CONFIG_ENV) or None
        if path is None and os.path.exists(DEFAULT_CONFIG_FILE):
            path = DEFAULT_CONFIG_FILE
    raw: dict[str, Any] = {}
    if path:
        raw.update(read_config_file(path))
    raw.update(_from_env(env))
    for key, value in (flags or {}).items():
        name = key.replace("_", "-")
        if name not in OPTION_BY_NAME:
            raise ConfigError(f"unknown option {key!r}")
        if value is not None:
            raw[name] = value

    values: dict[str, Any] = {}
    for opt in OPTIONS:
        if opt.name not in raw:
            continue
        try:
            values[opt.attr] = PARSERS[opt.type](raw[opt.name])
        except ValueError as exc:
            raise ConfigError(f"{opt.name}: {exc}") from None
    config = Config(**values)
    return _check(config, env)


def _check(config: Config, env: Mapping[str, str]) -> Config:
    """Cross-option checks and derived defaults."""
    for opt in REQUIRED:
        if getattr(config, opt.attr) is None:
            raise ConfigError(f"{opt.name}: must not be empty")
    if config.proxy_hops < 0 or config.proxy_hops > 16:
        raise ConfigError("proxy-hops: must be between 0 and 16")
    if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", config.proxy_header or ""):
        raise ConfigError("proxy-header: must be an HTTP header name")
    if config.workers is not None and not 1 <= config.workers <= 256:
        raise ConfigError("workers: must be between 1 and 256")
    if not 1 <= config.worker_connections <= 100_000:
        raise ConfigError("worker-connections: must be between 1 and 100000")
    if not 1024 <= config.max_report_size <= 16 * 1024 * 1024:
        raise ConfigError("max-report-size: must be between 1024 and 16777216 bytes")
    for name in ("rate-limit", "max-in-flight", "max-in-flight-per-client", "min-upload-rate",
                 "max-connections-per-client", "max-connections-per-network"):
        if not 0 <= getattr(config, name.replace("-", "_")) <= 1_000_000:
            raise ConfigError(f"{name}: must be between 0 (off) and 1000000")
    if not 1 <= config.rate_limit_burst <= 1_000_000:
        raise ConfigError("rate-limit-burst: must be between 1 and 1000000")
    check_rate_limit_storage(config.rate_limit_storage)
    if config.rate_limit_key is not None and not 16 <= len(config.rate_limit_key) <= 512:
        raise ConfigError("rate-limit-key: must be 16-512 characters")
    if not 0.1 <= config.header_timeout <= 3600:
        raise ConfigError("header-timeout: must be between 100ms and 1h")
    if not config.header_timeout <= config.request_timeout <= 3600:
        raise ConfigError("request-timeout: must be at least header-timeout and at most 1h")
    if config.collector_id is not None and not re.fullmatch(r"[\w.:-]{1,128}", config.collector_id):
        raise ConfigError("collector-id: use 1-128 letters, digits, '.', ':', '_' or '-'")
    given = config.scrub_allow_config_keys
    config = dataclasses.replace(config, scrub_allow_config_keys=tuple(
        key.lower().replace("_", "-") for key in given))
    for spelled, key in zip(given, config.scrub_allow_config_keys, strict=True):
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{0,63}", key):
            raise ConfigError(f"scrub-allow-config-keys: {key!r}: use letters, digits, '.', "
                              "'-' and '_' (keys are compared in lower case, '_' as '-')")
        if secret_key(spelled) or secret_key(key):  # as given: serverIp is server + Ip
            raise ConfigError(f"scrub-allow-config-keys: {key!r} names a secret, an address "
                              "or an identifier: it is never kept")
    if config.autotls:  # HOSTNAME is often set by the environment (containers): only check it here
        if not config.hostname:
            raise ConfigError("autotls: --hostname is required with --autotls")
        try:
            hostname = check_hostname(config.hostname)
        except ValueError as exc:
            raise ConfigError(f"hostname: {exc}") from None
        config = dataclasses.replace(config, hostname=hostname)
        if "." not in hostname and config.acme_directory in (LETS_ENCRYPT, LETS_ENCRYPT_STAGING):
            raise ConfigError(f"hostname: {hostname!r} is not a fully qualified domain "
                              "name (containers set HOSTNAME to their id: pass --hostname)")
    if bool(config.certfile) != bool(config.keyfile):
        raise ConfigError("certfile: --certfile and --keyfile go together")
    if config.autotls and config.certfile:
        raise ConfigError("certfile: use either --autotls or --certfile/--keyfile, not both")
    for name in ("certfile", "keyfile") + (("acme-ca-bundle",) if config.autotls else ()):
        path = getattr(config, OPTION_BY_NAME[name].attr)
        if path and not os.path.isfile(path):
            raise ConfigError(f"{name}: no such file: {path}")
    if config.autotls:
        if not re.match(r"^https?://[^\s/]+", config.acme_directory or ""):
            raise ConfigError(f"acme-directory: not an http(s) URL: {config.acme_directory!r}")
        if not 1 <= config.acme_http_port <= 65535:
            raise ConfigError("acme-http-port: must be between 1 and 65535")
        if not 1 <= config.renew_before_days <= 3650:
            raise ConfigError("renew-before-days: must be between 1 and 3650")
        if config.autotls_check_interval < 1:
            raise ConfigError("autotls-check-interval: must be at least 1s")
    if config.relay_aggregates_url and not (config.relay_token and config.collector_id):
        raise ConfigError("relay-aggregates-url: needs relay-token (the secondary's "
                          "relay-tokens) and collector-id (it keeps each collector apart)")
    aggregates_url = (config.relay_aggregates_url,) if config.relay_aggregates_url else ()
    for url in (config.ooni_api, *config.relay_url, *aggregates_url):
        if not re.match(r"^https?://[^\s/]+", url):
            raise ConfigError(f"relay: not an http(s) URL: {url!r}")
        if "@" in url.split("/", 3)[2]:
            raise ConfigError("relay: no credentials in URLs (they would show in logs and "
                              "/healthz); use relay-token")
    if config.relay_url and not config.relay_token:
        raise ConfigError("relay-token: required with relay-url (a secondary's /relay "
                          "accepts only its relay-tokens)")
    for token in (config.relay_token, *config.relay_tokens):
        if token is not None and not re.fullmatch(r"[\x21-\x7e]{16,512}", token):
            raise ConfigError("relay-token: tokens must be 16-512 printable characters, "
                              "no spaces")
    if not 2 <= config.aggregate_k <= 1_000_000:
        raise ConfigError("aggregate-k: must be between 2 and 1000000")
    if config.dashboard_token is not None and not re.fullmatch(r"[\x21-\x7e]{16,512}",
                                                               config.dashboard_token):
        raise ConfigError("dashboard-token: must be 16-512 printable characters, no spaces")
    if config.report_id_key is not None and not re.fullmatch(r"[\x21-\x7e]{16,512}",
                                                             config.report_id_key):
        raise ConfigError("report-id-key: must be 16-512 printable characters, no spaces")
    if not 0 < config.relay_attempt_timeout <= 600:
        raise ConfigError("relay-attempt-timeout: must be more than 0 and at most 10m")
    if config.relay_timeout > 600:
        raise ConfigError("relay-timeout: must be at most 10m")
    if not 0.05 <= config.relay_interval <= 86400:
        raise ConfigError("relay-interval: must be between 50ms and 1d")
    if not 0 < config.relay_retry_min <= config.relay_retry_max:
        raise ConfigError("relay-retry-min: must be more than 0 and at most relay-retry-max")
    if not 0 < config.relay_confirm_delay <= 30 * 86400:
        raise ConfigError("relay-confirm-delay: must be more than 0 and at most 30d")
    if config.relay_max_age <= 0:
        raise ConfigError("relay-max-age: must be more than 0")
    if not 1 <= config.relay_batch <= 100:
        raise ConfigError("relay-batch: must be between 1 and 100")
    if not 1 <= config.relay_concurrency <= 256:
        raise ConfigError("relay-concurrency: must be between 1 and 256")
    if not 0.1 <= config.purge_interval <= 7 * 86400:
        raise ConfigError("purge-interval: must be between 100ms and 7d")
    if config.metrics_listen is not None:
        host, port = split_listen(config.metrics_listen, "metrics-listen")
        config = dataclasses.replace(config, metrics_listen=f"{host}:{port}" if ":" not in host
                                     else f"[{host}]:{port}")
    if config.geo_provider not in ("dbip", "maxmind", "ipinfo"):
        raise ConfigError(f"geo-provider: expected dbip, maxmind or ipinfo, got "
                          f"{config.geo_provider!r}")
    if config.geo_download_url is not None:
        if not re.match(r"^https?://[^\s/]+", config.geo_download_url):
            raise ConfigError(f"geo-download-url: not an http(s) URL: "
                              f"{config.geo_download_url!r}")
        if "@" in config.geo_download_url.split("/", 3)[2]:
            raise ConfigError("geo-download-url: no credentials in the URL (use "
                              "maxmind-license-key or ipinfo-token)")
    if config.geo_update_interval and config.geo_update_interval < 1:
        raise ConfigError("geo-update-interval: must be 0 (off) or at least 1s")
    if config.geo_stale_after < 86400:
        raise ConfigError("geo-stale-after: must be at least 1d")
    listen = config.listen
    if listen is None:
        if config.autotls:
            listen = ":443"
        elif env.get("PORT"):
            listen = f":{env['PORT']}"
        else:
            listen = ":8080"
    host, port = split_listen(listen)
    if config.metrics_listen is not None and split_listen(config.metrics_listen)[1] == port:
        raise ConfigError("metrics-listen: must not be the public listen port")
    return dataclasses.replace(config, listen=f"{host}:{port}" if ":" not in host
                               else f"[{host}]:{port}")


_HOSTNAME = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)(?:\.(?!-)[a-z0-9-]{1,63}(?<!-))*")


# Storages of the `limits` library that keep a sliding window counter (web/limits.py).
RATE_LIMIT_SCHEMES = ("memory", "redis", "rediss", "redis+unix", "redis+sentinel",
                      "redis+cluster", "memcached")


def check_rate_limit_storage(url: str | None) -> None:
    """A storage URL the rate limiter can use; the message never shows the URL (a password)."""
    expected = "expected memory://, redis://HOST:PORT or memcached://HOST:PORT"
    try:
        parts = urlsplit(url or "")
        port = parts.port
    except (ValueError, TypeError):
        raise ConfigError(f"rate-limit-storage: not a URL ({expected})") from None
    if parts.scheme not in RATE_LIMIT_SCHEMES:
        raise ConfigError(f"rate-limit-storage: unknown scheme {parts.scheme!r} ({expected})")
    if parts.scheme == "redis+unix":
        if not parts.path:
            raise ConfigError("rate-limit-storage: redis+unix:// needs a socket path")
    elif parts.scheme != "memory" and not (parts.hostname or (port is None and parts.path)):
        raise ConfigError(f"rate-limit-storage: {parts.scheme}:// needs a host ({expected})")


def check_hostname(hostname: str) -> str:
    """Lower-case a DNS name; reject what an HTTP-01 (autotls) certificate cannot name."""
    name = hostname.strip().rstrip(".").lower()
    if name.startswith("*."):
        raise ValueError("wildcard names need DNS-01 validation; autotls uses HTTP-01")
    if (len(name) > 253 or not _HOSTNAME.fullmatch(name)
            or re.fullmatch(r"[\d.]+", name)):
        raise ValueError(f"not a DNS host name: {hostname!r}")
    return name


def split_listen(listen: str, option: str = "listen") -> tuple[str, int]:
    """Split HOST:PORT, :PORT or [V6]:PORT; an empty host means all interfaces."""
    match = re.fullmatch(r"(?:\[([0-9A-Fa-f:.]+)\]|([^:\[\]]*)):(\d{1,5})", listen.strip())
    if not match:
        raise ConfigError(f"{option}: expected HOST:PORT or :PORT, got {listen!r}")
    host = match.group(1) or match.group(2) or "0.0.0.0"  # noqa: S104 - a server binds all
    port = int(match.group(3))
    if not 0 < port < 65536:
        raise ConfigError(f"{option}: port out of range in {listen!r}")
    return host, port


def describe(config: Config) -> dict[str, Any]:
    """The configuration with secrets masked, for debug logs."""
    out = {}
    for opt in OPTIONS:
        value = getattr(config, opt.attr)
        out[opt.name] = "***" if opt.secret and value else value
    return out
