"""Rollback under FSDP2 (2 ranks, gloo, CPU): each rank restores its own shards of the
weights and of the optimizer state, bit for bit, with no gather; nothing hangs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers.torchrun import torchrun

pytestmark = pytest.mark.slow

WORKER = Path(__file__).parents[1] / "recovery_fsdp_worker.py"


def test_each_rank_restores_its_shards(tmp_path: Path) -> None:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    proc = torchrun(WORKER, str(tmp_path), timeout=120)
    if proc.returncode != 0 and "FSDP2 unavailable" in proc.stderr:
        pytest.skip(proc.stderr[proc.stderr.index("FSDP2 unavailable") :].splitlines()[0])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        record = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert record["commands"]["r"]["state"] == "applied", record["commands"]
        assert record["windows"] == [(5, 7)]  # the snapshot of step 4 (confirmed at 5)
        restored, snapshot = record["saved"]["after7"], record["saved"]["after4"]
        assert restored.keys() == snapshot.keys()
        for key in restored:
            assert torch.equal(restored[key], snapshot[key]), (rank, key)
