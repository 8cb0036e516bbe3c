"""Stable rank ‖W‖_F² / σ₁(W)² of every weight target (MSign Def. 3.1, PSS SR(W))."""

from __future__ import annotations

from typing import ClassVar

import torch

from .base import Output, Quantity, StepContext, Values, stack

__all__ = ["StableRank"]


class StableRank(Quantity):
    name: ClassVar[str] = "stable_rank"

    @torch.no_grad()
    def compute(self, ctx: StepContext) -> list[Output]:
        values = stack([ctx.triplet(t).stable_rank for t in ctx.targets])
        return [Values(self.name, tuple(t.name for t in ctx.targets), values)]
