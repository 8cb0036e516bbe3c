"""The probe under torch.distributed: which rank computes and ships what, and the two
collectives the probe itself issues.

DDP: weight and gradient quantities are identical on every rank, so rank 0 computes and ships
them (and the loss); the other ranks take part in the command broadcast and, with
``activations_per_rank``, compute the activation quantities of their own batch. FSDP2
(DTensor parameters): weight spectra are collectives, so every rank computes the same
quantities at the same steps, and rank 0 ships.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from .quantities import REGISTRY, Quantity

__all__ = [
    "PER_BATCH_WIRE_NAMES",
    "broadcast_from_rank0",
    "computed_on_rank",
    "is_per_batch",
    "rank_and_world",
    "shared_run_id",
]


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size (0, 1 without an initialised process group)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:  # pragma: no cover - exotic builds
        pass
    return 0, 1


def broadcast_from_rank0(items: list[Any]) -> list[Any]:
    """Rank 0's list on every rank (one collective; every rank must call it at the same step)."""
    import torch.distributed as dist

    box: list[Any] = [items]
    dist.broadcast_object_list(box, src=0)
    return list(box[0])


def shared_run_id(world_size: int) -> str:
    """A fresh run id, the same on every rank (rank 0's, broadcast once at construction)."""
    run_id = str(uuid.uuid4())
    if world_size > 1:
        run_id = broadcast_from_rank0([run_id])[0]
    return run_id


def is_per_batch(cls: type[Quantity]) -> bool:
    """Whether a quantity is computed from the batch (layer inputs, attention projections),
    so that its value differs between data-parallel ranks."""
    return cls.needs_inputs or cls.needs_attention


PER_BATCH_WIRE_NAMES = frozenset(
    name for cls in REGISTRY.values() if is_per_batch(cls) for name in cls.wire_names()
)
"""The wire quantities a rank other than 0 ships (its own batch's activations)."""


def computed_on_rank(
    quantities: Sequence[Quantity], *, rank: int, sharded: bool, activations_per_rank: bool
) -> list[Quantity]:
    """The quantities this rank computes: all of them on rank 0 and under FSDP2; under DDP
    the other ranks compute only their batch's activation quantities, and only if asked."""
    if rank == 0 or sharded:
        return list(quantities)
    return [q for q in quantities if activations_per_rank and is_per_batch(type(q))]
