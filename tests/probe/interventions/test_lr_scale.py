"""LearningRateScale: the optimizer steps with scale x the user's LR, the user's value and
schedule are untouched, and the hooks exist only while a backoff is in force."""

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
    # a schedule that rewrites the LR each step is scaled, not overwritten
    opt.param_groups[0]["lr"] = 0.2
    torch.testing.assert_close(step_delta(layer, opt), torch.full((2, 3), -0.05))


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
