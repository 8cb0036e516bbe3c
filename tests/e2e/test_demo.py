"""The demo's path end to end on a short run: probe -> server -> alert -> MSign -> ack."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from helpers.live_server import free_port

from rankguard.probe.demo.run import run_demo, stop_started_servers

pytestmark = pytest.mark.slow


def test_short_demo_run_alerts_and_applies_msign(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the demo's ./rankguard.db and ./rankguard_logs
    port = free_port()
    try:
        demo = run_demo(port=port, max_steps=150, quiet=True)
        assert demo.server_pid is not None
        assert demo.first_alert_step is not None and demo.first_alert_step < 150
        applied = [c for c in demo.commands if c["state"] == "applied"]
        assert applied, demo.commands
        assert all(c["kind"] == "msign" and c["created_by"].startswith("alert:") for c in applied)
        for command in applied:
            matrices = command["result"]["matrices"]
            assert matrices
            for m in matrices:
                assert m["frobenius_after"] == pytest.approx(m["frobenius_before"], rel=1e-4)
        events = httpx.get(f"http://127.0.0.1:{port}/api/v1/runs/{demo.run_id}/events").json()
        kinds = {e["kind"] for e in events["data"]}
        assert {"alert", "command_applied"} <= kinds
    finally:
        stop_started_servers()
