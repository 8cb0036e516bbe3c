"""Issue 18, failure 2 (the probe's side), against the real server: the registration of a run
with a project token mints a job token; the probe uses it for everything after (its points
are stored, an operator's msign reaches it and its ack is recorded), and that token is
refused on any other run."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F
from helpers.live_server import running_server
from helpers.models import TinyGPT

from rankguard.probe import Probe
from rankguard.probe.http_transport import HttpTransport

pytestmark = [
    pytest.mark.slow,
]


def test_the_probe_works_on_the_job_token_its_run_was_given(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyGPT()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(0)
    with running_server(tmp_path) as server:
        tokens = server.new_project()
        probe = Probe(
            model,
            optimizer,
            run="job-token",
            server=server.url,
            token=tokens["ingest"],
            log_dir=str(tmp_path / "logs"),
            every=2,
            command_poll_interval=0.05,
        )
        transport = probe.transport
        assert isinstance(transport, HttpTransport)
        deadline = time.monotonic() + 30
        while not transport._registered and time.monotonic() < deadline:
            time.sleep(0.05)
        job = transport._auth["Authorization"]
        assert job != f"Bearer {tokens['ingest']}", "no job token minted"  # bound to the run
        api = f"{server.url}/api/v1"
        operate = {"Authorization": f"Bearer {tokens['operate']}"}
        order = httpx.post(
            f"{api}/runs/{probe.run_id}/commands", json={"kind": "msign"}, headers=operate
        )
        assert order.status_code == 201
        for _ in range(30):
            idx = torch.randint(0, 32, (2, 8), generator=generator)
            loss = F.cross_entropy(model(idx)[:, :-1].reshape(-1, 32), idx[:, 1:].reshape(-1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            probe.step(loss)
            time.sleep(0.02)
        report = probe.close(timeout=10)
        assert report.delivered_all, str(report)
        command = httpx.get(
            f"{api}/runs/{probe.run_id}/commands/{order.json()['id']}", headers=operate
        )
        assert command.json()["state"] == "applied"
        read = {"Authorization": f"Bearer {tokens['read']}"}
        series = httpx.get(
            f"{api}/runs/{probe.run_id}/series", params={"quantity": "loss"}, headers=read
        ).json()["series"]
        assert sum(len(s["steps"]) for s in series) == 30
        other = httpx.post(
            f"{api}/runs",
            json={"id": str(uuid.uuid4()), "name": "other"},
            headers={"Authorization": f"Bearer {tokens['ingest']}"},
        ).json()["id"]
        forged = httpx.post(
            f"{api}/runs/{other}/points",
            json={"quantity": ["loss"], "target": ["global"], "step": [0], "value": [1.0]},
            headers={"Authorization": job},
        )
        assert forged.status_code in (403, 404)
