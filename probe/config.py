"""The probe's configuration: the one place its options live. A frozen, keyword-only dataclass
validated at construction (no pydantic in the training process); every error names the field,
the value and what would be valid.

``Probe(model, optimizer, run=..., every=10)`` and
``Probe(model, optimizer, run=..., config=ProbeConfig(every=10))`` are the same probe: keyword
options are these fields, applied on top of ``config``. Cadence is set one way: ``every`` and
``jacobian_every`` for the defaults, ``schedules`` for a quantity of its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .exceptions import ConfigError, ConfigTypeError

__all__ = ["ProbeConfig", "RecoveryConfig"]


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigTypeError(
            f"{name}: expected an int >= 1, got {value!r} ({type(value).__name__})"
        )
    if value <= 0:
        raise ConfigError(f"{name}: must be >= 1, got {value}")


def _strings(name: str, value: object, what: str) -> tuple[str, ...]:
    """One string or a sequence of strings, as a tuple; ``what`` names an entry in errors."""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Sequence | set | frozenset):
        raise ConfigTypeError(f"{name}: expected a {what} or a sequence of them, got {value!r}")
    out = tuple(value)
    for entry in out:
        if not isinstance(entry, str):
            raise ConfigTypeError(f"{name}: every entry must be a {what}, got {entry!r}")
    return out


def _globs(name: str, value: object) -> tuple[str, ...] | None:
    return None if value is None else _strings(name, value, "glob string")


def _quantity_names(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        raise ConfigTypeError(
            f"quantities: expected quantity names, got a mapping {dict(value)!r}; a quantity's "
            "own cadence goes in schedules={name: every}"
        )
    return _strings("quantities", value, "quantity name")


def _number(name: str, value: object, low: float, high: float = float("inf")) -> float:
    """A real number in (low, high]; ``high`` inf means unbounded above."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigTypeError(f"{name}: expected a number, got {value!r}")
    if not low < value <= high or value != value:
        bound = f"in ({low}, {high}]" if high != float("inf") else f"> {low}"
        raise ConfigError(f"{name}: expected a number {bound}, got {value!r}")
    return float(value)


