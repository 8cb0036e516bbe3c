"""Webhook isolation: how long a fast receiver waits for its alerts while another receiver of
the same project is slow (issue 18, failure 8: 0.2 s became 20-43 s).

A real `rankguard serve` (any build: ``--rankguard`` points at its console script, so the
same workload runs against an older checkout), two real local receivers (one answers after
``--slow-s``, one at once) and one alert rule that fires and resolves at every other step;
one ingest makes ``2 * --flips`` notifications for each receiver. Reported: the fast
receiver's latency from that ingest to each of its notifications (p50, max), and how many
the slow one had received by then.

    .venv/bin/python benchmarks/webhook_isolation.py
    .venv/bin/python benchmarks/webhook_isolation.py --rankguard ../main/.venv/bin/rankguard
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from helpers.webhook_receiver import Receiver, webhook_receiver  # noqa: E402

from benchmarks.ingest import TOKEN, rankguard_server  # noqa: E402

# The receivers are local; the slow one is slow, not dead (under the attempt deadline).
SERVER_ENV = {
    "RANKGUARD_WEBHOOK_ALLOW": "127.0.0.1/32",
    "RANKGUARD_WEBHOOK_TIMEOUT_S": "30",
    "RANKGUARD_DELIVERY_POLL_S": "0.2",
}
FLIP_RULE = {
    "name": "bench_flip",
    "quantity": "loss",
    "condition": "above",
    "threshold": 10.0,
    "consecutive": 1,
    "clear_after": 1,
    "cooldown": 0,
    "severity": "warning",
}


def run_workload(
    base: str,
    slow: Receiver,
    fast: Receiver,
    flips: int,
    *,
    operate: str = TOKEN,
    ingest: str = TOKEN,
) -> dict[str, Any]:
    """Two webhooks and one flipping rule (with the ``operate`` token), one ingest (with the
    ``ingest`` token); waits for every notification of the fast receiver."""
    url = f"{base}/api/v1"
    with httpx.Client(base_url=url, headers=_bearer(operate), timeout=60) as api:
        for name, receiver in (("slow", slow), ("fast", fast)):
            hook = {"name": name, "url": receiver.url(f"/{name}"), "min_severity": "info"}
            api.post("/webhooks", json=hook).raise_for_status()
        api.post("/alert-rules", json={"rule": FLIP_RULE}).raise_for_status()
    with httpx.Client(base_url=url, headers=_bearer(ingest), timeout=60) as api:
        run = api.post("/runs", json={"name": "isolation"}).json()["id"]
        steps = list(range(1, 2 * flips + 2))
        values = [20.0 if s % 2 else 1.0 for s in steps]  # fires at odd steps, resolves at even
        body = {"quantity": ["loss"] * len(steps), "target": ["global"] * len(steps)}
        sent = time.perf_counter()
        api.post(f"/runs/{run}/points", json={**body, "step": steps, "value": values})
    expected = 2 * flips
    arrived = fast.wait_for(expected, timeout=600, path="/fast")
    latencies = [r.at - sent for r in arrived[:expected]]
    slow_by_then = len([r for r in slow.requests if r.at <= arrived[expected - 1].at])
    return {
        "notifications_each": expected,
        "fast_p50_s": statistics.median(latencies),
        "fast_max_s": max(latencies),
        "slow_received_by_then": slow_by_then,
    }


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def measure(rankguard: str, database_url: str, *, slow_s: float, flips: int) -> dict[str, Any]:
    with (
        webhook_receiver() as slow,
        webhook_receiver() as fast,
        rankguard_server(database_url, rankguard=rankguard, env=SERVER_ENV) as base,
    ):
        slow.delay_s = slow_s
        return run_workload(base, slow, fast, flips)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rankguard", default=str(Path(sys.executable).with_name("rankguard")))
    parser.add_argument("--slow-s", type=float, default=2.0)
    parser.add_argument("--flips", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(
            args.rankguard,
            f"sqlite:///{Path(tmp) / 'rg.db'}",
            slow_s=args.slow_s,
            flips=args.flips,
        )
    print(f"rankguard: {args.rankguard}")
    print(
        f"slow receiver answers after {args.slow_s} s; {result['notifications_each']} "
        f"notifications per receiver from one ingest"
    )
    print(
        f"fast receiver latency: p50 {result['fast_p50_s']:.3f} s, "
        f"max {result['fast_max_s']:.3f} s; slow receiver had "
        f"{result['slow_received_by_then']} by then"
    )


if __name__ == "__main__":
    main()
