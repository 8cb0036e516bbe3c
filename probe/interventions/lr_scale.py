"""Learning-rate backoff: a multiplier on every parameter group's learning rate, on top of the
user's own schedule.

Training loops and LR schedulers write ``group["lr"]`` themselves (every step, or from the
group's previous value), so a multiplier written into the groups once would be overwritten
or compounded. Instead the multiplier is applied around each ``optimizer.step()``: a step
pre-hook multiplies each group's LR by ``scale`` and a post-hook puts the user's value back.
The schedule keeps its shape, the optimizer steps with ``scale`` × it, and the hooks exist
only while ``scale < 1``.

The scale never goes above 1: rankguard can lower the learning rate below the user's
schedule, never raise it above. A factor > 1 undoes an earlier backoff (up to 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from ..exceptions import ConfigError

__all__ = ["LearningRateScale"]


class LearningRateScale:
    """The probe's learning-rate multiplier for one optimizer."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.scale = 1.0
        self._handles: list[RemovableHandle] = []
        self._user_lrs: list[Any] = []  # each group's own LR during a step

    def multiply(self, factor: float) -> dict[str, Any]:
        """Multiplies the scale by ``factor`` (capped at 1); returns what the next
        ``optimizer.step()`` will use."""
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            raise ConfigError(f"args.factor: expected a number > 0, got {factor!r}")
        if not (math.isfinite(factor) and factor > 0):
            raise ConfigError(f"args.factor: expected a finite number > 0, got {factor!r}")
        self._set(min(1.0, self.scale * float(factor)))
        return {
            "factor": float(factor),
            "scale": self.scale,
            # a tensor LR is read once here, when a command is applied, never in a step
            "lr": [float(g["lr"]) * self.scale for g in self.optimizer.param_groups],
        }

    def remove(self) -> None:
        """Removes the hooks: the optimizer steps with the user's LR again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._set(float(state.get("scale", 1.0)))

    def _set(self, scale: float) -> None:
        self.scale = scale
        if scale < 1.0 and not self._handles:
            self._handles = [
                self.optimizer.register_step_pre_hook(self._scale_groups),
                self.optimizer.register_step_post_hook(self._restore_groups),
            ]
        elif scale >= 1.0:
            self.remove()

    def _scale_groups(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._user_lrs = [g["lr"] for g in optimizer.param_groups]
        for g, lr in zip(optimizer.param_groups, self._user_lrs, strict=True):
            # a tensor LR (capturable/fused optimizers) stays a tensor on its device
            g["lr"] = lr * self.scale

    def _restore_groups(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for g, lr in zip(optimizer.param_groups, self._user_lrs, strict=True):
            g["lr"] = lr
        self._user_lrs = []
