"""A scripted HTTP collector on 127.0.0.1 for client tests: answers POSTs from a queue.

Each request pops the next :class:`Reply` (or calls a function of the request that returns
one); when the queue is empty the ``default`` answers. Replies can also ``hang`` (never answer
until the server stops, so the client times out) or ``close`` the connection unanswered.
"""

from __future__ import annotations

import json
import socket
import threading
import uuid as _uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Recorded:
    """One request the server received."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Reply:
    """What to answer: a status, a JSON body (dict) or raw bytes, headers, or an action."""

    status: int = 201
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    action: str | None = None  # "hang" or "close"


def stored(request: Recorded) -> Reply:
    """Answer like a collector that stored the report: 201 with the report and its uuid."""
    report = request.json
    answer = dict(report)
    answer.setdefault("uuid", str(_uuid.uuid4()))
    answer.pop("endpoint", None)
    return Reply(201, answer)


ReplyLike = Reply | Callable[[Recorded], Reply]


class ScriptedCollector:
    """Threaded HTTP server on a free loopback port; use as a context manager."""

    def __init__(self, *replies: ReplyLike, default: ReplyLike = stored) -> None:
        self.queue: deque[ReplyLike] = deque(replies)
        self.default = default
        self.requests: list[Recorded] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                rec = Recorded("POST", self.path, dict(self.headers.items()), body)
                with outer._lock:
                    outer.requests.append(rec)
                    item = outer.queue.popleft() if outer.queue else outer.default
                reply = item(rec) if callable(item) else item
                if reply.action == "hang":
                    outer._stop.wait(60)
                    self.close_connection = True
                    return
                if reply.action == "close":
                    self.close_connection = True
                    return
                if isinstance(reply.body, bytes):
                    data = reply.body
                    ctype = "text/html"
                elif reply.body is None:
                    data = b""
                    ctype = None
                else:
                    data = json.dumps(reply.body).encode()
                    ctype = "application/json"
                self.send_response(reply.status)
                headers = dict(reply.headers)
                if ctype:
                    headers.setdefault("Content-Type", ctype)
                headers["Content-Length"] = str(len(data))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = False
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def push(self, *replies: ReplyLike) -> None:
        with self._lock:
            self.queue.extend(replies)

    def start(self) -> ScriptedCollector:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()

    def __enter__(self) -> ScriptedCollector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def closed_port_url() -> str:
    """A loopback URL nothing listens on (bound then closed): connecting is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
