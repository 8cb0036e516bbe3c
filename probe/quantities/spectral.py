"""Top singular triplet of a matrix by warm-started power iteration, shared by every quantity
computed at a step (one iteration per matrix per sample step), with an exact mode
(``torch.linalg.svd``) for checks.

Warm start: the right vector v of the previous sample is the starting point, so once a weight
has a spectral gap one or two iterations keep it converged (perf.md §3.1). Without a gap
(σ₂ ≈ σ₁, e.g. at initialisation) σ₁ is still right to within the gap, but v₁ is undefined;
``Triplet.gap`` carries σ₂/σ₁ only in exact mode.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PowerIteration", "Triplet", "start_vector"]


@dataclass(frozen=True)
class Triplet:
    """σ₁ (0-d), u₁ (m,), v₁ (n,) and ‖W‖_F² (0-d) of an (m, n) matrix, fp32, on device."""

    sigma: Tensor
    u: Tensor
    v: Tensor
    fro2: Tensor

    @property
    def stable_rank(self) -> Tensor:
        return self.fro2 / self.sigma.square().clamp_min(torch.finfo(torch.float32).tiny)


def start_vector(n: int, device: torch.device) -> Tensor:
    """A deterministic dense unit vector made on the device: no host copy, and the user's
    random number streams are left alone (torch.randn would advance them)."""
    golden = (math.sqrt(5.0) - 1.0) / 2.0
    x = torch.arange(1, n + 1, device=device, dtype=torch.float32)
    return F.normalize(torch.sin(x * (2.0 * math.pi * golden)) + 0.5, dim=0)


class PowerIteration:
    """Warm-started power iteration on (m, n) matrices keyed by name.

    Args:
        iterations: iterations per call once warm.
        cold_iterations: iterations the first time a key is seen.
        exact: use ``torch.linalg.svd`` instead (syncs on CUDA; for checks).
    """

    def __init__(self, *, iterations: int = 4, cold_iterations: int = 30, exact: bool = False):
        self.iterations = iterations
        self.cold_iterations = cold_iterations
        self.exact = exact
        self._v: dict[str, Tensor] = {}

    @torch.no_grad()
    def triplet(self, key: str, matrix: Tensor) -> Triplet:
        w = matrix.detach().to(torch.float32)  # (m, n); a copy only for bf16/fp16
        fro2 = torch.linalg.vector_norm(w).square()
        if self.exact:
            u_all, s, vh = torch.linalg.svd(w, full_matrices=False)
            return Triplet(s[0], u_all[:, 0], vh[0], fro2)
        v = self._v.get(key)
        n_iter = self.iterations
        if v is None or v.shape[0] != w.shape[1]:
            v = start_vector(w.shape[1], w.device)
            n_iter = self.cold_iterations
        elif v.device != w.device:
            v = v.to(w.device)
        u = v.new_empty(0)
        wtu = v
        for _ in range(n_iter):
            # u <- W v / |W v|  (m,),  v <- Wᵀ u / |Wᵀ u|  (n,)
            u = F.normalize(w @ v, dim=0)
            wtu = w.t() @ u
            v = F.normalize(wtu, dim=0)
        # σ = |Wᵀ u| with u = Wv/|Wv|: between |Wv| and σ₁, relative error O((σ₂/σ₁)^2k)
        sigma = torch.linalg.vector_norm(wtu)
        self._v[key] = v
        return Triplet(sigma, u, v, fro2)

    def forget(self, key: str) -> None:
        self._v.pop(key, None)

    def state_dict(self) -> dict[str, Any]:
        return {"v": {k: v.detach().clone() for k, v in self._v.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._v = {k: torch.as_tensor(v).detach().clone() for k, v in state.get("v", {}).items()}