@dataclass(frozen=True, kw_only=True, slots=True)
class RecoveryConfig:
    """Automatic recovery inside the training process (:mod:`rankguard.probe.recovery`):
    snapshots of known-good states, rollback, the in-process first response, skip-step,
    QK-Clip and the flight recorder. ``ProbeConfig(auto_recover=True)`` is
    :meth:`auto_recover`; the defaults of this class are the conservative half (snapshots,
    rollback on a non-finite or spiking loss, the flight recorder).

    The default values and their measurements: BENCHMARKS.md, "Recovery".
    """

    snapshot_every: int = 50
    """Steps between snapshots of the training state (weights, optimizer, schedulers,
    scaler, RNG, step) into host memory."""
    keep: int = 2
    """Known-good snapshots kept (the ring); one more slot holds the snapshot being confirmed."""
    confirm_steps: int = 10
    """A snapshot becomes known-good once this many steps after it passed every in-process
    check (and the samples in between were finite)."""
    snapshot_dir: str | None = None
    """Also write each known-good snapshot to this folder (a background thread; None: memory
    only)."""
    rollback: bool = True
    """Roll back in-process on a non-finite loss, a loss spike or an update-ratio spike."""
    max_retries: int = 3
    """Rollbacks per incident before it is escalated (event ``rollback_exhausted``)."""
    retry_window: int = 100
    """Steps after a rollback in which a new trigger is a retry of the same incident."""
    stop_on_exhausted: bool = False
    """When the retries are exhausted, also set ``probe.should_stop`` (a loop or integration
    that reads it ends the run)."""
    lr_factor: float = 0.5
    """Learning-rate backoff of each rollback (compounding over the retries of an incident)."""
    lr_hold_steps: int = 100
    """Steps a learning-rate backoff holds after the last one, before it decays back."""
    lr_recover_steps: int = 50
    """After the hold, the backoff doubles back every this many steps (gradually)."""
    lr_floor: float = 1e-4
    """The smallest learning-rate multiplier any backoff can reach."""
    loss_spike: float = 1.5
    """A loss above this many times the median of the last ``window`` finite losses is a
    spike (a trigger for rollback)."""
    window: int = 64
    """Steps in the running medians (loss, gradient norm, update ratio)."""
    warmup: int = 50
    """Steps of history before the checks other than the non-finite ones are live (the
    failure definition's own warmup: healthy runs spike in their first steps)."""
    update_ratio_hot: float | None = None
    """Geometric-mean update-to-weight ratio of one step above which the learning rate is
    backed off at that step, with a ceiling that holds while the schedule rises (None: off)."""
    update_ratio_spike: float = 10.0
    """An update ratio above this many times its running median (and above
    ``update_ratio_hot``) is a spike: rollback, and a backoff sized to the overshoot."""
    skip_step: bool = False
    """Drop, inside ``optimizer.step()``, an update whose gradients are non-finite or whose
    norm exceeds ``skip_factor`` x its running median (reads one flag per step, as
    GradScaler does)."""
    skip_factor: float = 10.0
    """The gradient-norm spike bound of skip-step, in running medians."""
    qk_clip_tau: float | None = None
    """QK-Clip: rescale a head's W_q/W_k when its max attention logit exceeds this (None:
    off). Acts where the probe measures attention logits (its sample steps)."""
    flight_steps: int = 256
    """Steps of cheap scalars kept on the device (the flight recorder)."""
    flight_before: int = 64
    """Steps before an incident shipped at full resolution."""

    def __post_init__(self) -> None:
        for name in (
            "snapshot_every",
            "keep",
            "confirm_steps",
            "max_retries",
            "retry_window",
            "lr_hold_steps",
            "lr_recover_steps",
            "window",
            "warmup",
            "flight_steps",
            "flight_before",
        ):
            _positive_int(f"recovery.{name}", getattr(self, name))
        for name in ("rollback", "stop_on_exhausted", "skip_step"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigTypeError(
                    f"recovery.{name}: expected True or False, got {getattr(self, name)!r}"
                )
        _set(self, "lr_factor", _number("recovery.lr_factor", self.lr_factor, 0.0, 1.0))
        _set(self, "lr_floor", _number("recovery.lr_floor", self.lr_floor, 0.0, 1.0))
        for name in ("loss_spike", "update_ratio_spike", "skip_factor"):
            _set(self, name, _number(f"recovery.{name}", getattr(self, name), 1.0))
        for name in ("update_ratio_hot", "qk_clip_tau"):
            if getattr(self, name) is not None:
                _set(self, name, _number(f"recovery.{name}", getattr(self, name), 0.0))
        if self.flight_before > self.flight_steps:
            raise ConfigError(
                f"recovery.flight_before: must be <= flight_steps ({self.flight_steps}), "
                f"got {self.flight_before}"
            )
        if self.snapshot_dir is not None and not isinstance(self.snapshot_dir, str):
            _set(self, "snapshot_dir", str(self.snapshot_dir))

    @classmethod
    def auto_recover(cls, **changes: Any) -> RecoveryConfig:
        """The documented "auto-recover" profile: everything this class can do, on.

        Skip-step (10x the running median), QK-Clip at Kimi K2's tau = 100, the holding
        learning-rate backoff at an update ratio of 0.05 (the calibrated bound of the default
        pack's ``update_ratio_high`` rule), and rollback with a retry cap of 3.
        """
        base: dict[str, Any] = {"skip_step": True, "qk_clip_tau": 100.0, "update_ratio_hot": 0.05}
        return cls(**{**base, **changes})

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def lr_options(self) -> dict[str, Any]:
        """The learning-rate backoff's settings (``LearningRateScale``'s keywords)."""
        return {
            "floor": self.lr_floor,
            "hold_steps": self.lr_hold_steps,
            "recover_steps": self.lr_recover_steps,
        }


_DERIVED = ("jacobian_every", "command_every")  # None: derived from ``every``

_POSITIVE_INTS = (
    "max_rows",
    "max_sequences",
    "jacobian_sequences",
    "power_iterations",
    "cold_iterations",
    "jacobian_iterations",
    "jacobian_cold_iterations",
    "histogram_bins",
)


@dataclass(frozen=True, kw_only=True, slots=True)
class ProbeConfig:
    """What the probe computes, how often, and how precisely.

    Validated (and normalised: globs to tuples, the derived cadences to ints) at construction.
    :func:`dataclasses.replace` keeps the derived cadences as they are (a ``set_probe``
    changing ``every`` leaves the Jacobian's cadence alone); :meth:`with_options` derives
    them again.
    """

    every: int = 50
    """Default cadence: the cheap quantities are computed on steps 0, every, 2*every, ..."""
    jacobian_every: int | None = None
    """Cadence of the Jacobian alignment (heavy); default 10 * every."""
    quantities: tuple[str, ...] | None = None
    """Names of the quantities to compute (None: all). Validated by the probe against the
    registry."""
    schedules: Mapping[str, int] = field(default_factory=dict)
    """Per-quantity cadence overrides, name -> every."""
    targets: tuple[str, ...] | None = None
    """fnmatch globs over weight target names to include; None: every 2-D weight."""
    exclude: tuple[str, ...] = ()
    """fnmatch globs over weight target names to leave out."""
    embeddings: bool = False
    """Include the embedding matrices."""
    head: bool = False
    """Include the LM head."""
    attention: tuple[str, ...] | None = None
    """Globs naming the attention targets (Q, K, V, O weights); None: detected automatically.
    Their modules' parents become the attention sites, replacing any detected ones."""
    attention_heads: int | None = None
    """Heads per attention module, for sites named by ``attention`` whose module carries no
    head count (``n_head``, ``num_heads``, ...)."""
    log_dir: str = "rankguard_logs"
    """Folder of the local sink file (offline runs) and of the spill file (live runs)."""
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
    """Jacobian power iterations per block on a warm sample (from the previous vector); the
    residual reached is reported as ``jacobian_residual``."""
    jacobian_cold_iterations: int = 100
    """The most Jacobian power iterations per block on the first sample (no warm vector),
    which stops earlier once the residual reaches ``jacobian_tolerance``."""
    jacobian_tolerance: float = 1e-3
    """Relative residual ‖J v − σ u‖/σ at which the first sample's Jacobian power iterations
    stop (checked every 5 iterations, one host sync each); the residual reached is reported
    as ``jacobian_residual`` on every sample."""
    histogram_bins: int = 41
    """Bins of the SA cosine histogram."""
    exact: bool = False
    """Exact top singular triplets by torch.linalg.svd (checks, small models; syncs on CUDA)."""
    command_every: int | None = None
    """Under DDP or FSDP2, the cadence (in steps) at which rank 0's commands are broadcast to
    every rank; each check is one collective, so it defaults to ``every``. A single process
    reads its local inbox on every step (no I/O)."""
    command_poll_interval: float = 1.0
    """Seconds between the transport thread's command polls (the latency between an order
    and its arrival in the inbox)."""
    compiled: bool | None = None
    """The model runs under ``torch.compile``: the probe's forward hooks are then registered
    once and switched on for sampled steps (compiled code never calls a hook registered after
    it was compiled). None: detected from the model (a ``torch.compile`` wrapper, or a module
    compiled with ``Module.compile()``)."""
    activations_per_rank: bool = False
    """Under DDP or FSDP2, ranks other than 0 also ship the activation quantities of their own
    batch (those computed from layer inputs or attention projections), labelled with their
    rank. Weight and gradient quantities and the loss stay rank 0's."""
    recovery: RecoveryConfig | None = None
    """Automatic recovery in the process (:class:`RecoveryConfig`; None: off)."""
    auto_recover: bool = False
    """The one switch of the "auto-recover" profile: in the process, every remedy of
    :meth:`RecoveryConfig.auto_recover` (unless ``recovery`` is given); on the server (the
    run's registration carries it), the default rules with their actions on, rollback
    included (docs/contract.md)."""
    _derived: frozenset[str] = field(default=frozenset(), init=False, repr=False, compare=False)
    """The cadences derived from ``every`` (given as None), re-derived by :meth:`with_options`."""

    def __post_init__(self) -> None:
        _positive_int("every", self.every)
        derived = {name for name in _DERIVED if getattr(self, name) is None}
        _set(self, "_derived", frozenset(derived))
        if "jacobian_every" in derived:
            _set(self, "jacobian_every", 10 * self.every)
        _positive_int("jacobian_every", self.jacobian_every)
        if "command_every" in derived:
            _set(self, "command_every", self.every)
        _positive_int("command_every", self.command_every)
        for name in _POSITIVE_INTS:
            _positive_int(name, getattr(self, name))
        if self.lanczos and self.power_iterations < 2:
            raise ConfigError(
                f"power_iterations: must be >= 2 with lanczos (one Lanczos step never moves "
                f"the warm vector), got {self.power_iterations}"
            )
        if self.attention_heads is not None:
            _positive_int("attention_heads", self.attention_heads)
        tol = self.jacobian_tolerance
        if isinstance(tol, bool) or not isinstance(tol, int | float) or not 0 < tol < 1:
            raise ConfigError(f"jacobian_tolerance: expected a number in (0, 1), got {tol!r}")
        if self.compiled is not None and not isinstance(self.compiled, bool):
            raise ConfigTypeError(f"compiled: expected True, False or None, got {self.compiled!r}")
        interval = self.command_poll_interval
        if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
            raise ConfigError(f"command_poll_interval: expected seconds > 0, got {interval!r}")
        if not isinstance(self.activations_per_rank, bool):
            raise ConfigTypeError(
                f"activations_per_rank: expected True or False, got {self.activations_per_rank!r}"
            )
        _set(self, "quantities", _quantity_names(self.quantities))
        if not isinstance(self.schedules, Mapping):
            raise ConfigTypeError(
                f"schedules: expected a mapping quantity name -> every, got {self.schedules!r}"
            )
        for key, value in self.schedules.items():
            _positive_int(f"schedules[{key!r}]", value)
        _set(self, "schedules", dict(self.schedules))  # the caller's dict stays theirs
        _set(self, "targets", _globs("targets", self.targets))
        _set(self, "exclude", _globs("exclude", self.exclude) or ())
        _set(self, "attention", _globs("attention", self.attention))
        if not isinstance(self.log_dir, str):
            _set(self, "log_dir", str(self.log_dir))
        if not isinstance(self.auto_recover, bool):
            raise ConfigTypeError(
                f"auto_recover: expected True or False, got {self.auto_recover!r}"
            )
        if self.recovery is not None and not isinstance(self.recovery, RecoveryConfig):
            raise ConfigTypeError(
                f"recovery: expected a RecoveryConfig or None, got {self.recovery!r}"
            )
        if self.auto_recover and self.recovery is None:
            # derived like the cadences: with_options derives it again (auto_recover=False
            # then turns it off)
            _set(self, "_derived", self._derived | {"recovery"})
            _set(self, "recovery", RecoveryConfig.auto_recover())

    def with_options(self, options: Mapping[str, Any]) -> ProbeConfig:
        """This configuration with some fields replaced (the probe's keyword options), as if
        they had been given to the constructor: ``ProbeConfig().with_options({"every": 5})``
        is ``ProbeConfig(every=5)`` (Jacobian every 50). An unknown name is a
        :class:`ConfigTypeError` listing the valid ones."""
        unknown = sorted(set(options) - _FIELD_NAMES)
        if unknown:
            raise ConfigTypeError(
                f"{unknown[0]}: not a probe option; valid: {sorted(_FIELD_NAMES)}"
            )
        if not options:
            return self
        rederived: dict[str, Any] = {n: None for n in self._derived if n not in options}
        return dataclasses.replace(self, **rederived, **options)

    def to_json(self) -> dict[str, Any]:
        """The configuration as plain JSON (sent with the run registration; the transport's
        own settings, ``command_*`` and ``activations_per_rank``, are not part of it)."""
        return {
            "every": self.every,
            "jacobian_every": self.jacobian_every,
            "quantities": list(self.quantities) if self.quantities is not None else None,
            "schedules": dict(self.schedules),
            "targets": list(self.targets) if self.targets is not None else None,
            "exclude": list(self.exclude),
            "embeddings": self.embeddings,
            "head": self.head,
            "attention": list(self.attention) if self.attention is not None else None,
            "attention_heads": self.attention_heads,
            "max_rows": self.max_rows,
            "max_sequences": self.max_sequences,
            "jacobian_sequences": self.jacobian_sequences,
            "power_iterations": self.power_iterations,
            "lanczos": self.lanczos,
            "cold_iterations": self.cold_iterations,
            "jacobian_iterations": self.jacobian_iterations,
            "jacobian_cold_iterations": self.jacobian_cold_iterations,
            "jacobian_tolerance": self.jacobian_tolerance,
            "histogram_bins": self.histogram_bins,
            "exact": self.exact,
            "auto_recover": self.auto_recover,
            "recovery": None if self.recovery is None else self.recovery.to_json(),
        }


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(ProbeConfig) if f.init)


def _set(config: ProbeConfig | RecoveryConfig, name: str, value: object) -> None:
    """Normalises a field of the frozen config during ``__post_init__``."""
    object.__setattr__(config, name, value)
