"""Top singular triplet of a matrix by warm-started power iteration, shared by every quantity
computed at a step (one iteration per matrix per sample step), with an exact mode
(``torch.linalg.svd``) for checks.

Warm start: the right vector v of the previous sample is the starting point, so once a weight
has a spectral gap one or two iterations keep it converged (perf.md §3.1). Without a gap
(σ₂ ≈ σ₁, e.g. at initialisation) σ₁ is still right to within the gap, but v₁ is undefined.

Distributed: under DDP every rank holds the whole matrix (the probe computes on rank 0).
A DTensor weight (FSDP2) is never handed to :meth:`PowerIteration.triplet`:
``StepContext.triplet`` sends it to :func:`.sharded.sharded_triplet`, which runs the same
iteration on each rank's shard with one all-reduce of a vector per iteration (no gather of
the matrix) and keeps its warm vectors here (:meth:`start`, :meth:`remember`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PowerIteration", "Triplet", "frobenius_squared", "start_vector"]

_TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class Triplet:
    """σ₁ (0-d), u₁ (m,), v₁ (n,) and ‖W‖_F² (0-d) of an (m, n) matrix, fp32, on device."""

    sigma: Tensor
    u: Tensor
    v: Tensor
    fro2: Tensor

    @property
    def stable_rank(self) -> Tensor:
        return self.fro2 / self.sigma.square().clamp_min(_TINY)


def frobenius_squared(w: Tensor) -> Tensor:
    """‖W‖_F² as a 0-d tensor: one dot product when W is contiguous (half the time of
    ``vector_norm(w).square()`` on a 256² CPU matrix), the norm otherwise (no copy)."""
    if w.is_contiguous():
        flat = w.reshape(-1)
        return torch.dot(flat, flat)
    norm: Tensor = torch.linalg.vector_norm(w)
    return norm.square()


def start_vector(n: int, device: torch.device) -> Tensor:
    """A deterministic dense unit vector made on the device: no host copy, and the user's
    random number streams are left alone (torch.randn would advance them)."""
    golden = (math.sqrt(5.0) - 1.0) / 2.0
    x = torch.arange(1, n + 1, device=device, dtype=torch.float32)
    v: Tensor = F.normalize(torch.sin(x * (2.0 * math.pi * golden)) + 0.5, dim=0)
    return v


class PowerIteration:
    """Warm-started power iteration on (m, n) matrices keyed by name.

    Args:
        iterations: iterations per call once warm.
        cold_iterations: iterations the first time a key is seen.
        exact: use ``torch.linalg.svd`` instead (syncs on CUDA; for checks).
    """

    def __init__(self, *, iterations: int = 3, cold_iterations: int = 30, exact: bool = False):
        if iterations < 1 or cold_iterations < 1:
            raise ValueError(
                f"iterations ({iterations}) and cold_iterations ({cold_iterations}) must be >= 1"
            )
        self.iterations = iterations
        self.cold_iterations = cold_iterations
        self.exact = exact
        self._v: dict[str, Tensor] = {}
        self._starts: dict[tuple[int, torch.device], Tensor] = {}

    def triplet(self, key: str, matrix: Tensor) -> Triplet:
        # No torch.no_grad() here: the matrix is detached and the vectors never require grad,
        # so no graph is built, and the decorator alone costs ~40 µs a call (a third of the
        # whole estimate for a 256² matrix on the 2-core CPU).
        w = matrix.detach().to(torch.float32)  # (m, n); a copy only for bf16/fp16
        fro2 = frobenius_squared(w)
        if self.exact:
            u_all, s, vh = torch.linalg.svd(w, full_matrices=False)
            return Triplet(s[0], u_all[:, 0], vh[0], fro2)
        v, n_iter = self.start(key, w.shape[1], w.device)
        # Few, cheap ops per iteration: below ~1024 a matvec costs about as much as the
        # dispatch of a small op, so only v is normalised (|v| = 1 bounds x and y by σ₁, σ₁²)
        # and fresh results are normalised in place.
        wt = w.t()
        for _ in range(n_iter):
            x = torch.mv(w, v)  # W v (m,)
            y = torch.mv(wt, x)  # WᵀW v (n,)
            y_norm = torch.linalg.vector_norm(y)
            v = y.div_(y_norm.clamp_min(_TINY))
        # σ = |WᵀWv|/|Wv| for the last v: between |Wv| and σ₁, relative error O((σ₂/σ₁)^2k);
        # 0 for a zero matrix
        x_norm = torch.linalg.vector_norm(x).clamp_min_(_TINY)
        sigma = y_norm / x_norm
        self.remember(key, v, y_norm)
        return Triplet(sigma, x.div_(x_norm), v, fro2)

    def start(self, key: str, n: int, device: torch.device) -> tuple[Tensor, int]:
        """The starting vector (n,) for ``key`` and how many iterations to run from it:
        the warm vector of the previous call, or a cold start."""
        v = self._v.get(key)
        if v is None or v.shape[0] != n:
            return self._start_vector(n, device), self.cold_iterations
        if v.device != device:
            v = v.to(device)
        return v, self.iterations

    def remember(self, key: str, v: Tensor, norm: Tensor) -> None:
        """Keeps ``v`` (n,), the last WᵀW v normalised from norm ``norm`` (0-d), as the warm
        start of the next call for ``key``.

        A zero matrix (a zero-initialised projection, a dead layer's inputs) gives norm 0 and
        v = 0, from which no later iteration could leave: σ₁ would read 0 forever once the
        weight trains. The start vector is kept instead, chosen on the device (no sync).
        """
        self._v[key] = torch.where(norm > 0, v, self._start_vector(v.shape[0], v.device))

    def _start_vector(self, n: int, device: torch.device) -> Tensor:
        """``start_vector(n, device)``, made once per size and device (never written to)."""
        start = self._starts.get((n, device))
        if start is None:
            start = self._starts[(n, device)] = start_vector(n, device)
        return start

    def forget(self, key: str) -> None:
        self._v.pop(key, None)

    def state_dict(self) -> dict[str, Any]:
        return {"v": {k: v.detach().clone() for k, v in self._v.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._v = {k: torch.as_tensor(v).detach().clone() for k, v in state.get("v", {}).items()}
