"""PSS singular-spectrum smoothing (arXiv 2602.01308; reference/papers.md §3.2, §6.6).

W ← U diag(f(s)) Vᵀ from a full thin SVD in fp32, written back in place. The arXiv
formula is not public; the variants are those of the authors' code
(typename-yyf/ICLR_stability), with s sorted descending (s₀ ≥ s₁ ≥ ...), n = len(s):

- ``clip`` ("maxeig"): with k (default ⌊n/20⌋), s_i ← s_k for i < k (0-based), i.e. the
  k largest values are clipped to the next one. k = 0 leaves s unchanged.
- ``conv``: s′_i = (s_{i−1} + s_i + s_{i+1})/3 with reflect padding (s₁ before s₀,
  s_{n−2} after s_{n−1}); a single value (n = 1) is left as it is.
- ``softmax``: s′ = softmax(τ·s)·Σ_j s_j (τ default 0.25, the code's value).

Every variant is then multiplied by ``scale`` (default 1.0; the GPT script's "maxeig" used
0.25, a global shrink — pass ``scale=0.25`` for that behaviour).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor

from ..exceptions import ConfigError
from ..targets import WeightTarget
from .records import InterventionResult
from .rewrite import StatsMode, Transformed, rewrite_targets
from .snapshot import Snapshot

__all__ = ["PSSVariant", "apply_pss", "smooth_singular_values"]


class PSSVariant(str, Enum):
    """The smoothing function f applied to the singular values."""

    CLIP = "clip"
    CONV = "conv"
    SOFTMAX = "softmax"


def default_k(n: int) -> int:
    """The code's k = ⌊n/20⌋ (clip the top 5%)."""
    return n // 20


def smooth_singular_values(
    s: Tensor,
    variant: PSSVariant | str,
    *,
    k: int | None = None,
    scale: float = 1.0,
    temperature: float = 0.25,
) -> Tensor:
    """f(s) for descending singular values s (n,); returns a new tensor."""
    variant = PSSVariant(variant)
    n = s.shape[0]
    if variant is PSSVariant.CLIP:
        kk = default_k(n) if k is None else k
        out = s.clone()
        if 0 < kk < n:
            out[:kk] = s[kk]
    elif variant is PSSVariant.CONV:
        if n < 2:
            out = s.clone()
        else:
            # (n,) -> (1, 1, n + 2) reflect-padded -> 3-tap mean -> (n,)
            padded = F.pad(s.view(1, 1, n), (1, 1), mode="reflect")
            out = F.avg_pool1d(padded, kernel_size=3, stride=1).view(n)
    else:
        out = torch.softmax(temperature * s, dim=0) * s.sum()
    return out * scale if scale != 1.0 else out


def _check_options(
    variant: PSSVariant | str, k: int | None, scale: float, temperature: float
) -> PSSVariant:
    try:
        resolved = PSSVariant(variant)
    except ValueError:
        valid = ", ".join(repr(v.value) for v in PSSVariant)
        raise ConfigError(f"variant: {variant!r} is not a PSS variant; valid: {valid}") from None
    if k is not None:
        if resolved is not PSSVariant.CLIP:
            raise ConfigError(f"k: {k!r} is only meaningful for variant='clip', not {variant!r}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ConfigError(f"k: {k!r} is invalid; expected None (⌊n/20⌋) or an integer >= 0")
    if (
        isinstance(scale, bool)
        or not isinstance(scale, (int, float))
        or not (math.isfinite(scale) and scale > 0)
    ):
        raise ConfigError(f"scale: {scale!r} is invalid; expected a finite number > 0")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not (math.isfinite(temperature) and temperature > 0)
    ):
        raise ConfigError(f"temperature: {temperature!r} is invalid; expected a finite number > 0")
    return resolved


def apply_pss(
    targets: Sequence[WeightTarget],
    *,
    variant: PSSVariant | str = PSSVariant.CLIP,
    k: int | None = None,
    scale: float = 1.0,
    temperature: float = 0.25,
    stats: StatsMode | str = StatsMode.EXACT,
    snapshot: Snapshot | None = None,
) -> InterventionResult:
    """Smooth the singular spectrum of every target in place; returns per-matrix records.

    The targets are snapshotted first (``snapshot``, if the caller keeps one for undo) and
    restored if any result is not finite: :class:`~.rewrite.RewriteError`.

    ``k`` (clip only) must be smaller than min(out, in) of every target; it is checked for
    all targets before any is rewritten.
    """
    chosen = list(targets) if not isinstance(targets, WeightTarget) else [targets]
    resolved = _check_options(variant, k, scale, temperature)
    if k is not None:
        too_small = [t.name for t in chosen if k >= min(t.shape)]
        if too_small:
            raise ConfigError(
                f"k: {k} must be smaller than min(out, in) of every target; too small: {too_small}"
            )
    mode = StatsMode.parse(stats)

    def transform(w: Tensor) -> Transformed:
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)  # U (m, n'), S (n',), Vh (n', n)
        smoothed = smooth_singular_values(S, resolved, k=k, scale=scale, temperature=temperature)
        return Transformed((U * smoothed) @ Vh, int(S.shape[0]), S)

    records, seconds = rewrite_targets(chosen, transform, stats=mode, snapshot=snapshot)
    options: dict[str, object] = {"variant": resolved.value, "scale": scale, "stats": mode.value}
    if resolved is PSSVariant.CLIP:
        options["k"] = k  # None: ⌊n/20⌋ per matrix
    if resolved is PSSVariant.SOFTMAX:
        options["temperature"] = temperature
    return InterventionResult(kind="pss", options=options, matrices=records, seconds=seconds)
