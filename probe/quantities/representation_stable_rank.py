"""SR(Z) = ‖Z‖_F²/σ₁(Z)² of a layer's sampled input rows Z (N, in) (PSS).

Z is the bounded subsample the forward pre-hook kept (≤ max_rows rows, fp32); σ₁(Z) comes
from a warm-started power iteration on Z shared with ``singularity_alignment``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .base import Output, Quantity, StepContext, Values, stack

__all__ = ["RepresentationStableRank"]


class RepresentationStableRank(Quantity):
    name: ClassVar[str] = "representation_stable_rank"
    needs_inputs: ClassVar[bool] = True

    @torch.no_grad()
    def compute(self, ctx: StepContext) -> list[Output]:
        names: list[str] = []
        values: list[Tensor] = []
        for t in ctx.targets:
            tri = ctx.input_triplet(t)
            if tri is None:
                continue
            names.append(t.name)
            values.append(tri.stable_rank)
        return [Values(self.name, tuple(names), stack(values))] if names else []
