"""Ingest throughput and downsampled-read latency of a real `rankguard serve` process.

Claim (perf.md Targets c): >= 100,000 points/s over HTTP into SQLite with several concurrent
clients, and a 1,000,000-point series read back downsampled to 2,000 points in <= 100 ms.
Baseline measured in the same run: the same points logged to an MLflow tracking server
(SQLite backend store) with ``log_batch`` (at most 1,000 metrics per request, MLflow's limit).

    .venv/bin/python benchmarks/ingest.py --quick
    RANKGUARD_BENCH_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:5432/postgres \\
        .venv/bin/python benchmarks/ingest.py

MLflow lives in its own venv (never in the project's): ``python3 -m venv .venv-mlflow &&
.venv-mlflow/bin/pip install mlflow``; found at RANKGUARD_MLFLOW_VENV or ./.venv-mlflow,
skipped with a message when absent.
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "rg_bench-admin-token-0123456789abcdef"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
TARGETS = 96
QUANTITIES = 8  # 768 points per sampled step, as in perf.md §5.2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout} s")


@contextmanager
def rankguard_server(
    database_url: str, *, rankguard: str | None = None, env: dict[str, str] | None = None
) -> Iterator[str]:
    """A `rankguard serve` (this environment's, or the console script ``rankguard``) with
    ``env`` added to its environment; yields its base URL."""
    port = _free_port()
    env = {**os.environ, "RANKGUARD_ADMIN_TOKEN": TOKEN, **(env or {})}
    cmd = [
        rankguard or str(Path(sys.executable).with_name("rankguard")),
        "serve",
        "--database-url",
        database_url,
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
        "--max-body-bytes",
        str(64 * 1024 * 1024),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(f"{base}/readyz", proc)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _batch(steps: range) -> bytes:
    """One columnar gzip body: every (quantity, target) at each step."""
    q, t, s, v = [], [], [], []
    for step in steps:
        for qi in range(QUANTITIES):
            for ti in range(TARGETS):
                q.append(f"q{qi}")
                t.append(f"transformer.h.{ti}.weight")
                s.append(step)
                v.append(1.0 + ((step * 31 + qi * 7 + ti) % 97) / 97.0)
    body = {"quantity": q, "target": t, "step": s, "value": v, "wall_time": [1.7e9 + x for x in s]}
    return gzip.compress(json.dumps(body).encode(), compresslevel=1)


def _client(base: str, steps_per_batch: int, batches: int, out: mp.Queue) -> None:  # type: ignore[type-arg]
    with httpx.Client(base_url=base, headers=HEADERS, timeout=120) as c:
        run = c.post("/api/v1/runs", json={"name": "bench"}).json()["id"]
        bodies = [
            _batch(range(i * steps_per_batch, (i + 1) * steps_per_batch)) for i in range(batches)
        ]
        out.put("ready")
        t0 = time.perf_counter()
        n = 0
        for body in bodies:
            r = c.post(
                f"/api/v1/runs/{run}/points",
                content=body,
                headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
            )
            r.raise_for_status()
            n += r.json()["received"]
        out.put((n, t0, time.perf_counter()))


def measure_ingest(base: str, clients: int, points: int, batch_points: int) -> float:
    steps_per_batch = max(1, batch_points // (TARGETS * QUANTITIES))
    per_client = points // clients
    batches = max(1, per_client // (steps_per_batch * TARGETS * QUANTITIES))
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    procs = [
        ctx.Process(target=_client, args=(base, steps_per_batch, batches, out))
        for _ in range(clients)
    ]
    for p in procs:
        p.start()
    results = [out.get() for _ in range(2 * clients)]
    for p in procs:
        p.join()
    spans = [r for r in results if r != "ready"]
    total = sum(r[0] for r in spans)
    elapsed = max(r[2] for r in spans) - min(r[1] for r in spans)
    return total / elapsed


def measure_read(base: str, n_points: int, reads: int) -> float:
    """Median ms to read an n_points series downsampled to 2,000 points."""
    with httpx.Client(base_url=base, headers=HEADERS, timeout=300) as c:
        run = c.post("/api/v1/runs", json={"name": "long"}).json()["id"]
        chunk = 100_000
        for lo in range(0, n_points, chunk):
            steps = list(range(lo, min(n_points, lo + chunk)))
            vals = [float(i % 1000) for i in steps]
            if lo == 0:
                vals[n_points // 3 % chunk] = 1e9  # a spike that must survive
            body = {
                "quantity": ["loss"] * len(steps),
                "target": ["global"] * len(steps),
                "step": steps,
                "value": vals,
                "wall_time": [0.0] * len(steps),
            }
            c.post(
                f"/api/v1/runs/{run}/points",
                content=gzip.compress(json.dumps(body).encode(), 1),
                headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
            ).raise_for_status()
        times = []
        for _ in range(reads):
            t0 = time.perf_counter()
            r = c.get(f"/api/v1/runs/{run}/series", params={"quantity": "loss", "max_points": 2000})
            times.append(time.perf_counter() - t0)
            s = r.json()["series"][0]
        assert s["total"] == n_points and 1e9 in s["values"], "downsampling lost the spike"
        return statistics.median(times) * 1000


# --- MLflow baseline ---------------------------------------------------------------------

MLFLOW_CLIENT = r"""
import sys, time
from mlflow.tracking import MlflowClient
from mlflow.entities import Metric
uri, steps, targets, quantities = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
c = MlflowClient(uri)
exp = c.create_experiment("bench-%d" % time.time_ns())
run = c.create_run(exp).info.run_id
metrics = [Metric(f"q{q}/transformer.h.{t}.weight", 1.0 + ((s * 31 + q * 7 + t) % 97) / 97.0,
                  1700000000000 + s, s)
           for s in range(steps) for q in range(quantities) for t in range(targets)]
t0 = time.perf_counter()
for i in range(0, len(metrics), 1000):  # MLflow accepts at most 1000 metrics per request
    c.log_batch(run, metrics=metrics[i:i + 1000])
print(len(metrics), t0, time.perf_counter())
"""


def measure_mlflow(venv: Path, clients: int, points: int, workdir: Path) -> float | None:
    mlflow = venv / "bin" / "mlflow"
    python = venv / "bin" / "python"
    if not mlflow.exists():
        print(
            f"MLflow: skipped (no {mlflow}; python3 -m venv .venv-mlflow && "
            ".venv-mlflow/bin/pip install mlflow)"
        )
        return None
    port = _free_port()
    store = workdir / "mlflow.db"
    proc = subprocess.Popen(
        [
            str(mlflow),
            "server",
            "--backend-store-uri",
            f"sqlite:///{store}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "2",
            "--default-artifact-root",
            str(workdir / "artifacts"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(f"{uri}/health", proc, timeout=180)
        steps = max(1, points // clients // (TARGETS * QUANTITIES))
        runs = [
            subprocess.Popen(
                [str(python), "-c", MLFLOW_CLIENT, uri, str(steps), str(TARGETS), str(QUANTITIES)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(clients)
        ]
        spans = [tuple(float(x) for x in r.communicate()[0].split()) for r in runs]
        total = sum(s[0] for s in spans)
        return total / (max(s[2] for s in spans) - min(s[1] for s in spans))
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


@contextmanager
def postgres_database(url: str) -> Iterator[str]:
    import psycopg
    from sqlalchemy.engine import make_url

    base = make_url(url)
    name = f"rankguard_bench_{uuid.uuid4().hex[:8]}"
    conninfo = base.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(conninfo, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer points and reads")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--batch", type=int, default=5000, help="points per request (~)")
    ap.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "RANKGUARD_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        ),
    )
    ap.add_argument(
        "--mlflow-venv",
        type=Path,
        default=Path(os.environ.get("RANKGUARD_MLFLOW_VENV", ROOT / ".venv-mlflow")),
    )
    args = ap.parse_args()
    points = 400_000 if args.quick else 2_000_000
    series_points = 1_000_000
    reads = 10 if args.quick else 20
    print(
        f"machine: {os.cpu_count()} CPUs; {args.clients} client processes, ~{args.batch} "
        f"points per gzip columnar request, {points:,} points per backend"
    )
    results: dict[str, float] = {}
    workdir = Path(tempfile.mkdtemp(prefix="rankguard-bench-"))
    try:
        backends: list[tuple[str, str | None]] = [
            ("sqlite", f"sqlite:///{workdir / 'rg.db'}"),
            ("postgresql", None),
        ]
        for name, url in backends:
            try:
                cm = postgres_database(args.postgres_url) if url is None else _nullcm(url)
                with cm as db_url, rankguard_server(db_url) as base:
                    rate = measure_ingest(base, args.clients, points, args.batch)
                    read_ms = measure_read(base, series_points, reads)
            except Exception as exc:  # report it and go on with the other backends
                print(f"{name}: skipped ({type(exc).__name__}: {exc})")
                continue
            results[name] = rate
            print(
                f"rankguard/{name}: {rate:,.0f} points/s ingest; 1M-point series -> 2,000 "
                f"points: median {read_ms:.1f} ms over {reads} reads"
            )
        mlflow = measure_mlflow(args.mlflow_venv, args.clients, points // 4, workdir)
        if mlflow is not None:
            print(f"mlflow/sqlite (log_batch, 1000 metrics/request): {mlflow:,.0f} points/s")
            for name, rate in results.items():
                print(f"ratio rankguard/{name} vs mlflow: {rate / mlflow:.1f}x")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


@contextmanager
def _nullcm(value: str) -> Iterator[str]:
    yield value


if __name__ == "__main__":
    sys.exit(main())
