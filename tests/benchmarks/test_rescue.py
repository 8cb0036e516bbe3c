"""The rescue benchmark's parts: the training loop rewinds after a rollback (fresh batches,
records cut back), the calibration procedure, and the count of remedies that acted."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from benchmarks.rescue import calibrate, healthy_maxima, remedies  # noqa: E402
from benchmarks.scenarios import catalog  # noqa: E402
from rankguard.probe.demo.data import ByteCorpus  # noqa: E402
from rankguard.probe.demo.train import train  # noqa: E402


class RewindOnce:
    """Returns training step 3 from step 5's callback, once (what a rollback does)."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def on_step(self, step: int, model: Any, optimizer: Any, loss: Any) -> int | None:
        self.calls.append(step)
        return 3 if step == 5 and self.calls.count(5) == 1 else None


def test_the_loop_resumes_from_the_restored_step_with_fresh_batches() -> None:
    corpus = ByteCorpus.load(max_bytes=200_000)
    cb = RewindOnce()
    result = train(catalog.get("healthy_preln"), 0, callbacks=[cb], max_steps=8, corpus=corpus)
    assert cb.calls == [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7]
    assert result.rollbacks == [(5, 3)]
    assert len(result.losses) == len(result.lrs) == 8  # the trajectory that exists
    assert len(result.wall_losses) == 11  # every batch, the undone ones included
    assert result.wall_losses[:3] == result.losses[:3]
    assert result.losses[3] != result.wall_losses[3]  # step 3 again, on a fresh batch


def test_calibration_is_the_healthy_maxima_times_a_margin() -> None:
    maxima = [
        {"loss_ratio": 1.16, "grad_ratio": 5.1, "update_ratio": 0.018},
        {"loss_ratio": 1.21, "grad_ratio": 3.0, "update_ratio": 0.034},
    ]
    assert calibrate(maxima) == {
        "loss_spike": 1.6,  # 1.25 x 1.21 = 1.51, up to 0.1
        "skip_factor": 11.0,  # 2 x 5.1, up to an integer
        "update_ratio_hot": 0.05,  # 1.5 x 0.034
        "warmup": 50,
    }


def test_healthy_maxima_start_after_the_warmup() -> None:
    losses = [10.0] * 10 + [2.0] * 90  # the early fall is learning, not a spike
    losses[70] = 3.0
    record = {
        "losses": losses,
        "grad_norms": [1.0] * 100,
        "points": {"update_ratio": [["w1", 20, 0.5], ["w1", 60, 0.02], ["w2", 60, 0.08]]},
    }
    found = healthy_maxima(record)
    assert found["loss_ratio"] == pytest.approx(1.5)
    assert found["grad_ratio"] == 1.0
    assert found["update_ratio"] == pytest.approx(math.sqrt(0.02 * 0.08))


def test_remedies_count_what_acted_in_the_process_and_from_the_server() -> None:
    record = {
        "events": [
            {"kind": "rollback", "payload": {}},
            {"kind": "qk_clip", "payload": {"heads_clipped": 0}},
            {"kind": "qk_clip", "payload": {"heads_clipped": 2}},
            {"kind": "lr_backoff", "payload": {}},
            {"kind": "alert", "payload": {}},
        ],
        "recovery": {"skipped_updates": 3},
        "commands": [
            {"kind": "msign", "acted": True},
            {"kind": "rollback", "acted": False},  # already rolled back in the process
            {"kind": "scale_lr", "acted": True},
        ],
    }
    assert remedies(record) == {
        "rollback": 1,
        "skip_step": 3,
        "lr_backoff": 2,
        "qk_clip": 1,
        "msign": 1,
    }
