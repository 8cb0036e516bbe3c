"""A real local webhook receiver for tests and benchmarks: ``http.server`` on 127.0.0.1:0 in
a thread, recording every request's path, headers, raw body and arrival time.

with webhook_receiver() as receiver:
    ... receiver.url("/json") ...; receiver.wait_for(3); receiver.requests

``receiver.delay_s`` makes it answer late (a slow receiver), ``receiver.reply`` sets the body
it answers with; ``trickling_receiver()`` is one that never finishes its answer.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.perf_counter() on arrival

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    base: str
    requests: list[Received] = field(default_factory=list)
    status: int = 200
    delay_s: float = 0.0
    reply: bytes = b""
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def url(self, path: str = "/") -> str:
        return f"{self.base}{path}"

    def record(self, item: Received) -> None:
        with self._cond:
            self.requests.append(item)
            self._cond.notify_all()

    def wait_for(self, n: int, timeout: float = 20.0, path: str | None = None) -> list[Received]:
        """Block until ``n`` requests (to ``path``, if given) arrived; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = [r for r in self.requests if path is None or r.path == path]
                if len(got) >= n:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"expected {n} webhook requests to {path}, got {len(got)}")
                self._cond.wait(left)


@contextmanager
def webhook_receiver() -> Iterator[Receiver]:
    receiver: Receiver | None = None

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            assert receiver is not None
            receiver.record(
                Received(self.path, dict(self.headers.items()), body, time.perf_counter())
            )
            if receiver.delay_s:
                time.sleep(receiver.delay_s)
            self.send_response(receiver.status)
            self.send_header("Content-Length", str(len(receiver.reply)))
            self.end_headers()
            self.wfile.write(receiver.reply)

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    receiver = Receiver(base=f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextmanager
def trickling_receiver(byte_every_s: float = 0.2, lasts_s: float = 60.0) -> Iterator[str]:
    """A receiver that reads the request, then sends its status line and headers one byte
    every ``byte_every_s`` and never ends them (until ``lasts_s``): a per-read timeout never
    fires on it. Yields its URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.2)
    stop = threading.Event()
    answer = b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"a" * 100_000

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                conn.recv(65536)
                for byte in answer:
                    if stop.wait(byte_every_s):
                        return
                    conn.sendall(bytes([byte]))
            except OSError:
                return

    def accept() -> None:
        deadline = time.monotonic() + lasts_s
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/hook"
    finally:
        stop.set()
        thread.join(5)
        listener.close()
