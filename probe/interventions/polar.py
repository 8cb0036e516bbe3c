"""Polar factor UVᵀ of a matrix by a matmul-only iteration (Polar Express, fp32).

For X = U S Vᵀ the polar factor (matrix sign) is U Vᵀ. A degree-5 odd polynomial step
X ← aX + (bA + cA²)X with A = XXᵀ acts on the singular values only, s ← a s + b s³ + c s⁵,
so after a normalisation that puts every s in (0, 1], a schedule of steps that maps (0, 1]
to ≈ 1 yields ≈ UVᵀ using matmuls only (no SVD, no host sync).

Coefficients: Polar Express (Amsel, Persson, Musco, Gower, arXiv 2505.16932, repository
NoahAmsel/PolarExpress ``basic.py``; ``optimal_composition(l=1e-3, num_iters=8,
safety_factor_eps=1e-2, cushion=0.02)``), already divided by the 1.01 safety factor, then
the limit step (15/8, -10/8, 3/8) repeated. Muon's fixed quintic (3.4445, -4.7750, 2.0315)
is *not* used: it leaves the singular values spread over ~[0.7, 1.2]
(reference/perf.md §1.2), which defeats MSign, whose point is to make them equal.

Normalisation (Su Jianlin, kexue.fm/archives/10922): instead of ‖X‖_F we divide by
(Σ sᵢ⁸)^{1/8} = ‖(XXᵀ)²‖_F^{1/4} ≥ s₁, which the first step computes anyway (A and A²).
It is much tighter than ‖X‖_F for well-spread spectra (≈ 2 s₁ instead of √n/2 · s₁ for
a Gaussian matrix), so small singular values start closer to 1 and need fewer steps.

Accuracy (fp32; scalar map, checked on matrices in tests/probe/interventions): with the
default 12 steps, every singular value s ≥ 3.2e-5 · (Σ sᵢ⁸)^{1/8} ends within 1e-3 of 1.
Since (Σ sᵢ⁸)^{1/8} ≤ r^{1/8} s₁, that covers a condition number up to 1e4 for
min(m, n) ≤ 4096. Smaller singular values are only partly lifted (each extra step
multiplies them by ≈ 1.875): the iteration cannot tell a tiny singular value from zero.
Exact zeros stay exactly zero (the polynomials are odd); fp32 round-off "zeros"
(≈ 1e-7 s₁) end near 3e-3. See :func:`steps_for_floor` to pick ``steps`` for a wider range.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_STEPS",
    "LIMIT_COEFFICIENTS",
    "POLAR_EXPRESS_COEFFICIENTS",
    "polar_coefficients",
    "polar_factor",
    "steps_for_floor",
]

# (a, b, c) per step; Polar Express basic.py (l = 1e-3, safety 1.01, cushion 0.02).
POLAR_EXPRESS_COEFFICIENTS: tuple[tuple[float, float, float], ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
)
# The classical quintic Newton–Schulz step: fixed point 1, slope 15/8 at 0, cubic convergence.
LIMIT_COEFFICIENTS: tuple[float, float, float] = (1.875, -1.25, 0.375)

DEFAULT_STEPS = 12
# Safety factor against rounding: a degree-5 step diverges for s slightly above its design
# interval, so the normalised input is divided by 1.01 (≈ bf16's next number after 1).
_SAFETY = 1.01
_EPS = 1e-30


def polar_coefficients(steps: int) -> list[tuple[float, float, float]]:
    """The (a, b, c) schedule for ``steps`` steps: Polar Express, then the limit step."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps={steps!r} is invalid: expected an integer >= 1")
    head = list(POLAR_EXPRESS_COEFFICIENTS[:steps])
    return head + [LIMIT_COEFFICIENTS] * (steps - len(head))


def steps_for_floor(floor: float, tol: float = 1e-3, max_steps: int = 64) -> int:
    """Fewest steps after which every normalised singular value in [floor, 1] is within tol of 1.

    ``floor`` is relative to the normaliser (Σ sᵢ⁸)^{1/8}; evaluated on the scalar map in
    float64 (the matrix iteration applies exactly this map to each singular value).
    """
    if not 0.0 < floor <= 1.0:
        raise ValueError(f"floor={floor!r} is invalid: expected 0 < floor <= 1")
    if not 0.0 < tol < 1.0:
        raise ValueError(f"tol={tol!r} is invalid: expected 0 < tol < 1")
    xs = torch.logspace(math.log10(floor), 0.0, 2049, dtype=torch.float64) / _SAFETY
    for steps in range(1, max_steps + 1):
        a, b, c = polar_coefficients(steps)[-1]
        xs = a * xs + b * xs**3 + c * xs**5
        if float((xs - 1.0).abs().max()) <= tol:
            return steps
    raise ValueError(f"floor={floor!r} needs more than max_steps={max_steps} steps")


@torch.no_grad()
def polar_factor(x: Tensor, *, steps: int = DEFAULT_STEPS) -> Tensor:
    """Approximate U Vᵀ of ``x`` (..., m, n) in fp32; returns a new fp32 tensor of x's shape.

    Batched over leading dimensions. Iterates on the smaller Gram side: a tall x (m > n) is
    transposed so that A = XXᵀ is min(m, n)². Per step: 3 matmuls, 4·m²n + 2·m³ FLOPs.
    """
    if x.ndim < 2:
        raise ValueError(f"x.ndim={x.ndim} is invalid: expected a matrix (..., m, n)")
    coefficients = polar_coefficients(steps)
    X = x.to(torch.float32)
    transposed = X.shape[-2] > X.shape[-1]
    if transposed:
        X = X.mT
    # X: (..., m, n) with m <= n. A pre-scale by ‖X‖_F keeps A² (∝ s⁸) inside fp32's range.
    fro = torch.linalg.matrix_norm(X, keepdim=True).clamp_min(_EPS)
    X = X / fro
    A = X @ X.mT  # (..., m, m)
    A2 = A @ A
    # (Σ s⁸)^{1/8} of the pre-scaled X: in [s₁, 1] and ≥ 1/√m since ‖X‖_F = 1, so the floor
    # only acts on the zero matrix (which stays zero) and keeps scale⁴ clear of underflow.
    scale = torch.linalg.matrix_norm(A2, keepdim=True).pow(0.125).clamp_min(1e-6) * _SAFETY
    X = X / scale
    A = A / scale**2
    A2 = A2 / scale**4
    for i, (a, b, c) in enumerate(coefficients):
        if i > 0:
            A = X @ X.mT
            A2 = A @ A
        # X ← aX + (bA + cA²)X, i.e. s ← a s + b s³ + c s⁵ on every singular value.
        B = b * A + c * A2
        X = torch.addmm(X, B, X, beta=a) if X.ndim == 2 else a * X + B @ X
    return X.mT if transposed else X
