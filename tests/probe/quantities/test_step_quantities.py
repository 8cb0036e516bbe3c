"""grad_norm, update_ratio and non_finite against direct computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankguard.probe.hooks import Captures
from rankguard.probe.quantities.grad_norm import GradNorm
from rankguard.probe.quantities.non_finite import NonFinite
from rankguard.probe.quantities.update_ratio import UpdateRatio


def test_grad_norm_from_dot_grad(ctx_for) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3))
    model(torch.randn(7, 4)).square().sum().backward()
    out = GradNorm().compute(ctx_for(model))[0]
    grads = {n: p.grad for n, p in model.named_parameters()}
    values = dict(zip(out.targets, out.values.tolist(), strict=True))
    for name, g in grads.items():
        assert values[name] == pytest.approx(g.norm().item(), rel=1e-6)
    total = torch.sqrt(sum(g.square().sum() for g in grads.values())).item()
    assert values["global"] == pytest.approx(total, rel=1e-6)


def test_grad_norm_prefers_hook_values(ctx_for) -> None:
    model = nn.Linear(2, 2)
    captures = Captures(grad_norms={"weight": torch.tensor(3.0), "bias": torch.tensor(4.0)})
    out = GradNorm().compute(ctx_for(model, captures=captures))[0]
    assert out.values.tolist() == [5.0, 3.0, 4.0]


def test_update_ratio_of_the_armed_step(ctx_for) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    ctx = ctx_for(model, step=7)
    q = UpdateRatio()
    assert q.compute(ctx) == []  # never armed: nothing to compare with
    q.arm(7, ctx.targets)
    before = [m.weight.detach().clone() for m in model]
    with torch.no_grad():
        model[0].weight.add_(0.1)
    out = q.compute(ctx)[0]
    assert out.targets == ("0.weight", "1.weight")
    expected0 = (model[0].weight.detach() - before[0]).norm() / before[0].norm()
    torch.testing.assert_close(out.values[0], expected0)
    assert out.values[1].item() == 0.0
    assert q.compute(ctx) == []  # the copy was consumed: no stale comparison later


def test_update_ratio_ignores_a_copy_armed_for_another_step(ctx_for) -> None:
    model = nn.Linear(3, 3)
    q = UpdateRatio()
    q.arm(4, ctx_for(model).targets)
    assert q.compute(ctx_for(model, step=9)) == []
    q.arm(4, ctx_for(model).targets)
    q.disarm()  # what the probe does on close or a skipped step
    assert q.compute(ctx_for(model, step=4)) == []


def test_update_ratio_reports_fused_parameter_once(tiny_gpt, ctx_for) -> None:
    q = UpdateRatio()
    ctx = ctx_for(tiny_gpt)
    q.arm(0, ctx.targets)
    out = q.compute(ctx)[0]
    assert "transformer.h.0.attn.c_attn.weight" in out.targets
    assert len(out.targets) == len(set(out.targets)) == 8


def test_non_finite_counts(ctx_for) -> None:
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
        model.weight[1, 2] = float("inf")
    model.bias.grad = torch.tensor([float("-inf"), 1.0])
    model.weight.grad = torch.zeros(2, 3)
    losses = [torch.tensor(float("nan")), 2.0, float("inf"), torch.tensor(1.0)]
    out = NonFinite().compute(ctx_for(model, losses=losses))[0]
    assert dict(zip(out.targets, out.values.tolist(), strict=True)) == {
        "loss": 2.0,
        "grad": 1.0,
        "weight": 2.0,
    }
