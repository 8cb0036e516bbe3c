"""Rewriting target matrices in place: the loop shared by MSign and PSS.

A *transform* maps one fp32 (out, in) matrix to its replacement. :func:`rewrite_targets`
runs it over the targets under ``torch.no_grad()``, writes each result back into the
parameter (in the parameter's dtype, through ``WeightTarget.matrix()`` so fused QKV
slices and transposed Conv1D weights land in the right place) and measures before/after
statistics.

Every rewrite is undoable and never leaves NaN/Inf behind: the targets are copied to a
:class:`~.snapshot.Snapshot` before the first write, each written matrix is checked for
finiteness, and if any is not finite (a scale that overflows, a weight whose norm overflows
fp32, a value past the fp16 range) or the transform raises, every target is restored from
the snapshot and :class:`RewriteError` says which matrix and why. This is the one place
weights are rewritten: commands, the periodic MSign optimizer and any future rewrite go
through it.

Distributed: under DDP every rank holds the whole parameter and calls this with the same
targets, so each rank computes the same result. Under FSDP2 a parameter is a DTensor
shard; :func:`rewrite_targets` then gathers one matrix at a time (``full_tensor()``, a
collective: every rank must call with the same targets in the same order), transforms the
full matrix on every rank and keeps its own shard (no second collective). Checked at world
size 1 (tests/probe/interventions/test_distributed.py) and, through an ``msign`` command of
the probe, at world size 2 (tests/probe/test_fsdp.py: Linear, fused QKV and Conv1D shards).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from ..exceptions import ConfigError, ProbeError
from ..quantities.sharded import is_dtensor
from ..targets import WeightTarget
from .records import MatrixResult
from .snapshot import Snapshot

__all__ = [
    "RewriteError",
    "StatsMode",
    "Transformed",
    "rewrite_targets",
    "spectral_norm_estimate",
]

_POWER_ITERATIONS = 20


class StatsMode(str, Enum):
    """How σ₁ is measured for the before/after records."""

    EXACT = "exact"  # torch.linalg SVD values (one extra SVD per matrix where not free)
    ESTIMATE = "estimate"  # power iteration, matmuls only (a lower bound of σ₁)
    NONE = "none"  # no records (the periodic optimizer's default: no host sync)

    @classmethod
    def parse(cls, value: StatsMode | str) -> StatsMode:
        """``value`` as a mode; anything else is a :class:`ConfigError` naming the valid ones."""
        try:
            return cls(value)
        except ValueError:
            valid = ", ".join(repr(s.value) for s in cls)
            raise ConfigError(f"stats: {value!r} is invalid; valid: {valid}") from None


class RewriteError(ProbeError, RuntimeError):
    """A rewrite failed or produced NaN/Inf; every target was restored from its snapshot."""


@dataclass(frozen=True)
class Transformed:
    """A transform's output: the new fp32 matrix (out, in), the rank it kept, and the input's
    singular values when it computed them anyway (reused for the 'before' record)."""

    matrix: Tensor
    rank: int
    singular_values: Tensor | None = None


Transform = Callable[[Tensor], Transformed]


def spectral_norm_estimate(w: Tensor, iterations: int = _POWER_ITERATIONS) -> Tensor:
    """σ₁ of w (m, n) by power iteration on WᵀW from a fixed random start (a 0-d tensor).

    Deterministic (seeded start vector), matmuls only, no host sync. It converges fast when
    σ₂/σ₁ is small and is exact for a matrix whose singular values are all equal (MSign's
    output); without a spectral gap it underestimates σ₁ slightly.
    """
    generator = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(w.shape[1], generator=generator, dtype=torch.float32).to(w.device)  # (n,)
    for _ in range(iterations):
        v = w.mT @ (w @ v)
        v = v / torch.linalg.vector_norm(v).clamp_min(1e-30)
    sigma: Tensor = torch.linalg.vector_norm(w @ v)
    return sigma


def _sigma1(w: Tensor, mode: StatsMode, singular_values: Tensor | None) -> Tensor:
    if singular_values is not None and singular_values.numel():
        return singular_values[0]
    if w.numel() == 0:
        return w.new_zeros(())
    if mode is StatsMode.EXACT:
        sigma: Tensor = torch.linalg.matrix_norm(w, ord=2)
        return sigma
    return spectral_norm_estimate(w)


def _view_of(target: WeightTarget, full: Tensor) -> Tensor:
    """The (out, in) view of ``full`` that ``target.matrix()`` takes of the parameter."""
    w = full.t() if target.transposed else full
    return w[target.rows] if target.rows is not None else w


def _check_targets(targets: Sequence[WeightTarget]) -> list[WeightTarget]:
    if isinstance(targets, WeightTarget):
        targets = [targets]
    chosen = list(targets)
    if not chosen:
        raise ConfigError("targets: an empty list; select at least one 2-D weight")
    for t in chosen:
        if not isinstance(t, WeightTarget):
            raise ConfigError(
                f"targets: expected WeightTarget items (from rankguard.probe.targets), "
                f"got {type(t).__name__}"
            )
    names = [t.name for t in chosen]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"targets: duplicate target names {dupes}; each matrix once")
    return chosen


def _check_finite(targets: Sequence[WeightTarget]) -> None:
    """Refuse to rewrite anything when some target holds NaN/Inf (one host sync)."""
    local = [t for t in targets if not is_dtensor(t.parameter)]
    if not local:
        return
    flags = torch.stack([torch.isfinite(t.matrix()).all().cpu() for t in local])
    bad = [t.name for t, ok in zip(local, flags.tolist(), strict=True) if not ok]
    if bad:
        raise ConfigError(
            f"targets: {bad} contain NaN or Inf; nothing was rewritten (restore a snapshot or "
            f"checkpoint first)"
        )


def _write_shard(param: Tensor, full: Tensor) -> None:
    """Copy this rank's shard of ``full`` into the DTensor parameter (no communication:
    every rank computed the same ``full``)."""
    from torch.distributed.tensor import distribute_tensor

    mine = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)  # type: ignore[attr-defined]
    param.to_local().copy_(mine.to_local())  # type: ignore[attr-defined]


def _stable_rank(fro: float, sigma1: float) -> float:
    return fro * fro / (sigma1 * sigma1) if sigma1 > 0 else 0.0


@torch.no_grad()
def rewrite_targets(
    targets: Sequence[WeightTarget],
    transform: Transform,
    *,
    stats: StatsMode,
    snapshot: Snapshot | None = None,
) -> tuple[tuple[MatrixResult, ...], float]:
    """Apply ``transform`` to every target in place; returns (records, seconds).

    All targets are checked before any is written (a NaN anywhere rewrites nothing), then
    copied to ``snapshot`` (one is taken when none is given; a caller that keeps it for undo
    passes its own, taken of these targets just before). A result that is not finite, or a
    transform that raises, restores every target from it and raises :class:`RewriteError`.
    Statistics and finiteness flags are gathered as device tensors and copied to the host
    once at the end; with ``StatsMode.NONE`` there are no records, and the flags are the
    only host sync beyond the transform's.
    """
    chosen = _check_targets(targets)
    stats = StatsMode.parse(stats)
    start = time.perf_counter()
    _check_finite(chosen)
    if snapshot is None:
        snapshot = Snapshot.take(chosen)
    rows: list[Tensor] = []  # per matrix (4,): ‖W‖_F, σ₁ before; ‖W‖_F, σ₁ after
    finite: list[Tensor] = []  # per matrix: 0-d bool, whether what was written is finite
    ranks: list[int] = []
    for target in chosen:
        try:
            row, flag, rank = _rewrite_one(target, transform, stats)
        except Exception as exc:
            snapshot.restore()
            raise RewriteError(
                f"{target.name!r}: the rewrite failed ({type(exc).__name__}: {exc}); "
                f"every target was restored from the snapshot"
            ) from exc
        finite.append(flag)
        if row is not None:
            rows.append(row)
            ranks.append(rank)
    flags, values = _to_host(finite, rows)
    bad = [t.name for t, ok in zip(chosen, flags, strict=True) if not ok]
    if bad:
        snapshot.restore()
        raise RewriteError(
            f"{bad}: the rewritten matrix holds NaN or Inf; every target was restored from "
            f"the snapshot"
        )
    seconds = time.perf_counter() - start
    if stats is StatsMode.NONE:
        return (), seconds
    exact = stats is StatsMode.EXACT
    records = tuple(
        MatrixResult(
            name=target.name,
            shape=target.shape,
            rank=rank,
            stable_rank_before=_stable_rank(fb, sb),
            stable_rank_after=_stable_rank(fa, sa),
            frobenius_before=fb,
            frobenius_after=fa,
            spectral_norm_before=sb,
            spectral_norm_after=sa,
            exact_stats=exact,
        )
        for target, rank, (fb, sb, fa, sa) in zip(chosen, ranks, values, strict=True)
    )
    return records, seconds


def _rewrite_one(
    target: WeightTarget, transform: Transform, stats: StatsMode
) -> tuple[Tensor | None, Tensor, int]:
    """Transforms and writes one target; returns its statistics row (None without stats),
    whether what was written is finite (a 0-d bool tensor, no sync) and the rank kept."""
    param = target.parameter
    sharded = is_dtensor(param)
    if sharded:
        # FSDP2: gather this matrix's parameter on every rank (a collective), work on the
        # full copy, keep our shard. Peak extra memory: one full parameter.
        full = param.detach().full_tensor()  # type: ignore[attr-defined]
        view = _view_of(target, full)
        if not bool(torch.isfinite(view).all()):
            raise ConfigError(f"targets: {target.name!r} contains NaN or Inf")
    else:
        view = target.matrix()
    w32 = view.to(torch.float32)  # (out, in); a copy unless the parameter is fp32
    out = transform(w32)
    before = None
    if stats is not StatsMode.NONE:
        # before-statistics read w32 before the write below (it may alias the parameter)
        before = (torch.linalg.matrix_norm(w32), _sigma1(w32, stats, out.singular_values))
    view.copy_(out.matrix)  # cast to the parameter dtype, in place
    if sharded:
        _write_shard(param, full)
    # checked as written: a finite fp32 result can still overflow a bf16/fp16 parameter
    flag = torch.isfinite(view).all()
    if before is None:
        return None, flag, out.rank
    written = view.to(torch.float32)
    after = (torch.linalg.matrix_norm(written), _sigma1(written, stats, None))
    return torch.stack([*before, *after]).to(torch.float64), flag, out.rank


def _to_host(finite: list[Tensor], rows: list[Tensor]) -> tuple[list[bool], list[list[float]]]:
    """The finiteness flags and the statistics rows on the host: one device->host copy
    when they all live on one device (the usual case), one per tensor otherwise."""
    parts = [f.to(torch.float64).reshape(1) for f in finite] + rows
    if len({t.device for t in parts}) == 1:
        host = torch.cat(parts).cpu().tolist()
    else:
        host = [v for t in parts for v in t.cpu().tolist()]
    for device in {t.device for t in parts}:
        if device.type == "cuda":  # the clock stops after the device's work
            torch.cuda.synchronize(device)
    n = len(finite)
    values = [host[n + 4 * i : n + 4 * i + 4] for i in range(len(rows))]
    return [v == 1.0 for v in host[:n]], values
