"""tt-server: serve the collector; every option is a flag, an env variable and a YAML key."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from . import __version__
from .config import DEFAULT_CONFIG_FILE, OPTIONS, ConfigError, Option, load_config

EXIT_CONFIG = 2
EXIT_RUNTIME = 1


def _flag(opt: Option) -> Callable:
    env = ", ".join(opt.envvars)
    shown = opt.shown_default
    default = "" if shown is None else f" [default: {shown}]"
    help_text = f"{opt.help}{default} [env: {env}]"
    if opt.type == "bool":
        return click.option(f"--{opt.name}/--no-{opt.name}", opt.attr, default=None,
                            help=help_text)
    if opt.type == "list":
        return click.option(f"--{opt.name}", opt.attr, multiple=True, metavar="VALUE",
                            help=help_text)
    metavar = {"int": "N", "duration": "DURATION"}.get(opt.type, "TEXT")
    return click.option(f"--{opt.name}", opt.attr, default=None, metavar=metavar, help=help_text)


def server_options(func: Callable) -> Callable:
    """Decorate a command with --config and one flag per option of the table."""
    for opt in reversed(OPTIONS):
        func = _flag(opt)(func)
    return click.option("--config", "config_path", type=click.Path(dir_okay=False),
                        default=None,
                        help=f"YAML config file [default: {DEFAULT_CONFIG_FILE} when it "
                             "exists] [env: TT_CONFIG]")(func)


def fail(message: str) -> None:
    """Exit 2 with one clear line (bad configuration)."""
    click.echo(f"tt-server: error: {message}", err=True)
    sys.exit(EXIT_CONFIG)


def config_from_flags(config_path: str | None, flags: dict[str, Any]) -> Any:
    """Load the configuration with the flags that were given on the command line."""
    given = {k: v for k, v in flags.items() if v is not None and v != ()}
    try:
        return load_config(flags=given, path=config_path)
    except ConfigError as exc:
        fail(str(exc))


def build_app(config: Any) -> Any:
    """create_app, turning start-up errors (store, geo) into exit 2."""
    from .pipeline.geo import GeoError
    from .store import StoreError
    from .web import create_app

    try:
        return create_app(config)
    except (ConfigError, StoreError, GeoError) as exc:
        fail(str(exc))


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"],
                                                            "max_content_width": 100})
@server_options
@click.version_option(__version__, prog_name="tt-server")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, **flags: Any) -> None:
    """Open Tunnel Telemetry collector.

    Serves POST /report with gunicorn. Precedence: flag > environment > config file > default.
    """
    config = config_from_flags(config_path, flags)
    ctx.obj = config
    ctx.meta["tt_server_flags"] = (config_path, flags)
    if ctx.invoked_subcommand is not None:
        return
    from .server import prepare_tls, serve

    if config.autotls or config.certfile:
        from .logs import setup_logging
        from .tls.autotls import AutoTLSError, TLSConfigError

        setup_logging(config.debug)
        try:  # before the app: a bad certificate pair is a config error (exit 2, one line)
            prepare_tls(config)
        except TLSConfigError as exc:
            fail(str(exc))
        except AutoTLSError as exc:
            click.echo(f"tt-server: error: autotls: {exc}", err=True)
            sys.exit(EXIT_RUNTIME)
    app = build_app(config)
    serve(config, app, tls_prepared=True)


@main.command()
@click.option("--force", is_flag=True, help="Renew even when the certificate is not due.")
@click.pass_obj
def renew(config: Any, force: bool) -> None:
    """Get or renew the autotls certificate now (the running server picks it up).

    Uses the same options as the server (cache dir, ACME directory, HTTP-01 port); safe to
    run while tt-server runs: issuance is serialised through a lock in autotls-cache-dir.
    """
    from .logs import setup_logging
    from .tls.autotls import AutoTLS, AutoTLSError

    if not config.autotls:
        fail("renew: autotls is off (use --autotls --hostname NAME)")
    setup_logging(config.debug)
    tls = AutoTLS.from_config(config)
    before = tls.current()
    try:
        cert = tls.renew(force=force)
    except AutoTLSError as exc:
        click.echo(f"tt-server: error: autotls: {exc}", err=True)
        sys.exit(EXIT_RUNTIME)
    if before is not None and cert.sha256 == before.sha256:
        due_at = cert.not_after - cert.renew_window(config.renew_before_days)
        click.echo(f"not due: {cert.describe()}; renewal from {due_at:%Y-%m-%d %H:%M} UTC "
                   f"(--force to renew now)")
    else:
        click.echo(f"renewed: {cert.describe()} ({cert.path})")


@main.command("relay")
@server_options
@click.option("--once", is_flag=True,
              help="Try every pending report now, whatever its backoff, then exit.")
@click.option("--retry-failed", is_flag=True,
              help="First put permanently failed reports back in the queue (after fixing the "
                   "configuration that made them fail).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def relay_command(ctx: click.Context, once: bool, retry_failed: bool, as_json: bool,
                  config_path: str | None, **flags: Any) -> None:
    """Relay pending reports now (the server retries by itself; this pushes the backlog).

    Uses the same configuration sources as the server; options may be given before or after
    'relay'. Exit status: 0 when nothing is left pending, 1 when some reports must still be
    retried, 2 on a configuration error.
    """
    import json

    from .relay import build_relay
    from .store import StoreError, open_store

    if not once:
        fail("relay: only --once is supported (the server runs the retry loop itself)")
    group_path, group_flags = ctx.meta.get("tt_server_flags", (None, {}))
    merged = {**{k: v for k, v in group_flags.items() if v is not None and v != ()},
              **{k: v for k, v in flags.items() if v is not None and v != ()}}
    config = config_from_flags(config_path or group_path, merged)
    try:
        store = open_store(config.database_url)
    except StoreError as exc:
        fail(str(exc))
    relay = build_relay(config, store)
    try:
        dests = relay.destinations()
        if retry_failed:
            for dest in dests:
                store.requeue(dest)
        summary = relay.run_once(now_all=True) if dests else {}
        backlog = store.backlog()
    finally:
        relay.close()
        store.close()
    result = {
        dest: {"results": dict(summary.get(dest, {})), **backlog.get(dest, {"pending": 0})}
        for dest in dests
    }
    unconfigured = {d: b for d, b in backlog.items() if d not in dests}
    if as_json:
        click.echo(json.dumps({"destinations": result, "unconfigured": unconfigured}))
    else:
        if not dests:
            click.echo("relay is off: set ooni-relay or relay-url to relay reports")
        for dest, row in result.items():
            done = ", ".join(f"{n} {state}" for state, n in sorted(row["results"].items())
                             if ":" not in state) or "nothing due"
            left = f"{row['pending']} still pending"
            if row["pending"]:
                left += f" (oldest {row['oldest_age_s']:.0f} s)"
            click.echo(f"{dest}: {done}; {left}")
        for dest, row in unconfigured.items():
            click.echo(f"{dest}: {row['pending']} pending, but this destination is no longer "
                       "configured")
    sys.exit(1 if any(row["pending"] for row in result.values()) else 0)


@main.command("aggregate")
@server_options
@click.option("--from", "start", metavar="TIME", help="First period: YYYY-MM-DD or RFC 3339 "
              "(default: 30 days or 48 hours before --to).")
@click.option("--to", "end", metavar="TIME",
              help="End of the last period (default and latest: the current period's start).")
@click.option("--period", type=click.Choice(["hour", "day"]), default="day", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["json", "jsonl", "csv"]), default="jsonl",
              show_default=True, help="json: GET /aggregates' document; jsonl: one line per "
              "period; csv: one row per cell.")
@click.pass_context
def aggregate_command(ctx: click.Context, start: str | None, end: str | None, period: str,
                      fmt: str, config_path: str | None, **flags: Any) -> None:
    """Print the k-anonymous aggregates of the stored reports (docs/aggregates.md).

    The same code and options (aggregate-k, database-url) as GET /aggregates: closed periods
    only. Exit status 2 on a bad option or parameter.
    """
    import json
    import time

    from .aggregate import build, parse_query, to_csv, to_json_lines
    from .errors import ReportError
    from .store import StoreError, open_store

    group_path, group_flags = ctx.meta.get("tt_server_flags", (None, {}))
    merged = {**{k: v for k, v in group_flags.items() if v is not None and v != ()},
              **{k: v for k, v in flags.items() if v is not None and v != ()}}
    config = config_from_flags(config_path or group_path, merged)
    try:
        query = parse_query({"from": start, "to": end, "period": period}, time.time())
    except ReportError as exc:
        fail(f"aggregate: {exc.msg}")
    try:
        store = open_store(config.database_url)
    except StoreError as exc:
        fail(str(exc))
    try:
        document = build(store, query, config.aggregate_k)
    finally:
        store.close()
    if fmt == "json":
        if credits := _geo_attributions(config):
            document["attribution"] = credits  # as GET /aggregates gives it
        click.echo(json.dumps(document))
        return
    _credit(config)
    if fmt == "csv":
        click.echo(to_csv(document), nl=False)
    else:
        for line in to_json_lines(document):
            click.echo(line)


def _command_config(ctx: click.Context, config_path: str | None, flags: dict[str, Any]) -> Any:
    """A subcommand's configuration: the group's options, then its own (given after it)."""
    group_path, group_flags = ctx.meta.get("tt_server_flags", (None, {}))
    merged = {**{k: v for k, v in group_flags.items() if v is not None and v != ()},
              **{k: v for k, v in flags.items() if v is not None and v != ()}}
    return config_from_flags(config_path or group_path, merged)


def _open_store(config: Any) -> Any:
    from .store import StoreError, open_store

    try:
        return open_store(config.database_url)
    except StoreError as exc:
        fail(str(exc))


def _geo_attributions(config: Any) -> list[str]:
    """What the licences of the geo databases the collector reads ask to be credited with,
    for output that carries the ASNs and countries they gave (none without databases). Reads
    each file's metadata only: no private copy, as the server makes to serve from."""
    from .geo_update import GeoUpdateError, attributions, inspect
    from .web import geo_paths

    info = []
    for path in dict.fromkeys(filter(None, geo_paths(config))):  # IPinfo: one file for both
        try:
            info.append({"database_type": inspect(path).database_type})
        except GeoUpdateError:
            continue  # unreadable: the server would refuse it, no credit to give here
    return attributions(info)


