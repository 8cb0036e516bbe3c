"""Training-state snapshots: a restore is bit-identical (weights, buffers, optimizer state,
parameter groups, schedulers, scaler, RNG), a snapshot that no longer fits writes nothing,
a failed restore leaves the ring able to restore again, and the ring keeps only confirmed
states."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers.models import TinyGPT
from torch import nn

from rankguard.probe.exceptions import ConfigError
from rankguard.probe.recovery.snapshots import SnapshotRing, StateSource, TrainingSnapshot

torch.set_num_threads(1)


class Scaler:
    """A GradScaler stand-in (CPU): its state is what a rollback must restore."""

    def __init__(self) -> None:
        self.scale = 1024.0
        self.growth = 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "growth": self.growth}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale, self.growth = state["scale"], state["growth"]


def setup() -> tuple[TinyGPT, torch.optim.Optimizer, Any, Scaler]:
    torch.manual_seed(0)
    model = TinyGPT()
    model.register_buffer("seen", torch.zeros(()))  # a buffer the forward would update
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched, Scaler()


def train(model: TinyGPT, opt: torch.optim.Optimizer, sched: Any, scaler: Scaler, n: int) -> None:
    for _ in range(n):
        idx = torch.randint(0, 32, (4, 8))
        loss = F.cross_entropy(model(idx)[:, :-1].reshape(-1, 32), idx[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        model.seen += 1
        scaler.scale *= 2
        scaler.growth += 1
        random.random()


def everything(
    model: nn.Module, opt: torch.optim.Optimizer, sched: Any, scaler: Scaler
) -> dict[str, Any]:
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": _clone(opt.state_dict()),
        "scheduler": dict(sched.state_dict()),
        "scaler": scaler.state_dict(),
        "rng": (random.getstate(), torch.get_rng_state().clone()),
    }


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


def assert_identical(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_identical(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_identical(x, y)
    else:
        assert a == b


def test_restore_is_bit_identical_for_the_whole_training_state() -> None:
    model, opt, sched, scaler = setup()
    train(model, opt, sched, scaler, 3)
    source = StateSource(model, opt, [sched], scaler)
    saved = everything(model, opt, sched, scaler)
    snapshot = TrainingSnapshot.capture(source, step=3, train_step=3)
    train(model, opt, sched, scaler, 4)
    opt.param_groups[0]["weight_decay"] = 0.5  # a setting changed since
    snapshot.restore(source)
    assert_identical(everything(model, opt, sched, scaler), saved)
    # and training from there repeats what it did the first time
    torch.manual_seed(7)
    train(model, opt, sched, scaler, 2)
    first = everything(model, opt, sched, scaler)["model"]
    snapshot.restore(source)
    torch.manual_seed(7)
    train(model, opt, sched, scaler, 2)
    assert_identical(everything(model, opt, sched, scaler)["model"], first)


def test_a_snapshot_before_the_first_step_clears_the_optimizer_state() -> None:
    model, opt, sched, scaler = setup()
    source = StateSource(model, opt, [sched], scaler)
    saved = everything(model, opt, sched, scaler)
    snapshot = TrainingSnapshot.capture(source, step=0, train_step=0)
    train(model, opt, sched, scaler, 2)
    assert opt.state
    snapshot.restore(source)
    assert not opt.state
    assert_identical(everything(model, opt, sched, scaler), saved)


def test_a_snapshot_that_no_longer_fits_writes_nothing() -> None:
    model, opt, sched, scaler = setup()
    train(model, opt, sched, scaler, 1)
    snapshot = TrainingSnapshot.capture(StateSource(model, opt, [sched], scaler), 1, 1)
    other = TinyGPT(d=8)
    other_opt = torch.optim.AdamW(other.parameters())
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ConfigError, match="snapshot"):
        snapshot.restore(StateSource(other, other_opt))
    assert_identical({k: v for k, v in other.state_dict().items()}, before)


def test_the_ring_survives_a_failed_rollback() -> None:
    model, opt, sched, scaler = setup()
    source = StateSource(model, opt, [sched], scaler)
    train(model, opt, sched, scaler, 2)
    ring = SnapshotRing(keep=2)
    ring.take(source, 2, 2)
    ring.confirm()
    saved = everything(model, opt, sched, scaler)
    train(model, opt, sched, scaler, 3)
    calls = {"n": 0}
    real = sched.load_state_dict

    def failing_once(state: dict[str, Any]) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("scheduler refused")
        real(state)

    sched.load_state_dict = failing_once  # type: ignore[method-assign]
    snapshot = ring.newest_before(5)
    assert snapshot is not None
    with pytest.raises(RuntimeError, match="refused"):
        snapshot.restore(source)
    assert [s.step for s in ring.good] == [2]
    again = ring.newest_before(5)
    assert again is snapshot
    again.restore(source)
    del sched.load_state_dict  # the patch would show in the scheduler's state_dict()
    assert_identical(everything(model, opt, sched, scaler), saved)


def test_the_ring_keeps_confirmed_states_only_and_reuses_buffers() -> None:
    model, opt, sched, scaler = setup()
    source = StateSource(model, opt, [sched], scaler)
    ring = SnapshotRing(keep=2)
    buffers: set[int] = set()
    for step in (10, 20, 30, 40):
        train(model, opt, sched, scaler, 1)
        snapshot = ring.take(source, step, step)
        buffers.update(t.data_ptr() for t in snapshot.tensors[:1])
        ring.confirm()
    assert [s.step for s in ring.good] == [30, 40]
    assert len(buffers) <= 3  # keep + 1 sets of host buffers, reused
    ring.take(source, 50, 50)
    ring.discard_after(45)  # an incident before the pending one was confirmed
    assert ring.pending is None and [s.step for s in ring.good] == [30, 40]
    assert ring.newest_before(40).step == 30  # type: ignore[union-attr]
    assert ring.newest_before(30) is None
    ring.discard_after(35)
    assert [s.step for s in ring.good] == [30]
    assert ring.nbytes > 0


def test_snapshots_go_to_disk_when_asked(tmp_path) -> None:
    model, opt, sched, scaler = setup()
    source = StateSource(model, opt, [sched], scaler)
    train(model, opt, sched, scaler, 1)
    ring = SnapshotRing(keep=1, snapshot_dir=str(tmp_path))
    ring.take(source, 5, 5)
    snapshot = ring.confirm()
    assert snapshot is not None
    snapshot.wait()
    saved = torch.load(tmp_path / "snapshot-5.pt", weights_only=False)
    assert saved["step"] == 5 and len(saved["tensors"]) == len(snapshot.tensors)
    ring.take(source, 6, 6)
    ring.confirm()
    ring.good[0].wait()
    assert not (tmp_path / "snapshot-5.pt").exists() and (tmp_path / "snapshot-6.pt").exists()
