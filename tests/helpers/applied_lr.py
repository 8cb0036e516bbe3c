"""The learning rate an optimizer really applies, read from its updates."""

from __future__ import annotations

import torch


class AppliedLR:
    """Hooks on a plain SGD optimizer (no momentum, no decay) that read the learning rate each
    step really applied, from the update itself: lr = (w_before − w_after) / grad. The
    gradient is read after the step: a trainer may compute it inside ``step(closure)``."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.applied: list[float] = []
        self.scheduled: list[float] = []
        self._param = next(p for g in optimizer.param_groups for p in g["params"])
        self._before = torch.empty(0)
        optimizer.register_step_pre_hook(self._pre)
        optimizer.register_step_post_hook(self._post)

    def _pre(self, opt: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        self._before = self._param.detach().clone()
        self.scheduled.append(float(opt.param_groups[0]["lr"]))

    def _post(self, opt: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        assert self._param.grad is not None
        grad = self._param.grad.flatten()
        i = int(grad.abs().argmax())
        after = self._param.detach().flatten()[i]
        self.applied.append(float((self._before.flatten()[i] - after) / grad[i]))
