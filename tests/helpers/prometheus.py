"""A real Prometheus server for tests: temp config and data dir, a free port, stopped on exit.

with running_prometheus(scrape_targets=["127.0.0.1:8000"]) as base_url:
    httpx.get(f"{base_url}/api/v1/query", params={"query": "up"})
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

from helpers.tools import require_tool

READY_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(
    scrape_targets: Sequence[str],
    rule_files: Sequence[Path],
    interval: str,
    credentials_file: Path | None = None,
) -> str:
    # JSON is valid YAML: no YAML writer needed.
    job: dict[str, object] = {
        "job_name": "rankguard",
        "metrics_path": "/metrics",
        "static_configs": [{"targets": list(scrape_targets)}],
    }
    if credentials_file is not None:  # as dashboard/prometheus/prometheus.yml does
        job["authorization"] = {"type": "Bearer", "credentials_file": str(credentials_file)}
    config: dict[str, object] = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(Path(p).resolve()) for p in rule_files],
        "scrape_configs": [job] if scrape_targets else [],
    }
    return json.dumps(config, indent=2)


@contextlib.contextmanager
def running_prometheus(
    scrape_targets: Sequence[str] = (),
    *,
    rule_files: Sequence[Path] = (),
    scrape_interval: str = "1s",
    bearer_token: str | None = None,
) -> Iterator[str]:
    """Starts Prometheus scraping `scrape_targets` ("host:port"), with `bearer_token` (a
    token with the metrics scope) if given; yields its base URL.

    Fails the calling test when the binary is missing (unless RANKGUARD_ALLOW_MISSING_TOOLS=1)
    or when it does not become ready within READY_TIMEOUT_S; the process is always stopped.
    """
    binary = require_tool(
        "prometheus",
        env_override="RANKGUARD_PROMETHEUS_BIN",
        hint="on Debian: apt-get install prometheus",
    )
    with tempfile.TemporaryDirectory(prefix="rankguard-prom-") as tmp:
        config_path = Path(tmp) / "prometheus.yml"
        credentials = None
        if bearer_token is not None:
            credentials = Path(tmp) / "metrics-token"
            credentials.write_text(bearer_token)
        config_path.write_text(_config(scrape_targets, rule_files, scrape_interval, credentials))
        log_path = Path(tmp) / "prometheus.log"
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={Path(tmp) / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            _wait_ready(process, base_url, log_path)
            yield base_url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def _wait_ready(process: subprocess.Popen[bytes], base_url: str, log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"prometheus exited with {process.returncode} before it was ready:\n"
                + log_path.read_text(errors="replace")[-2000:]
            )
        try:
            if httpx.get(f"{base_url}/-/ready", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(
        f"prometheus at {base_url} not ready after {READY_TIMEOUT_S} s:\n"
        + log_path.read_text(errors="replace")[-2000:]
    )
