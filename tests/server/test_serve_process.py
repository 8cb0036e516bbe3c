"""The real thing: `rankguard serve` as a process on a temp SQLite file; ingest, restart,
read everything back. Also: the generated admin token is printed once, on the first start."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from server_helpers import points_body

RANKGUARD = Path(sys.executable).with_name("rankguard")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve(db: Path, env: dict[str, str]) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    port = _free_port()
    proc = subprocess.Popen(
        [
            str(RANKGUARD),
            "serve",
            "--database-url",
            f"sqlite:///{db}",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("RANKGUARD_")},
            "OMP_NUM_THREADS": "1",
            **env,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                out, err = proc.communicate(timeout=5)
                pytest.fail(f"rankguard serve did not become ready:\n{out}\n{err}")
            time.sleep(0.2)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.communicate(timeout=20)  # also closes the pipes
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


@pytest.mark.slow
def test_serve_ingest_restart_read_back(tmp_path: Path) -> None:
    db = tmp_path / "rankguard.db"
    with serve(db, {}) as (base, proc):
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    (line,) = [ln for ln in err.splitlines() if "admin token" in ln]
    token = line.rsplit(" ", 1)[1]
    headers = {"Authorization": f"Bearer {token}"}
    values = [0.5, "NaN", "Infinity", "-Infinity", 2.0]
    with serve(db, {}) as (base, proc):
        run = httpx.post(f"{base}/api/v1/runs", json={"name": "proc"}, headers=headers).json()
        r = httpx.post(
            f"{base}/api/v1/runs/{run['id']}/points",
            json=points_body([1, 2, 3, 4, 5], values),
            headers=headers,
        )
        assert r.json() == {"received": 5, "inserted": 5}
        cmd = httpx.post(
            f"{base}/api/v1/runs/{run['id']}/commands", json={"kind": "msign"}, headers=headers
        ).json()
    with serve(db, {}) as (base, proc):
        got = httpx.get(
            f"{base}/api/v1/runs/{run['id']}/series", params={"quantity": "loss"}, headers=headers
        ).json()["series"][0]
        assert got["values"] == values and got["steps"] == [1, 2, 3, 4, 5]
        replay = httpx.post(
            f"{base}/api/v1/runs/{run['id']}/points",
            json=points_body([1, 2, 3, 4, 5], values),
            headers=headers,
        )
        assert replay.json()["inserted"] == 0
        cmds = httpx.get(f"{base}/api/v1/runs/{run['id']}/commands", headers=headers).json()
        assert [c["id"] for c in cmds["data"]] == [cmd["id"]]
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert "admin token" not in err  # printed on the first start only


def test_no_auth_refuses_a_public_bind() -> None:
    r = subprocess.run(
        [str(RANKGUARD), "serve", "--no-auth", "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "force_no_auth" in r.stderr
