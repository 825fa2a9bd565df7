"""Loopback TCP listeners that misbehave on purpose, for probe tests.

:class:`Listener` accepts connections on 127.0.0.1 and handles each one by ``mode``:
``hold`` (accept, never answer), ``garbage`` (answer plain text, as a non-TLS service would),
``reset`` (wait for the first byte, then abort with a TCP RST, as an injector would) or
``tls`` (complete a TLS handshake with the given server context, recording the SNI).
:func:`full_backlog` gives a port where connecting times out: its accept queue is full.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import ipaddress
import socket
import ssl
import struct
import threading
from collections.abc import Iterator
from pathlib import Path


class Listener:
    """A TCP listener on 127.0.0.1 with one behaviour for every connection."""

    def __init__(self, mode: str = "hold", tls_context: ssl.SSLContext | None = None) -> None:
        self.mode = mode
        self.tls_context = tls_context
        self.server_names: list[str | None] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.05)
        self.port: int = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Listener:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for c in self._conns:
            c.close()
        self.sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(2.0)
            try:
                self._handle(conn)
            except OSError:
                conn.close()

    def _handle(self, conn: socket.socket) -> None:
        if self.mode == "hold":
            self._conns.append(conn)
        elif self.mode == "garbage":
            conn.recv(1024)
            conn.sendall(b"HTTP/1.0 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            conn.close()
        elif self.mode == "reset":
            conn.recv(1)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
        elif self.mode == "tls":
            assert self.tls_context is not None
            ctx = self.tls_context

            def remember(_sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
                self.server_names.append(name)

            ctx.sni_callback = remember
            try:
                tls = ctx.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError):
                conn.close()
                return
            tls.close()
        else:  # pragma: no cover
            raise ValueError(self.mode)


@contextlib.contextmanager
def full_backlog() -> Iterator[int]:
    """A loopback port whose accept queue is full: a new connect gets no answer (times out).

    Linux drops a SYN when the listen queue is full, so the connecting side just waits.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers: list[socket.socket] = []
    try:
        for _ in range(16):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            fillers.append(s)
            s.settimeout(0.2)
            try:
                s.connect(("127.0.0.1", port))
            except TimeoutError:
                break
        else:  # pragma: no cover
            raise RuntimeError("could not fill the listen queue")
        yield port
    finally:
        for s in fillers:
            s.close()
        listener.close()


def make_certificate(directory: Path, names: tuple[str, ...] = ("localhost",)) -> tuple[Path, Path]:
    """A self-signed certificate for ``names`` (and 127.0.0.1): ``(certfile, keyfile)`` PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = _dt.datetime.now(_dt.UTC)
    sans = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return certfile, keyfile


def server_context(certfile: Path, keyfile: Path) -> ssl.SSLContext:
    """A TLS server context for :class:`Listener` ``tls`` mode."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certfile, keyfile)
    return ctx
