"""``tt-report``: probe endpoints and deliver reports to collectors from the command line.

Exit codes: 0 delivered (or nothing to do), 1 rejected by a collector (400/413/415),
2 usage error or invalid report, 3 not delivered (spooled for ``tt-report flush``).
stdout carries JSON only (the collector's answer, or the report with ``--dry-run``);
progress and errors go to stderr.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from .. import __version__
from . import (
    Client,
    ClientError,
    InvalidReport,
    NotDelivered,
    Receipt,
    ReportRejected,
    RetryPolicy,
    Sampler,
    Spool,
    build_report,
    default_spool_dir,
    failure,
    validate_report,
)

EXIT_DELIVERED = 0
EXIT_REJECTED = 1
EXIT_USAGE = 2
EXIT_NOT_DELIVERED = 3

log = logging.getLogger("tunnel_telemetry")


def _emit(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False))


def _err(message: str) -> None:
    click.echo(f"tt-report: {message}", err=True)


class _StderrHandler(logging.Handler):
    """Log lines to the current stderr (click's test runner swaps it), prefixed."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(f"tt-report: {record.getMessage()}", err=True)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


@contextlib.contextmanager
def _logging_to_stderr(verbose: int, quiet: bool) -> Iterator[None]:
    """Progress lines on stderr for the command's duration; the logger is restored after."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    handler = _StderrHandler()
    saved = (log.level, log.propagate)
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]


def _parse_config(pairs: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint="'--config'")
        out[key] = value
    return out


def _collectors(values: tuple[str, ...]) -> list[str]:
    if values:
        raw = list(values)
    else:
        raw = os.environ.get("TT_COLLECTORS", "").split(",")
    return [c.strip() for item in raw for c in item.split(",") if c.strip()]


def delivery_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by every command that talks to collectors."""
    options = [
        click.option(
            "--collector",
            "collectors",
            multiple=True,
            metavar="URL",
            help="Collector base URL (repeatable; first that takes the report wins). "
            "Default: $TT_COLLECTORS, comma-separated.",
        ),
        click.option(
            "--spool-dir",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Where undelivered reports wait. Default: $TT_SPOOL_DIR, else "
            "$XDG_STATE_HOME/tunnel-telemetry/spool (~/.local/state/...).",
        ),
        click.option("--no-spool", is_flag=True, help="Do not spool an undelivered report."),
        click.option(
            "--timeout",
            type=click.FloatRange(min=0.01),
            default=10.0,
            show_default=True,
            help="Seconds to wait for each collector (connect and answer).",
        ),
        click.option(
            "--attempts",
            type=click.IntRange(min=1),
            default=3,
            show_default=True,
            help="Rounds over the collector list before giving up.",
        ),
        click.option(
            "--max-time",
            type=click.FloatRange(min=0),
            default=60.0,
            show_default=True,
            help="No new round after this many seconds.",
        ),
        click.option(
            "--backoff",
            type=click.FloatRange(min=0),
            default=1.0,
            show_default=True,
            help="Seconds before the first retry round (doubles each round, jittered).",
        ),
        click.option("-v", "--verbose", count=True, help="More progress on stderr."),
        click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def sampling_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Sampling fractions (outline-sdk style) and the seed tests use."""
    func = click.option(
        "--seed", type=int, default=None, hidden=True, help="Random seed (for tests)."
    )(func)
    func = click.option(
        "--failure-fraction",
        type=click.FloatRange(0, 1),
        default=1.0,
        show_default=True,
        help="Fraction of failure reports to send.",
    )(func)
    func = click.option(
        "--success-fraction",
        type=click.FloatRange(0, 1),
        default=1.0,
        show_default=True,
        help="Fraction of success reports to send.",
    )(func)
    return func


def report_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Fields a user may add to a report built by the command."""
    func = click.option(
        "--client-cc", default=None, metavar="CC", help="Your own ISO country code."
    )(func)
    func = click.option(
        "--client-asn", default=None, metavar="ASn", help="Your own ASN (AS1234)."
    )(func)
    func = click.option(
        "--config",
        "config_pairs",
        multiple=True,
        metavar="KEY=VALUE",
        help="Protocol setting to report (repeatable). Never put secrets here.",
    )(func)
    return func


def _make_client(opts: dict[str, Any], *, need_collectors: bool = True) -> Client:
    collectors = _collectors(opts["collectors"])
    if need_collectors and not collectors:
        raise click.UsageError("no collector: give --collector URL or set TT_COLLECTORS")
    spool: Spool | None = None
    if not opts["no_spool"]:
        spool = Spool(opts["spool_dir"] or default_spool_dir())
    policy = RetryPolicy(
        attempts=opts["attempts"], backoff=opts["backoff"], max_elapsed=opts["max_time"]
    )
    sampler = None
    rng = random.Random(opts.get("seed"))
    if opts.get("success_fraction", 1.0) < 1.0 or opts.get("failure_fraction", 1.0) < 1.0:
        sampler = Sampler(opts["success_fraction"], opts["failure_fraction"], rng)
    try:
        return Client(
            collectors,
            spool=spool,
            policy=policy,
            sampler=sampler,
            timeout=opts["timeout"],
            rng=rng,
        )
    except ClientError as exc:
        raise click.UsageError(exc.message) from None


def _deliver(report: dict[str, Any], opts: dict[str, Any]) -> int:
    """Send one report the way every command does; return the exit code."""
    if opts["dry_run"]:
        try:
            validate_report(report)
        except InvalidReport as exc:
            _err(str(exc))
            return EXIT_USAGE
        _emit(report)
        return EXIT_DELIVERED
    with _make_client(opts) as client:
        try:
            receipt = client.send(report)
        except InvalidReport as exc:
            _err(str(exc))
            return EXIT_USAGE
        except ReportRejected as exc:
            _err(str(exc))
            _print_errors(exc.receipt)
            _emit(exc.receipt.answer)
            return EXIT_REJECTED
        except NotDelivered as exc:
            _err(f"not delivered: {exc}")
            if exc.spooled:
                _err(f"spooled as {exc.spooled}; run `tt-report flush` to resend")
            elif exc.spool_error:
                _err(f"NOT spooled: {exc.spool_error}")
            else:
                _err("not spooled (--no-spool)")
            return EXIT_NOT_DELIVERED
    if receipt is None:
        _err("sampled out: not sent")
        return EXIT_DELIVERED
    _err(f"delivered to {receipt.collector} ({receipt.status}), uuid {receipt.uuid}")
    if receipt.ooni_measurement_link:
        _err(f"OONI: {receipt.ooni_measurement_link}")
    _emit(receipt.answer)
    return EXIT_DELIVERED


def _print_errors(receipt: Receipt) -> None:
    for item in receipt.answer.get("errors") or []:
        if isinstance(item, dict):
            _err(f"  {item.get('path') or '/'}: {item.get('message')}")


def _command(func: Callable[..., int]) -> Callable[..., None]:
    """Set up logging, run, and exit with the command's code (no traceback for known errors)."""

    @functools.wraps(func)
    def wrapper(**opts: Any) -> None:
        opts = _with_group_options(opts)
        with _logging_to_stderr(opts.get("verbose", 0), opts.get("quiet", False)):
            try:
                code = func(**opts)
            except ClientError as exc:
                _err(str(exc))
                code = exc.exit_code
        sys.exit(code)

    return wrapper


def _with_group_options(opts: dict[str, Any]) -> dict[str, Any]:
    """Delivery options given before the subcommand (``tt-report --collector URL probe``)
    count unless the subcommand's own flags set them too (after the subcommand wins)."""
    ctx = click.get_current_context()
    parent = ctx.parent
    if parent is None:
        return opts
    merged = dict(opts)
    for name, value in parent.params.items():
        if name not in merged or parent.get_parameter_source(name) in (
                None, click.core.ParameterSource.DEFAULT):
            continue
        if ctx.get_parameter_source(name) in (None, click.core.ParameterSource.DEFAULT):
            merged[name] = value
    return merged


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tt-report")
@delivery_options
def main(**opts: Any) -> None:
    """Probe circumvention endpoints and deliver connectivity reports to collectors.

    Delivery options (--collector, --timeout, ...) go before or after the subcommand.
    Exit codes: 0 delivered, 1 rejected by a collector, 2 usage error or invalid
    report, 3 not delivered (spooled; `tt-report flush` resends).
    """


@main.command()
@click.argument("endpoint")
@click.option(
    "--probe-timeout",
    type=click.FloatRange(min=0.01),
    default=5.0,
    show_default=True,
    help="Seconds for each probe step (resolve, connect, TLS handshake).",
)
@click.option(
    "--tls/--no-tls",
    default=None,
    help="Force or skip the TLS handshake (default: by protocol: https, tls, wss, h2, "
    "dot, doh, trojan, *+tls, *+https, *+wss).",
)
@click.option("--sni", default=None, help="TLS server name (default: the endpoint's host).")
@click.option(
    "--insecure", is_flag=True, help="Do not check the TLS certificate (only the handshake)."
)
@click.option(
    "--cafile",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="CA certificates (PEM) to check the endpoint's certificate with.",
)
@report_options
@sampling_options
@click.option("--dry-run", is_flag=True, help="Print the report; do not send it.")
@delivery_options
@_command
def probe(**opts: Any) -> int:
    """Try ENDPOINT (protocol://address:port) for real, then send its report.

    Resolves the host, connects over TCP and, for TLS protocols, completes a TLS
    handshake; the report says which step failed (dns.resolve, tcp.connect,
    tls.handshake) with its POSIX error name. A failing endpoint is not a failing
    command: the exit code tells whether the report was delivered.
    """
    from .probe import probe as run_probe

    config = _parse_config(opts["config_pairs"])
    report = run_probe(
        opts["endpoint"],
        timeout=opts["probe_timeout"],
        tls=opts["tls"],
        server_name=opts["sni"],
        verify=not opts["insecure"],
        cafile=opts["cafile"],
        config=config or None,
        client_asn=opts["client_asn"],
        client_cc=opts["client_cc"],
    )
    fail = report.get("failure")
    if fail:
        what = " ".join(x for x in (fail["op"], fail.get("posix_error"), fail.get("msg")) if x)
        _err(f"probe: failed: {what} ({report['duration_ms']} ms)")
    else:
        _err(f"probe: ok ({report['duration_ms']} ms)")
    return _deliver(report, opts)


@main.command()
@click.argument("file", required=False, type=click.File("r", encoding="utf-8"))
@click.option("--endpoint", default=None, help="Build the report: protocol://address:port.")
@click.option("--time", "time_", default=None, help="RFC 3339 start time (default: now).")
@click.option("--duration-ms", type=click.IntRange(min=0), default=None, help="Duration.")
@click.option("--failure-op", default=None, help="Failed operation (absent = success).")
@click.option("--failure-msg", default=None, help="Failure message.")
@click.option("--posix-error", default=None, help="POSIX error name, e.g. ECONNREFUSED.")
@click.option("--uuid", default=None, help="Report uuid (default: a new one).")
@report_options
@sampling_options
@click.option("--dry-run", is_flag=True, help="Check and print the report; do not send it.")
@delivery_options
@_command
def send(**opts: Any) -> int:
    """Send a report from FILE (JSON; - for stdin), or one built from --endpoint and flags."""
    builders = [
        "time_",
        "duration_ms",
        "failure_op",
        "failure_msg",
        "posix_error",
        "uuid",
        "client_asn",
        "client_cc",
    ]
    given = [n for n in builders if opts[n] is not None] + (
        ["config"] if opts["config_pairs"] else []
    )
    if opts["file"] is not None:
        if opts["endpoint"] or given:
            names = ", ".join("--" + n.rstrip("_").replace("_", "-") for n in given)
            raise click.UsageError(
                f"give either FILE or --endpoint with flags, not both ({names or '--endpoint'})"
            )
        try:
            report = json.load(opts["file"])
        except ValueError as exc:
            raise InvalidReport(f"{opts['file'].name}: not JSON ({exc})") from None
        if not isinstance(report, dict):
            raise InvalidReport(f"{opts['file'].name}: a report is one JSON object")
    elif opts["endpoint"]:
        if opts["failure_op"] is None and (opts["failure_msg"] or opts["posix_error"]):
            raise click.UsageError("--failure-msg / --posix-error need --failure-op")
        fail = None
        if opts["failure_op"] is not None:
            fail = failure(opts["failure_op"], opts["failure_msg"], opts["posix_error"])
        report = build_report(
            opts["endpoint"],
            time=opts["time_"],
            duration_ms=opts["duration_ms"],
            failure=fail,
            config=_parse_config(opts["config_pairs"]) or None,
            client_asn=opts["client_asn"],
            client_cc=opts["client_cc"],
            uuid=opts["uuid"],
        )
    else:
        raise click.UsageError("give a report FILE (- for stdin) or --endpoint URL")
    return _deliver(report, opts)


@main.command()
@click.option("--dry-run", is_flag=True, help="List the spooled reports; send nothing.")
@delivery_options
@_command
def flush(**opts: Any) -> int:
    """Deliver the spooled reports (oldest first) and remove each one delivered.

    Exit 0 when the spool is empty afterwards, 3 when some could not be delivered
    (they stay), 1 when a collector refused some (moved to the spool's rejected/).
    """
    if opts["no_spool"]:
        raise click.UsageError("--no-spool makes no sense with flush")
    if opts["dry_run"]:
        spool = Spool(opts["spool_dir"] or default_spool_dir())
        paths = spool.paths()
        _err(f"{len(paths)} report(s) in {spool.directory}")
        _emit({"spool": str(spool.directory), "reports": [p.name for p in paths]})
        return EXIT_DELIVERED
    spool = Spool(opts["spool_dir"] or default_spool_dir())
    if not len(spool):  # nothing to send: no collector needed to say so
        _err(f"nothing to flush in {spool.directory}")
        _emit({"delivered": [], "rejected": [], "remaining": 0})
        return EXIT_DELIVERED
    with _make_client(opts) as client:
        assert client.spool is not None
        pending = len(client.spool)
        if not pending:
            _err(f"nothing to flush in {client.spool.directory}")
            _emit({"delivered": [], "rejected": [], "remaining": 0})
            return EXIT_DELIVERED
        _err(f"flushing {pending} report(s) from {client.spool.directory}")
        result = client.flush()
    _emit(result.to_dict())
    _err(
        f"delivered {len(result.delivered)}, rejected {len(result.rejected)}, "
        f"remaining {result.remaining}"
    )
    if result.error is not None:
        _err(f"stopped: {result.error}")
        return EXIT_NOT_DELIVERED
    if result.rejected:
        return EXIT_REJECTED
    return EXIT_DELIVERED


if __name__ == "__main__":  # pragma: no cover
    main()
