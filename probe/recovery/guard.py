"""The in-process first response's checks: every step, on the device, and skip-step.

Two optimizer hooks and the probe's step feed one row of device scalars per step:

- the step pre-hook (after backward, before the update) takes the global gradient norm and
  the count of gradient tensors with a NaN/Inf, and compares the norm with ``skip_factor`` x
  the running median of the last ``window`` norms. With skip-step on, it reads that one
  verdict (a 0-d flag: the one host read per step, as ``GradScaler.step`` does) and, on a
  non-finite or spiking gradient, drops the update exactly: every ``.grad`` is set to None,
  so the optimizer skips every parameter (no state, no step count changes). OLMo-core's
  SkipStepAdamW and MaxText do the same inside their optimizers.
- the pre- and post-hook measure the update-to-weight ratio ||dW|| / ||W|| of every weight
  on a strided subsample (at most ``_SAMPLE`` elements per weight: a copy of ~0.1% of a
  large model, instead of the whole of it), geometric mean over the weights: above
  ``update_ratio_hot`` the step is hot (learning-rate backoff); also above
  ``update_ratio_spike`` x its running median it is a spike (rollback).
- ``probe.step(loss)`` adds the loss: non-finite, or above ``loss_spike`` x the running
  median of the last losses.

Every check but the non-finite ones waits for ``warmup`` steps of history (the first steps
of a run are learning: healthy runs spike there too). Without skip-step nothing is read on
a healthy step: the row is published at the step
boundary (:meth:`StepGuard.end_step`). On a CPU the values are read there (there is no
device to wait for). On CUDA the row is copied with ``non_blocking`` into pinned memory and
read at the next step boundary, once its event has completed: the decisions land **one
step** after the step they judge. Running medians ignore the values they flagged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntFlag
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from ..config import RecoveryConfig
from ..quantities.sharded import is_dtensor
from .flight import FlightRecorder

__all__ = ["Flag", "StepGuard", "StepReading"]

_SAMPLE = 4096  # elements per weight in the update-ratio subsample


class Flag(IntFlag):
    NONE = 0
    LOSS_NON_FINITE = 1
    GRAD_NON_FINITE = 2
    LOSS_SPIKE = 4
    UPDATE_SPIKE = 8
    UPDATE_HOT = 16
    GRAD_SPIKE = 32
    SKIPPED = 64


# the row: flags, loss, grad norm, update ratio, non-finite grads, and the medians
_FLAGS, _LOSS, _GNORM, _RATIO, _NONFINITE, _LOSS_MED, _RATIO_MED, _GNORM_MED = range(8)


@dataclass(frozen=True)
class StepReading:
    """What the checks saw at one step (NaN: not measured at that step)."""

    step: int
    flags: Flag
    loss: float
    grad_norm: float
    update_ratio: float
    non_finite: float
    loss_median: float
    update_ratio_median: float
    grad_norm_median: float

    @property
    def healthy(self) -> bool:
        return not (self.flags & ~Flag.SKIPPED & ~Flag.GRAD_SPIKE)


class _History:
    """The last ``n`` values on the device (NaN: empty or flagged); a median without sync."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.values = torch.full((n,), math.nan, device=device)
        self.count = 0  # values pushed (host-side: no read needed)

    def median(self) -> Tensor:
        return torch.nanmedian(self.values)

    def push(self, value: Tensor, flagged: Tensor) -> None:
        keep = torch.where(flagged | ~torch.isfinite(value), math.nan, value)
        self.values[self.count % self.values.shape[0]] = keep
        self.count += 1

    def copy(self) -> _History:
        out = _History.__new__(_History)
        out.values, out.count = self.values.clone(), self.count  # a device copy: no sync
        return out


