"""Spectral-alignment sign diversity (papers.md §6.3, a reconstruction: sign-invariant).

For a linear layer with sampled inputs xₙ (N, in) and the top right singular vector v₁ of its
weight, cₙ = ⟨xₙ, v₁⟩/‖xₙ‖ ∈ [-1, 1]; p₊ = fraction of tokens with cₙ > 0 among those with a
sign; D = 2·min(p₊, 1 − p₊) ∈ [0, 1] (1 balanced, 0 collapsed onto one side of v₁). D does not
depend on the arbitrary sign of v₁. Also a histogram ``sa_cosine`` of the cₙ on fixed edges.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .base import Histogram, Output, Quantity, StepContext, Values, stack

__all__ = ["SaSignDiversity", "cosine_histogram", "histogram_edges", "sign_diversity"]


def histogram_edges(bins: int) -> tuple[float, ...]:
    """``bins + 1`` evenly spaced edges over [-1, 1]."""
    return tuple(-1.0 + 2.0 * i / bins for i in range(bins + 1))


def cosines(x: Tensor, v: Tensor) -> Tensor:
    """(N, in), (in,) -> (N,) cosines of each row with the unit vector v (0 for zero rows)."""
    norms = torch.linalg.vector_norm(x, dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    out: Tensor = (x @ v) / norms
    return out


def sign_diversity(c: Tensor) -> Tensor:
    """D = 2·min(p₊, 1 − p₊) over the entries of c with a sign; NaN if none has one."""
    pos = (c > 0).sum().to(torch.float32)
    neg = (c < 0).sum().to(torch.float32)
    p = pos / (pos + neg)
    return 2.0 * torch.minimum(p, 1.0 - p)


def cosine_histogram(c: Tensor, bins: int) -> Tensor:
    """Counts of c on ``histogram_edges(bins)`` (the last bin closed). bucketize-free and
    sync-free: torch.bincount/histc may read sizes back to the host on CUDA.

    A NaN cosine (non-finite layer inputs, e.g. an fp16 overflow) has no bin and is not
    counted. Cast to an index it would be out of range: an IndexError on the CPU, a
    device-side assert that kills the process on CUDA."""
    counted = ~torch.isnan(c)
    position = ((c.clamp(-1.0, 1.0) + 1.0) * (bins / 2.0)).floor().clamp_(0, bins - 1)
    idx = torch.where(counted, position, 0.0).long()
    counts = torch.zeros(bins, device=c.device, dtype=torch.float32)
    return counts.index_add_(0, idx, counted.to(torch.float32))


class SaSignDiversity(Quantity):
    name: ClassVar[str] = "sa_sign_diversity"
    emits: ClassVar[tuple[str, ...]] = ("sa_sign_diversity", "sa_cosine")
    needs_inputs: ClassVar[bool] = True

    @torch.no_grad()
    def compute(self, ctx: StepContext) -> list[Output]:
        bins = ctx.config.histogram_bins
        edges = histogram_edges(bins)
        names: list[str] = []
        values: list[Tensor] = []
        out: list[Output] = []
        for t in ctx.targets:
            x = ctx.captures.inputs.get(t.name)
            if x is None:
                continue  # the module ran no forward on this step (or its input is internal)
            c = cosines(x, ctx.triplet(t).v)
            names.append(t.name)
            values.append(sign_diversity(c))
            out.append(Histogram("sa_cosine", t.name, edges, cosine_histogram(c, bins)))
        if names:
            out.insert(0, Values(self.name, tuple(names), stack(values)))
        return out
