"""Top singular triplet of a weight sharded as a DTensor (FSDP2, tensor parallel), without
gathering the matrix: power iteration on this rank's block with an all-reduce of vectors.

The target's (out, in) matrix W (m, n) is split by one ``Shard`` placement of its stored
parameter on one mesh dimension. Two cases, by which axis of W the shard cuts:

- rows (``nn.Linear`` weight, Shard(0)): this rank holds W_r (m_r, n).
  x_r = W_r v;  y = Σ_ranks W_rᵀ x_r  (one all-reduce of (n,) per iteration).
- columns (HF ``Conv1D`` weight stored (in, out), Shard(0)): this rank holds W_c (m, n_c).
  x = Σ_ranks W_c v_c  (one all-reduce of (m,) per iteration);  y_c = W_cᵀ x.
  ‖y‖ is needed to normalise v: it rides along with the next iteration's all-reduce
  (W (y/‖y‖) = (W y)/‖y‖), and one last all-reduce assembles v (n,) and ‖y‖.

Scalars (‖W‖_F² on the first iteration, ‖x‖² or ‖y‖²) are packed with the vector, so an
iteration costs exactly one all-reduce; a fused QKV slice takes the rows of this rank's
shard that fall inside it (a rank holding none of them contributes zeros). Replicated mesh
dimensions (HSDP) need no communication: every replica computes the same numbers.

Every rank of the shard group must call this for the same targets in the same order (the
probe computes weight quantities on every rank under FSDP2). Results are identical on every
rank (they are computed from all-reduced buffers), fp32, on the device; no host sync.

Layouts this does not cover (``Partial``, several ``Shard`` placements on one parameter,
strided shards of FSDP2 + TP, uneven splits other than ``torch.chunk``'s) and the exact mode
gather the parameter (``full_tensor()``, a collective on every rank) and fall back to
:meth:`PowerIteration.triplet` on the full matrix.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..targets import WeightTarget
from .spectral import PowerIteration, Triplet, frobenius_squared

__all__ = ["ShardLayout", "is_dtensor", "shard_layout", "sharded_triplet"]

logger = logging.getLogger("rankguard.probe")

_TINY = torch.finfo(torch.float32).tiny


@functools.cache
def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a DTensor (False on builds without torch.distributed)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


@dataclass(frozen=True)
class ShardLayout:
    """Where this rank's block sits in a target's (out, in) matrix W (m, n).

    ``block`` is this rank's (out, in) block (a view of the local shard, possibly empty):
    rows ``start:start + block.shape[0]`` of W when ``axis == 0``, columns
    ``start:start + block.shape[1]`` when ``axis == 1``. ``group`` is the process group of
    the sharded mesh dimension.
    """

    block: Tensor
    axis: int
    start: int
    shape: tuple[int, int]
    group: dist.ProcessGroup


def _chunk_span(size: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of chunk ``index`` when ``size`` is split like ``torch.chunk`` (what
    DTensor's Shard does): chunks of ceil(size / parts), the last ones short or empty."""
    chunk = -(-size // parts)
    start = min(index * chunk, size)
    return start, min(start + chunk, size)


def shard_layout(target: WeightTarget) -> ShardLayout | None:
    """This rank's block of the target's matrix, or None for a layout not handled here."""
    from torch.distributed.tensor import Replicate, Shard

    param = target.parameter
    placements = param.placements  # type: ignore[attr-defined]
    sharded = [(i, p) for i, p in enumerate(placements) if not isinstance(p, Replicate)]
    if len(sharded) != 1 or type(sharded[0][1]) is not Shard:  # not _StridedShard/Partial
        return None
    mesh_dim, placement = sharded[0]
    stored_dim = placement.dim % 2
    mesh = param.device_mesh  # type: ignore[attr-defined]
    local = param.to_local().detach()  # type: ignore[attr-defined]
    global_shape = tuple(param.shape)
    lo, hi = _chunk_span(
        global_shape[stored_dim], mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
    )
    if local.dim() != 2 or local.shape[stored_dim] != hi - lo:
        return None
    # the (out, in) view of the local shard; Conv1D stores (in, out)
    block = local.t() if target.transposed else local
    axis = stored_dim if not target.transposed else 1 - stored_dim
    rows = target.rows
    m = global_shape[1] if target.transposed else global_shape[0]
    n = global_shape[0] if target.transposed else global_shape[1]
    start = lo
    if rows is not None:
        row_lo, row_hi, _ = rows.indices(m)
        if axis == 0:
            # the part of this rank's rows [lo, hi) inside the fused slice [row_lo, row_hi)
            a, b = max(lo, row_lo), min(hi, row_hi)
            b = max(a, b)
            block = block[a - lo : b - lo]
            start = a - row_lo if b > a else 0
        else:
            block = block[row_lo:row_hi]
        m = row_hi - row_lo
    return ShardLayout(block, axis, start, (m, n), mesh.get_group(mesh_dim))


def sharded_triplet(power: PowerIteration, target: WeightTarget) -> Triplet:
    """σ₁, u₁, v₁ and ‖W‖_F² of the target's matrix from this rank's shard; the warm vector
    v (n,) is kept in ``power`` under the target's name, identical on every rank."""
    layout = None if power.exact else shard_layout(target)
    if layout is None:
        if not power.exact:
            _log_fallback(target.name)
        # a gather of the whole parameter (a collective on every rank)
        full = target.parameter.detach().full_tensor()  # type: ignore[attr-defined]
        w = full.t() if target.transposed else full
        return power.triplet(target.name, w[target.rows] if target.rows is not None else w)
    w = layout.block.to(torch.float32)  # (m_r, n) or (m, n_c); a copy only for bf16/fp16
    v, n_iter = power.start(target.name, layout.shape[1], w.device)
    if layout.axis == 0:
        return _rows(power, target.name, w, layout, v, n_iter)
    return _columns(power, target.name, w, layout, v, n_iter)


def _rows(
    power: PowerIteration, key: str, w: Tensor, layout: ShardLayout, v: Tensor, n_iter: int
) -> Triplet:
    m, n = layout.shape
    stop = layout.start + w.shape[0]
    fro2 = w.new_zeros(())
    y_norm = w.new_zeros(())
    packed = w.new_zeros(0)
    x_local = w.new_zeros(w.shape[0])
    for i in range(n_iter):
        x_local = torch.mv(w, v)  # W_r v (m_r,)
        parts = [torch.mv(w.t(), x_local), x_local.square().sum().reshape(1)]  # (n,), ‖x_r‖²
        if i == 0:
            parts.append(frobenius_squared(w).reshape(1))  # ‖W_r‖_F²
        if i == n_iter - 1:
            # the last x assembled on every rank for u (zeros outside this rank's rows)
            parts.append(torch.cat([x_local.new_zeros(layout.start), x_local]))
            parts.append(x_local.new_zeros(m - stop))
        packed = torch.cat(parts)
        dist.all_reduce(packed, group=layout.group)  # y (n,), ‖x‖², [‖W‖_F²], [x (m,)]
        y = packed[:n]
        if i == 0:
            fro2 = packed[n + 1]
        y_norm = torch.linalg.vector_norm(y)
        v = y / y_norm.clamp_min(_TINY)
    x = packed[-m:] if m else packed[:0]
    x_norm = packed[n].sqrt().clamp_min(_TINY)
    power.remember(key, v, y_norm)
    return Triplet(y_norm / x_norm, x / x_norm, v, fro2)


def _columns(
    power: PowerIteration, key: str, w: Tensor, layout: ShardLayout, v: Tensor, n_iter: int
) -> Triplet:
    m, n = layout.shape
    stop = layout.start + w.shape[1]
    y_local = v[layout.start : stop]  # the start vector (unit norm), then y_c unnormalised
    fro2 = w.new_zeros(())
    x = w.new_zeros(m)
    for i in range(n_iter):
        # W (y/‖y‖) = (W_c y_c summed over ranks)/‖y‖: ‖y‖² rides along
        parts = [torch.mv(w, y_local), y_local.square().sum().reshape(1)]  # (m,), ‖y_c‖²
        if i == 0:
            parts.append(frobenius_squared(w).reshape(1))  # ‖W_c‖_F²
        packed = torch.cat(parts)
        dist.all_reduce(packed, group=layout.group)  # W y (m,), ‖y‖², [‖W‖_F²]
        if i == 0:
            fro2 = packed[m + 1]
        x = packed[:m] / packed[m].sqrt().clamp_min(_TINY)  # W v (m,)
        y_local = torch.mv(w.t(), x)  # (WᵀW v)_c (n_c,)
    # assemble y (n,) and ‖y‖² on every rank
    packed = torch.cat([y_local.new_zeros(layout.start), y_local, y_local.new_zeros(n - stop)])
    dist.all_reduce(packed, group=layout.group)
    y_norm = torch.linalg.vector_norm(packed)
    v = packed / y_norm.clamp_min(_TINY)
    x_norm = torch.linalg.vector_norm(x).clamp_min(_TINY)
    power.remember(key, v, y_norm)
    return Triplet(y_norm / x_norm, x / x_norm, v, fro2)


@functools.cache
def _log_fallback(name: str) -> None:
    logger.warning(
        "rankguard: %s: DTensor layout not handled by the sharded power iteration; the "
        "parameter is gathered (full_tensor) for its spectrum on every sample",
        name,
    )
