"""‖W_t − W_prev‖_F / ‖W_prev‖_F per weight parameter between consecutive samples.

Memory cost: one copy of every selected weight parameter, in its own dtype and on its device
(for a model whose 2-D weights are all selected, about one extra copy of the weights), kept
between samples. Restrict it with the probe's ``targets``/``exclude`` or leave the quantity
out (``quantities=...``) on memory-tight runs. Fused parts (``[q]``/``[k]``/``[v]``) share
their parameter: the ratio is reported once, under the parameter name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from .base import Output, Quantity, StepContext, Values, stack

__all__ = ["UpdateRatio"]


class UpdateRatio(Quantity):
    name: ClassVar[str] = "update_ratio"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._prev: dict[str, Tensor] = {}

    @torch.no_grad()
    def compute(self, ctx: StepContext) -> list[Output]:
        names: list[str] = []
        values: list[Tensor] = []
        seen: set[int] = set()
        for t in ctx.targets:
            p = t.parameter
            if id(p) in seen:
                continue
            seen.add(id(p))
            name = t.parameter_name
            prev = self._prev.get(name)
            w = p.detach()
            if prev is not None and prev.shape == w.shape:
                prev = prev.to(w.device)
                diff = torch.linalg.vector_norm(w.float() - prev.float())
                base = torch.linalg.vector_norm(prev, dtype=torch.float32)
                names.append(name)
                values.append(diff / base)
                prev.copy_(w)
                self._prev[name] = prev
            else:
                self._prev[name] = w.clone()
        return [Values(self.name, tuple(names), stack(values))] if names else []

    def state_dict(self) -> dict[str, Any]:
        return {"prev": {k: v.clone() for k, v in self._prev.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._prev = {k: v.detach().clone() for k, v in state.get("prev", {}).items()}
