"""The flight recorder: every step's cheap scalars in a ring on the device, shipped at full
step resolution around an incident.

The probe samples every ``every`` steps (50 by default), so an alert at that cadence cannot
show what happened step by step. The recorder keeps, for each of the last ``steps`` steps,
the loss, the global gradient norm, the update-to-weight ratio and the count of gradient
tensors with a non-finite element, written by :class:`~.guard.StepGuard` on the device
(no host sync). Around an incident the window is read once and shipped as ordinary points:

==================  ================  ================================================
quantity            target            value
==================  ================  ================================================
``loss``            ``global``        the loss of that step
``grad_norm``       ``global``        global L2 norm of the gradients the optimizer saw
``update_ratio``    ``global``        geometric mean over the weights of the step's
                                      ||dW|| / ||W|| (strided subsample, see guard.py)
``non_finite``      ``grad_tensors``  gradient tensors with a NaN/Inf element
==================  ================  ================================================

Ingest is idempotent on (series, step), so the points of steps that were also sampled are
stored once.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from ..wire import Point

__all__ = ["FLIGHT_SERIES", "FlightRecorder"]

# column of the ring -> (quantity, target) of the shipped point
FLIGHT_SERIES = (
    ("loss", "global"),
    ("grad_norm", "global"),
    ("update_ratio", "global"),
    ("non_finite", "grad_tensors"),
)


class FlightRecorder:
    """A (steps, 4) fp32 ring on the device; ``slot_steps`` (host) says which step each row
    holds."""

    def __init__(self, steps: int, device: torch.device) -> None:
        self.steps = steps
        self.ring = torch.full((steps, len(FLIGHT_SERIES)), math.nan, device=device)
        self.slot_steps: list[int | None] = [None] * steps

    @torch.no_grad()
    def record(self, step: int, values: Tensor) -> None:
        """``values``: (4,) device tensor, in the order of :data:`FLIGHT_SERIES`."""
        slot = step % self.steps
        self.ring[slot].copy_(values)
        self.slot_steps[slot] = step

    def window(self, start: int, end: int, *, rank: int = 0) -> list[Point]:
        """The recorded points of steps ``start``..``end`` still in the ring (one device->
        host copy: called at an incident, never on a healthy step)."""
        rows = self.ring.cpu().tolist()
        wall = time.time()
        points: list[Point] = []
        for slot, step in sorted(
            ((i, s) for i, s in enumerate(self.slot_steps) if s is not None and start <= s <= end),
            key=lambda item: item[1],
        ):
            for (quantity, target), value in zip(FLIGHT_SERIES, rows[slot], strict=True):
                if quantity == "loss" or not math.isnan(value):
                    points.append(Point(quantity, target, step, value, rank, wall))
        return points
