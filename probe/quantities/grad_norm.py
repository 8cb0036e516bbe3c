"""Gradient L2 norms: ``global`` and per parameter, as backward produced them.

Measured by post-accumulate-grad hooks armed for the sampled step (before any clipping, and
still available when ``zero_grad`` runs before ``probe.step``); without a hook value the
parameter's current ``.grad`` is used. The global norm is √Σ‖g_p‖² over parameters.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .base import Output, Quantity, StepContext, Values, stack

__all__ = ["GradNorm", "gathered_grad_norms"]


def gathered_grad_norms(ctx: StepContext) -> dict[str, Tensor]:
    """Parameter name -> 0-d fp32 gradient norm (hooks first, then ``.grad``)."""
    out: dict[str, Tensor] = {}
    for name, p in ctx.params:
        hooked = ctx.captures.grad_norms.get(name)
        if hooked is not None:
            out[name] = hooked
        elif p.grad is not None:
            out[name] = torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32)
    return out


class GradNorm(Quantity):
    name: ClassVar[str] = "grad_norm"
    needs_grads: ClassVar[bool] = True

    @torch.no_grad()
    def compute(self, ctx: StepContext) -> list[Output]:
        norms = gathered_grad_norms(ctx)
        if not norms:
            return []
        per = stack(list(norms.values()))
        total = torch.linalg.vector_norm(per).reshape(1)
        return [Values(self.name, ("global", *norms.keys()), torch.cat([total, per]))]
