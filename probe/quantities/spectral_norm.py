"""σ₁(W), the spectral norm of every weight target (MSign Thm 4.4: ‖W‖₂ = ‖W‖_F/√srank)."""

from __future__ import annotations

from typing import ClassVar

import torch

from .base import Output, Quantity, StepContext, Values, stack

__all__ = ["SpectralNorm"]


class SpectralNorm(Quantity):
    name: ClassVar[str] = "spectral_norm"

    @torch.no_grad()
    def compute(self, ctx: StepContext) -> list[Output]:
        values = stack([ctx.triplet(t).sigma for t in ctx.targets])
        return [Values(self.name, tuple(t.name for t in ctx.targets), values)]
