"""The periodic MSign optimizer reproduces the paper's Algorithm 1 against a reference loop."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from intervention_helpers import TinyModel
from torch import nn

from rankguard.probe.exceptions import ConfigError
from rankguard.probe.interventions import MSign
from rankguard.probe.targets import find_targets

PERIOD = 3
STEPS = 10  # MSign after steps 3, 6, 9


def _reference_msign(w: torch.Tensor) -> None:
    """Paper Alg. 1, written independently: W ← ‖W‖_F/√r · U_r V_rᵀ (fp32, thin SVD)."""
    U, S, Vh = torch.linalg.svd(w.float(), full_matrices=False)
    r = int((max(w.shape) * torch.finfo(torch.float32).eps * S[0] < S).sum())
    new = torch.linalg.norm(w.float()) / math.sqrt(r) * U[:, :r] @ Vh[:r, :]
    w.copy_(new)


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(4, 5, 16, generator=g)
    return (model(x) - x).pow(2).mean()


def _srank(w: torch.Tensor) -> float:
    s = torch.linalg.svdvals(w.double())
    return float((s**2).sum() / s[0] ** 2)


def test_matches_reference_loop_and_leaves_adam_state(tiny_model: TinyModel) -> None:
    ref_model = copy.deepcopy(tiny_model)
    targets = find_targets(tiny_model)
    ref_targets = find_targets(ref_model)
    opt = MSign(torch.optim.AdamW(tiny_model.parameters(), lr=1e-2), targets, period=PERIOD)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
    assert opt.engine.value == "svd"
    for step in range(1, STEPS + 1):
        for model, optimizer in ((tiny_model, opt), (ref_model, ref_opt)):
            optimizer.zero_grad()
            _loss(model, step).backward()
            optimizer.step()
        if step % PERIOD == 0:
            with torch.no_grad():
                for t in ref_targets:
                    _reference_msign(t.matrix())
        for t, rt in zip(targets, ref_targets, strict=True):
            torch.testing.assert_close(t.matrix(), rt.matrix(), rtol=1e-5, atol=1e-6)
            full = min(t.matrix().shape)
            if step % PERIOD == 0:
                assert _srank(t.matrix()) == pytest.approx(full, rel=1e-4), (step, t.name)
            else:
                assert _srank(t.matrix()) < 0.99 * full, (step, t.name)
    assert opt.step_count == STEPS and opt.applications == STEPS // PERIOD
    # the Adam moments are the reference's: MSign did not touch them
    for p, rp in zip(tiny_model.parameters(), ref_model.parameters(), strict=True):
        s, rs = opt.state[p], ref_opt.state[rp]
        torch.testing.assert_close(s["exp_avg_sq"], rs["exp_avg_sq"], rtol=1e-4, atol=1e-9)
        assert s["step"] == rs["step"]


def test_msign_leaves_non_targets_bit_identical(tiny_model: TinyModel) -> None:
    # With lr=0 AdamW moves nothing, so whatever changes comes from MSign alone. (Compared
    # along a trajectory instead, a bias whose gradient is zero in exact arithmetic, e.g. a
    # key bias under softmax, gets round-off gradients that Adam's normalisation amplifies.)
    targets = find_targets(tiny_model)
    opt = MSign(torch.optim.AdamW(tiny_model.parameters(), lr=0.0), targets, period=1)
    before = {name: p.detach().clone() for name, p in tiny_model.named_parameters()}
    _loss(tiny_model, 1).backward()
    opt.step()
    assert opt.applications == 1
    target_params = {id(t.parameter) for t in targets}
    for name, p in tiny_model.named_parameters():
        if id(p) in target_params:
            assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), name


def test_hook_counts_direct_optimizer_steps_and_remove(tiny_model: TinyModel) -> None:
    targets = find_targets(tiny_model)
    inner = torch.optim.SGD(tiny_model.parameters(), lr=1e-2)
    msign = MSign(inner, targets, period=2)
    w = targets[0].matrix()
    for step in range(1, 3):
        inner.zero_grad()
        _loss(tiny_model, step).backward()
        inner.step()  # the training loop keeps its own optimizer
    assert msign.step_count == 2 and msign.applications == 1
    assert _srank(w) == pytest.approx(min(w.shape), rel=1e-4)
    msign.remove()
    for _ in range(2):
        inner.step()
    assert msign.step_count == 2


def test_state_dict_round_trip(tiny_model: TinyModel) -> None:
    targets = find_targets(tiny_model)
    opt = MSign(torch.optim.AdamW(tiny_model.parameters(), lr=1e-3), targets, period=5)
    for step in range(1, 4):
        opt.zero_grad()
        _loss(tiny_model, step).backward()
        opt.step()
    sd = opt.state_dict()
    assert sd["msign"]["step_count"] == 3
    other_model = copy.deepcopy(tiny_model)
    other = MSign(
        torch.optim.AdamW(other_model.parameters(), lr=1e-3), find_targets(other_model), period=5
    )
    other.load_state_dict(sd)
    assert other.step_count == 3
    assert other.optimizer.state_dict()["state"].keys() == sd["optimizer"]["state"].keys()
    # steps 4 and 5 on both: both apply MSign after step 5 (counter carried over)
    for step in range(4, 6):
        for model, optimizer in ((tiny_model, opt), (other_model, other)):
            optimizer.zero_grad()
            _loss(model, step).backward()
            optimizer.step()
    assert opt.applications == 1 and other.applications == 1
    with pytest.raises(ConfigError, match="state_dict"):
        other.load_state_dict({"optimizer": sd["optimizer"]})


def test_delegation_and_records(tiny_model: TinyModel) -> None:
    targets = find_targets(tiny_model)
    inner = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    opt = MSign(inner, targets, period=1, stats="exact", engine="newton_schulz")
    assert opt.param_groups is inner.param_groups
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})
    assert len(inner.param_groups) == 2
    _loss(tiny_model, 0).backward()
    opt.step()
    assert opt.last_result is not None
    assert len(opt.last_result.matrices) == len(targets)
    assert all(m.stable_rank_after > 0.99 * min(m.shape) for m in opt.last_result.matrices)
    opt.zero_grad()
    assert all(p.grad is None for p in tiny_model.parameters())
    assert "period=1" in repr(opt)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"period": 0}, "period: 0"),
        ({"period": 2.5}, "period: 2.5"),
        ({"engine": "qr"}, "engine: 'qr'"),
        ({"steps": -1}, "steps: -1"),
        ({"stats": "fast"}, "stats: 'fast' is invalid; valid: 'exact', 'estimate', 'none'"),
    ],
)
def test_invalid_arguments(tiny_model: TinyModel, kwargs: dict[str, object], match: str) -> None:
    inner = torch.optim.SGD(tiny_model.parameters(), lr=1e-2)
    with pytest.raises(ConfigError, match=match):
        MSign(inner, find_targets(tiny_model), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="optimizer"):
        MSign(object(), find_targets(tiny_model))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="targets"):
        MSign(inner, [])
