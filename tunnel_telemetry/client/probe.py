"""Probe an endpoint for real (resolve, TCP connect, TLS handshake) and build its report.

Each step has its own timeout. The report's ``failure.op`` names the step that failed
(``dns.resolve``, ``tcp.connect``, ``tls.handshake``), ``posix_error`` the error's POSIX name
(``ECONNREFUSED``, ``ETIMEDOUT``, ``ECONNRESET``, ``EAI_NONAME``...) when the system gave one,
and ``msg`` the system's message. TLS library errors (bad certificate, protocol violation) have
no POSIX name: their ``msg`` tells what happened.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from . import Endpoint, build_report, failure, parse_endpoint

log = logging.getLogger(__name__)

# Protocols whose endpoint speaks TLS first: probing them includes a TLS handshake.
# Any protocol ending in "+tls", "+https" or "+wss" (vless+tls, vmess+wss...) does too.
TLS_PROTOCOLS = frozenset({"https", "tls", "wss", "h2", "dot", "doh", "trojan"})
TLS_SUFFIXES = ("+tls", "+https", "+wss")

_EAI_NAMES = {
    getattr(socket, name): name for name in dir(socket) if name.startswith("EAI_")
}

Resolver = Callable[..., list[tuple[Any, ...]]]


class ProbeFailure(Exception):
    """A probe step failed: carries the report's ``failure`` fields."""

    def __init__(self, op: str, posix_error: str | None, msg: str) -> None:
        super().__init__(f"{op}: {posix_error or 'error'}: {msg}")
        self.op = op
        self.posix_error = posix_error
        self.msg = msg

    def as_failure(self) -> dict[str, str]:
        return failure(self.op, self.msg, self.posix_error)


def uses_tls(proto: str) -> bool:
    """Whether probing ``proto`` includes a TLS handshake by default."""
    return proto in TLS_PROTOCOLS or proto.endswith(TLS_SUFFIXES)


def posix_error_name(exc: BaseException) -> str | None:
    """The POSIX name of an OS error (``ECONNREFUSED``...), ``ETIMEDOUT`` for timeouts."""
    if isinstance(exc, ssl.SSLError):
        return None  # its errno is an OpenSSL code, not a POSIX one
    if isinstance(exc, socket.gaierror):
        return _EAI_NAMES.get(exc.errno)
    if isinstance(exc, TimeoutError) and exc.errno is None:
        return "ETIMEDOUT"
    if isinstance(exc, OSError) and exc.errno is not None and exc.errno in errno.errorcode:
        return errno.errorcode[exc.errno]
    return None


def _message(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, TimeoutError) and exc.errno is None:
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, ssl.SSLError):
        return exc.strerror
    return str(exc) or type(exc).__name__


def _fail(op: str, exc: BaseException) -> ProbeFailure:
    return ProbeFailure(op, posix_error_name(exc), _message(exc))


def resolve(
    endpoint: Endpoint, timeout: float, resolver: Resolver = socket.getaddrinfo
) -> list[tuple[int, tuple[Any, ...]]]:
    """``(family, sockaddr)`` pairs for the endpoint; raises :class:`ProbeFailure` (dns.resolve).

    ``getaddrinfo`` has no timeout of its own, so it runs in a daemon thread we stop waiting
    for after ``timeout`` seconds.
    """
    if endpoint.address is not None:
        infos = socket.getaddrinfo(
            endpoint.host, endpoint.port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
        )
        return [(fam, addr) for fam, _, _, _, addr in infos]
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["infos"] = resolver(
                endpoint.host, endpoint.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            )
        except Exception as exc:  # noqa: BLE001 - reported to the caller below
            box["error"] = exc

    worker = threading.Thread(target=work, name="tt-probe-resolve", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise ProbeFailure("dns.resolve", "ETIMEDOUT", f"no answer within {timeout:g}s")
    if "error" in box:
        raise _fail("dns.resolve", box["error"])
    infos = box.get("infos") or []
    if not infos:
        raise ProbeFailure("dns.resolve", "EAI_NONAME", "no address for this name")
    return [(fam, addr) for fam, _, _, _, addr in infos]


def connect(addresses: list[tuple[int, tuple[Any, ...]]], timeout: float) -> socket.socket:
    """TCP connect to the first address that answers within ``timeout`` (shared by all).

    On failure raises :class:`ProbeFailure` (tcp.connect) with the first address's error, as
    Go's dialer does: it is the preferred address and usually the telling one.
    """
    deadline = time.monotonic() + timeout
    first: BaseException | None = None
    for family, sockaddr in addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(remaining)
            sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            first = first or exc
            continue
        return sock
    if first is None:
        first = TimeoutError()
    raise _fail("tcp.connect", first)


def tls_handshake(
    sock: socket.socket,
    server_name: str,
    timeout: float,
    verify: bool = True,
    cafile: str | None = None,
) -> ssl.SSLSocket:
    """TLS handshake over ``sock`` with SNI ``server_name`` (none for an IP address).

    With ``verify`` the certificate must be valid for ``server_name`` (system CAs, or
    ``cafile``); a failed check is a ``tls.handshake`` failure too (it may be an interception).
    """
    ctx = ssl.create_default_context(cafile=cafile)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    sock.settimeout(timeout)
    try:
        return ctx.wrap_socket(sock, server_hostname=server_name)
    except (OSError, ValueError) as exc:
        sock.close()
        raise _fail("tls.handshake", exc) from exc


def probe(
    endpoint: str,
    *,
    timeout: float = 5.0,
    tls: bool | None = None,
    server_name: str | None = None,
    verify: bool = True,
    cafile: str | None = None,
    config: Mapping[str, str] | None = None,
    client_asn: str | None = None,
    client_cc: str | None = None,
    resolver: Resolver = socket.getaddrinfo,
) -> dict[str, Any]:
    """Try ``endpoint`` for real and return its report (success, or the step that failed).

    ``tls=None`` does a TLS handshake when :func:`uses_tls` says the protocol needs one;
    ``server_name`` overrides the SNI (default: the endpoint's host). Raises
    :class:`~tunnel_telemetry.client.InvalidReport` for an unparsable endpoint.
    """
    ep = parse_endpoint(endpoint)
    do_tls = uses_tls(ep.proto) if tls is None else tls
    started = datetime.now(UTC)
    t0 = time.monotonic()
    fail: ProbeFailure | None = None
    try:
        addresses = resolve(ep, timeout, resolver)
        sock = connect(addresses, timeout)
        try:
            if do_tls:
                sock = tls_handshake(sock, server_name or ep.host, timeout, verify, cafile)
        finally:
            sock.close()
    except ProbeFailure as exc:
        fail = exc
    duration_ms = int(round((time.monotonic() - t0) * 1000))
    log.debug(
        "probe %s: %s in %d ms",
        ep.proto,
        "ok" if fail is None else f"{fail.op} {fail.posix_error or ''} {fail.msg}",
        duration_ms,
    )
    return build_report(
        endpoint,
        time=started,
        duration_ms=duration_ms,
        failure=fail.as_failure() if fail else None,
        config=config,
        client_asn=client_asn,
        client_cc=client_cc,
    )
