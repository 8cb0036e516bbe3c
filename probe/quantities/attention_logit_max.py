"""max |q·kᵀ|·scale per attention module, as the model computes it (Wortsman et al. 2023;
alarm above 1e3/1e4).

q and k are read where the model computes attention, after rotary embeddings and qk-norm:
each site found by what it does (:mod:`..attention`) has its call captured on the sampled step
(``max_sequences`` sequences) and is replayed invisibly, without its KV cache, under
:class:`~..attention.LogitRecorder`. The maximum runs over the positions the model's mask
allows (causal, padding, sliding window) and over every head (grouped-query attention
included); the per-head maxima of the latest sample stay on the device in :attr:`per_head`
(for a per-head remedy such as QK-Clip).

A site whose replay computes no attention the recorder can see is left to
``attention_logit_bound`` (its projections) and said once.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ..attention import LogitRecorder
from .base import Output, Quantity, StepContext, Values, stack

__all__ = ["AttentionLogitMax"]


class AttentionLogitMax(Quantity):
    name: ClassVar[str] = "attention_logit_max"
    needs_attention: ClassVar[bool] = True

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.per_head: dict[str, Tensor] = {}
        """Site name -> (heads,) fp32 max logit per head, from the latest sample (device)."""

    @torch.no_grad()
    def compute(self, ctx: StepContext) -> list[Output]:
        recorder = LogitRecorder()
        names: list[str] = []
        values: list[Tensor] = []
        for site in ctx.sites:
            call = ctx.captures.calls.get(site.name) if site.replay else None
            if call is None:
                continue
            heads = recorder.replay(site.module, call.args, call.kwargs, call.autocast)
            if heads is None:
                site.replay = False  # from now on its projections, if reachable, give a bound
                ctx.unavailable(
                    self.name,
                    "its forward computed no attention the probe could intercept; "
                    + (
                        "attention_logit_bound reports its projections instead"
                        if site.has_projections
                        else "no projections found either"
                    ),
                    site.name,
                )
                continue
            self.per_head[site.name] = heads
            names.append(site.name)
            values.append(heads.amax())
        return [Values(self.name, tuple(names), stack(values))] if names else []
