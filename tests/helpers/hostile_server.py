"""A real local HTTP server that answers whatever a test tells it: the stand-in for a
compromised rankguard server, a man in the middle on a plain ``http://`` URL, or a server
that hangs, trickles, truncates or refuses. ``http.server`` on 127.0.0.1:0 in a thread.

Out of the box it speaks just enough of the probe's API (register, points, histograms,
claim, ack) and records what arrived; a test replaces the answer of any path:

    with hostile_server() as server:
        server.answer("/commands/claim", Answer(body={"data": "abc"}))
        server.answer("/points", lambda request: Answer(422) if 7 in request.json()["step"]
                      else None)  # None: the default answer
        ... Probe(model, server=server.url, ...) ...
        server.wait_for(lambda: len(server.steps()) == 30)
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Answer:
    """What the server does with one request.

    ``body``: bytes as they are, a str as UTF-8, anything else as JSON. ``hang``: seconds to
    wait before answering, or an Event to wait for. ``trickle``: seconds between the body's
    bytes. ``truncate``: announce the whole length, send half the body, close. ``reset``:
    close the connection without answering.
    """

    status: int = 200
    body: Any = b""
    headers: dict[str, str] = field(default_factory=dict)
    hang: float | threading.Event = 0.0
    trickle: float = 0.0
    truncate: bool = False
    reset: bool = False

    def raw_body(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        if isinstance(self.body, str):
            return self.body.encode()
        return json.dumps(self.body).encode()


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes  # gunzipped when the request was gzip-encoded
    at: float = field(default_factory=time.monotonic)

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


Rule = Answer | Callable[[Request], Answer | None]


@dataclass
class HostileServer:
    base: str
    requests: list[Request] = field(default_factory=list)
    rules: dict[str, Rule] = field(default_factory=dict)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _stopping: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return self.base

    def answer(self, suffix: str, rule: Rule) -> None:
        """Answers requests whose path ends with ``suffix`` by ``rule`` (an Answer, or a
        function of the request returning one, or None for the default answer)."""
        with self._cond:
            self.rules[suffix] = rule

    def seen(self, suffix: str = "") -> list[Request]:
        with self._cond:
            return [r for r in self.requests if r.path.endswith(suffix)]

    def steps(self) -> list[int]:
        """Every step of every points request the server accepted (200), in arrival order."""
        with self._cond:
            return [s for r in self._accepted_points for s in r.json()["step"]]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("hostile server: condition not reached in time")
                self._cond.wait(min(left, 0.05))

    # -- the handler's side ---------------------------------------------------------------

    _accepted_points: list[Request] = field(default_factory=list)

    def handle(self, request: Request) -> Answer:
        with self._cond:
            self.requests.append(request)
            rule = next(
                (r for suffix, r in self.rules.items() if request.path.endswith(suffix)), None
            )
        answer = rule(request) if callable(rule) else rule
        if answer is None:
            answer = _default_answer(request)
        with self._cond:
            if request.path.endswith("/points") and answer.status == 200 and not answer.reset:
                self._accepted_points.append(request)
            self._cond.notify_all()
        return answer


def _default_answer(request: Request) -> Answer:
    """What a healthy rankguard server would say (enough for the probe's transport)."""
    path = request.path
    if path.endswith("/api/v1/runs"):
        return Answer(201, request.json())
    if path.endswith("/points"):
        n = len(request.json()["step"])
        return Answer(200, {"received": n, "inserted": n})
    if path.endswith("/commands/claim"):
        return Answer(200, {"data": [], "count": 0})
    return Answer(200, {})


@contextmanager
def hostile_server() -> Iterator[HostileServer]:
    server_box: list[HostileServer] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            # headers and body go out in separate writes: without this, Nagle's algorithm
            # and delayed ACKs add ~40 ms to every keep-alive request
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            request = Request(self.command, self.path, dict(self.headers.items()), body)
            host = server_box[0]
            answer = host.handle(request)
            if isinstance(answer.hang, threading.Event):
                answer.hang.wait(60)
            elif answer.hang:
                host._stopping.wait(answer.hang)
            if answer.reset:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            raw = answer.raw_body()
            self.send_response(answer.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            for name, value in answer.headers.items():
                self.send_header(name, value)
            self.end_headers()
            if answer.truncate:
                self.wfile.write(raw[: len(raw) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
            elif answer.trickle:
                for i in range(len(raw)):
                    if host._stopping.wait(answer.trickle):
                        return
                    self.wfile.write(raw[i : i + 1])
                    self.wfile.flush()
            else:
                self.wfile.write(raw)

        do_POST = do_GET = _serve

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            return

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    server = HostileServer(base=f"http://127.0.0.1:{httpd.server_address[1]}")
    server_box.append(server)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
