"""SR(Z) = ‖Z‖_F²/σ₁(Z)² of a layer's sampled input rows Z (N, in) (PSS).

Z is the bounded subsample the forward pre-hook kept (≤ max_rows rows, fp32); σ₁(Z) comes
from a warm-started power iteration on Z shared with ``singularity_alignment``.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .base import Output, Quantity, StepContext, Values, stack

__all__ = ["RepresentationStableRank"]


class RepresentationStableRank(Quantity):
    name: ClassVar[str] = "representation_stable_rank"
    needs_inputs: ClassVar[bool] = True

    @torch.no_grad()
    def compute(self, ctx: StepContext) -> list[Output]:
        pairs = list(ctx.input_triplets())
        if not pairs:
            return []
        names = tuple(t.name for t, _ in pairs)
        return [Values(self.name, names, stack([tri.stable_rank for _, tri in pairs]))]
