"""Learning-rate backoff that holds: a multiplier and a ceiling on every parameter group's
learning rate, on top of the user's own schedule.

Training loops and LR schedulers write ``group["lr"]`` themselves (every step, or from the
group's previous value), so a multiplier written into the groups once would be overwritten
or compounded. Instead the backoff is applied around each ``optimizer.step()``: a step
pre-hook replaces each group's LR by ``min(scale x user LR, ceiling)`` and a post-hook puts
the user's value back. The hooks exist only while a backoff is in force.

Why a ceiling as well as a multiplier: a backoff that only multiplies lets the run's own
schedule climb straight back (a ramp, the end of a warmup, a resumed run with the wrong LR):
in the rescue benchmark one halving was followed by ~130 steps of a rising LR and the same
blow-up. A backoff (``factor < 1``) therefore also caps each group at ``factor`` x the rate it
was actually stepping with; the cap holds while the schedule rises.

Recovery: the backoff holds for ``hold_steps`` steps after the last one (the stated healthy
period; any new backoff restarts it), then the multiplier and the ceiling rise together by
``2 ** (1 / recover_steps)`` per step (doubling every ``recover_steps`` steps) until the
multiplier is 1 and the ceiling is above the user's LR, when the hooks are removed. The
probe calls :meth:`tick` once per step for that; without ticks the backoff simply holds.

Bounds: the multiplier never goes above 1 (rankguard never raises the LR above the user's
schedule) and never below ``floor`` (default 1e-4), so repeated backoffs cannot leave the
run at an LR of 0; a factor > 1 lifts the backoff (to 1 at most, and a lift that reaches 1
removes the ceiling), so it can always be undone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from ..exceptions import ConfigError

__all__ = ["LearningRateScale"]

DEFAULT_FLOOR = 1e-4
DEFAULT_HOLD_STEPS = 100
DEFAULT_RECOVER_STEPS = 50


class LearningRateScale:
    """The probe's learning-rate backoff for one optimizer.

    Args:
        optimizer: the optimizer whose parameter groups are backed off.
        floor: the smallest multiplier (and the smallest ceiling, relative to the user's LR
            at the time of the backoff).
        hold_steps: steps a backoff holds, unchanged, after the last backoff.
        recover_steps: after the hold, the multiplier and the ceiling double every this many
            steps (geometrically, a little every step) until the backoff is over.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        floor: float = DEFAULT_FLOOR,
        hold_steps: int = DEFAULT_HOLD_STEPS,
        recover_steps: int = DEFAULT_RECOVER_STEPS,
    ) -> None:
        if not (isinstance(floor, int | float) and 0.0 < floor <= 1.0):
            raise ConfigError(f"floor: expected a number in (0, 1], got {floor!r}")
        for name, value in (("hold_steps", hold_steps), ("recover_steps", recover_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: expected an integer >= 1, got {value!r}")
        self.optimizer = optimizer
        self.floor = float(floor)
        self.hold_steps = hold_steps
        self.recover_steps = recover_steps
        self.scale = 1.0
        self.ceilings: list[float] | None = None  # per group, absolute; None: no ceiling
        self.held_until: int | None = None  # the last step of the hold
        self._step = 0  # the latest step seen by tick()
        self._handles: list[RemovableHandle] = []
        self._user_lrs: list[Any] = []  # each group's own LR during a step

    @property
    def active(self) -> bool:
        """Whether the optimizer currently steps with a backed-off LR."""
        return bool(self._handles)

    def multiply(self, factor: float, *, step: int | None = None) -> dict[str, Any]:
        """A backoff (``factor`` < 1: the multiplier and a ceiling at ``factor`` x the LR in
        use, held for ``hold_steps``) or a lift (``factor`` >= 1: both raised, up to the
        user's schedule). Returns what the next ``optimizer.step()`` will use."""
        if isinstance(factor, bool) or not isinstance(factor, int | float):
            raise ConfigError(f"args.factor: expected a number > 0, got {factor!r}")
        if not (math.isfinite(factor) and factor > 0):
            raise ConfigError(f"args.factor: expected a finite number > 0, got {factor!r}")
        factor = float(factor)
        if step is not None:
            self._step = step
        # a tensor LR is read here, when a backoff is ordered, never in a step
        users = [float(g["lr"]) for g in self.optimizer.param_groups]
        if factor < 1.0:
            in_use = self._effective(users)
            self.scale = max(self.floor, self.scale * factor)
            self.ceilings = [
                max(self.floor * user, lr * factor) for lr, user in zip(in_use, users, strict=True)
            ]
            self.held_until = self._step + self.hold_steps
        else:
            self.scale = min(1.0, self.scale * factor)
            if self.ceilings is not None:
                self.ceilings = [c * factor for c in self.ceilings]
            if self.scale >= 1.0:
                self.ceilings = None
        self._sync_hooks()
        return {"factor": factor, "scale": self.scale, "lr": self._effective(users)}

    def tick(self, step: int) -> None:
        """Called once per step: after the hold, lets the backoff recover a little."""
        self._step = step
        if not self._handles or self.held_until is None or step <= self.held_until:
            return
        growth = 2.0 ** (1.0 / self.recover_steps)
        self.scale = min(1.0, self.scale * growth)
        if self.ceilings is not None:
            self.ceilings = [c * growth for c in self.ceilings]
        if self.scale >= 1.0:
            # over once the ceiling no longer binds (a tensor LR is read here, rarely)
            users = [float(g["lr"]) for g in self.optimizer.param_groups]
            if self.ceilings is None or all(
                c >= u for c, u in zip(self.ceilings, users, strict=True)
            ):
                self.ceilings = None
                self.held_until = None
        self._sync_hooks()

    def remove(self) -> None:
        """Removes the hooks: the optimizer steps with the user's LR again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "ceilings": None if self.ceilings is None else list(self.ceilings),
            "held_until": self.held_until,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scale = min(1.0, max(self.floor, float(state.get("scale", 1.0))))
        ceilings = state.get("ceilings")
        self.ceilings = None if ceilings is None else [float(c) for c in ceilings]
        held = state.get("held_until")
        self.held_until = None if held is None else int(held)
        self._sync_hooks()

    # -- internals --------------------------------------------------------------------------

    def _effective(self, users: list[float]) -> list[float]:
        lrs = [u * self.scale for u in users]
        if self.ceilings is None:
            return lrs
        return [min(lr, c) for lr, c in zip(lrs, self.ceilings, strict=True)]

    def _sync_hooks(self) -> None:
        if self.ceilings is not None and len(self.ceilings) != len(self.optimizer.param_groups):
            self.ceilings = None  # groups were added since: the ceiling no longer maps
        backed_off = self.scale < 1.0 or self.ceilings is not None
        if backed_off and not self._handles:
            self._handles = [
                self.optimizer.register_step_pre_hook(self._scale_groups),
                self.optimizer.register_step_post_hook(self._restore_groups),
            ]
        elif not backed_off:
            self.remove()

    def _scale_groups(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._user_lrs = [g["lr"] for g in optimizer.param_groups]
        ceilings = self.ceilings
        for i, (g, lr) in enumerate(zip(optimizer.param_groups, self._user_lrs, strict=True)):
            scaled = lr * self.scale
            if ceilings is not None and i < len(ceilings):
                # a tensor LR (capturable/fused optimizers) stays a tensor on its device
                scaled = (
                    scaled.clamp(max=ceilings[i])
                    if isinstance(scaled, torch.Tensor)
                    else min(scaled, ceilings[i])
                )
            g["lr"] = scaled

    def _restore_groups(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for g, lr in zip(optimizer.param_groups, self._user_lrs, strict=True):
            g["lr"] = lr
        self._user_lrs = []
