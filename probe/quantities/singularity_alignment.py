"""φ = |⟨v₁(W), v₁(Z)⟩| (PSS): how far the weight's top input direction and the top
direction of its sampled inputs Z (N, in) coincide. Both vectors live in the input space;
|·| makes φ independent of their arbitrary signs. φ ∈ [0, 1]."""

from __future__ import annotations

from typing import ClassVar

import torch

from .base import Output, Quantity, StepContext, Values, stack

__all__ = ["SingularityAlignment"]


class SingularityAlignment(Quantity):
    name: ClassVar[str] = "singularity_alignment"
    needs_inputs: ClassVar[bool] = True

    @torch.no_grad()
    def compute(self, ctx: StepContext) -> list[Output]:
        pairs = list(ctx.input_triplets())
        if not pairs:
            return []
        names = tuple(t.name for t, _ in pairs)
        # both vectors live in the input space (in,)
        phi = [torch.dot(ctx.triplet(t).v, tri.v).abs() for t, tri in pairs]
        return [Values(self.name, names, stack(phi))]
