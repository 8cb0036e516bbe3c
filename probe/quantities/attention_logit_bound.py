"""An upper bound of every attention logit where only the projections are reachable.

For attention modules found by name or by the user's ``attention=`` globs whose attention
computation the probe cannot see (a hand-written block, a fused kernel), the q and k
projection outputs of ``max_sequences`` sequences give, per head,
max_i ‖q_i‖ · max_j ‖k_j‖ / √d_h ≥ |q_i·k_j| / √d_h for every pair (Cauchy–Schwarz): a bound
that holds under any mask and any norm-preserving position encoding (rotary), but not the
logit itself. It has its own name so that a rule on ``attention_logit_max`` never reads it.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ..attention import projection_bound
from .base import Output, Quantity, StepContext, Values, stack

__all__ = ["AttentionLogitBound"]


class AttentionLogitBound(Quantity):
    name: ClassVar[str] = "attention_logit_bound"
    needs_attention: ClassVar[bool] = True

    @torch.no_grad()
    def compute(self, ctx: StepContext) -> list[Output]:
        names: list[str] = []
        values: list[Tensor] = []
        for site in ctx.sites:
            qk = ctx.captures.qk.get(site.name)
            if site.replay or qk is None or site.n_head is None:
                continue
            names.append(site.name)
            values.append(projection_bound(qk[0], qk[1], site.n_head, site.n_kv_head).amax())
        return [Values(self.name, tuple(names), stack(values))] if names else []
