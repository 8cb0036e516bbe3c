"""LearningRateScale: the optimizer steps with scale x the user's LR (capped while the
schedule rises), the user's value and schedule are untouched, the backoff holds for its
healthy period and then decays back, never reaches 0, and the hooks exist only while a
backoff is in force."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rankguard.probe.exceptions import ConfigError
from rankguard.probe.interventions import LearningRateScale


def sgd_pair() -> tuple[nn.Linear, torch.optim.SGD]:
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    return layer, torch.optim.SGD(layer.parameters(), lr=0.1)


def step_delta(layer: nn.Linear, opt: torch.optim.Optimizer) -> torch.Tensor:
    """The weight update of one SGD step on a fixed gradient (1 everywhere)."""
    before = layer.weight.detach().clone()
    for p in layer.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    return layer.weight.detach() - before


def test_the_step_uses_the_scaled_lr_and_the_user_keeps_theirs() -> None:
    layer, opt = sgd_pair()
    scale = LearningRateScale(opt)
    result = scale.multiply(0.25)
    assert result == {"factor": 0.25, "scale": 0.25, "lr": [pytest.approx(0.025)]}
    torch.testing.assert_close(step_delta(layer, opt), torch.full((2, 3), -0.025))
    assert opt.param_groups[0]["lr"] == 0.1  # the user's value, as their scheduler left it
    # a schedule that lowers the LR is scaled, not overwritten
    opt.param_groups[0]["lr"] = 0.04
    torch.testing.assert_close(step_delta(layer, opt), torch.full((2, 3), -0.01))
    assert opt.param_groups[0]["lr"] == 0.04


def test_the_backoff_holds_while_the_schedule_rises() -> None:
    """The failure it is for: one halving, then a rising schedule brings the LR back."""
    layer, opt = sgd_pair()
    scale = LearningRateScale(opt, hold_steps=10)
    scale.multiply(0.5, step=0)
    for lr in (0.2, 0.8, 3.0):  # the schedule ramps up 30x
        opt.param_groups[0]["lr"] = lr
        torch.testing.assert_close(step_delta(layer, opt), torch.full((2, 3), -0.05))
        assert opt.param_groups[0]["lr"] == lr


def test_after_the_healthy_period_it_decays_back_gradually() -> None:
    layer, opt = sgd_pair()
    scale = LearningRateScale(opt, hold_steps=10, recover_steps=5)
    scale.multiply(0.25, step=0)
    for step in range(1, 11):
        scale.tick(step)
    assert scale.scale == 0.25  # held through the healthy period
    scales = []
    for step in range(11, 21):
        scale.tick(step)
        scales.append(scale.scale)
    assert scales == sorted(scales) and scales[0] < 0.3  # gradually: x2 every 5 steps
    assert scales[4] == pytest.approx(0.5) and scales[-1] == pytest.approx(1.0)
    assert not opt._optimizer_step_pre_hooks  # over: the user's LR again
    torch.testing.assert_close(step_delta(layer, opt), torch.full((2, 3), -0.1))


def test_a_new_backoff_restarts_the_hold() -> None:
    _, opt = sgd_pair()
    scale = LearningRateScale(opt, hold_steps=10, recover_steps=5)
    scale.multiply(0.5, step=0)
    scale.tick(9)
    scale.multiply(0.5, step=9)
    for step in range(10, 20):
        scale.tick(step)
    assert scale.scale == 0.25


def test_repeated_backoffs_stop_at_the_floor_and_can_always_be_lifted() -> None:
    layer, opt = sgd_pair()
    scale = LearningRateScale(opt)
    scale.multiply(1e-300)
    scale.multiply(1e-300)
    assert scale.scale == 1e-4 and scale.ceilings == [pytest.approx(1e-5)]
    torch.testing.assert_close(step_delta(layer, opt), torch.full((2, 3), -1e-5))
    assert scale.multiply(1e300)["scale"] == 1.0
    assert scale.ceilings is None and not opt._optimizer_step_pre_hooks
    torch.testing.assert_close(step_delta(layer, opt), torch.full((2, 3), -0.1))


def test_backoffs_compound_and_never_raise_above_the_schedule() -> None:
    layer, opt = sgd_pair()
    scale = LearningRateScale(opt)
    scale.multiply(0.5)
    assert scale.multiply(0.5)["scale"] == 0.25
    assert scale.multiply(100.0)["scale"] == 1.0  # undone, capped at the user's LR
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    torch.testing.assert_close(step_delta(layer, opt), torch.full((2, 3), -0.1))


def test_remove_and_state_round_trip() -> None:
    layer, opt = sgd_pair()
    scale = LearningRateScale(opt)
    scale.multiply(0.1)
    assert len(opt._optimizer_step_pre_hooks) == len(opt._optimizer_step_post_hooks) == 1
    state = scale.state_dict()
    scale.remove()
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    again = LearningRateScale(opt)
    again.load_state_dict(state)
    torch.testing.assert_close(step_delta(layer, opt), torch.full((2, 3), -0.01))
    again.remove()


@pytest.mark.parametrize("factor", [0, -0.5, math.inf, math.nan, True, "0.5"])
def test_bad_factor_is_refused_and_changes_nothing(factor: object) -> None:
    _, opt = sgd_pair()
    scale = LearningRateScale(opt)
    with pytest.raises(ConfigError, match=r"args\.factor"):
        scale.multiply(factor)  # type: ignore[arg-type]
    assert scale.scale == 1.0 and not opt._optimizer_step_pre_hooks


def test_a_chainable_scheduler_keeps_its_own_schedule() -> None:
    """StepLR reads the group's LR to compute the next one: it must see its own value, never
    the scaled one, or each step would compound the backoff into the schedule."""
    layer, opt = sgd_pair()
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    scale = LearningRateScale(opt)
    scale.multiply(0.1)
    deltas = []
    for _ in range(3):
        deltas.append(step_delta(layer, opt)[0, 0].item())
        scheduler.step()
    assert deltas == pytest.approx([-0.01, -0.005, -0.0025])  # 0.1 x (0.1, 0.05, 0.025)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0125)  # the schedule alone
    scale.remove()
