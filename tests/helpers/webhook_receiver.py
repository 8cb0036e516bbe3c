"""A real local webhook receiver for tests and benchmarks: ``http.server`` on 127.0.0.1:0 in
a thread, recording every request's path, headers, raw body and arrival time.

with webhook_receiver() as receiver:
    ... receiver.url("/json") ...; receiver.wait_for(3); receiver.requests
"""

from __future__ import annotations

import json
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
            self.send_response(receiver.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

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
