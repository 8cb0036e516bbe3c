"""A real `rankguard serve` process for end-to-end tests: start, stop, restart on the same
port and database, and a project with one token per scope."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

RANKGUARD = Path(sys.executable).with_name("rankguard")
ADMIN_TOKEN = "rg_e2e-admin-token-0123456789abcdef"
# A fixed key for webhook secrets (no key file beside a PostgreSQL test's working directory),
# and the tests' webhook receivers listen on 127.0.0.1, which the server refuses by default.
TEST_ENV = {
    "RANKGUARD_SECRET_KEY": "cmFua2d1YXJkLXRlc3Qta2V5LTAxMjM0NTY3ODlhYmM=",
    "RANKGUARD_WEBHOOK_ALLOW": "127.0.0.1/32",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveServer:
    """One server process on a fixed port and database; ``stop()``/``start()`` restart it."""

    database_url: str
    port: int = field(default_factory=free_port)
    admin_token: str = ADMIN_TOKEN
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=lambda: dict(TEST_ENV))
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RANKGUARD_")}
        env.update(OMP_NUM_THREADS="1", RANKGUARD_ADMIN_TOKEN=self.admin_token, **self.env)
        log: Any = subprocess.DEVNULL
        if self.log_path is not None:
            log = self.log_path.open("ab")
        try:
            self._spawn(env, log)
        finally:
            if log is not subprocess.DEVNULL:
                log.close()  # the child holds its own descriptor
        self._wait_ready(timeout)

    def _spawn(self, env: dict[str, str], log: Any) -> None:
        self.proc = subprocess.Popen(
            [
                str(RANKGUARD),
                "serve",
                "--database-url",
                self.database_url,
                "--port",
                str(self.port),
                "--log-level",
                "warning",
                *self.extra_args,
            ],
            env=env,
            stdout=log,
            stderr=log,
        )

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                detail = self.log_path.read_text() if self.log_path else ""
                raise RuntimeError(f"rankguard serve did not become ready\n{detail}")
            time.sleep(0.1)

    def kill(self) -> None:
        """Kills the process without a clean shutdown (SIGKILL)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=f"{self.url}/api/v1",
            headers={"Authorization": f"Bearer {self.admin_token}"},
            timeout=30,
        )

    def new_project(self) -> dict[str, str]:
        """A fresh project; returns its name and one token per scope."""
        name = f"e2e-{uuid.uuid4().hex[:10]}"
        tokens = {"project": name}
        with self.admin() as admin:
            admin.post("/projects", json={"name": name}).raise_for_status()
            for scope in ("ingest", "read", "operate"):
                response = admin.post(
                    "/tokens", json={"name": scope, "project": name, "scopes": [scope]}
                )
                response.raise_for_status()
                tokens[scope] = response.json()["token"]
        return tokens


@contextmanager
def running_server(tmp_path: Path, **options: object) -> Iterator[LiveServer]:
    """A server on a fresh SQLite file under ``tmp_path`` (or ``database_url=``)."""
    database_url = str(options.pop("database_url", f"sqlite:///{tmp_path / 'rankguard.db'}"))
    server = LiveServer(
        database_url=database_url,
        log_path=tmp_path / "server.log",
        **options,  # type: ignore[arg-type]
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()
