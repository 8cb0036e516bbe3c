"""Counts of NaN/±Inf elements: ``loss`` (over the losses recorded since the previous sample,
so a NaN between samples is not missed), ``grad`` (over every gradient of the sampled step)
and ``weight`` (over every parameter)."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from .base import Output, Quantity, StepContext, Values

__all__ = ["NonFinite"]


def _count(t: Tensor) -> Tensor:
    return (~torch.isfinite(t.detach())).sum().to(torch.float32)


class NonFinite(Quantity):
    name: ClassVar[str] = "non_finite"
    needs_grads: ClassVar[bool] = True

    @torch.no_grad()
    def compute(self, ctx: StepContext) -> list[Output]:
        names: list[str] = []
        counts: list[Tensor] = []
        device = ctx.params[0][1].device if ctx.params else torch.device("cpu")
        if ctx.losses:
            tensors = [x for x in ctx.losses if isinstance(x, Tensor)]
            floats = sum(
                1 for x in ctx.losses if not isinstance(x, Tensor) and not math.isfinite(x)
            )
            c = (
                torch.tensor(float(floats))
                if not tensors
                else floats + sum(_count(t) for t in tensors)
            )
            names.append("loss")
            counts.append(torch.as_tensor(c, dtype=torch.float32).to(device))
        grads: list[Tensor] = []
        for name, p in ctx.params:
            hooked = ctx.captures.grad_non_finite.get(name)
            if hooked is not None:
                grads.append(hooked.to(torch.float32))
            elif p.grad is not None:
                grads.append(_count(p.grad))
        if grads:
            names.append("grad")
            counts.append(torch.stack(grads).sum())
        if ctx.params:
            names.append("weight")
            counts.append(torch.stack([_count(p) for _, p in ctx.params]).sum())
        if not names:
            return []
        return [Values(self.name, tuple(names), torch.stack([c.to(device) for c in counts]))]
