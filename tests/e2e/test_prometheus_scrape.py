"""A real Prometheus scrapes a real `rankguard serve` process with a token of the metrics
scope: a PromQL query returns the gauge the server computed from the ingested points, and
``promtool check metrics`` accepts the exposition text."""

from __future__ import annotations

import subprocess
import time
from typing import Any

import httpx
import pytest
from helpers.live_server import running_server
from helpers.prometheus import running_prometheus
from helpers.tools import require_tool

pytestmark = [pytest.mark.prometheus, pytest.mark.slow]

TARGETS = [f"transformer.h.{i}.attn.c_attn.weight" for i in range(5)]


def query(prom: str, promql: str, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Poll until the query returns a sample (the first scrapes may precede the data)."""
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(f"{prom}/api/v1/query", params={"query": promql}, timeout=5)
        r.raise_for_status()
        result = list(r.json()["data"]["result"])
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


def test_prometheus_reads_the_run_gauges(tmp_path: Any) -> None:
    promtool = require_tool("promtool", hint="on Debian: apt-get install prometheus")
    with running_server(tmp_path) as server:
        tokens = server.new_project()
        with httpx.Client(
            base_url=f"{server.url}/api/v1",
            headers={"Authorization": f"Bearer {tokens['ingest']}"},
            timeout=30,
        ) as ingest:
            run = ingest.post("/runs", json={"name": "scraped"}).json()["id"]
            earlier = [9.0, 9.5, 8.5, 9.0, 9.9]
            latest = [6.5, 4.25, 7.0, 5.5, 8.0]
            for step, values in ((10, earlier), (20, latest)):
                body = {
                    "quantity": ["stable_rank"] * 5,
                    "target": TARGETS,
                    "step": [step] * 5,
                    "value": values,
                }
                ingest.post(f"/runs/{run}/points", json=body).raise_for_status()

        assert httpx.get(f"{server.url}/metrics", timeout=10).status_code == 401
        with server.admin() as admin:
            minted = admin.post(
                "/tokens",
                json={"name": "prometheus", "project": tokens["project"], "scopes": ["metrics"]},
            )
        scrape_token = minted.json()["token"]
        scrape = {"Authorization": f"Bearer {scrape_token}"}
        exposition = httpx.get(f"{server.url}/metrics", headers=scrape, timeout=10)
        assert exposition.status_code == 200
        check = subprocess.run(
            [promtool, "check", "metrics"],
            input=exposition.content,
            capture_output=True,
            timeout=60,
        )
        assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()

        with running_prometheus(
            scrape_targets=[f"127.0.0.1:{server.port}"], bearer_token=scrape_token
        ) as prom:
            selector = f'quantity="stable_rank",aggregate="min",run="{run}"'
            [sample] = query(prom, f"rankguard_run_quantity{{{selector}}}")
            assert float(sample["value"][1]) == min(latest)
            assert sample["metric"]["project"] == tokens["project"]
            [step] = query(prom, f'rankguard_run_last_step{{run="{run}"}}')
            assert float(step["value"][1]) == 20
            top = query(prom, f'rankguard_run_quantity_top{{run="{run}"}}')
            assert len(top) == 5
            [up] = query(prom, 'up{job="rankguard"}')
            assert up["value"][1] == "1"
