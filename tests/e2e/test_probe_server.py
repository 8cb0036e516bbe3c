"""The probe against a real `rankguard serve` process: MSign ordered over the API is applied
at one step and acknowledged; a server killed mid-run loses no point and duplicates none;
an offline run uploaded later (twice) is stored once."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import torch.nn.functional as F
from helpers.live_server import LiveServer, running_server
from helpers.models import TinyGPT

from rankguard.probe import Probe

pytestmark = pytest.mark.slow

VOCAB = 32


def train_step(model: TinyGPT, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> Any:
    idx = torch.randint(0, VOCAB, (4, 8), generator=generator)
    logits = model(idx)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), idx[:, 1:].reshape(-1))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def read_series(server: LiveServer, token: str, run_id: str, quantity: str) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{server.url}/api/v1/runs/{run_id}/series",
        params={"quantity": quantity, "max_points": 1_000_000},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    response.raise_for_status()
    return list(response.json()["series"])


def test_msign_ordered_over_the_api_is_applied_acked_and_recorded(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyGPT()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    with running_server(tmp_path) as server:
        tokens = server.new_project()
        probe = Probe(
            model,
            optimizer,
            run="e2e-msign",
            server=server.url,
            token=tokens["ingest"],
            every=5,
            log_dir=tmp_path / "logs",
        )
        operate = {"Authorization": f"Bearer {tokens['operate']}"}
        queued = None
        applied_at = None
        targets_before: dict[str, torch.Tensor] = {}
        for step in range(400):
            train_step(model, optimizer, generator)
            if step == 3:
                # The run registered itself; order MSign on its attention weights.
                response = httpx.post(
                    f"{server.url}/api/v1/runs/{probe.run_id}/commands",
                    json={"kind": "msign", "args": {"targets": "attention", "engine": "svd"}},
                    headers=operate,
                )
                assert response.status_code == 201, response.text
                queued = response.json()["id"]
            # What the weights were just before this step boundary (when a command may act).
            targets_before = {t.name: t.matrix().detach().clone() for t in probe.targets}
            probe.step()
            if probe.command_log():  # applied at this step boundary
                applied_at = step
                break
            time.sleep(0.01)
        assert applied_at is not None, "the command never reached the probe"

        # On the model: every attention matrix is now (|W|_F/sqrt(r)) U V^T.
        for target in probe.targets:
            after = target.matrix().detach().double()
            before = targets_before[target.name].double()
            if "attention" not in target.groups:
                assert torch.equal(target.matrix(), targets_before[target.name])
                continue
            singular_values = torch.linalg.svdvals(after)
            stable_rank = (singular_values.square().sum() / singular_values[0] ** 2).item()
            assert stable_rank == pytest.approx(min(after.shape), rel=1e-5)
            assert after.norm().item() == pytest.approx(before.norm().item(), rel=1e-5)

        report = probe.close(timeout=30)
        assert report.delivered_all, str(report)

        command = httpx.get(
            f"{server.url}/api/v1/runs/{probe.run_id}/commands/{queued}", headers=operate
        ).json()
        assert command["state"] == "applied"
        assert command["applied_step"] == applied_at
        matrices = command["result"]["matrices"]
        assert {m["name"] for m in matrices} == {
            t.name for t in probe.targets if "attention" in t.groups
        }
        for m in matrices:
            assert m["stable_rank_after"] == pytest.approx(m["rank"], rel=1e-4)
            assert m["frobenius_after"] == pytest.approx(m["frobenius_before"], rel=1e-5)
        events = httpx.get(
            f"{server.url}/api/v1/runs/{probe.run_id}/events", headers=operate
        ).json()["data"]
        assert [e["step"] for e in events if e["kind"] == "command_applied"] == [applied_at]


def test_server_killed_mid_run_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyGPT()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(0)
    steps = 120
    with running_server(tmp_path) as server:
        tokens = server.new_project()
        probe = Probe(
            model,
            optimizer,
            run="e2e-fault",
            server=server.url,
            token=tokens["ingest"],
            every=1,
            quantities=["stable_rank", "grad_norm"],
            log_dir=tmp_path / "logs",
        )
        for step in range(steps):
            train_step(model, optimizer, generator)
            probe.step(torch.tensor(float(step)))
            if step == 40:
                server.kill()  # no clean shutdown: whatever was in flight is cut off
            if step == 80:
                assert probe.stats().spilled_batches > 0
                server.start()
            time.sleep(0.005)
        report = probe.close(timeout=60)
        assert report.delivered_all, str(report)
        stats = probe.stats()
        assert stats.replayed_batches > 0
        assert stats.dropped_batches == 0

        (loss,) = read_series(server, tokens["read"], probe.run_id, "loss")
        assert loss["steps"] == list(range(steps))
        assert loss["values"] == [float(s) for s in range(steps)]
        stable_rank = read_series(server, tokens["read"], probe.run_id, "stable_rank")
        assert {s["target"] for s in stable_rank} == {t.name for t in probe.targets}
        for series in stable_rank:
            assert series["steps"] == list(range(steps)), series["target"]


def test_offline_run_uploaded_twice_is_stored_once(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyGPT()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(0)
    probe = Probe(model, optimizer, run="offline", every=2, log_dir=tmp_path / "logs")
    for _ in range(10):
        probe.step(train_step(model, optimizer, generator))
    probe.close()
    path = probe.sink_path
    assert path is not None and path.exists()
    with running_server(tmp_path) as server:
        tokens = server.new_project()
        for _ in range(2):
            subprocess.run(
                [
                    str(Path(sys.executable).with_name("rankguard")),
                    "upload",
                    str(path),
                    "--server",
                    server.url,
                    "--token",
                    tokens["ingest"],
                ],
                check=True,
                capture_output=True,
                timeout=120,
            )
        (loss,) = read_series(server, tokens["read"], probe.run_id, "loss")
        assert loss["steps"] == list(range(10))
        stable_rank = read_series(server, tokens["read"], probe.run_id, "stable_rank")
        assert all(s["steps"] == [0, 2, 4, 6, 8] for s in stable_rank)
