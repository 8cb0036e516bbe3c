"""The demo's path end to end on a short run: probe (auto-recover) -> server; the 100x
learning-rate spike at step 150 is caught at the step it lands and rolled back; the
rollback is an event on the server and the table's remedies say so."""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import pytest
from helpers.live_server import free_port

from benchmarks.demo import remedies, run_demo, stop_started_servers

pytestmark = pytest.mark.slow


def test_short_demo_run_rolls_back_the_spike(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the demo's ./rankguard.db and ./rankguard_logs
    port = free_port()
    try:
        demo = run_demo(port=port, max_steps=155, quiet=True)
        assert demo.server_pid is not None
        (rollback,) = [e for e in demo.events if e["kind"] == "rollback"]
        payload = rollback["payload"]
        assert rollback["step"] == 150 and payload["restored_step"] < 150
        assert payload["skipped"] == [payload["restored_step"] + 1, 150]
        assert payload["reason"] == "update_ratio_spike" and payload["lr_factor"] < 0.5
        assert remedies(demo)["rollback"] == 1
        assert math.isfinite(demo.final_loss) and demo.final_loss < 3.0
        events = httpx.get(f"http://127.0.0.1:{port}/api/v1/runs/{demo.run_id}/events").json()
        assert "rollback" in {e["kind"] for e in events["data"]}
    finally:
        stop_started_servers()
