"""The probe's configuration: a plain dataclass validated at construction (no pydantic in the
training process). Every error names the field, the value and what would be valid."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .exceptions import ConfigError, ConfigTypeError

__all__ = ["ProbeConfig"]


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigTypeError(
            f"{name}: expected an int >= 1, got {value!r} ({type(value).__name__})"
        )
    if value <= 0:
        raise ConfigError(f"{name}: must be >= 1, got {value}")


def _globs(name: str, value: object, *, optional: bool) -> tuple[str, ...] | None:
    if value is None:
        if optional:
            return None
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Sequence | set | frozenset):
        raise ConfigTypeError(
            f"{name}: expected a glob string or a sequence of glob strings, got {value!r}"
        )
    out = tuple(value)
    for g in out:
        if not isinstance(g, str):
            raise ConfigTypeError(f"{name}: every entry must be a string, got {g!r}")
    return out


@dataclass(kw_only=True)
class ProbeConfig:
    every: int = 50
    """Default cadence: the cheap quantities are computed on steps 0, every, 2*every, ..."""
    jacobian_every: int | None = None
    """Cadence of the Jacobian alignment (heavy); default 10 * every."""
    quantities: tuple[str, ...] | None = None
    """Names of the quantities to compute (None: all). Validated by the probe against the
    registry."""
    schedules: Mapping[str, int] = field(default_factory=dict)
    """Per-quantity cadence overrides, name -> every."""
    include: tuple[str, ...] | None = None
    """fnmatch globs over weight target names; None: every 2-D weight."""
    exclude: tuple[str, ...] = ()
    embeddings: bool = False
    head: bool = False
    attention: tuple[str, ...] | None = None
    """Globs naming the attention targets; None: detected automatically."""
    log_dir: str = "rankguard_logs"
    strict: bool = False
    """Re-raise a failing quantity instead of logging it once and disabling it (tests)."""
    max_rows: int = 256
    """Input rows kept per module on a sampled step (fp32), for the activation quantities."""
    max_sequences: int = 2
    """Sequences of attention projections kept for the logit max."""
    jacobian_sequences: int = 1
    """Sequences of the captured probe batch (Jacobian; each sequence costs a full set of
    power iterations, results are averaged over sequences)."""
    power_iterations: int = 3
    """Warm iterations per weight per sample step: power iterations, or Lanczos steps (>= 2)
    with ``lanczos``. 3 power iterations: σ₁ and the stable rank within ~1e-6 of svdvals with
    a spectral gap (trained weights), within ~1-2% when σ₂ is within 1% of σ₁ or on no-gap
    Gaussian matrices (initialisation) (benchmarks/spectral_cost.py, BENCHMARKS.md)."""
    lanczos: bool = False
    """Lanczos steps instead of power iterations once warm: the stable rank within ~2e-4 of
    svdvals even without a spectral gap, at ~2x the cost on 256² CPU matrices (~1x from
    1024²). Sharded (FSDP2) weights keep power iterations."""
    cold_iterations: int = 30
    """Power iterations the first time a weight is seen (no warm vector yet)."""
    jacobian_iterations: int = 3
    jacobian_cold_iterations: int = 20
    histogram_bins: int = 41
    exact: bool = False
    """Exact top singular triplets by torch.linalg.svd (checks, small models; syncs on CUDA)."""

    def __post_init__(self) -> None:
        _positive_int("every", self.every)
        if self.jacobian_every is None:
            self.jacobian_every = 10 * self.every
        _positive_int("jacobian_every", self.jacobian_every)
        for name in (
            "max_rows",
            "max_sequences",
            "jacobian_sequences",
            "power_iterations",
            "cold_iterations",
            "jacobian_iterations",
            "jacobian_cold_iterations",
            "histogram_bins",
        ):
            _positive_int(name, getattr(self, name))
        if self.lanczos and self.power_iterations < 2:
            raise ConfigError(
                f"power_iterations: must be >= 2 with lanczos (one Lanczos step never moves "
                f"the warm vector), got {self.power_iterations}"
            )
        if self.quantities is not None:
            q = _globs("quantities", self.quantities, optional=False)
            self.quantities = q
        if not isinstance(self.schedules, Mapping):
            raise ConfigTypeError(
                f"schedules: expected a mapping quantity name -> every, got {self.schedules!r}"
            )
        for key, value in self.schedules.items():
            _positive_int(f"schedules[{key!r}]", value)
        self.include = _globs("targets", self.include, optional=True)
        self.exclude = _globs("exclude", self.exclude, optional=False) or ()
        self.attention = _globs("attention", self.attention, optional=True)
        if not isinstance(self.log_dir, str):
            self.log_dir = str(self.log_dir)

    def to_json(self) -> dict[str, Any]:
        """The configuration as plain JSON (sent with the run registration)."""
        return {
            "every": self.every,
            "jacobian_every": self.jacobian_every,
            "quantities": list(self.quantities) if self.quantities is not None else None,
            "schedules": dict(self.schedules),
            "targets": list(self.include) if self.include is not None else None,
            "exclude": list(self.exclude),
            "embeddings": self.embeddings,
            "head": self.head,
            "attention": list(self.attention) if self.attention is not None else None,
            "max_rows": self.max_rows,
            "max_sequences": self.max_sequences,
            "jacobian_sequences": self.jacobian_sequences,
            "power_iterations": self.power_iterations,
            "lanczos": self.lanczos,
            "cold_iterations": self.cold_iterations,
            "jacobian_iterations": self.jacobian_iterations,
            "jacobian_cold_iterations": self.jacobian_cold_iterations,
            "histogram_bins": self.histogram_bins,
            "exact": self.exact,
        }