def _credit(config: Any) -> None:
    """One line on standard error naming what the output's geo data must be credited with."""
    if credits := _geo_attributions(config):
        click.echo(f"attribution: {'; '.join(credits)}", err=True)


def _parsed(parse: Callable[[str], Any], name: str) -> Callable:
    def convert(ctx: click.Context, param: Any, value: str | None) -> Any:
        if value is None:
            return None
        try:
            return parse(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx, param, name) from None
    return convert


def _when(value: str) -> float:
    from .export import parse_when

    return parse_when(value)


def _asn(value: str) -> str:
    from .export import asn

    return asn(value)


def _cc(value: str) -> str:
    from .export import country

    return country(value)


@main.command("export")
@server_options
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl",
              show_default=True, help="JSON lines (one report a line) or CSV with a header.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, allow_dash=True), default="-",
              help="Write here instead of standard output.")
@click.option("--since", callback=_parsed(_when, "--since"), metavar="WHEN",
              help="Received at or after WHEN: RFC 3339 time, YYYY-MM-DD (UTC) or a "
                   "duration ago (24h, 7d).")
@click.option("--until", callback=_parsed(_when, "--until"), metavar="WHEN",
              help="Received before WHEN (same forms as --since).")
@click.option("--client-cc", callback=_parsed(_cc, "--client-cc"), metavar="CC",
              help="Only clients in this country (two letters; ZZ: unknown).")
