"""The one definition of training failure used by every scenario and benchmark.

- **explosion**: after ``warmup`` steps, the loss is non-finite or exceeds ``factor`` (2×) its
  running minimum (the minimum over all earlier steps, warmup included).
- **silent degradation**: the run never explodes, but its final smoothed loss exceeds
  ``(1 + margin)`` × the healthy control's final smoothed loss (same seed, same model size).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

EXPLOSION_FACTOR = 2.0
EXPLOSION_WARMUP = 50
DEGRADATION_MARGIN = 0.15
SMOOTH_WINDOW = 25


class FailureKind(str, Enum):
    EXPLOSION = "explosion"
    SILENT_DEGRADATION = "silent_degradation"


@dataclass(frozen=True)
class Failure:
    kind: FailureKind
    step: int  # index into the loss curve where failure is first established
    value: float  # the loss (explosion) or final smoothed loss (degradation) that tripped it
    reference: float  # the running minimum (explosion) or the control's smoothed loss


def smoothed_final_loss(losses: Sequence[float], window: int = SMOOTH_WINDOW) -> float:
    """Mean of the last ``window`` losses; +inf if any of them is non-finite."""
    if not losses:
        raise ValueError("losses is empty")
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    tail = list(losses[-window:])
    if any(not math.isfinite(v) for v in tail):
        return math.inf
    return sum(tail) / len(tail)


def find_explosion(
    losses: Sequence[float],
    *,
    warmup: int = EXPLOSION_WARMUP,
    factor: float = EXPLOSION_FACTOR,
) -> Failure | None:
    """First step ≥ ``warmup`` whose loss is non-finite or > ``factor`` × running minimum."""
    if factor <= 1.0:
        raise ValueError(f"factor must be > 1, got {factor}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    running_min = math.inf
    for step, loss in enumerate(losses):
        if not math.isfinite(loss):
            if step >= warmup:
                return Failure(FailureKind.EXPLOSION, step, loss, running_min)
            continue
        if step >= warmup and loss > factor * running_min:
            return Failure(FailureKind.EXPLOSION, step, loss, running_min)
        running_min = min(running_min, loss)
    return None


def classify(
    losses: Sequence[float],
    control_losses: Sequence[float] | None = None,
    *,
    warmup: int = EXPLOSION_WARMUP,
    factor: float = EXPLOSION_FACTOR,
    margin: float = DEGRADATION_MARGIN,
    window: int = SMOOTH_WINDOW,
) -> Failure | None:
    """The failure of a run (explosion first, then silent degradation vs. the control), or None.

    A non-finite loss during warmup also counts (at the first step ≥ warmup), since the run can
    no longer train. Silent degradation needs ``control_losses``; without it only explosions count.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    exploded = find_explosion(losses, warmup=warmup, factor=factor)
    if exploded is not None:
        return exploded
    if any(not math.isfinite(v) for v in losses):
        # Non-finite only before warmup and the curve ends there: still a dead run.
        return Failure(FailureKind.EXPLOSION, min(warmup, len(losses) - 1), math.nan, math.nan)
    if control_losses is None or not losses:
        return None
    final = smoothed_final_loss(losses, window)
    ref = smoothed_final_loss(control_losses, window)
    if final > (1.0 + margin) * ref:
        return Failure(FailureKind.SILENT_DEGRADATION, len(losses) - 1, final, ref)
    return None
