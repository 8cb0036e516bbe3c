"""Under torchrun (2 ranks, gloo): a command is applied at the same step on every rank and
the weights stay bit-identical; with the server down, training finishes (no deadlock)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from helpers.live_server import free_port, running_server
from helpers.torchrun import torchrun

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("ddp_worker.py")


def run_workers(out_dir: Path, server: str, ingest: str, operate: str, steps: int) -> None:
    result = torchrun(WORKER, str(out_dir), server, ingest, operate, str(steps))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def load_rank(out_dir: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict]:
    weights = torch.load(out_dir / f"rank{rank}.pt", weights_only=True)
    log = json.loads((out_dir / f"rank{rank}.json").read_text())
    return weights, log


def test_command_applied_at_the_same_step_on_every_rank(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        tokens = server.new_project()
        run_workers(tmp_path, server.url, tokens["ingest"], tokens["operate"], steps=200)
        weights0, log0 = load_rank(tmp_path, 0)
        weights1, log1 = load_rank(tmp_path, 1)

        assert log0["run_id"] == log1["run_id"]
        # rank 1 keeps no losses (rank 0 ships the loss): nothing piles up over the run
        assert log1["pending_losses"] == 0
        assert len(log0["commands"]) == 2, log0
        assert log0["commands"].keys() == log1["commands"].keys()
        for command_id in log0["commands"]:
            ack0, ack1 = log0["commands"][command_id], log1["commands"][command_id]
            assert ack0["state"] == ack1["state"] == "applied"
            assert ack0["step"] == ack1["step"]
            assert ack0["step"] % 2 == 0  # only at command-broadcast steps
        # the learning-rate backoff is in force on both ranks (equal weights below show that
        # both optimizers stepped with it from the same step)
        assert log0["lr_scale"] == log1["lr_scale"]
        assert log0["lr_scale"]["scale"] == 0.25
        command_id = next(
            c for c, ack in log0["commands"].items() if "matrices" in ack.get("result", {})
        )
        ack0 = log0["commands"][command_id]
        assert weights0.keys() == weights1.keys()
        for name in weights0:
            assert torch.equal(weights0[name], weights1[name]), name

        # Rank 1 shipped the activation quantities of its own batch, labelled rank 1; weight
        # quantities, gradients and the loss are rank 0's alone.
        index = httpx.get(
            f"{server.url}/api/v1/runs/{log0['run_id']}/series/index",
            headers={"Authorization": f"Bearer {tokens['read']}"},
        ).json()["series"]
        by_rank: dict[int, set[str]] = {}
        for entry in index:
            by_rank.setdefault(entry["rank"], set()).add(entry["quantity"])
        assert {"attention_logit_max", "sa_sign_diversity"} <= by_rank[1]
        assert by_rank[1] <= {
            "attention_logit_max",
            "sa_sign_diversity",
            "sa_cosine",  # its histogram
            "singularity_alignment",
            "representation_stable_rank",
        }
        assert {"stable_rank", "grad_norm", "loss", "attention_logit_max"} <= by_rank[0]

        command = httpx.get(
            f"{server.url}/api/v1/runs/{log0['run_id']}/commands/{command_id}",
            headers={"Authorization": f"Bearer {tokens['read']}"},
        ).json()
        assert command["state"] == "applied"
        assert command["applied_step"] == ack0["step"]


def test_no_deadlock_when_the_server_is_down(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    run_workers(tmp_path, dead, "no-token", "-", steps=30)
    weights0, log0 = load_rank(tmp_path, 0)
    weights1, _ = load_rank(tmp_path, 1)
    assert log0["commands"] == {}
    assert not log0["delivered"]
    for name in weights0:
        assert torch.equal(weights0[name], weights1[name]), name
    # Rank 0 kept everything it sampled in its spill file.
    assert any((tmp_path / "logs0").glob("*.jsonl"))
