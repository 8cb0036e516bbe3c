"""The per-step checks: the update-ratio estimate against the exact ratio, the flags each
check raises (and only after its warm-up), skip-step on a spiking gradient, and the flight
recorder's window."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers.models import TinyGPT

from rankguard.probe.config import RecoveryConfig
from rankguard.probe.recovery.flight import FlightRecorder
from rankguard.probe.recovery.guard import Flag, StepGuard

torch.set_num_threads(1)
CPU = torch.device("cpu")


def setup(**config: object) -> tuple[TinyGPT, torch.optim.Optimizer, StepGuard]:
    torch.manual_seed(0)
    model = TinyGPT(d=96)  # 96x96 and larger weights: the sample is a strict subset
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = RecoveryConfig.auto_recover(**{"warmup": 8, "window": 16, **config})  # type: ignore[arg-type]
    params = list(model.parameters())
    weights = [p for p in params if p.dim() == 2]
    guard = StepGuard(opt, params, weights, cfg, FlightRecorder(32, CPU), CPU)
    return model, opt, guard


def step(model: TinyGPT, opt: torch.optim.Optimizer, scale: float = 1.0) -> torch.Tensor:
    idx = torch.randint(0, 32, (4, 8))
    loss = F.cross_entropy(model(idx)[:, :-1].reshape(-1, 32), idx[:, 1:].reshape(-1))
    (loss * scale).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def test_the_update_ratio_estimate_is_close_to_the_exact_one() -> None:
    model, opt, guard = setup()
    weights = [p.detach() for p in model.parameters() if p.dim() == 2]
    for i in range(3):
        before = [w.detach().clone() for w in weights]
        loss = step(model, opt)
        exact = [
            torch.linalg.vector_norm(w - b) / torch.linalg.vector_norm(b)
            for w, b in zip(weights, before, strict=True)
        ]
        gmean = math.exp(sum(math.log(float(r)) for r in exact) / len(exact))
        reading = guard.end_step(i, loss)
        assert reading is not None
        assert reading.update_ratio == pytest.approx(gmean, rel=0.05)


def test_checks_wait_for_their_warmup_then_flag() -> None:
    model, opt, guard = setup(update_ratio_hot=1e-6)  # every update is "hot"
    flags = []
    for i in range(12):
        reading = guard.end_step(i, step(model, opt))
        assert reading is not None
        flags.append(reading.flags)
    assert all(not f & Flag.UPDATE_HOT for f in flags[:8])
    assert all(f & Flag.UPDATE_HOT for f in flags[8:])
    reading = guard.end_step(12, torch.tensor(50.0))  # a loss 10x its median
    assert reading is not None and reading.flags & Flag.LOSS_SPIKE
    reading = guard.end_step(13, torch.tensor(math.nan))  # non-finite: live from step 0
    assert reading is not None and reading.flags & Flag.LOSS_NON_FINITE


def test_skip_step_drops_a_spiking_gradient_and_the_median_ignores_it() -> None:
    model, opt, guard = setup(skip_factor=10.0)
    for i in range(10):
        guard.end_step(i, step(model, opt))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adam = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    loss = step(model, opt, scale=1e4)  # a gradient 10^4 x the usual
    reading = guard.end_step(10, loss)
    assert reading is not None and reading.flags & Flag.SKIPPED and reading.flags & Flag.GRAD_SPIKE
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, adam[k]) for k, v in opt.state_dict()["state"][0].items())
    assert guard.skipped == 1
    reading = guard.end_step(11, step(model, opt))  # the next normal step is not a spike
    assert reading is not None and not reading.flags & Flag.SKIPPED
    guard.remove()
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_the_flight_recorder_keeps_every_step_of_its_window() -> None:
    model, opt, guard = setup()
    for i in range(40):
        guard.end_step(i, step(model, opt))
    points = guard.flight.window(20, 39)
    by_quantity: dict[str, list[int]] = {}
    for p in points:
        by_quantity.setdefault(p.quantity, []).append(p.step)
    assert by_quantity["loss"] == list(range(20, 40))
    assert by_quantity["grad_norm"] == list(range(20, 40))
    assert by_quantity["update_ratio"] == list(range(20, 40))
    assert {p.target for p in points} == {"global", "grad_tensors"}
    assert guard.flight.window(0, 7) == []  # overwritten: the ring holds 32 steps
