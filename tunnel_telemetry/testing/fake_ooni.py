"""A fake OONI collector on loopback that checks requests the way OONI's backend does.

Speaks OONI's report protocol (``POST /report``, ``POST /report/{id}``,
``POST /report/{id}/close``) and the two calls of its measurements API a relay uses to confirm
a submission (``GET /api/v1/measurements``, ``GET /api/v1/raw_measurement``), records every
request and accepted measurement, and can be told at run time to be slow (past a client's
timeout: the measurement is kept all the same), to fail with 5xx or 429, to reset connections,
to answer ``{}`` while keeping the measurement (``fallback``: OONI's fastpath is down and the
measurement went to its fallback store, re-uploaded later) or to answer ``{}`` and lose it
(``empty``: the fallback store failed too).  Used by the tests, by the benchmark and by
operators trying a relay set-up:

    with FakeOONI() as fake:
        ...  # point ooni-api at fake.url
        assert fake.stats()["submissions"] == 1

    python -m tunnel_telemetry.testing.fake_ooni --port 8099 --latency-ms 50

As OONI's backend does: report ids are stateless (a well-formed id is accepted whether the
fake opened it or not, closed or not: never 404); required fields 422; report id parsing and
content consistency 400 "Incorrect format" / "Inconsistent measurement", the ASN compared as
text (``AS03215`` in the body against ``3215`` in the id is inconsistent; leading zeros are
refused outright); a country code must be two letters (``"12"`` is refused); AS0 / ZZ (also
``AS00``, which opens a ``_0_`` report) answered 200 ``{}``; request bodies may be zstd
(``Content-Encoding: zstd``).

Stricter than OONI on purpose, so that relay bugs show up in tests (``strict=False`` keeps
only OONI's own checks): the df-000 fields and their formats (OONI's pipeline silently loses
a measurement whose times or annotations it cannot parse), ``test_start_time``,
``software_*`` and ``test_version`` equal to the opened report's when the fake opened it, and
``probe_ip`` "127.0.0.1" (never the client's address).

Control over HTTP (for the command-line use): ``GET /_fake/stats``, ``POST /_fake/behave``
with ``{"latency_ms": 50, "fault": {"kind": "503", "times": 3}}``, ``POST /_fake/clear``.
Control requests are not recorded.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import logging
import random
import re
import secrets
import signal
import socket
import struct
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import zstandard

log = logging.getLogger(__name__)

OPS = ("open", "submit", "close")
FAULT_KINDS = ("status", "429", "reset", "disconnect", "empty", "fallback")
OONI_TIME = "%Y-%m-%d %H:%M:%S"
_OONI_TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")
_OPEN_REQUIRED = (
    "data_format_version",
    "format",
    "software_name",
    "software_version",
    "test_start_time",
    "test_version",
)
_SUBMIT_RE = re.compile(r"^/report/([^/]+)$")
_CLOSE_RE = re.compile(r"^/report/([^/]+)/close$")


class _Reject(Exception):
    """A request the fake answers with an error status and an OONI-like body."""

    def __init__(self, status: int, detail: Any, reason: str = "") -> None:
        super().__init__(reason or str(detail))
        self.status = status
        self.detail = detail
        self.reason = reason


@dataclass
class Fault:
    """A misbehaviour applied to matching requests (``times`` None: until cleared)."""

    kind: str  # "status" (use status), "429", "reset", "disconnect", "empty", "fallback"
    status: int = 503
    retry_after: str | None = None
    times: int | None = None
    probability: float = 1.0
    ops: tuple[str, ...] = ("open", "submit")


@dataclass
class RecordedRequest:
    """One request as the fake received it (method, path, headers, raw body)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int | None = None

    def text(self) -> str:
        """Everything the client sent, as one string (for privacy checks)."""
        head = "\n".join(f"{k}: {v}" for k, v in self.headers.items())
        return f"{self.method} {self.path}\n{head}\n\n{self.body.decode('utf-8', 'replace')}"


@dataclass
class OpenReport:
    """State the fake keeps per report id it handed out."""

    report_id: str
    meta: dict[str, Any]
    closed: bool = False
    expired: bool = False
    measurements: int = 0


