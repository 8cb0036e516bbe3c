"""Rollback under torchrun (2 ranks, gloo): every rank restores the same snapshot at the
same command boundary, bit-identical to the state it saved at that step, for an operator's
order and for rank 0's in-process first response."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.torchrun import torchrun

pytestmark = pytest.mark.slow

WORKER = Path(__file__).parents[1] / "recovery_ddp_worker.py"


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):  # bit for bit, NaN where NaN (the poisoned steps)
        return (
            isinstance(b, torch.Tensor)
            and torch.equal(a.isnan(), b.isnan())
            and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
        )
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


def test_rollback_is_bit_identical_on_every_rank(tmp_path: Path) -> None:
    result = torchrun(WORKER, str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    logs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    states = [torch.load(tmp_path / f"states{r}.pt", weights_only=False) for r in (0, 1)]
    # the operator's order (step 13) at boundary 14: snapshot 8; the NaN loss at step 21
    # (rank 0's check) at boundary 22: the newest snapshot before the state after step 20
    assert logs[0]["windows"] == logs[1]["windows"] == [[9, 14], [17, 22]]
    assert logs[0]["commands"]["r1"]["state"] == logs[1]["commands"]["r1"]["state"] == "applied"
    for saved in states:
        assert same(saved["rolled14"], saved["after8"])
        assert same(saved["rolled22"], saved["after16"])
    for key in states[0]:
        assert same(states[0][key]["model"], states[1][key]["model"]), key
