"""Alert latency and the ingest cost of evaluating alert rules, on a real `rankguard serve`.

Claims (issue 5):
(a) from the HTTP ingest of the tripping point to the webhook received by a real local
    receiver: p95 <= 1 s (p50 and p95 over one alert per run, many runs);
(b) evaluating the rule pack on ingest costs little: ingest throughput (points/s over HTTP,
    several client threads, gzip columnar batches) with rules evaluated vs
    RANKGUARD_ALERTS_ENABLED=false on the same workload, ratio >= 0.8.

The workload uses the contract's quantity names (stable_rank, sa_sign_diversity, ...) over
96 targets so the default rule pack really evaluates (7 of its 10 rules match these
quantities: all but the loss, gradient-norm and non-finite ones); the values stay healthy,
so (b) measures evaluation, not alert traffic.

    .venv/bin/python benchmarks/alert_latency.py --quick
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from helpers.webhook_receiver import webhook_receiver  # noqa: E402

from benchmarks.ingest import HEADERS, rankguard_server  # noqa: E402

TARGETS = [f"transformer.h.{i // 8}.attn.c_attn.weight[{i % 8}]" for i in range(96)]
QUANTITIES = (
    "stable_rank",
    "sa_sign_diversity",
    "spectral_norm",
    "representation_stable_rank",
    "attention_logit_max",
    "jacobian_alignment_gain",
    "update_ratio",
    "singularity_alignment",
)
GZIP = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
TRIP_RULE = {
    "name": "bench_sa_collapse",
    "quantity": "sa_sign_diversity",
    "condition": "below",
    "threshold": 0.1,
    "targets": ["*"],
}


def healthy(q: str, step: int, t: int) -> float:
    if q == "sa_sign_diversity":
        return 0.6 + (step * 7 + t) % 30 / 100
    if q == "update_ratio":  # a healthy step moves a weight by ~1% (the rule's bound: 5%)
        return 0.005 + (step + t) % 40 / 4000
    if q in ("jacobian_alignment_gain", "singularity_alignment"):
        return 0.1 + (step + t) % 40 / 100
    return 5.0 + (step * 31 + t) % 97 / 97


def body(steps: range, trip: int | None = None) -> bytes:
    """Every (quantity, target) at each step; ``trip``: that target's SA diversity is 0.05."""
    q, tg, s, v = [], [], [], []
    for step in steps:
        for quantity in QUANTITIES:
            for ti, target in enumerate(TARGETS):
                q.append(quantity)
                tg.append(target)
                s.append(step)
                value = healthy(quantity, step, ti)
                if trip is not None and quantity == "sa_sign_diversity" and ti == trip:
                    value = 0.05
                v.append(value)
    data = {"quantity": q, "target": tg, "step": s, "value": v}
    return gzip.compress(json.dumps(data).encode(), compresslevel=1)


def percentile(xs: list[float], p: float) -> float:
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def measure_latency(base: str, runs: int) -> list[float]:
    """Seconds from sending the tripping batch to the webhook's arrival, one per run."""
    latencies = []
    with (
        webhook_receiver() as receiver,
        httpx.Client(base_url=base, headers=HEADERS, timeout=60) as c,
    ):
        c.post("/api/v1/alert-rules", json={"rule": TRIP_RULE}).raise_for_status()
        c.post(
            "/api/v1/webhooks", json={"name": "bench", "url": receiver.url("/hook"), "secret": "s"}
        ).raise_for_status()
        warm = body(range(0, 50, 10))
        for i in range(runs):
            run = c.post("/api/v1/runs", json={"name": f"latency-{i}"}).json()["id"]
            c.post(f"/api/v1/runs/{run}/points", content=warm, headers=GZIP).raise_for_status()
            trip = body(range(50, 60, 10), trip=i % len(TARGETS))
            t0 = time.perf_counter()
            c.post(f"/api/v1/runs/{run}/points", content=trip, headers=GZIP).raise_for_status()
            got = receiver.wait_for(i + 1, timeout=30)
            latencies.append(got[i].at - t0)
            assert got[i].json()["run"]["id"] == run
    return latencies


def measure_ingest(base: str, clients: int, batches: int, steps_per_batch: int) -> float:
    """Points/s over HTTP: ``clients`` threads, each its own run, bodies built beforehand."""
    bodies = [body(range(i * steps_per_batch, (i + 1) * steps_per_batch)) for i in range(batches)]
    n_per_batch = steps_per_batch * len(QUANTITIES) * len(TARGETS)
    barrier = threading.Barrier(clients + 1)
    spans: list[tuple[float, float]] = []

    def client() -> None:
        with httpx.Client(base_url=base, headers=HEADERS, timeout=120) as c:
            run = c.post("/api/v1/runs", json={"name": "throughput"}).json()["id"]
            barrier.wait()
            t0 = time.perf_counter()
            for b in bodies:
                c.post(f"/api/v1/runs/{run}/points", content=b, headers=GZIP).raise_for_status()
            spans.append((t0, time.perf_counter()))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    for t in threads:
        t.join()
    elapsed = max(e for _, e in spans) - min(s for s, _ in spans)
    return clients * batches * n_per_batch / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs and points")
    parser.add_argument("--database-url", help="default: a fresh SQLite file per server")
    args = parser.parse_args()
    runs = 20 if args.quick else 50
    clients, batches, spb = (4, 8, 4) if args.quick else (4, 25, 4)
    repeats = 2 if args.quick else 3

    with tempfile.TemporaryDirectory(prefix="rankguard-alert-bench-") as tmp:

        def url(tag: str) -> str:
            return args.database_url or f"sqlite:///{Path(tmp) / tag}.db"

        os.environ["RANKGUARD_ALERTS_ENABLED"] = "true"
        # The receiver is local: a server refuses loopback webhooks unless allowed.
        local = {"RANKGUARD_WEBHOOK_ALLOW": "127.0.0.1/32"}
        with rankguard_server(url("latency"), env=local) as base:
            latencies = measure_latency(base, runs)

        rates: dict[str, list[float]] = {"on": [], "off": []}
        for r in range(repeats):  # interleaved: a noisy neighbour hits both sides alike
            for mode in ("off", "on"):
                os.environ["RANKGUARD_ALERTS_ENABLED"] = "true" if mode == "on" else "false"
                with rankguard_server(url(f"ingest-{mode}-{r}")) as base:
                    rates[mode].append(measure_ingest(base, clients, batches, spb))
        os.environ.pop("RANKGUARD_ALERTS_ENABLED", None)

    p50, p95 = percentile(latencies, 50), percentile(latencies, 95)
    on, off = max(rates["on"]), max(rates["off"])
    ratio = on / off
    points = clients * batches * spb * len(QUANTITIES) * len(TARGETS)
    print(f"alert latency: ingest of the tripping point -> webhook received ({runs} runs)")
    print(f"  {'p50':<28}{p50 * 1000:>10.1f} ms")
    print(f"  {'p95':<28}{p95 * 1000:>10.1f} ms   target <= 1000 ms")
    print(f"  {'max':<28}{max(latencies) * 1000:>10.1f} ms")
    print(f"ingest throughput, {clients} client threads, {points:,} points per measurement")
    print(f"  {'rules off (baseline)':<28}{off:>10,.0f} points/s  {rates['off']}")
    print(f"  {'default pack evaluated':<28}{on:>10,.0f} points/s  {rates['on']}")
    print(f"  {'ratio on/off':<28}{ratio:>10.2f}   target >= 0.8")
    ok = p95 <= 1.0 and ratio >= 0.8
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
