"""Dashboard load times in headless Chromium against a real ``rankguard serve`` (``--no-auth``)
on SQLite files seeded by ``benchmarks/dashboard_seed.py``. Each figure is a median over
repeated loads; the load average of the (shared) machine is printed beside it.

- ``run``: the run page of a run with 1,000 weight matrices × 2,000 sampled steps, from
  navigation start to every figure drawn (``window.__rankguardRenderedAt``). "Cold" loads use
  a fresh browser context each (plotly.js fetched and compiled again), "warm" ones reload in
  one context. The same on a small run (12 × 200) is the baseline. Target: ≤ 2 s.
- ``runs``: the runs page with 1,000 runs (each judged by the default rules on ingest), first
  render of a fresh browser context: newest first, and sorted by risk, which ranks every run
  by its margins: once on a freshly started server (no margin cached: "cold server"), and on
  a server that computed them before. Target: ≤ 1 s.
- ``compare``: 4 runs × 1,000 matrices × 2,000 steps overlaid (stable rank, min over the
  matrices, and the loss), fresh browser context each load. Target: ≤ 2 s cold.

    python -m benchmarks.dashboard_load                    # all three
    python -m benchmarks.dashboard_load --only runs compare --repeats 3
    python -m benchmarks.dashboard_load --quick            # small sizes, a smoke run
"""

from __future__ import annotations

import argparse
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.dashboard_seed import clone_run, seed_fleet, seed_run
from tests.helpers.browser import chromium


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
    run_id, seed_s, points = seed_run(db_url, targets=targets, steps=steps)
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


def first_render(browser: Any, url: str, phases: dict[str, float] | None = None) -> float:
    """Seconds from navigation start to the page's data drawn, in a fresh browser context;
    ``phases`` (given) receives where that time went (PHASES_JS)."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.goto(url)
    page.wait_for_function("() => window.__rankguardRendered === true", timeout=120_000)
    ms: float = page.evaluate("window.__rankguardRenderedAt")
    if phases is not None:
        phases.update(page.evaluate(PHASES_JS))
    context.close()
    return ms / 1000


def _load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _median(label: str, times: list[float], target: float | None = None) -> float:
    med = statistics.median(times)
    verdict = (
        ""
        if target is None
        else f" against ≤ {target:g} s: {'met' if med <= target else 'NOT met'}"
    )
    print(f"  {label}: median {med:.3f} s ({', '.join(f'{t:.2f}' for t in times)}){verdict}; "
          f"{_load()}", flush=True)  # fmt: skip
    return med


def measure_runs_page(browser: Any, workdir: Path, runs: int, steps: int, repeats: int) -> None:
    db_url = f"sqlite:///{workdir / f'fleet-{runs}.db'}"
    seed_s = seed_fleet(db_url, runs=runs, steps=steps)
    print(f"runs page: {runs} runs x {steps} steps (7 series each, default rules judged on "
          f"ingest), seeded in {seed_s:.1f} s", flush=True)  # fmt: skip
    cold_server, api_cold, api_warm = [], [], []
    newest, risk = [], []
    for _ in range(repeats):
        proc, url = serve(db_url, workdir)  # a fresh server: no margin cached
        try:
            cold_server.append(first_render(browser, url + "/?sort=risk"))
            newest.append(first_render(browser, url + "/"))
            risk.append(first_render(browser, url + "/?sort=risk"))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        proc, url = serve(db_url, workdir)
        try:
            for sink in (api_cold, api_warm):
                start = time.perf_counter()
                httpx.get(url + "/api/v1/dashboard/runs?sort=risk", timeout=120).raise_for_status()
                sink.append(time.perf_counter() - start)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    _median("first render, newest first", newest, 1.0)
    _median("first render, sorted by risk, margins cached by the server", risk, 1.0)
    _median("first render, sorted by risk, freshly started server", cold_server, 1.0)
    _median("endpoint sort=risk, fresh server (every run's margins computed)", api_cold)
    _median("endpoint sort=risk, margins cached", api_warm)


def measure_compare(browser: Any, workdir: Path, targets: int, steps: int, repeats: int) -> None:
    db_url = f"sqlite:///{workdir / f'compare-{targets}x{steps}.db'}"
    start = time.perf_counter()
    first, _, points = seed_run(db_url, targets=targets, steps=steps, full=False)
    ids = [first] + [clone_run(db_url, first, f"clone-{i}", 1 + 0.1 * i) for i in range(1, 4)]
    print(f"compare: 4 runs x {targets} matrices x {steps} steps ({4 * points / 1e6:.1f}M "
          f"points), seeded in {time.perf_counter() - start:.1f} s", flush=True)  # fmt: skip
    page = "/compare?runs=" + ",".join(ids)
    loads, endpoint, mean_agg = [], [], []
    phases: dict[str, float] = {}
    proc, url = serve(db_url, workdir)
    try:
        warmup = first_render(browser, url + page)  # the server's first build imports plotly
        for _ in range(repeats):
            loads.append(first_render(browser, url + page, phases))
            for sink, extra in ((endpoint, ""), (mean_agg, "&agg=mean")):
                start = time.perf_counter()
                resp = httpx.get(url + "/api/v1/dashboard/compare?runs=" + ",".join(ids) + extra,
                                 timeout=300)  # fmt: skip
                resp.raise_for_status()
                sink.append(time.perf_counter() - start)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"  first render on a freshly started server: {warmup:.2f} s", flush=True)
    _median("first render, fresh browser context (stable_rank min over matrices + loss)",
            loads, 2.0)  # fmt: skip
    print("  last load, ms from navigation: "
          + ", ".join(f"{k} {v:.0f}" for k, v in phases.items() if v is not None))  # fmt: skip
    _median("endpoint, stable_rank min over matrices (rollup)", endpoint)
    _median("endpoint, stable_rank mean over matrices (every point read)", mean_agg)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--only", nargs="+", choices=("run", "runs", "compare"),
                        default=["run", "runs", "compare"])  # fmt: skip
    parser.add_argument("--targets", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=1000, help="runs of the runs page")
    parser.add_argument("--run-steps", type=int, default=400, help="steps of each of those")
    parser.add_argument("--loads", type=int, default=5, help="loads per run-page figure")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the fleet figures")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.targets, args.steps, args.runs, args.run_steps = 100, 500, 60, 100
    print("before:", _load(), flush=True)
    with tempfile.TemporaryDirectory() as tmp, chromium() as browser:
        if "run" in args.only:
            small = measure(browser, Path(tmp), 12, 200, args.loads)
            big = measure(browser, Path(tmp), args.targets, args.steps, args.loads)
            print(
                f"big/small render time: cold {big['cold_s'] / small['cold_s']:.2f}x, "
                f"warm {big['warm_s'] / small['warm_s']:.2f}x; big run cold "
                f"{big['cold_s']:.2f} s against the 2 s target "
                f"({'met' if big['cold_s'] <= 2.0 else 'NOT met'})"
            )
        if "runs" in args.only:
            measure_runs_page(browser, Path(tmp), args.runs, args.run_steps, args.repeats)
        if "compare" in args.only:
            measure_compare(browser, Path(tmp), args.targets, args.steps, args.repeats)
    print("after:", _load())


if __name__ == "__main__":
    main()
