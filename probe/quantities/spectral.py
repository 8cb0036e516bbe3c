"""Top singular triplet of a matrix, warm-started from the previous sample and shared by
every quantity computed at a step, with an exact mode (``torch.linalg.svd``) for checks.

Two warm estimates. Power iteration (the default, the cheapest): once a weight has a spectral
gap one or two iterations keep it converged (perf.md §3.1); without one (σ₂ ≈ σ₁, e.g. at
initialisation) σ₁ is right only to within the gap (the stable rank to ~1-2%) and v₁ is
undefined. Lanczos (``lanczos=True``): a few Golub–Kahan–Lanczos steps from the previous
sample's vector and the top singular triplet of the small bidiagonal matrix, which resolves
σ₁ inside a cluster too (~1e-6 with σ₂/σ₁ = 0.995) at more small ops per call.

Distributed: under DDP every rank holds the whole matrix (the probe computes on rank 0).
A DTensor weight (FSDP2) is never handed to :meth:`PowerIteration.triplet`:
``StepContext.triplet`` sends it to :func:`.sharded.sharded_triplet`, which runs ``iterations``
power iterations on each rank's shard with one all-reduce of a vector per iteration (no
gather of the matrix) and keeps its warm vectors here (:meth:`start`, :meth:`remember`).
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
    """Warm-started top singular triplets of (m, n) matrices keyed by name: power iteration,
    or Lanczos steps once warm (``lanczos=True``).

    Args:
        iterations: per call once warm: power iterations (2 matvecs each), or with
            ``lanczos`` Golub–Kahan–Lanczos steps (>= 2; 2k − 1 matvecs). A sharded weight
            always gets power iterations.
        cold_iterations: power iterations the first time a key is seen.
        lanczos: resolve σ₁ when σ₂ is within 1% of it (the stable rank to ~1e-6 instead of
            ~1%), at ~2x the cost of 3 power iterations on a 256² CPU matrix, ~1x from 1024
            (BENCHMARKS.md, "Stable-rank estimate cost").
        exact: use ``torch.linalg.svd`` instead (syncs on CUDA; for checks).
    """

    def __init__(
        self,
        *,
        iterations: int = 3,
        cold_iterations: int = 30,
        lanczos: bool = False,
        exact: bool = False,
    ):
        least = 2 if lanczos else 1
        if iterations < least or cold_iterations < 1:
            raise ValueError(
                f"iterations ({iterations}) must be >= {least} and cold_iterations "
                f"({cold_iterations}) >= 1"
                + (" (one Lanczos step never moves the warm vector)" if lanczos else "")
            )
        self.lanczos = lanczos
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
        v = self._warm_vector(key, w.shape[1], w.device)
        if self.lanczos:
            if v is None:  # cold: plain power iterations towards the top first
                start = self._start_vector(w.shape[1], w.device)
                v = self._power(w, start, self.cold_iterations)[0]
            sigma, u, v = self._lanczos(w, v)
            self.remember(key, v, sigma)
            return Triplet(sigma, u, v, fro2)
        n_iter = self.iterations
        if v is None:
            v, n_iter = self._start_vector(w.shape[1], w.device), self.cold_iterations
        v, x, y_norm = self._power(w, v, n_iter)
        # σ = |WᵀWv|/|Wv| for the last v: between |Wv| and σ₁, relative error O((σ₂/σ₁)^2k);
        # 0 for a zero matrix
        x_norm = torch.linalg.vector_norm(x).clamp_min_(_TINY)
        sigma = y_norm / x_norm
        self.remember(key, v, y_norm)
        return Triplet(sigma, x.div_(x_norm), v, fro2)

    def _power(self, w: Tensor, v: Tensor, n_iter: int) -> tuple[Tensor, Tensor, Tensor]:
        """``n_iter`` (>= 1) power iterations v ← WᵀW v/‖WᵀW v‖: the new v (0 for a zero
        matrix), and the last iteration's W v (m,) and ‖WᵀW v‖ (0-d).

        Few, cheap ops per iteration: below ~1024 a matvec costs about as much as the dispatch
        of a small op, so only v is normalised (|v| = 1 bounds x and y by σ₁, σ₁²) and fresh
        results are normalised in place.
        """
        wt = w.t()
        for _ in range(n_iter):
            x = torch.mv(w, v)  # W v (m,)
            y = torch.mv(wt, x)  # WᵀW v (n,)
            y_norm = torch.linalg.vector_norm(y)
            v = y.div_(y_norm.clamp_min(_TINY))
        return v, x, y_norm

    def _lanczos(self, w: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """σ₁, u₁, v₁ by ``iterations`` steps of Golub–Kahan–Lanczos bidiagonalisation from v:
        W V = U B on orthonormal V (n, k), U (m, k), B (k, k) upper bidiagonal, then the
        top singular triplet of B (the Ritz triplet): 2k − 1 matvecs, 5 for k = 3.

        Why: power iteration's error shrinks like (σ₂/σ₁)^2 per iteration, so when σ₂ is
        within 1% of σ₁ (every Gaussian-like weight near initialisation) the stable rank stays
        ~1% off however long it is warmed. The Krylov
        space holds the whole top cluster and B resolves it (BENCHMARKS.md, "Stable-rank
        estimate cost"). V is reorthogonalised against v as it is built: a warm v is nearly
        converged, so the recurrence's new direction is a small difference and loses
        orthogonality to it.
        """
        k = self.iterations
        wt = w.t()
        basis_v = w.new_empty(k, w.shape[1])
        basis_u = w.new_empty(k, w.shape[0])
        vs, us = basis_v.unbind(0), basis_u.unbind(0)  # row views, made once
        torch.div(v, torch.linalg.vector_norm(v).clamp_min(_TINY), out=vs[0])
        alphas: list[Tensor] = []
        betas: list[Tensor] = []
        for j in range(k):
            u = torch.mv(w, vs[j], out=us[j])
            if j:
                u.addcmul_(betas[-1], us[j - 1], value=-1.0)
            alphas.append(torch.linalg.vector_norm(u))
            u.div_(alphas[-1].clamp_min(_TINY))
            if j == k - 1:
                break
            r = torch.mv(wt, u, out=vs[j + 1])
            r.addcmul_(alphas[-1], vs[j], value=-1.0)
            # orthogonality is lost towards the converged direction, i.e. the warm v
            r.addcmul_(torch.dot(r, vs[0]), vs[0], value=-1.0)
            betas.append(torch.linalg.vector_norm(r))
            r.div_(betas[-1].clamp_min(_TINY))
        bidiagonal = torch.diag(torch.stack(alphas)) + torch.diag(torch.stack(betas), 1)
        sigma, x, y = _top_singular_triplet(bidiagonal)
        return sigma, torch.mv(basis_u.t(), x), torch.mv(basis_v.t(), y)

    def start(self, key: str, n: int, device: torch.device) -> tuple[Tensor, int]:
        """The starting vector (n,) for ``key`` and how many power iterations to run from it
        (the sharded path): the warm vector of the previous call, or a cold start."""
        v = self._warm_vector(key, n, device)
        if v is None:
            return self._start_vector(n, device), self.cold_iterations
        return v, self.iterations

    def _warm_vector(self, key: str, n: int, device: torch.device) -> Tensor | None:
        v = self._v.get(key)
        if v is None or v.shape[0] != n:
            return None
        return v if v.device == device else v.to(device)

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


def _top_singular_triplet(b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """σ₁ (0-d), u₁ (k,), v₁ (k,) of a small (k, k) matrix, without a host sync.

    On the CPU, LAPACK's SVD (a few µs for k = 3). On an accelerator ``torch.linalg.svd``
    would synchronise with the host (its documentation says so), so there the top
    eigenvector of BᵀB comes from repeated squaring, each square rescaled by its trace:
    after 2¹⁰ powers the second Ritz value's share is (θ₂/θ₁)^1024, e.g. 3e-5 for θ₂/θ₁ =
    0.99; a tie leaves some vector of the tied pair, whose value is the same σ₁.
    """
    if b.device.type == "cpu":
        u_all, s, vh = torch.linalg.svd(b)
        return s[0], u_all[:, 0], vh[0]
    return _top_by_squaring(b)


def _top_by_squaring(b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The accelerator branch of :func:`_top_singular_triplet` (tested on the CPU too)."""
    power = b.t() @ b
    for _ in range(10):
        power = power / torch.trace(power).clamp_min(_TINY)
        power = power @ power
    # (BᵀB)^p ≈ θ₁^p v vᵀ: its column with the largest diagonal entry is a multiple of v
    column = torch.argmax(torch.diagonal(power)).reshape(1)
    v = F.normalize(power.index_select(1, column).reshape(-1), dim=0)
    bv = torch.mv(b, v)
    sigma = torch.linalg.vector_norm(bv)
    return sigma, bv / sigma.clamp_min(_TINY), v
