"""Dashboard load time: a run with 1,000 weight matrices × 2,000 sampled steps.

Seeds a SQLite file directly through ``server.storage`` (stable_rank and sa_sign_diversity for
each of the 1,000 targets, plus loss, grad_norm, attention_logit_max per block, Jacobian
alignment and a·M per block pair, sa_cosine histograms, an alert and an intervention), starts
a real ``rankguard serve`` process on it (``--no-auth``), and times the run page in headless
Chromium from navigation start to every figure drawn with data (the page sets
``window.__rankguardRendered`` and ``__rankguardRenderedAt = performance.now()``).
Median over ``--loads`` loads; "cold" loads use a fresh browser context each time (plotly.js
fetched and compiled again), "warm" ones reload in one context (plotly.js from the HTTP
cache). The server builds the figures once per data fingerprint (the first request, timed
on its own as "build") and serves later loads of unchanged data from its payload cache.

The same is measured on a small run (12 targets × 200 steps) as the baseline; the ratio
big/small is printed. Target: big run ≤ 2 s.

    python -m benchmarks.dashboard_load              # full (1,000 × 2,000)
    python -m benchmarks.dashboard_load --quick      # 100 × 500, for a smoke run
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rankguard.server import storage
from rankguard.server.config import Settings
from rankguard.server.db import Database, make_engine, upgrade_schema
from rankguard.server.storage import ColumnarPoints
from tests.helpers import synthetic

CHROMIUM = os.environ.get("RANKGUARD_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PER_BLOCK = 4  # attention Q, K, V, O: 250 blocks -> 1,000 weight matrices


def _series_points(
    quantity: str, target: str, steps: np.ndarray, values: np.ndarray
) -> ColumnarPoints:
    n = steps.size
    return ColumnarPoints(
        quantity=[quantity] * n,
        target=[target] * n,
        rank=[0] * n,
        step=steps.tolist(),
        wall_time=[0.0] * n,
        value=values.tolist(),
    )


def _concat(parts: list[ColumnarPoints]) -> ColumnarPoints:
    return ColumnarPoints(
        *[
            list(itertools.chain.from_iterable(getattr(p, f) for p in parts))
            for f in ColumnarPoints.__dataclass_fields__
        ]
    )


def seed(db_url: str, *, targets: int, steps: int) -> tuple[str, float, int]:
    """Creates the schema and one run; returns (run id, seconds, points inserted)."""
    settings = Settings(database_url=db_url)
    engine = make_engine(settings)
    upgrade_schema(engine)
    db = Database(engine, lock_timeout_s=60)
    rng = np.random.default_rng(0)
    blocks = targets // PER_BLOCK
    names = synthetic.weight_targets(blocks, PER_BLOCK)
    step_arr = np.arange(steps, dtype=np.int64)
    t = np.linspace(0, 1, steps)
    start = time.perf_counter()
    with db.write() as session:
        project = storage.ensure_project(session=session, name="default")
        run, _ = storage.register_run(
            session=session,
            project=project,
            run_id=None,
            name=f"bench-{targets}x{steps}",
            config={},
            world_size=1,
            parameters=[],
        )
        run_id = run.id
    known: dict[Any, int] = {}
    total = 0

    def insert(parts: list[ColumnarPoints]) -> None:
        nonlocal total
        with db.write() as session:
            n, new = storage.insert_points(
                session=session, run_id=run_id, points=_concat(parts), known=known
            )
        known.update(new)
        total += n

    insert(
        [
            _series_points("loss", "global", step_arr, 4 * np.exp(-3 * t) + 0.5 + 2.0 * (t > 0.8)),
            _series_points("grad_norm", "global", step_arr, 1 + 5.0 * (t > 0.78)),
        ]
    )
    chunk: list[ColumnarPoints] = []
    for i, name in enumerate(names):
        phase = i / len(names)
        sr = (8 + 4 * np.sin(6 * t + 7 * phase)) * (1 - 0.7 * (t > 0.75 + 0.1 * phase)) + 1
        chunk.append(_series_points("stable_rank", name, step_arr, sr + 0.1 * rng.random(steps)))
        chunk.append(
            _series_points(
                "sa_sign_diversity",
                name,
                step_arr,
                np.clip(0.9 - 0.6 * t * phase + 0.05 * rng.random(steps), 0, 1),
            )
        )
        if len(chunk) >= 100:
            insert(chunk)
            chunk = []
    for b in range(blocks):
        chunk.append(
            _series_points(
                "attention_logit_max",
                f"model.layers.{b}.attn",
                step_arr,
                5 + 20 * t**3 * (1 + b % 7),
            )
        )
        if b + 1 < blocks:
            pair = f"model.layers.{b}->model.layers.{b + 1}"
            a = np.clip(0.3 + 0.5 * t + 0.05 * np.sin(11 * t + b), 0, 1)
            chunk.append(_series_points("jacobian_alignment", pair, step_arr, a))
            chunk.append(
                _series_points(
                    "jacobian_alignment_gain", pair, step_arr, a * (1.2 + 0.8 * np.sin(3 * t + b))
                )
            )
        if len(chunk) >= 100:
            insert(chunk)
            chunk = []
    if chunk:
        insert(chunk)

    class _H:  # the attribute shape storage.insert_histograms reads
        def __init__(self, d: dict[str, Any]) -> None:
            self.__dict__.update(d, wall_time=None)

    hists = [
        _H(h)
        for h in synthetic.histograms(blocks=blocks, steps=steps, per_block=PER_BLOCK, count=50)
    ]
    with db.write() as session:
        storage.insert_histograms(session=session, run_id=run_id, histograms=hists, known=known)
        storage.create_event(
            session=session,
            run_id=run_id,
            kind="alert",
            step=int(steps * 0.7),
            payload=synthetic.ALERT_EVENT["payload"],
        )
        storage.create_event(
            session=session,
            run_id=run_id,
            kind="intervention",
            step=int(steps * 0.8),
            payload=synthetic.INTERVENTION_EVENT["payload"],
        )
    db.dispose()
    return run_id, time.perf_counter() - start, total


def serve(db_url: str, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rankguard.server.cli",
            "serve",
            "--no-auth",
            "--port",
            str(port),
            "--database-url",
            db_url,
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("rankguard serve did not start")
        time.sleep(0.2)


def endpoint_time(url: str, run_id: str, repeats: int) -> tuple[float, float, int, float]:
    """(first request: figures built, median of the repeats: served from the payload cache,
    payload bytes, median of a live poll of the unchanged run: If-None-Match -> 304)."""
    times, size, etag = [], 0, ""
    for _ in range(repeats):
        start = time.perf_counter()
        resp = httpx.get(f"{url}/api/v1/runs/{run_id}/figures", timeout=120)
        times.append(time.perf_counter() - start)
        resp.raise_for_status()
        size, etag = len(resp.content), resp.headers["etag"]
    polls = []
    for _ in range(repeats):
        start = time.perf_counter()
        resp = httpx.get(
            f"{url}/api/v1/runs/{run_id}/figures", headers={"If-None-Match": etag}, timeout=120
        )
        polls.append(time.perf_counter() - start)
        if resp.status_code != 304:
            raise RuntimeError(f"poll of an unchanged run: {resp.status_code}, expected 304")
    return times[0], statistics.median(times[1:]), size, statistics.median(polls)


# Where a load's time went (ms from navigation start): scripts run (plotly.js compiled), the
# figures' response in, their JSON parsed, everything drawn. run.js sets the rg: marks.
PHASES_JS = """() => {
  const mark = (n) => (performance.getEntriesByName(n)[0] || {}).startTime;
  const nav = performance.getEntriesByType("navigation")[0];
  return {scripts: nav.domContentLoadedEventEnd, response: mark("rg:response"),
          parsed: mark("rg:parsed"), drawn: window.__rankguardRenderedAt};
}"""


def page_times(
    browser: Any, url: str, run_id: str, loads: int
) -> tuple[list[float], list[float], dict[str, float]]:
    """(cold, warm) seconds from navigation start to every figure drawn, and the phases of
    the last cold load."""
    page_url = f"{url}/runs/{run_id}"

    def load(page: Any) -> float:
        page.goto(page_url)
        # Polled from outside: wait_for_function evals in the page, which its CSP refuses.
        # The figure is the page's own timestamp, so the polling period does not enter it.
        deadline = time.monotonic() + 120
        while not page.evaluate("() => window.__rankguardRendered === true"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{page_url} did not render in 120 s")
            time.sleep(0.05)
        ms: float = page.evaluate("window.__rankguardRenderedAt")
        return ms / 1000

    cold = []
    phases: dict[str, float] = {}
    for _ in range(loads):
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        cold.append(load(page))
        phases = page.evaluate(PHASES_JS)
        context.close()
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    load(page)  # fills the HTTP cache (plotly.js)
    warm = [load(page) for _ in range(loads)]
    context.close()
    return cold, warm, phases


def measure(browser: Any, workdir: Path, targets: int, steps: int, loads: int) -> dict[str, float]:
    db_url = f"sqlite:///{workdir / f'bench-{targets}x{steps}.db'}"
    run_id, seed_s, points = seed(db_url, targets=targets, steps=steps)
    proc, url = serve(db_url, workdir)
    try:
        build_s, endpoint_s, size, poll_s = endpoint_time(url, run_id, max(4, loads))
        cold, warm, phases = page_times(browser, url, run_id, loads)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    result = {
        "targets": targets,
        "steps": steps,
        "points": points,
        "seed_s": seed_s,
        "endpoint_s": endpoint_s,
        "payload_mb": size / 1e6,
        "cold_s": statistics.median(cold),
        "warm_s": statistics.median(warm),
    }
    print(
        f"{targets:>5} targets x {steps:>5} steps ({points / 1e6:.2f}M points, seeded in "
        f"{seed_s:.1f} s): figures endpoint first (build) {build_s:.3f} s, cached "
        f"{endpoint_s:.3f} s ({size / 1e6:.2f} MB), unchanged-run poll (304) {poll_s:.3f} s; page "
        f"rendered cold {result['cold_s']:.3f} s (loads: {', '.join(f'{c:.2f}' for c in cold)}), "
        f"warm {result['warm_s']:.3f} s (loads: {', '.join(f'{w:.2f}' for w in warm)}); "
        "last cold load, ms from navigation: "
        + ", ".join(f"{k} {v:.0f}" for k, v in phases.items() if v is not None),
        flush=True,
    )
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--targets", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="100 targets x 500 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.targets, args.steps = 100, 500
    from playwright.sync_api import sync_playwright

    print("load before:", os.getloadavg(), flush=True)
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        small = measure(browser, Path(tmp), 12, 200, args.loads)
        big = measure(browser, Path(tmp), args.targets, args.steps, args.loads)
        browser.close()
    print("load after:", os.getloadavg())
    print(
        f"big/small render time: cold {big['cold_s'] / small['cold_s']:.2f}x, "
        f"warm {big['warm_s'] / small['warm_s']:.2f}x; "
        f"big run cold {big['cold_s']:.2f} s against the 2 s target "
        f"({'met' if big['cold_s'] <= 2.0 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
