"""Polar Express polar factor against the exact U Vᵀ from torch.linalg.svd (float64)."""

from __future__ import annotations

import pytest
import torch
from intervention_helpers import make_matrix

from rankguard.probe.interventions.polar import (
    DEFAULT_STEPS,
    LIMIT_COEFFICIENTS,
    POLAR_EXPRESS_COEFFICIENTS,
    polar_coefficients,
    polar_factor,
    steps_for_floor,
)


def _exact_polar(w: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(w.double(), full_matrices=False)
    return U @ Vh


@pytest.mark.parametrize(
    ("m", "n", "cond"),
    [(64, 64, 10.0), (96, 96, 1e3), (96, 96, 1e4), (160, 48, 1e4), (48, 160, 1e4)],
)
def test_polar_factor_matches_svd(m: int, n: int, cond: float) -> None:
    w = make_matrix(m, n, cond=cond, seed=m + n)
    p = polar_factor(w)
    assert p.dtype == torch.float32 and p.shape == (m, n)
    s = torch.linalg.svdvals(p.double())
    assert float((s - 1).abs().max()) < 1e-3
    exact = _exact_polar(w)
    assert float(torch.linalg.norm(p.double() - exact) / torch.linalg.norm(exact)) < 1e-3


def test_gaussian_and_bf16_input_give_fp32_polar_factor() -> None:
    w = torch.randn(80, 120, generator=torch.Generator().manual_seed(1))
    p = polar_factor(w.to(torch.bfloat16))
    assert p.dtype == torch.float32
    exact = _exact_polar(w.to(torch.bfloat16).float())
    assert float(torch.linalg.norm(p.double() - exact) / torch.linalg.norm(exact)) < 1e-4


def test_exact_zeros_stay_zero_and_zero_matrix_is_zero() -> None:
    w = make_matrix(40, 40, cond=10.0)
    w[20:] = 0.0  # exact rank 20: rows of zeros
    s = torch.linalg.svdvals(polar_factor(w).double())
    assert float((s[:20] - 1).abs().max()) < 1e-3
    assert float(s[20:].max()) < 1e-6
    assert torch.equal(polar_factor(torch.zeros(5, 7)), torch.zeros(5, 7))


def test_roundoff_zeros_are_only_slightly_lifted() -> None:
    # A product of thin factors: rank 8 in exact arithmetic, fp32 round-off elsewhere.
    w = make_matrix(64, 96, cond=10.0, rank=8)
    s = torch.linalg.svdvals(polar_factor(w).double())
    assert float((s[:8] - 1).abs().max()) < 1e-3
    assert float(s[8:].max()) < 1e-2


def test_batched_equals_one_by_one() -> None:
    ws = torch.stack([make_matrix(32, 48, cond=100.0, seed=i) for i in range(3)])
    batched = polar_factor(ws)
    for i in range(3):
        torch.testing.assert_close(batched[i], polar_factor(ws[i]), rtol=1e-5, atol=1e-6)


def test_fewer_steps_are_less_accurate() -> None:
    # The schedule is what makes it accurate: 5 steps leave the spread of perf.md §1.5.
    w = make_matrix(96, 96, cond=1e3)
    s5 = torch.linalg.svdvals(polar_factor(w, steps=5).double())
    assert float((s5 - 1).abs().max()) > 1e-2


def test_coefficient_schedule() -> None:
    assert polar_coefficients(3) == list(POLAR_EXPRESS_COEFFICIENTS[:3])
    sched = polar_coefficients(DEFAULT_STEPS)
    assert len(sched) == DEFAULT_STEPS
    assert sched[-1] == LIMIT_COEFFICIENTS
    # the whole schedule maps 1 (the largest normalised singular value) to ≈ 1
    x = 1.0 / 1.01
    for a, b, c in sched:
        x = a * x + b * x**3 + c * x**5
    assert abs(x - 1.0) < 1e-6


def test_steps_for_floor_is_monotone_and_consistent_with_default() -> None:
    steps = [steps_for_floor(f) for f in (1e-2, 1e-3, 1e-4, 1e-5)]
    assert steps == sorted(steps) and steps[0] < steps[-1]
    assert steps_for_floor(3.0e-5) <= DEFAULT_STEPS + 1


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: polar_coefficients(0), "steps=0"),
        (lambda: polar_factor(torch.ones(3)), "x.ndim=1"),
        (lambda: steps_for_floor(0.0), "floor=0.0"),
        (lambda: steps_for_floor(0.1, tol=2.0), "tol=2.0"),
        (lambda: steps_for_floor(1e-30, max_steps=3), "max_steps=3"),
    ],
)
def test_invalid_arguments(call: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()  # type: ignore[operator]