class StepGuard:
    """The per-step checks of one optimizer's updates and the probe's losses."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | None,
        params: Sequence[Tensor],
        weights: Sequence[Tensor],
        config: RecoveryConfig,
        flight: FlightRecorder,
        device: torch.device,
    ) -> None:
        self.config = config
        self.flight = flight
        self.params = list(params)
        self.weights = [w for w in weights if w.requires_grad]
        self.device = device
        self.skipped = 0  # updates dropped by skip-step
        self._row = self._fresh_row()
        self._flags = torch.zeros((), dtype=torch.int32, device=device)
        self._loss = _History(config.window, device)
        self._gnorm = _History(config.window, device)
        self._ratio = _History(config.window, device)
        self._sample = _WeightSample()
        self._before: Tensor | None = None
        self._pending: list[tuple[int, Tensor, Any]] = []  # CUDA readouts in flight
        self._handles: list[RemovableHandle] = []
        if optimizer is not None:
            self._handles = [
                optimizer.register_step_pre_hook(self._pre_step),
                optimizer.register_step_post_hook(self._post_step),
            ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _fresh_row(self) -> Tensor:
        row = torch.full((8,), math.nan, device=self.device)
        row[_FLAGS] = 0.0
        return row

    def _flag(self, bit: Flag, condition: Tensor) -> None:
        self._flags.bitwise_or_(condition.to(torch.int32) * int(bit))

    # -- the optimizer step -----------------------------------------------------------------

    @torch.no_grad()
    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]  # no_grad: no detach
        if not grads:
            return
        norms = _grad_norms(grads)  # (n,) fp32
        total = torch.linalg.vector_norm(norms)
        non_finite = ~torch.isfinite(norms)
        median = self._gnorm.median()
        bad = ~torch.isfinite(total)
        spike = torch.zeros((), dtype=torch.bool, device=total.device)
        if self._gnorm.count >= self.config.warmup:
            spike = total > self.config.skip_factor * median
        self._row[_GNORM] = total
        self._row[_NONFINITE] = non_finite.sum()
        self._row[_GNORM_MED] = median
        self._flag(Flag.GRAD_NON_FINITE, bad)
        self._flag(Flag.GRAD_SPIKE, spike)
        self._gnorm.push(total, spike)
        dropped = False
        if self.config.skip_step and bool(bad | spike):  # the one read per step (skip-step)
            for p in self.params:
                p.grad = None
            self._flag(Flag.SKIPPED, torch.ones((), dtype=torch.bool, device=self.device))
            self.skipped += 1
            dropped = True
        if self.config.update_ratio_hot is not None and not dropped:
            self._before = self._sample.take([w for w in self.weights if w.grad is not None])

    @torch.no_grad()
    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        before, self._before = self._before, None
        if before is None or self.config.update_ratio_hot is None:
            return
        ratios = self._sample.ratios(before)
        gmean = torch.exp(torch.log(ratios.clamp(min=1e-30)).mean())
        median = self._ratio.median()
        hot = torch.zeros((), dtype=torch.bool, device=gmean.device)
        spike = hot
        if self._ratio.count >= self.config.warmup:
            hot = gmean > self.config.update_ratio_hot
            spike = hot & (gmean > self.config.update_ratio_spike * median)
        self._row[_RATIO] = gmean
        self._row[_RATIO_MED] = median
        self._flag(Flag.UPDATE_HOT, hot)
        self._flag(Flag.UPDATE_SPIKE, spike)
        self._ratio.push(gmean, spike)

    # -- the step boundary ------------------------------------------------------------------

    @torch.no_grad()
    def end_step(self, step: int, loss: Tensor | float | None) -> StepReading | None:
        """Adds the loss checks, records the step in the flight recorder, and returns the
        reading of this step (CPU) or of the previous one once its copy landed (CUDA)."""
        if loss is not None:
            value = (
                loss.detach().float().reshape(-1)[0].to(self.device)
                if isinstance(loss, Tensor)
                else torch.tensor(float(loss), device=self.device)
            )
            median = self._loss.median()
            spike = torch.zeros((), dtype=torch.bool, device=self.device)
            if self._loss.count >= self.config.warmup:
                spike = value > self.config.loss_spike * median
            self._row[_LOSS] = value
            self._row[_LOSS_MED] = median
            self._flag(Flag.LOSS_NON_FINITE, ~torch.isfinite(value))
            self._flag(Flag.LOSS_SPIKE, spike)
            self._loss.push(value, spike)
        self._row[_FLAGS] = self._flags.to(torch.float32)
        self.flight.record(
            step, torch.stack([self._row[i] for i in (_LOSS, _GNORM, _RATIO, _NONFINITE)])
        )
        row, self._row = self._row, self._fresh_row()
        self._flags.zero_()
        if row.device.type == "cpu":
            return _reading(step, row.tolist())
        host = torch.empty(row.shape, dtype=row.dtype, pin_memory=True)
        host.copy_(row, non_blocking=True)  # read at the next boundary: no sync now
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record()
        self._pending.append((step, host, event))
        if len(self._pending) > 1 and self._pending[0][2].query():
            done, host_row, _ = self._pending.pop(0)
            return _reading(done, host_row.tolist())
        return None

    def drain(self) -> list[StepReading]:
        """Every reading still in flight (waits for them: at close or a rollback)."""
        out = []
        for step, host, event in self._pending:
            event.synchronize()
            out.append(_reading(step, host.tolist()))
        self._pending = []
        return out

    def forget_pending(self) -> None:
        """Drops the readings in flight (they judged a trajectory a rollback undid)."""
        self._pending = []

    def statistics(self) -> tuple[_History, _History, _History]:
        """A copy of the running histories (loss, gradient norm, update ratio), to keep with
        a snapshot."""
        return self._loss.copy(), self._gnorm.copy(), self._ratio.copy()

    def rewind(self, saved: tuple[_History, _History, _History] | None) -> None:
        """The histories as they were when a restored snapshot was taken (None: empty).
        Judged against the undone trajectory's medians, the first losses after restoring an
        early state look like spikes and would order rollback after rollback."""
        if saved is None:
            n = self.config.window
            saved = (_History(n, self.device), _History(n, self.device), _History(n, self.device))
        self._loss, self._gnorm, self._ratio = (h.copy() for h in saved)


def _reading(step: int, row: list[float]) -> StepReading:
    return StepReading(
        step=step,
        flags=Flag(int(row[_FLAGS])),
        loss=row[_LOSS],
        grad_norm=row[_GNORM],
        update_ratio=row[_RATIO],
        non_finite=row[_NONFINITE],
        loss_median=row[_LOSS_MED],
        update_ratio_median=row[_RATIO_MED],
        grad_norm_median=row[_GNORM_MED],
    )


class _WeightSample:
    """A strided subsample of every weight (``_SAMPLE`` elements each, of its local shard;
    zero-padded when a weight is smaller: zeros add nothing to the sums) as one (n, _SAMPLE)
    fp32 tensor: the update ratio of all the weights in a handful of ops, whatever their
    number."""

    def __init__(self) -> None:
        self._views: list[Tensor] = []

    def take(self, weights: Sequence[Tensor]) -> Tensor:
        """The sample before the update (a copy); remembers which weights it covers."""
        self._views = [_subsample(w) for w in weights]
        return self._stack()

    def ratios(self, before: Tensor) -> Tensor:
        """(n,) ||dW|| / ||W|| of each weight on its sample, ``before`` from :meth:`take`."""
        moved = (self._stack() - before).square_().sum(dim=1)
        size = before.square().sum(dim=1)
        return (moved / size.clamp(min=torch.finfo(torch.float32).tiny)).sqrt_()

    def _stack(self) -> Tensor:
        parts = [
            v if v.numel() == _SAMPLE else F.pad(v, (0, _SAMPLE - v.numel())) for v in self._views
        ]
        return torch.cat(parts).float().view(len(parts), _SAMPLE)


def _subsample(w: Tensor) -> Tensor:
    """A strided view of at most ``_SAMPLE`` elements of ``w`` (its local shard)."""
    flat = (w.detach().to_local() if is_dtensor(w) else w.detach()).reshape(-1)  # type: ignore[attr-defined]
    stride = max(1, flat.numel() // _SAMPLE)
    return flat[::stride][:_SAMPLE]


def _grad_norms(grads: list[Tensor]) -> Tensor:
    """(n,) fp32 L2 norms of the gradients; FSDP2 shards: norms of the whole gradients (the
    squares of the local shards summed over the ranks: one all-reduce)."""
    if any(is_dtensor(g) for g in grads):
        import torch.distributed as dist

        local = [g.to_local() if is_dtensor(g) else g for g in grads]  # type: ignore[attr-defined]
        squares = torch.stack(torch._foreach_norm(local, 2, dtype=torch.float32)) ** 2
        dist.all_reduce(squares)
        return squares.sqrt()
    return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))
