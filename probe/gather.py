"""From a sampled step's device results to wire points and histograms, with one device->host
copy per device.

Quantities return tensors on the device (:class:`~.quantities.Values` and
:class:`~.quantities.Histogram`); the losses recorded since the last sample are 0-d device
tensors or floats. :func:`gather` flattens them all into one fp32 chunk per device, copies
each chunk once, and splits the host values back into points and histograms.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .quantities import Histogram, Values
from .quantities.sharded import is_dtensor
from .wire import Point, encode_histogram

__all__ = ["Loss", "gather", "to_host"]

Loss = tuple[int, Tensor | float, float]
"""A recorded loss: (step, value, wall time); the value stays on its device until gathered."""


def gather(
    outputs: Sequence[Values | Histogram], losses: Sequence[Loss], step: int, rank: int
) -> tuple[list[Point], list[dict[str, Any]]]:
    """The points (quantities at ``step``, then one per loss at its own step) and encoded
    histograms of one sampled step, labelled with ``rank``."""
    wall = time.time()
    chunks: list[Tensor] = []
    for o in outputs:
        t = o.values if isinstance(o, Values) else o.counts
        chunks.append(_local(t.detach()).reshape(-1).to(torch.float32))
    loss_tensors = [_local(v) for _, v, _ in losses if isinstance(v, Tensor)]
    chunks.extend(v.reshape(-1)[:1].to(torch.float32) for v in loss_tensors)
    host = to_host(chunks)
    pos = 0
    points: list[Point] = []
    histograms: list[dict[str, Any]] = []
    for o in outputs:
        if isinstance(o, Values):
            vals = host[pos : pos + len(o.targets)]
            pos += len(o.targets)
            for target, value in zip(o.targets, vals, strict=True):
                points.append(Point(o.quantity, target, step, value, rank, wall))
        else:
            n = o.counts.numel()
            counts = host[pos : pos + n]
            pos += n
            histograms.append(
                encode_histogram(o.quantity, o.target, step, o.edges, counts, rank=rank)
            )
    for loss_step, loss_value, loss_wall in losses:
        if isinstance(loss_value, Tensor):
            v = host[pos]
            pos += 1
        else:
            v = loss_value
        points.append(Point("loss", "global", loss_step, v, rank, loss_wall))
    return points, histograms


def _local(t: Tensor) -> Tensor:
    """A plain tensor for a result computed with DTensor ops (FSDP2: gradient norms, update
    ratios, non-finite counts come out Partial or Replicate): ``full_tensor()`` reduces those
    few values, one all-reduce per output; every rank emits the same outputs at the step."""
    return t.full_tensor() if is_dtensor(t) else t  # type: ignore[attr-defined]


def to_host(chunks: Sequence[Tensor]) -> list[float]:
    """The values of 1-d tensors as one list of floats, in order: one copy per device."""
    if not chunks:
        return []
    by_device: dict[torch.device, list[int]] = {}
    for i, c in enumerate(chunks):
        by_device.setdefault(c.device, []).append(i)
    out: list[float] = [math.nan] * sum(c.numel() for c in chunks)
    offsets = [0]
    for c in chunks:
        offsets.append(offsets[-1] + c.numel())
    for idx in by_device.values():
        flat = torch.cat([chunks[i] for i in idx])
        values = flat.cpu().tolist()  # one device->host copy per sample step (per device)
        pos = 0
        for i in idx:
            n = chunks[i].numel()
            out[offsets[i] : offsets[i] + n] = values[pos : pos + n]
            pos += n
    return out