@dataclass
class Measurement:
    """An accepted submission."""

    report_id: str
    measurement_uid: str
    content: dict[str, Any]
    received: float = field(default_factory=time.time)
    fallback: bool = False  # answered {}: kept in the fallback store

    @property
    def uuid(self) -> str | None:
        """The tunnel-telemetry report uuid the measurement carries, if any."""
        ann = self.content.get("annotations") or {}
        tk = self.content.get("test_keys") or {}
        return ann.get("report_uuid") or (tk.get("uuid") if isinstance(tk, dict) else None)


class _Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True
    request_queue_size = 256
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], fake: FakeOONI) -> None:
        self.fake = fake
        self.live: set[socket.socket] = set()
        self.live_lock = threading.Lock()
        self.closing = False
        super().__init__(addr, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:  # noqa: ANN401
        log.debug("fake OONI: connection error", exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-ooni/1"
    sys_version = ""
    timeout = 60  # idle keep-alive connections are closed after this
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.live_lock:
            self.server.live.add(self.connection)
            if self.server.closing:  # accepted while stopping: let the thread end now
                self.connection.shutdown(socket.SHUT_RDWR)
        self.server.fake._count("connections")

    def finish(self) -> None:
        with self.server.live_lock:
            self.server.live.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002, ANN401
        log.debug("fake OONI: " + format, *args)

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        path, _, query = self.path.partition("?")
        fake = self.server.fake
        if path.startswith("/_fake/"):
            status, payload = fake._control(method, path, body)
            self._send(status, payload)
            return
        rec = RecordedRequest(method, self.path, dict(self.headers.items()), body)
        fake._record(rec)
        if (self.headers.get("Content-Encoding") or "").lower() == "zstd":
            try:
                body = zstandard.ZstdDecompressor().decompressobj().decompress(body)
            except zstandard.ZstdError:
                body = b""  # not zstd: "body is not JSON" below
        status, payload, headers = fake._handle(method, path, body, rec, query)
        rec.status = status
        if status == -1:  # reset: RST instead of an answer
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        if status == -2:  # disconnect: close without answering
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._send(status, payload, headers)

    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:  # noqa: ANN401
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self._headers_buffer.append(b"\r\n" + data)  # headers and body in one write
        self.flush_headers()


class FakeOONI:
    """The fake collector: start with ``with FakeOONI() as fake`` or ``start()`` / ``stop()``."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        latency: float = 0.0,
        strict: bool = True,
        collector_id: str = "1",
    ) -> None:
        self.host = host
        self.port = port
        self.latency = latency
        self.slow_ops = OPS
        self.strict = strict
        self.collector_id = collector_id
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.reset()

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> FakeOONI:
        """Bind and serve in a background thread; ``url`` is valid afterwards."""
        self._server = _Server((self.host, self.port), self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
            name="fake-ooni", daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, drop open connections and wait for the handler threads."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        with server.live_lock:
            server.closing = True
            live = list(server.live)
        for sock in live:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> FakeOONI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Base URL to configure as ``ooni-api``."""
        return f"http://{self.host}:{self.port}"

    # -- run-time behaviour ---------------------------------------------------------------

    def set_latency(self, seconds: float, ops: Iterable[str] = OPS) -> None:
        """Delay answers to ``ops`` by ``seconds`` (slow mode: past a client's timeout the
        request is still carried out, as OONI does, and the answer goes nowhere)."""
        self.latency = seconds
        self.slow_ops = tuple(ops)

    def fail(
        self,
        kind: str | int,
        *,
        times: int | None = None,
        retry_after: str | int | None = None,
        probability: float = 1.0,
        ops: Iterable[str] = ("open", "submit"),
    ) -> None:
        """Misbehave on matching requests: an HTTP status (e.g. 503), 429, reset, disconnect,
        empty (200 ``{}``: a submission checked but dropped, an open without report id) or
        fallback (200 ``{}`` for a submission that is kept all the same),
        ``times`` times or until ``clear_faults()``."""
        status = 503
        if isinstance(kind, int) or str(kind).isdigit():
            status = int(kind)
            kind = "429" if status == 429 else "status"
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}")
        ops = tuple(ops)
        if bad := [o for o in ops if o not in OPS]:
            raise ValueError(f"unknown ops {bad}")
        ra = None if retry_after is None else str(retry_after)
        with self._lock:
            self._faults.append(Fault(kind, status, ra, times, probability, ops))

    def clear_faults(self) -> None:
        """Behave again."""
        with self._lock:
            self._faults.clear()

    def reset(self) -> None:
        """Forget all records, reports and faults."""
        with self._lock:
            self.requests: list[RecordedRequest] = []
            self.measurements: list[Measurement] = []
            self._reports: dict[str, OpenReport] = {}
            self._counts: collections.Counter[str] = collections.Counter()
            self._uuids: collections.Counter[str] = collections.Counter()
            self._rejections: list[str] = []
            self._in_flight = 0
            self._max_in_flight = 0
        self.clear_faults()

    # -- records --------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters: connections accepted, requests, opens, submissions (accepted, with those
        kept in the fallback store), closes, dropped (200 ``{}``, lost), fallback (200 ``{}``,
        kept), measurements API calls, rejected, faults injected, distinct uuids, duplicate
        deliveries, reports still open, the requests it is answering now (in_flight) and the
        most it answered at once (max_in_flight)."""
        with self._lock:
            return {
                "connections": self._counts["connections"],
                "requests": len(self.requests),
                "opens": self._counts["open"],
                "submissions": self._counts["submit"],
                "closes": self._counts["close"],
                "dropped": self._counts["dropped"],
                "fallback": self._counts["fallback"],
                "api": self._counts["api"],
                "rejected": self._counts["rejected"],
                "faults": self._counts["fault"],
                "uuids": len(self._uuids),
                "duplicates": sum(n - 1 for n in self._uuids.values() if n > 1),
                "open_reports": sum(
                    1 for r in self._reports.values() if not (r.closed or r.expired)
                ),
                "in_flight": self._in_flight,
                "max_in_flight": self._max_in_flight,
            }

    def uuids(self) -> collections.Counter[str]:
        """How many times each report uuid was accepted."""
        with self._lock:
            return collections.Counter(self._uuids)

    def rejections(self) -> list[str]:
        """Reasons of every rejected request, in order (to explain a failing test)."""
        with self._lock:
            return list(self._rejections)

    def reports(self) -> dict[str, OpenReport]:
        """Report ids handed out, with their open metadata."""
        with self._lock:
            return dict(self._reports)

    def all_text(self) -> str:
        """Every request received (paths, headers, bodies) as text, for privacy checks."""
        with self._lock:
            return "\n".join(r.text() for r in self.requests)

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any]:
        """Poll ``stats()`` until ``predicate`` holds; raise TimeoutError with the stats."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if predicate(s):
                return s
            if time.monotonic() > deadline:
                raise TimeoutError(f"fake OONI: condition not met, stats {s}")
            time.sleep(0.02)

    # -- protocol -------------------------------------------------------------------------

    def _count(self, what: str) -> None:
        with self._lock:
            self._counts[what] += 1

    def _record(self, rec: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(rec)

    def _fault_for(self, op: str) -> Fault | None:
        with self._lock:
            for f in self._faults:
                if op in f.ops and (f.probability >= 1 or random.random() < f.probability):
                    if f.times is not None:
                        f.times -= 1
                        if f.times <= 0:
                            self._faults.remove(f)
                    self._counts["fault"] += 1
                    return f
        return None

    def _handle(
        self, method: str, path: str, body: bytes, rec: RecordedRequest, query: str = ""
    ) -> tuple[int, Any, dict[str, str]]:
        with self._lock:
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            if method == "GET" and path.startswith("/api/v1/"):
                return self._api(path, urllib.parse.parse_qs(query))
            return self._answer(method, path, body, rec)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _answer(
        self, method: str, path: str, body: bytes, rec: RecordedRequest
    ) -> tuple[int, Any, dict[str, str]]:
        if method != "POST":
            return 405, {"detail": "Method Not Allowed"}, {}
        if path == "/report":
            op, rid = "open", None
        elif m := _CLOSE_RE.match(path):
            op, rid = "close", m.group(1)
        elif m := _SUBMIT_RE.match(path):
            op, rid = "submit", m.group(1)
        else:
            return 404, {"detail": "Not Found"}, {}
        if self.latency > 0 and op in self.slow_ops:
            time.sleep(self.latency)
        fault = self._fault_for(op)
        if fault is not None and fault.kind not in ("empty", "fallback"):
            if fault.kind == "reset":
                return -1, None, {}
            if fault.kind == "disconnect":
                return -2, None, {}
            if fault.kind == "429":
                hdr = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
                return 429, {"detail": "Too Many Requests"}, hdr
            return fault.status, {"detail": "Injected failure"}, {}
        if fault is not None and op == "open":  # empty, fallback: an answer without a report id
            return 200, {}, {}
        try:
            if op == "open":
                return 200, self._open(body), {}
            if op == "close":
                return 200, self._close(rid), {}
            return 200, self._submit(rid, body, empty=fault.kind if fault else None), {}
        except _Reject as e:
            with self._lock:
                self._counts["rejected"] += 1
                self._rejections.append(f"{op} {e.status}: {e.reason or e.detail}")
            payload = {"detail": e.detail}
            if e.reason:
                payload["fake_reason"] = e.reason
            return e.status, payload, {}

    def _open(self, body: bytes) -> dict[str, Any]:
        def unprocessable(kind: str, loc: list[str], reason: str) -> _Reject:
            return _Reject(422, [{"type": kind, "loc": loc, "msg": reason}], reason)

        try:
            data = json.loads(body)
        except ValueError:
            raise unprocessable("json_invalid", ["body"], "body is not JSON") from None
        if not isinstance(data, dict):
            raise unprocessable("model_type", ["body"], "body is not an object")
        missing = [f for f in _OPEN_REQUIRED if f not in data]
        if missing:
            detail = [{"type": "missing", "loc": ["body", f], "msg": "Field required"}
                      for f in missing]
            raise _Reject(422, detail, f"missing {', '.join(missing)}")
        for f in (*_OPEN_REQUIRED, "probe_asn", "probe_cc", "test_name"):
            if f in data and not isinstance(data[f], str):
                raise unprocessable("string_type", ["body", f], f"{f} not a string")
        asn = data.get("probe_asn", "AS0").upper()
        if len(asn) > 12 or len(asn) < 3 or not asn.startswith("AS"):
            asn = "AS0"
        try:
            asn_i = int(asn[2:])
        except ValueError:
            asn_i = 0
        cc = data.get("probe_cc", "ZZ").upper().replace("_", "")
        if len(cc) != 2:
            cc = "ZZ"
        if not cc.isalpha():
            raise _Reject(400, "Incorrect format", "probe_cc not two letters")
        test_name = data.get("test_name", "").lower()
        if self.strict:
            self._check_open_strict(data)
        ts = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        rand = secrets.token_urlsafe(12).replace("_", "o").replace("-", "o")
        rid = f"{ts}_{test_name.replace('_', '')}_{cc}_{asn_i}_n{self.collector_id}_{rand}"
        meta = {k: data[k] for k in _OPEN_REQUIRED}
        meta.update(probe_asn=f"AS{asn_i}", probe_cc=cc, test_name=test_name)
        with self._lock:
            self._reports[rid] = OpenReport(rid, meta)
            self._counts["open"] += 1
        return {"backend_version": "fake-1", "report_id": rid,
                "supported_formats": ["yaml", "json"]}

    @staticmethod
    def _check_open_strict(data: dict[str, Any]) -> None:
        if data["format"] != "json":
            raise _Reject(400, "Incorrect format", "format must be json")
        if data["data_format_version"] != "0.2.0":
            raise _Reject(400, "Incorrect format", "data_format_version must be 0.2.0")
        if not _OONI_TIME_RE.match(data["test_start_time"]):
            raise _Reject(400, "Incorrect format", "test_start_time not YYYY-MM-DD HH:MM:SS")
        if not re.fullmatch(r"[a-z][a-z0-9_]{1,29}", data.get("test_name", "")):
            raise _Reject(400, "Incorrect format", "test_name not lower case, 2-30 chars")
        if not data["software_name"] or not data["software_version"] or not data["test_version"]:
            raise _Reject(400, "Incorrect format", "empty software_name/version or test_version")
        for f in ("probe_asn", "probe_cc"):
            if f not in data:
                raise _Reject(400, "Incorrect format", f"{f} missing (OONI would assume AS0/ZZ)")
        if not re.fullmatch(r"AS\d{1,10}", data["probe_asn"]):
            raise _Reject(400, "Incorrect format", "probe_asn not AS<digits>")
        if not re.fullmatch(r"[A-Z]{2}", data["probe_cc"]):
            raise _Reject(400, "Incorrect format", "probe_cc not two upper-case letters")

    def _close(self, rid: str) -> dict[str, Any]:
        with self._lock:
            self._counts["close"] += 1
            rep = self._reports.get(rid)
            if rep is not None:
                rep.closed = True
        return {}

    def _submit(self, rid: str, body: bytes, *, empty: bool) -> dict[str, Any]:
        parts = rid.split("_")
        if len(parts) != 6:
            raise _Reject(400, "Incorrect format", "report id does not have 6 parts")
        _ts, test_name, cc, asn, _cid, _rand = parts
        if not (len(cc) == 2 and test_name.isalnum() and 1 < len(test_name) < 30):
            raise _Reject(400, "Incorrect format", "report id cc / test name malformed")
        try:
            asn_i = int(asn)
        except ValueError:
            raise _Reject(400, "Incorrect format", "report id asn not a number") from None
        if asn_i == 0 or cc.upper() == "ZZ":
            with self._lock:
                self._counts["dropped"] += 1
            return {}
        with self._lock:
            rep = self._reports.get(rid)  # None when another instance opened it: still fine
        try:
            data = json.loads(body)
        except ValueError:
            raise _Reject(400, "Incorrect format", "body is not JSON") from None
        content = data.get("content") if isinstance(data, dict) else None
        if not isinstance(content, dict):
            raise _Reject(400, "Incorrect format", "content is not an object")
        if self.strict and data.get("format") != "json":
            raise _Reject(400, "Incorrect format", "format must be json")
        try:
            m_cc = str(content["probe_cc"])
            m_asn = str(content["probe_asn"])
            m_tn = str(content["test_name"])
        except KeyError as e:
            raise _Reject(400, "Incorrect format", f"content lacks {e.args[0]}") from None
        if cc.upper() != m_cc.upper():
            raise _Reject(400, "Inconsistent measurement", "probe_cc differs from report id")
        if not (3 <= len(m_asn) <= 12 and re.fullmatch(r"AS(0|[1-9]\d*)", m_asn)):
            raise _Reject(400, "Incorrect format", "probe_asn malformed (leading zeros?)")
        if asn != m_asn[2:]:  # compared as text, as OONI does
            raise _Reject(400, "Inconsistent measurement", "probe_asn differs from report id")
        if test_name != m_tn.replace("_", ""):
            raise _Reject(400, "Inconsistent measurement", "test_name differs from report id")
        if not re.fullmatch(r"[A-Z]{2}", m_cc):
            raise _Reject(400, "Incorrect format", "probe_cc malformed")
        if not (1 <= len(m_tn) <= 30 and m_tn == m_tn.lower()):
            raise _Reject(400, "Incorrect format", "test_name malformed")
        if self.strict:
            self._check_content_strict(rid, rep, content)
        if empty == "empty":  # the fallback store failed too: lost
            with self._lock:
                self._counts["dropped"] += 1
            return {}
        h = hashlib.sha512(body).hexdigest()[:16]
        uid = f"{datetime.now(UTC).strftime('%Y%m%d%H%M%S.%f')}_{cc}_{test_name}_{h}"
        m = Measurement(rid, uid, content, fallback=empty == "fallback")
        with self._lock:
            self.measurements.append(m)
            self._counts["submit"] += 1
            self._counts["fallback"] += m.fallback
            if rep is not None:
                rep.measurements += 1
            if m.uuid:
                self._uuids[m.uuid] += 1
        return {} if m.fallback else {"measurement_uid": uid}

    def _api(self, path: str, query: dict[str, list[str]]) -> tuple[int, Any, dict[str, str]]:
        """The measurements API, as far as a relay uses it: search by report id (and
        measurement_start_time since / until), and one raw measurement by its uid."""
        def arg(name: str) -> str | None:
            values = query.get(name)
            return values[-1] if values else None

        with self._lock:
            self._counts["api"] += 1
            kept = list(self.measurements)
        if path == "/api/v1/measurements":
            rid, since, until = arg("report_id"), arg("since"), arg("until")
            limit = int(arg("limit") or 100)
            found = []
            for m in kept:
                start = str(m.content.get("measurement_start_time", "")).replace(" ", "T")
                if rid is not None and m.report_id != rid:
                    continue
                if (since and start < since) or (until and start >= until):
                    continue
                found.append({"measurement_uid": m.measurement_uid, "report_id": m.report_id,
                              "measurement_start_time": start + "Z",
                              "test_name": m.content.get("test_name"),
                              "probe_cc": m.content.get("probe_cc"),
                              "probe_asn": m.content.get("probe_asn")})
            return 200, {"metadata": {"count": len(found[:limit])}, "results": found[:limit]}, {}
        if path == "/api/v1/raw_measurement":
            uid = arg("measurement_uid")
            for m in kept:
                if m.measurement_uid == uid:
                    return 200, m.content, {}
            return 404, {"error": "Measurement not found"}, {}
        return 404, {"detail": "Not Found"}, {}

    @staticmethod
    def _check_content_strict(rid: str, rep: OpenReport | None, c: dict[str, Any]) -> None:
        def bad(reason: str) -> _Reject:
            return _Reject(400, "Incorrect format", reason)

        required = (
            "annotations", "data_format_version", "input", "measurement_start_time",
            "probe_asn", "probe_cc", "probe_ip", "report_id", "software_name",
            "software_version", "test_keys", "test_name", "test_runtime", "test_start_time",
            "test_version",
        )
        if missing := [k for k in required if k not in c]:
            raise bad(f"content lacks {', '.join(missing)}")
        if c["data_format_version"] != "0.2.0":
            raise bad("data_format_version must be 0.2.0")
        if c["report_id"] != rid:
            raise bad("content report_id differs from the URL's")
        for k in ("measurement_start_time", "test_start_time"):
            if not (isinstance(c[k], str) and _OONI_TIME_RE.match(c[k])):
                raise bad(f"{k} not YYYY-MM-DD HH:MM:SS")
        for k in ("test_start_time", "test_version", "software_name", "software_version"):
            if rep is not None and c[k] != rep.meta[k]:
                raise bad(f"{k} differs from the opened report's")
        if c["probe_ip"] != "127.0.0.1":
            raise bad("probe_ip must be 127.0.0.1 (never share the probe's address)")
        rt = c["test_runtime"]
        if isinstance(rt, bool) or not isinstance(rt, int | float) or rt < 0:
            raise bad("test_runtime not a number >= 0")
        ann = c["annotations"]
        if not (isinstance(ann, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in ann.items()
        )):
            raise bad("annotations not a map of strings")
        if c["input"] is not None and not isinstance(c["input"], str):
            raise bad("input not null or a string")
        if not isinstance(c["test_keys"], dict):
            raise bad("test_keys not an object")

    # -- HTTP control (for the command-line use) ----------------------------------------------

    def _control(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        if path == "/_fake/stats" and method == "GET":
            return 200, self.stats()
        if method != "POST":
            return 405, {"detail": "Method Not Allowed"}
        try:
            data = json.loads(body) if body else {}
            if path == "/_fake/clear":
                self.reset() if data.get("records") else self.clear_faults()
                return 200, {"ok": True}
            if path == "/_fake/behave":
                if "latency_ms" in data:
                    self.set_latency(float(data["latency_ms"]) / 1000)
                if "strict" in data:
                    self.strict = bool(data["strict"])
                if f := data.get("fault"):
                    f = dict(f)
                    self.fail(f.pop("kind"), **f)
                return 200, {"ok": True}
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            return 400, {"detail": f"bad control request: {e}"}
        return 404, {"detail": "Not Found"}


def main(argv: list[str] | None = None) -> int:
    """Run the fake collector until interrupted; print its stats as JSON on exit."""
    p = argparse.ArgumentParser(prog="python -m tunnel_telemetry.testing.fake_ooni",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    p.add_argument("--latency-ms", type=float, default=0.0, help="delay every answer")
    p.add_argument("--fail", metavar="KIND",
                   help="misbehave: an HTTP status (503), 429, reset, disconnect, fallback "
                        "(200 {}, kept) or empty (200 {}, lost)")
    p.add_argument("--fail-rate", type=float, default=1.0,
                   help="fraction of open/submit requests that misbehave (default 1)")
    p.add_argument("--retry-after", help="Retry-After value sent with 429")
    p.add_argument("--lenient", action="store_true", help="only OONI's own checks")
    p.add_argument("--collector-id", default="1")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    fake = FakeOONI(args.host, args.port, latency=args.latency_ms / 1000,
                    strict=not args.lenient, collector_id=args.collector_id)
    if args.fail:
        try:
            fake.fail(args.fail, probability=args.fail_rate, retry_after=args.retry_after)
        except ValueError as e:
            p.error(str(e))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with fake:
        print(f"fake OONI listening on {fake.url}", flush=True)
        stop.wait()
    json.dump(fake.stats(), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