@click.option("--client-asn", callback=_parsed(_asn, "--client-asn"), metavar="ASN",
              help="Only clients in this network (AS13335 or 13335; AS0: unknown).")
@click.option("--proto", metavar="PROTO", help="Only this endpoint protocol (ss, https ...).")
@click.option("--endpoint-asn", callback=_parsed(_asn, "--endpoint-asn"), metavar="ASN",
              help="Only endpoints in this network.")
@click.option("--failed/--succeeded", "failed", default=None,
              help="Only failed connections (a failure) / only successful ones [default: both].")
@click.pass_context
def export_command(ctx: click.Context, fmt: str, output: str, since: float | None,
                   until: float | None, client_cc: str | None, client_asn: str | None,
                   proto: str | None, endpoint_asn: str | None, failed: bool | None,
                   config_path: str | None, **flags: Any) -> None:
    """Write the stored reports, oldest first, as JSON lines (default) or CSV.

    Streams: any number of reports in constant memory; the same output from SQLite and
    PostgreSQL. Filters combine (all must match).
    """
    from .export import write
    from .store import ExportFilter

    config = _command_config(ctx, config_path, flags)
    store = _open_store(config)
    filters = ExportFilter(since=since, until=until, client_cc=client_cc, client_asn=client_asn,
                           proto=proto.lower() if proto else None, endpoint_asn=endpoint_asn,
                           failed=failed)
    try:
        with (contextlib.nullcontext(sys.stdout) if output == "-"
              else open(output, "w", encoding="utf-8", newline="")) as out:
            count = write(store.export(filters), out, fmt)
    except BrokenPipeError:  # | head: the reader has all it wanted
        sys.stderr.close()
        sys.exit(0)
    finally:
        store.close()
    if output != "-":
        click.echo(f"{count} reports written to {output}", err=True)
    _credit(config)


