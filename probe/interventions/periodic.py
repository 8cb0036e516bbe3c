"""The MSign optimizer of the paper (Alg. 1): a base optimizer step, then MSign every P steps.

``MSign(optimizer, targets, period=100)`` registers a post-step hook on the wrapped torch
optimizer, so MSign runs after every P-th *completed* ``optimizer.step()`` whether the
training loop calls ``msign.step()`` or keeps calling ``optimizer.step()`` (and a
``GradScaler`` that skips a step on overflow does not advance the count). Steps count from
1: MSign runs after steps P, 2P, ... The optimizer state (Adam moments) is left untouched,
as in the paper.

Each application snapshots the targets into a host buffer it reuses (one device->host copy
of the targets every P steps) and keeps its result only if it is finite
(:func:`~.rewrite.rewrite_targets`). One that fails — a result with NaN/Inf, weights that
already hold NaN — restores the weights, is counted in ``failures`` (the error in
``last_error``, logged once) and training goes on: this runs inside the user's
``optimizer.step()``, which it must never break. ``strict=True`` raises instead.

The wrapper delegates ``step``, ``zero_grad``, ``param_groups``, ``state`` and
``add_param_group``; its ``state_dict()`` holds the optimizer's plus the step counter, and
``load_state_dict`` restores both. Pass the *inner* optimizer to an LR scheduler (the
schedulers check ``isinstance(optimizer, torch.optim.Optimizer)``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from torch.optim import Optimizer

from ..exceptions import ConfigError
from ..targets import WeightTarget
from .msign import Engine, _check_rank_tol, _check_steps, _resolve_engine, apply_msign
from .polar import DEFAULT_STEPS
from .records import InterventionResult
from .rewrite import StatsMode
from .snapshot import Snapshot

__all__ = ["MSign"]

logger = logging.getLogger("rankguard.probe.interventions")


class MSign:
    """Apply MSign to ``targets`` after every ``period``-th step of ``optimizer``."""

    def __init__(
        self,
        optimizer: Optimizer,
        targets: Sequence[WeightTarget],
        *,
        period: int = 100,
        engine: Engine | str | None = None,
        steps: int = DEFAULT_STEPS,
        rank_tol: float | None = None,
        stats: StatsMode | str = StatsMode.NONE,
        strict: bool = False,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise ConfigError(
                f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if not isinstance(period, int) or isinstance(period, bool) or period < 1:
            raise ConfigError(f"period: {period!r} is invalid; expected an integer >= 1")
        self._targets = [targets] if isinstance(targets, WeightTarget) else list(targets)
        if not self._targets:
            raise ConfigError("targets: an empty list; select at least one 2-D weight")
        _check_steps(steps)
        _check_rank_tol(rank_tol)
        self.optimizer = optimizer
        self.period = period
        self.engine = _resolve_engine(engine, self._targets[0].parameter.device)
        self.steps = steps
        self.rank_tol = rank_tol
        self.stats = StatsMode.parse(stats)
        self.strict = strict
        self.step_count = 0
        self.applications = 0
        self.failures = 0
        self.last_result: InterventionResult | None = None
        self.last_error: Exception | None = None
        self._snapshot: Snapshot | None = None  # host buffers, reused every application
        self._handle = optimizer.register_step_post_hook(self._after_step)

    def _after_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self.step_count += 1
        if self.step_count % self.period != 0:
            return
        try:
            self._snapshot = (
                self._snapshot.refresh()
                if self._snapshot is not None
                else Snapshot.take(self._targets)
            )
            self.last_result = apply_msign(
                self._targets,
                engine=self.engine,
                steps=self.steps,
                rank_tol=self.rank_tol,
                stats=self.stats,
                snapshot=self._snapshot,
            )
        except Exception as exc:
            if self.strict:
                raise
            self.failures += 1
            self.last_error = exc
            if self.failures == 1:
                logger.warning(
                    "rankguard: periodic MSign at step %d failed and left the weights as they "
                    "were: %s (further failures counted in MSign.failures)",
                    self.step_count,
                    exc,
                )
            return
        self.applications += 1

    # --- delegation ------------------------------------------------------------------------

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """The base optimizer's step; MSign follows it (from the hook) on every P-th step."""
        if closure is None:
            return self.optimizer.step()
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "msign": {"step_count": self.step_count, "period": self.period},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        try:
            inner = state_dict["optimizer"]
            step_count = state_dict["msign"]["step_count"]
        except (KeyError, TypeError):
            raise ConfigError(
                "state_dict: expected {'optimizer': ..., 'msign': {'step_count': int, ...}} "
                "as written by MSign.state_dict()"
            ) from None
        if not isinstance(step_count, int) or step_count < 0:
            raise ConfigError(f"state_dict: msign.step_count={step_count!r} is not an int >= 0")
        self.optimizer.load_state_dict(inner)
        self.step_count = step_count

    def remove(self) -> None:
        """Stop applying MSign (unregister the hook); the optimizer keeps working alone."""
        self._handle.remove()

    def __repr__(self) -> str:
        return (
            f"MSign(period={self.period}, engine={self.engine.value!r}, "
            f"targets={len(self._targets)}, step_count={self.step_count}, "
            f"failures={self.failures}, "
            f"optimizer={type(self.optimizer).__name__})"
        )
