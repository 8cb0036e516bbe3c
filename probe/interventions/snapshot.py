"""Undo for interventions: a copy of the targeted matrices kept off the accelerator.

``Snapshot.take(targets)`` copies each target's (out, in) matrix, in the parameter's own
dtype, to CPU memory (pinned when CUDA is available, so the copies are fast DMA);
``snapshot.restore()`` writes them back in place, bit-identical. Every weight rewrite takes
one before its first write (:mod:`.rewrite`). For an FSDP2 (DTensor)
parameter the snapshot holds this rank's local shard of the whole parameter, and restore
writes that shard back: no collective either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..exceptions import ConfigError
from ..quantities.sharded import is_dtensor
from ..targets import WeightTarget

__all__ = ["Snapshot"]


def _local_view(target: WeightTarget) -> Tensor:
    """The tensor this rank owns for ``target``: its matrix view, or, for a DTensor
    parameter, the local shard of the whole parameter (views of shards are not
    well defined)."""
    if is_dtensor(target.parameter):
        return target.parameter.detach().to_local()  # type: ignore[attr-defined, no-any-return]
    return target.matrix()


@dataclass(frozen=True)
class _Saved:
    target: WeightTarget
    data: Tensor  # CPU copy, same dtype and shape as the live view


class Snapshot:
    """Copies of target matrices, restorable exactly. Build with :meth:`take`."""

    def __init__(self, saved: Sequence[_Saved]) -> None:
        self._saved = tuple(saved)

    @classmethod
    @torch.no_grad()
    def take(cls, targets: Sequence[WeightTarget]) -> Snapshot:
        chosen = [targets] if isinstance(targets, WeightTarget) else list(targets)
        if not chosen:
            raise ConfigError("targets: an empty list; nothing to snapshot")
        pin = torch.cuda.is_available()
        saved: list[_Saved] = []
        for target in chosen:
            live = _local_view(target)
            # pinned host buffer + copy_ keeps dtype and values bit-for-bit
            buffer = torch.empty(live.shape, dtype=live.dtype, device="cpu", pin_memory=pin)
            buffer.copy_(live)
            saved.append(_Saved(target, buffer))
        return cls(saved)

    @torch.no_grad()
    def refresh(self) -> Snapshot:
        """Copies the targets' current values into this snapshot's own buffers (no new
        allocation: the periodic MSign optimizer refreshes one before every application).
        A target whose shape or dtype changed gets a fresh snapshot instead."""
        if any(
            _local_view(s.target).shape != s.data.shape
            or _local_view(s.target).dtype != s.data.dtype
            for s in self._saved
        ):
            return Snapshot.take([s.target for s in self._saved])
        for s in self._saved:
            s.data.copy_(_local_view(s.target))
        return self

    @property
    def names(self) -> list[str]:
        return [s.target.name for s in self._saved]

    @property
    def nbytes(self) -> int:
        """Host memory held by the snapshot."""
        return sum(s.data.numel() * s.data.element_size() for s in self._saved)

    @property
    def on_cpu(self) -> bool:
        """True: every copy lives in host memory (the accelerator holds none of it)."""
        return all(s.data.device.type == "cpu" for s in self._saved)

    @property
    def pinned(self) -> bool:
        """True when every copy is in page-locked host memory (taken with CUDA present)."""
        return all(s.data.is_pinned() for s in self._saved)

    def __len__(self) -> int:
        return len(self._saved)

    @torch.no_grad()
    def restore(self) -> None:
        """Write every saved matrix back into its parameter, in place (bit-identical)."""
        for s in self._saved:
            live = _local_view(s.target)
            if live.shape != s.data.shape or live.dtype != s.data.dtype:
                raise ConfigError(
                    f"snapshot: {s.target.name!r} is now {tuple(live.shape)} {live.dtype}, "
                    f"was {tuple(s.data.shape)} {s.data.dtype}; cannot restore"
                )
        for s in self._saved:
            _local_view(s.target).copy_(s.data, non_blocking=False)