@main.command("purge")
@server_options
@click.option("--older-than", "older_than", required=True, metavar="DURATION",
              callback=_parsed(lambda v: _duration(v), "--older-than"),
              help="Delete reports received longer ago than this (e.g. 180d, 12h).")
@click.option("--dry-run", is_flag=True, help="Only count what would be deleted.")
@click.pass_context
def purge_command(ctx: click.Context, older_than: float, dry_run: bool,
                  config_path: str | None, **flags: Any) -> None:
    """Delete old reports now (the server does it by itself, see retention).

    Reports still waiting to be relayed are kept, whatever their age. Safe to run while
    tt-server runs.
    """
    from .housekeeping import purge

    config = _command_config(ctx, config_path, flags)
    store = _open_store(config)
    try:
        count = purge(store, time.time() - older_than, dry_run=dry_run)
    finally:
        store.close()
    click.echo(f"{count} reports {'would be' if dry_run else ''} deleted".replace("  ", " "))


def _duration(value: str) -> float:
    from .durations import parse_duration

    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be more than 0")
    return seconds


@main.group("geo")
def geo_group() -> None:
    """Geo databases (country and ASN): get them and keep them fresh."""


@geo_group.command("update")
@server_options
@click.option("--provider", type=click.Choice(["dbip", "maxmind", "ipinfo"]), default=None,
              help="Override geo-provider for this run.")
@click.option("--reload-pid", metavar="PID|PIDFILE", default=None,
              help="Send this tt-server master SIGHUP when a database was installed, so it "
                   "reopens them without a restart.")
@click.option("--force", is_flag=True,
              help="Install even a database older than the one in place.")
@click.option("--timeout", "timeout", metavar="DURATION", default="30s", show_default=True,
              help="Most time to wait for a connection or for the next bytes of an answer.")
@click.pass_context
def geo_update_command(ctx: click.Context, provider: str | None, reload_pid: str | None,
                       force: bool, timeout: str, config_path: str | None,
                       **flags: Any) -> None:
    """Fetch, check and install the country and ASN databases into geo-dir.

    Uses the same configuration sources as the server (geo-provider, geo-dir, credentials
    from MAXMIND_ACCOUNT_ID / MAXMIND_LICENSE_KEY or IPINFO_TOKEN). Exit status: 0 when the
    databases are installed or up to date, 1 when the update failed (nothing changed), 2 on
    a configuration error.
    """
    from .durations import parse_duration
    from .geo_update import (
        GeoUpdateConfigError,
        GeoUpdateError,
        geo_dir,
        read_pid,
        signal_reload,
        update,
    )

    group_path, group_flags = ctx.meta.get("tt_server_flags", (None, {}))
    merged = {**{k: v for k, v in group_flags.items() if v is not None and v != ()},
              **{k: v for k, v in flags.items() if v is not None and v != ()}}
    config = config_from_flags(config_path or group_path, merged)
    try:
        seconds = parse_duration(timeout)
    except ValueError as exc:
        fail(f"timeout: {exc}")
    if not 0 < seconds <= 600:
        fail("timeout: must be more than 0 and at most 10m")
    try:
        pid = read_pid(reload_pid) if reload_pid else None
    except GeoUpdateError as exc:
        fail(f"geo update: {exc}")
    try:
        result = update(config, provider=provider, timeout=seconds, force=force)
    except GeoUpdateConfigError as exc:
        fail(f"geo update: {exc}")
    except GeoUpdateError as exc:
        click.echo(f"tt-server: error: geo update: {exc}", err=True)
        sys.exit(EXIT_RUNTIME)
    for line in result.lines:
        click.echo(line)
    spec = result.provider
    click.echo(f"data: {spec.title}, {spec.licence}: {spec.attribution}; updated "
               f"{spec.schedule}")
    for option, role in (("geoip-country-db", "country"), ("geoip-asn-db", "asn")):
        if getattr(config, option.replace("-", "_")):
            click.echo(f"note: {option} is set, so the collector reads that file, not the "
                       f"{role} database in {geo_dir(config)}")
    if pid is not None and result.installed:
        try:
            signal_reload(pid)
        except GeoUpdateError as exc:
            click.echo(f"tt-server: error: geo update: {exc}", err=True)
            sys.exit(EXIT_RUNTIME)
        click.echo(f"reload: sent SIGHUP to {pid}")


if __name__ == "__main__":
    main()
