"""φ = |⟨v₁(W), v₁(Z)⟩| (PSS): how far the weight's top input direction and the top
direction of its sampled inputs Z (N, in) coincide. Both vectors live in the input space;
|·| makes φ independent of their arbitrary signs. φ ∈ [0, 1]."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .base import Output, Quantity, StepContext, Values, stack

__all__ = ["SingularityAlignment"]


class SingularityAlignment(Quantity):
    name: ClassVar[str] = "singularity_alignment"
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
            values.append(torch.dot(ctx.triplet(t).v, tri.v).abs())
        return [Values(self.name, tuple(names), stack(values))] if names else []
