"""max |qᵢ·kⱼ|/√d_h per attention module (Wortsman et al. 2023; alarm above 1e3/1e4).

q and k are the outputs of the attention's projections (fused ``c_attn`` split in thirds, or
``q_proj``/``k_proj``), captured for at most ``max_sequences`` sequences of the sampled step.
Causality is NOT applied: the max runs over every (i, j) pair, future positions included, so
for a causal model it is an upper bound of the logits actually used. Logits are taken before
any rotary embedding or qk-norm applied after the projection. Grouped-query attention: k heads
are repeated to match q heads. Not available for ``nn.MultiheadAttention`` (q and k are
internal to its fused kernel).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from .base import Output, Quantity, StepContext, Values, stack

__all__ = ["AttentionLogitMax", "max_abs_logit"]

_CHUNK = 256  # query rows per block: bounds the (b, h, chunk, T) logits buffer


def max_abs_logit(q: Tensor, k: Tensor, n_head: int, n_kv_head: int | None = None) -> Tensor:
    """q (b, T, h·d), k (b, T, h_kv·d) -> 0-d max |q·k|/√d over batch, heads and pairs."""
    b, t, c = q.shape
    d = c // n_head
    q = q.reshape(b, t, n_head, d).transpose(1, 2)  # (b, h, T, d)
    kv = n_kv_head or max(1, k.shape[-1] // d)
    k = k.reshape(b, k.shape[1], kv, d).transpose(1, 2)  # (b, h_kv, T, d)
    if kv != n_head:
        k = k.repeat_interleave(n_head // kv, dim=1)  # (b, h, T, d)
    scale = 1.0 / math.sqrt(d)
    best = q.new_zeros(())
    for start in range(0, t, _CHUNK):
        logits = q[:, :, start : start + _CHUNK] @ k.transpose(-1, -2)  # (b, h, chunk, T)
        best = torch.maximum(best, logits.abs().amax() * scale)
    return best


class AttentionLogitMax(Quantity):
    name: ClassVar[str] = "attention_logit_max"
    needs_attention: ClassVar[bool] = True

    @torch.no_grad()
    def compute(self, ctx: StepContext) -> list[Output]:
        names: list[str] = []
        values: list[Tensor] = []
        for site in ctx.sites:
            qk = ctx.captures.qk.get(site.name)
            if qk is None:
                continue
            names.append(site.name)
            values.append(max_abs_logit(qk[0], qk[1], site.n_head, site.n_kv_head))
        return [Values(self.name, tuple(names), stack(values))] if names else []
