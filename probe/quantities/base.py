"""The one interface every quantity implements, and what a sampled step hands it.

A quantity declares its wire name (``name``), what it needs from the step (weights only,
sampled inputs, gradients, attention projections), and computes *on the device*: it returns
1-d tensors (one value per target) and never calls ``.item()``/``.cpu()``. The probe gathers
every result of a step into one device->host copy.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..attention import AttentionSite
from ..config import ProbeConfig
from ..hooks import CallCapture, Captures
from ..schedules import Every, Schedule
from ..targets import WeightTarget
from .sharded import is_dtensor, sharded_triplet
from .spectral import PowerIteration, Triplet

__all__ = ["Histogram", "Quantity", "StepContext", "Unavailable", "Values"]

Unavailable = Callable[[str, str, "str | None"], None]
"""``(quantity, reason, target or None)``: a quantity says what it could not compute."""


def _ignore(quantity: str, reason: str, target: str | None = None) -> None:
    return None


@dataclass(frozen=True)
class Values:
    """One value per target of one wire quantity; ``values`` is (len(targets),) on device."""

    quantity: str
    targets: tuple[str, ...]
    values: Tensor
    steps: tuple[int, ...] | None = None  # None: all at the context's step


@dataclass(frozen=True)
class Histogram:
    """Counts on fixed ``edges`` (len(edges) == counts.numel() + 1); counts on device."""

    quantity: str
    target: str
    edges: tuple[float, ...]
    counts: Tensor


Output = Values | Histogram


@dataclass
class StepContext:
    """Everything a quantity may read on one sampled step. Spectral results are cached here,
    so quantities computed at the same step share one power iteration per weight."""

    step: int
    model: nn.Module
    targets: Sequence[WeightTarget]
    config: ProbeConfig
    weights: PowerIteration
    inputs_spectrum: PowerIteration
    captures: Captures
    params: Sequence[tuple[str, nn.Parameter]]
    losses: Sequence[Tensor | float] = ()
    sites: Sequence[AttentionSite] = ()
    blocks: Sequence[tuple[str, nn.Module]] = ()
    probe_batch: CallCapture | None = None
    report: Unavailable = _ignore
    """Where :meth:`unavailable` goes (the probe: a warning and a ``quantity_unavailable``
    event, once per quantity and target)."""
    _weight_cache: dict[str, Triplet] = field(default_factory=dict)
    _input_cache: dict[int, Triplet] = field(default_factory=dict)

    def unavailable(self, quantity: str, reason: str, target: str | None = None) -> None:
        """Says that ``quantity`` (for ``target``, or at all) could not be computed, and why."""
        self.report(quantity, reason, target)

    def triplet(self, target: WeightTarget) -> Triplet:
        """Top singular triplet of the target's (out, in) matrix in fp32, once per step.

        A DTensor parameter (FSDP2) goes to the sharded power iteration: collectives, so
        every rank of its group must ask for the same targets in the same order."""
        hit = self._weight_cache.get(target.name)
        if hit is None:
            if is_dtensor(target.parameter):
                hit = sharded_triplet(self.weights, target)
            else:
                hit = self.weights.triplet(target.name, target.matrix())
            self._weight_cache[target.name] = hit
        return hit

    def input_triplets(self) -> Iterator[tuple[WeightTarget, Triplet]]:
        """(target, top triplet of its sampled inputs) for every target whose module ran a
        forward on this step, in target order."""
        for target in self.targets:
            tri = self.input_triplet(target)
            if tri is not None:
                yield target, tri

    def input_triplet(self, target: WeightTarget) -> Triplet | None:
        """Top triplet of the target's sampled input rows Z (N, in), or None if the module
        ran no forward on this step. Fused parts share their input: computed once."""
        z = self.captures.inputs.get(target.name)
        if z is None:
            return None
        hit = self._input_cache.get(id(z))
        if hit is None:
            # warm vectors are keyed by module (q, k, v of a fused projection share inputs)
            key = target.module_name
            if target.rows is not None and target.module_name and "[" in target.name:
                key = f"{target.module_name}:{target.name.rpartition('[')[2]}"
            hit = self.inputs_spectrum.triplet(key, z)
            self._input_cache[id(z)] = hit
        return hit


class Quantity(abc.ABC):
    """A named measurement with its own schedule and (optional) warm-start state."""

    name: ClassVar[str]
    """Wire name: file = wire = database = Prometheus label = figure."""
    emits: ClassVar[tuple[str, ...]] = ()
    """Every wire quantity this class produces (default: just ``name``)."""
    needs_inputs: ClassVar[bool] = False
    needs_grads: ClassVar[bool] = False
    needs_attention: ClassVar[bool] = False
    needs_blocks: ClassVar[bool] = False
    """Reads the repeated blocks' calls (``captures.blocks``)."""
    default_cadence: ClassVar[str] = "every"
    """'every' or 'jacobian_every': which config cadence is the default schedule."""

    def __init__(self, *, schedule: Schedule | None = None) -> None:
        self.schedule: Schedule = schedule if schedule is not None else Every(1)

    @classmethod
    def wire_names(cls) -> tuple[str, ...]:
        return cls.emits or (cls.name,)

    def should_compute(self, step: int) -> bool:
        return self.schedule(step)

    def arm(self, step: int, targets: Sequence[WeightTarget]) -> None:
        """Called at the end of the step before ``step`` when ``step`` is due (after that
        step's commands), so a quantity can keep what the next optimizer step starts from.
        No host sync; the default keeps nothing."""
        return None

    def disarm(self) -> None:
        """Drops what :meth:`arm` kept (the probe closes, or the armed step was skipped)."""
        return None

    @abc.abstractmethod
    def compute(self, ctx: StepContext) -> list[Output]:
        """Results for ``ctx.step``, on the device; no host sync."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None


def stack(values: Sequence[Tensor], device: torch.device | None = None) -> Tensor:
    """0-d tensors -> (n,) fp32 on their device (empty on ``device`` or CPU)."""
    if not values:
        return torch.zeros(0, device=device)
    return torch.stack([v.reshape(()).to(torch.float32) for v in values])
