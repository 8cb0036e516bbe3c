"""What an intervention reports: one record per matrix and one per application.

Plain frozen dataclasses; ``to_dict()`` gives JSON-ready dicts (the probe acknowledges a
command with them). Non-finite floats become the strings ``"NaN"``, ``"Infinity"`` and
``"-Infinity"``, as on the wire (docs/contract.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..wire import encode_float

__all__ = ["InterventionResult", "MatrixResult"]


@dataclass(frozen=True)
class MatrixResult:
    """Before/after statistics of one rewritten (out, in) matrix.

    ``rank`` is the number of singular values the operation kept (the exact engine's
    r = #(S > tol); min(m, n) for Newton–Schulz and PSS). ``exact_stats`` says whether σ₁
    came from an SVD (True) or from a power-iteration estimate (False; a lower bound, so
    the stable rank is then an upper-side estimate).
    """

    name: str
    shape: tuple[int, int]
    rank: int
    stable_rank_before: float
    stable_rank_after: float
    frobenius_before: float
    frobenius_after: float
    spectral_norm_before: float
    spectral_norm_after: float
    exact_stats: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "rank": self.rank,
            "stable_rank_before": encode_float(self.stable_rank_before),
            "stable_rank_after": encode_float(self.stable_rank_after),
            "frobenius_before": encode_float(self.frobenius_before),
            "frobenius_after": encode_float(self.frobenius_after),
            "spectral_norm_before": encode_float(self.spectral_norm_before),
            "spectral_norm_after": encode_float(self.spectral_norm_after),
            "exact_stats": self.exact_stats,
        }


@dataclass(frozen=True)
class InterventionResult:
    """One application of an intervention to a set of targets.

    ``kind`` is ``"msign"`` or ``"pss"``; ``options`` the resolved arguments (engine,
    variant, k, ...); ``seconds`` the wall time of the whole application, statistics
    included (the device is synchronised before the clock stops).
    """

    kind: str
    options: dict[str, Any]
    matrices: tuple[MatrixResult, ...]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "options": dict(self.options),
            "matrices": [m.to_dict() for m in self.matrices],
            "seconds": self.seconds,
        }
