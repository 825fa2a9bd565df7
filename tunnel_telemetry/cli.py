"""tt-server: serve the collector; every option is a flag, an env variable and a YAML key."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from . import __version__
from .config import DEFAULT_CONFIG_FILE, OPTIONS, ConfigError, Option, load_config

EXIT_CONFIG = 2
EXIT_RUNTIME = 1


def _flag(opt: Option) -> Callable:
    env = ", ".join(opt.envvars)
    default = "" if opt.default in (None, ()) else f" [default: {opt.default}]"
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
                             "exists] [env: CONFIG]")(func)


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
    from . import create_app
    from .geo import GeoError
    from .store import StoreError

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
    if ctx.invoked_subcommand is not None:
        return
    from .autotls import AutoTLSError, TLSConfigError
    from .server import serve

    app = build_app(config)
    try:
        serve(config, app)
    except TLSConfigError as exc:
        fail(str(exc))
    except AutoTLSError as exc:
        click.echo(f"tt-server: error: autotls: {exc}", err=True)
        sys.exit(EXIT_RUNTIME)


@main.command()
@click.option("--force", is_flag=True, help="Renew even when the certificate is not due.")
@click.pass_obj
def renew(config: Any, force: bool) -> None:
    """Get or renew the autotls certificate now (the running server picks it up).

    Uses the same options as the server (cache dir, ACME directory, HTTP-01 port); safe to
    run while tt-server runs: issuance is serialised through a lock in autotls-cache-dir.
    """
    from .autotls import AutoTLS, AutoTLSError
    from .logs import setup_logging

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


if __name__ == "__main__":
    main()
