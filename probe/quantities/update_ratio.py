"""‖W_after − W_before‖_F / ‖W_before‖_F per weight parameter over one optimizer step: the
update-to-weight ratio of the sampled step, whatever the probe's cadence.

The probe arms this quantity at the end of the step before a sample (``arm``): the weights
then are the ones ``optimizer.step()`` of the sampled step starts from, because
``probe.step()`` runs after the optimizer and its commands have already been applied. At the
sample the ratio of that one update is computed and the copy is dropped.

Memory cost: one copy of every selected weight parameter, in its own dtype and on its device,
held for one step only (from the end of the step before a sample to the sample). Restrict it
with the probe's ``targets``/``exclude`` or leave the quantity out (``quantities=...``) on
memory-tight runs. Fused parts (``[q]``/``[k]``/``[v]``) share their parameter: the ratio is
reported once, under the parameter name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..targets import WeightTarget
from .base import Output, Quantity, StepContext, Values, stack

__all__ = ["UpdateRatio"]


class UpdateRatio(Quantity):
    name: ClassVar[str] = "update_ratio"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._before: dict[str, Tensor] = {}
        self._armed_for: int | None = None

    @torch.no_grad()
    def arm(self, step: int, targets: Sequence[WeightTarget]) -> None:
        # a device copy of each weight, no host sync; dropped at the sample
        self._before = {}
        for t in targets:
            if t.parameter_name not in self._before:
                self._before[t.parameter_name] = t.parameter.detach().clone()
        self._armed_for = step

    def disarm(self) -> None:
        self._before, self._armed_for = {}, None

    @torch.no_grad()
    def compute(self, ctx: StepContext) -> list[Output]:
        before, armed_for = self._before, self._armed_for
        self.disarm()
        if armed_for != ctx.step:  # not armed for this step (the caller jumped with step=)
            return []
        names: list[str] = []
        values: list[Tensor] = []
        for t in ctx.targets:
            name = t.parameter_name
            old = before.pop(name, None)
            if old is None:  # a fused part whose parameter is already reported
                continue
            w = t.parameter.detach()
            diff = torch.linalg.vector_norm(w.float() - old.float())
            names.append(name)
            values.append(diff / torch.linalg.vector_norm(old, dtype=torch.float32))
        return [Values(self.name, tuple(names), stack(values))] if names else []
