"""Alerting end to end: a real `rankguard serve` process and a real local webhook receiver.

An sa_sign_diversity collapse (6 layers, the first at the earliest step) fires one alert that
names the earliest layer first; three webhooks (json, slack, alertmanager) get signed
payloads; the rule's MSign action queues one command (rate-limited); a replayed batch raises
nothing; the alert survives a server kill and restart (state in the database) and resolves
when the series recovers."""

from __future__ import annotations

import gzip
import json
import time
from typing import Any

import httpx
import pytest
from helpers.live_server import running_server
from helpers.webhook_receiver import Received, webhook_receiver

from rankguard.server.notify import signing

pytestmark = pytest.mark.slow

SECRET = "e2e-webhook-secret"
TARGETS = [f"transformer.h.{i}.mlp.c_fc.weight" for i in range(6)]
ONSET = {TARGETS[i]: 50 + 10 * k for k, i in enumerate([3, 0, 5, 1, 4, 2])}
SA_RULE = {
    "name": "sa_collapse_e2e",
    "quantity": "sa_sign_diversity",
    "condition": "below",
    "threshold": 0.1,
    "consecutive": 3,
    "clear_after": 3,
    "cooldown": 0,
    "severity": "critical",
    "msign": {"enabled": True, "targets": "attention", "max_orders": 1, "window_steps": 1000},
}


def batch(steps: range, onset: dict[str, int], recover_at: int | None = None) -> bytes:
    q, t, s, v = [], [], [], []
    for step in steps:
        for target in TARGETS:
            collapsed = onset[target] <= step and (recover_at is None or step < recover_at)
            q.append("sa_sign_diversity")
            t.append(target)
            s.append(step)
            v.append(0.05 if collapsed else 0.8)
    body = {"quantity": q, "target": t, "step": s, "value": v}
    return gzip.compress(json.dumps(body).encode())


def client(url: str, token: str) -> httpx.Client:
    return httpx.Client(
        base_url=f"{url}/api/v1", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )


def post_points(ingest: httpx.Client, run: str, body: bytes) -> dict[str, Any]:
    r = ingest.post(
        f"/runs/{run}/points",
        content=body,
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    r.raise_for_status()
    return dict(r.json())


def check_signed(got: list[Received]) -> None:
    for g in got:
        assert signing.verify_signature(
            g.body,
            SECRET,
            g.headers.get("X-Rankguard-Signature"),
            g.headers.get("X-Rankguard-Timestamp"),
        ), g


def test_collapse_alert_webhooks_msign_restart_and_resolution(tmp_path: Any) -> None:
    with running_server(tmp_path) as server, webhook_receiver() as receiver:
        tokens = server.new_project()
        ingest = client(server.url, tokens["ingest"])
        read = client(server.url, tokens["read"])
        operate = client(server.url, tokens["operate"])
        for fmt in ("json", "slack", "alertmanager"):
            operate.post(
                "/webhooks",
                json={"name": fmt, "url": receiver.url(f"/{fmt}"), "format": fmt, "secret": SECRET},
            ).raise_for_status()
        operate.post("/alert-rules", json={"rule": SA_RULE}).raise_for_status()
        run = ingest.post("/runs", json={"name": "collapse"}).json()["id"]

        first = batch(range(0, 60, 10), ONSET)
        post_points(ingest, run, first)
        post_points(ingest, run, batch(range(60, 120, 10), ONSET))
        fired = receiver.wait_for(3)
        check_signed(fired)
        by_path = {g.path: g.json() for g in fired}
        assert set(by_path) == {"/json", "/slack", "/alertmanager"}
        payload = by_path["/json"]
        assert payload["status"] == "firing" and payload["rule"] == "sa_collapse_e2e"
        assert payload["targets"][0]["target"] == TARGETS[3]  # the earliest mover first
        assert payload["first_step"] == 50 and payload["step"] == 70
        assert TARGETS[3] in by_path["/slack"]["text"] or TARGETS[3] in json.dumps(
            by_path["/slack"]["blocks"]
        )
        assert by_path["/alertmanager"]["alerts"][0]["labels"]["run"] == run
        [alert] = read.get(f"/runs/{run}/alerts").json()["data"]
        assert payload["alert_id"] == alert["id"]

        commands = read.get(f"/runs/{run}/commands").json()["data"]
        assert [(c["kind"], c["created_by"], c["args"]["targets"]) for c in commands] == [
            ("msign", f"alert:{alert['id']}", "attention")
        ]

        # The probe's spill replay sends the same batch again: nothing new.
        assert post_points(ingest, run, first)["inserted"] == 0
        assert read.get(f"/runs/{run}/alerts").json()["count"] == 1

        # Kill the server (no clean shutdown) and start it again on the same database.
        server.kill()
        server.start()
        [still] = read.get(f"/runs/{run}/alerts", params={"state": "firing"}).json()["data"]
        assert still["id"] == alert["id"]

        # Recovery: the engine state survived the restart, so the alert resolves (once).
        post_points(ingest, run, batch(range(120, 200, 10), dict.fromkeys(TARGETS, 10**9)))
        resolved = receiver.wait_for(6)[3:]
        check_signed(resolved)
        by_path = {g.path: g.json() for g in resolved}
        assert by_path["/json"]["status"] == "resolved"
        assert by_path["/json"]["alert_id"] == alert["id"]
        assert by_path["/alertmanager"]["status"] == "resolved"
        [done] = read.get(f"/runs/{run}/alerts").json()["data"]
        assert (done["state"], done["resolved_step"]) == ("resolved", 140)

        # A second collapse within the MSign window: a new alert, no second command.
        post_points(ingest, run, batch(range(200, 260, 10), dict.fromkeys(TARGETS, 200)))
        receiver.wait_for(9)
        newest = read.get(f"/runs/{run}/alerts").json()["data"][0]
        assert (newest["episode"], newest["command_suppressed"]) == (2, True)
        assert len(read.get(f"/runs/{run}/commands").json()["data"]) == 1

        # The delivery log shows every notification delivered on the first attempt.
        hooks = read.get("/webhooks").json()["data"]
        for hook in hooks:
            deadline = time.monotonic() + 10  # the outcome is written just after the reply
            while True:
                log = read.get(f"/webhooks/{hook['id']}/deliveries").json()["data"]
                if [d["outcome"] for d in log] == ["delivered"] * 3 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert [d["outcome"] for d in log] == ["delivered"] * 3, log
            assert all(len(d["attempts"]) == 1 for d in log)
        for c in (ingest, read, operate):
            c.close()
