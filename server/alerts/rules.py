"""Alert rules: the declarative ``Rule`` over one quantity, its conditions and aggregations,
and the actions a firing rule may order (MSign, a learning-rate backoff, a rollback to a
known-good snapshot, QK-Clip). Everything is validated at construction; ``RuleError`` says
the field, the value and what would be valid.

Standard library only (with ``server/vocab.py``), like the rest of the engine's core.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from fnmatch import fnmatchcase
from typing import Any, ClassVar

from rankguard.server.vocab import AlertSeverity, CommandKind, MSignEngine, TargetGroup, values


class RuleError(ValueError):
    """A rule, rule dict or engine state is invalid; the message names field, value and fix."""


class Condition(str, Enum):
    ABOVE = "above"
    BELOW = "below"
    DROP_FROM_BASELINE = "drop_from_baseline"
    RATIO_TO_EMA = "ratio_to_ema"
    ZSCORE = "zscore"
    NON_FINITE = "non_finite"
    # Conditions over the series' own recent past: the peers' detectors (history.py).
    ZSCORE_ABOVE = "zscore_above"
    MAX_RATIO = "max_ratio"
    RATIO_TO_MEAN = "ratio_to_mean"
    RISE_OVER_MEAN = "rise_over_mean"
    CUSUM = "cusum"
    RATIO_TO_BEST = "ratio_to_best"
    RISE_FROM_BASELINE = "rise_from_baseline"


class Aggregation(str, Enum):
    ANY = "any"
    ALL = "all"
    AT_LEAST_K = "at_least_k"
    MEAN = "mean"
    GMEAN = "gmean"
    MIN = "min"
    MAX = "max"


# Boolean aggregations count tripped targets; value aggregations combine the values first.
BOOLEAN_AGGREGATIONS = frozenset({Aggregation.ANY, Aggregation.ALL, Aggregation.AT_LEAST_K})
# Conditions judged against the series' own past (history.py): each trips on a value above a
# bound it derives from earlier samples, and its threshold is a ratio, a z or a CUSUM bound.
HISTORY_CONDITIONS = frozenset(
    {
        Condition.ZSCORE_ABOVE,
        Condition.MAX_RATIO,
        Condition.RATIO_TO_MEAN,
        Condition.RISE_OVER_MEAN,
        Condition.CUSUM,
        Condition.RATIO_TO_BEST,
        Condition.RISE_FROM_BASELINE,
    }
)
# Conditions whose threshold is a ratio or a |z|: it must be positive.
_RELATIVE = frozenset(
    {Condition.DROP_FROM_BASELINE, Condition.RATIO_TO_EMA, Condition.ZSCORE, *HISTORY_CONDITIONS}
)
# Conditions whose safe side is below the bound (the clear bound must not sit above it).
_SAFE_BELOW = frozenset(
    {Condition.ABOVE, Condition.RATIO_TO_EMA, Condition.ZSCORE, *HISTORY_CONDITIONS}
)
# The longest window a rule may keep: the state holds up to this many values per series and is
# rewritten on every ingest, so it stays bounded.
MAX_WINDOW = 4096


def _coerce_enum(enum: type[Enum], field_name: str, value: Any) -> Any:
    if isinstance(value, enum):
        return value
    try:
        return enum(value)
    except ValueError:
        valid = ", ".join(repr(v) for v in values(enum))
        raise RuleError(f"{field_name}={value!r} is not valid; use one of {valid}") from None


def check_int(field_name: str, value: Any, minimum: int) -> None:
    """Raise ``RuleError`` unless ``value`` is an integer (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RuleError(f"{field_name}={value!r} is not valid; use an integer >= {minimum}")


def _check_number(field_name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RuleError(f"{field_name}={value!r} is not valid; use a finite number")
    return float(value)


def _globs(value: Any) -> tuple[str, ...] | None:
    """``value`` as a non-empty tuple of non-empty strings, or None when it is not one."""
    if isinstance(value, list):
        value = tuple(value)
    if not isinstance(value, tuple) or not value:
        return None
    return value if all(isinstance(t, str) and t for t in value) else None


@dataclass(frozen=True)
class Action:
    """When a rule orders its command: on firing, then (``repeat_every``) again every that
    many steps while the alert keeps firing, at most ``max_orders`` times per
    ``window_steps`` steps. ``enabled=False`` keeps the action in the rule (visible, one
    switch to turn on) without acting. Subclasses say what is ordered (:meth:`command`)."""

    field_name: ClassVar[str]  # the Rule field, for error messages
    enabled: bool = False
    max_orders: int = 1
    window_steps: int = 1000
    repeat_every: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise RuleError(
                f"{self.field_name}.enabled={self.enabled!r} is not valid; use true or false"
            )
        check_int(f"{self.field_name}.max_orders", self.max_orders, 1)
        check_int(f"{self.field_name}.window_steps", self.window_steps, 1)
        if self.repeat_every is not None:
            check_int(f"{self.field_name}.repeat_every", self.repeat_every, 1)

    def command(self) -> dict[str, Any]:
        """The command this action orders: ``{"kind": ..., "args": {...}}``."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        if not isinstance(data, Mapping):
            raise RuleError(f"{cls.field_name}={data!r} is not valid; use an object or null")
        valid = {f.name for f in fields(cls)}
        unknown = set(data) - valid
        if unknown:
            raise RuleError(
                f"{cls.field_name} has unknown field(s) {sorted(unknown)}; valid: "
                f"{', '.join(sorted(valid))}"
            )
        return cls(**dict(data))


@dataclass(frozen=True)
class MSignAction(Action):
    """Order MSign when the rule fires (the MSign paper restores periodically, so
    ``repeat_every`` may order it again while the trouble lasts). ``targets`` is a group of
    docs/contract.md (``"attention"``, ``"all_2d"``) or a tuple of fnmatch globs over target
    names."""

    field_name: ClassVar[str] = "msign"
    targets: str | tuple[str, ...] = TargetGroup.ALL_2D.value
    engine: str = MSignEngine.SVD.value

    def __post_init__(self) -> None:
        super().__post_init__()
        groups = values(TargetGroup)
        if isinstance(self.targets, str):
            if self.targets not in groups:
                raise RuleError(
                    f"msign.targets={self.targets!r} is not valid; use one of {groups} "
                    "or a list of fnmatch globs"
                )
        else:
            targets = _globs(self.targets)
            if targets is None:
                raise RuleError(
                    f"msign.targets={self.targets!r} is not valid; use one of {groups} "
                    "or a non-empty list of fnmatch globs"
                )
            object.__setattr__(self, "targets", targets)
        if self.engine not in values(MSignEngine):
            raise RuleError(
                f"msign.engine={self.engine!r} is not valid; use one of {values(MSignEngine)}"
            )

    def command(self) -> dict[str, Any]:
        targets = self.targets if isinstance(self.targets, str) else list(self.targets)
        return {
            "kind": CommandKind.MSIGN.value,
            "args": {"targets": targets, "engine": self.engine},
        }

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        if not isinstance(self.targets, str):
            data["targets"] = list(self.targets)
        return data


@dataclass(frozen=True)
class LRBackoffAction(Action):
    """Order a learning-rate backoff when the rule fires: the probe multiplies every
    parameter group's learning rate by ``factor`` (in (0, 1)) on top of the user's schedule,
    cumulatively; ``repeat_every`` keeps lowering it while the alert fires."""

    field_name: ClassVar[str] = "lr_backoff"
    factor: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        factor = _check_number("lr_backoff.factor", self.factor)
        if not 0.0 < factor < 1.0:
            raise RuleError(
                f"lr_backoff.factor={factor!r} is not valid; use a number in (0, 1) "
                "(the learning rate is multiplied by it)"
            )
        object.__setattr__(self, "factor", factor)

    def command(self) -> dict[str, Any]:
        return {"kind": CommandKind.SCALE_LR.value, "args": {"factor": self.factor}}


@dataclass(frozen=True)
class RollbackAction(Action):
    """Order a rollback when the rule fires: the probe restores its newest known-good
    snapshot older than the alert's first step, skips the batches after it and backs the
    learning rate off by ``lr_factor`` (in (0, 1]); the probe caps the rollbacks of one
    alert (its incident) and escalates. Needs the probe's recovery on (``auto_recover``)."""

    field_name: ClassVar[str] = "rollback"
    lr_factor: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        factor = _check_number("rollback.lr_factor", self.lr_factor)
        if not 0.0 < factor <= 1.0:
            raise RuleError(
                f"rollback.lr_factor={factor!r} is not valid; use a number in (0, 1] "
                "(1: no learning-rate backoff)"
            )
        object.__setattr__(self, "lr_factor", factor)

    def command(self) -> dict[str, Any]:
        # the alert's first step and its id are added where the command is queued
        return {"kind": CommandKind.ROLLBACK.value, "args": {"lr_factor": self.lr_factor}}


@dataclass(frozen=True)
class QKClipAction(Action):
    """Order QK-Clip when the rule fires: the probe rescales W_q/W_k of every attention head
    whose max logit at its latest sample exceeded ``tau`` (Kimi K2's rule)."""

    field_name: ClassVar[str] = "qk_clip"
    tau: float = 100.0

    def __post_init__(self) -> None:
        super().__post_init__()
        tau = _check_number("qk_clip.tau", self.tau)
        if tau <= 0:
            raise RuleError(f"qk_clip.tau={tau!r} is not valid; use a number > 0")
        object.__setattr__(self, "tau", tau)

    def command(self) -> dict[str, Any]:
        return {"kind": CommandKind.QK_CLIP.value, "args": {"tau": self.tau}}


AnyAction = MSignAction | LRBackoffAction | RollbackAction | QKClipAction
ACTIONS: tuple[type[Action], ...] = (MSignAction, LRBackoffAction, RollbackAction, QKClipAction)
ACTION_FIELDS = tuple(a.field_name for a in ACTIONS)  # the Rule fields that hold actions


@dataclass(frozen=True)
class Rule:
    """One declarative alert rule over one quantity; validated at construction.

    ``threshold`` means, by condition: ``above``/``below`` the bound; ``drop_from_baseline`` the
    ratio to the series' own baseline (mean of its first ``baseline_samples`` finite samples);
    ``ratio_to_ema`` the ratio of a value to the EMA of the previous values; ``zscore`` the
    |z| bound over the trailing ``window`` samples; ``non_finite`` takes none. The conditions
    over the series' own past (the peers' detectors; definitions in ``history.py``):
    ``zscore_above`` z above the mean of the previous ``window`` (OLMo-core), ``max_ratio`` the
    ratio to the largest of the first ``window`` samples (Megatron-LM), ``ratio_to_mean`` the
    ratio to the mean of the previous ``window`` (llm-foundry), ``rise_over_mean`` the rise over
    the running mean of ``window`` in units of that mean (Lightning's ``rtol``), ``cusum`` the
    decision bound h of Page's CUSUM with slack ``slack`` over a median/MAD baseline of
    ``window`` samples, ``ratio_to_best`` the ratio of the trailing ``window`` mean to its
    lowest value so far (1.0 with ``consecutive`` = a stall; above 1 = gradual divergence),
    ``rise_from_baseline`` the ratio to the run's own early level: the mean of the
    ``baseline_samples`` samples that follow the first ``warmup`` (a learning-rate warmup
    is not the baseline).
    ``warmup`` is a
    count of *samples* of a series (the probe samples every N steps, so 50 samples may be 500
    steps); ``min_step`` is in training steps; ``cooldown`` is in steps after a resolution.
    ``clear_threshold`` (hysteresis) is in the units of ``threshold`` (a ratio for
    ``drop_from_baseline`` and ``ratio_to_ema``, a |z| for ``zscore``).
    """

    name: str
    quantity: str
    condition: Condition
    threshold: float | None = None
    targets: tuple[str, ...] = ("*",)
    aggregation: Aggregation = Aggregation.ANY
    k: int | None = None
    consecutive: int = 1
    severity: AlertSeverity = AlertSeverity.WARNING
    cooldown: int = 0
    clear_threshold: float | None = None
    clear_after: int = 1
    baseline_samples: int = 5
    ema_alpha: float = 0.1
    warmup: int = 0
    window: int = 20
    slack: float = 0.5
    min_step: int = 0
    notify: bool = True
    msign: MSignAction = field(default_factory=MSignAction)
    lr_backoff: LRBackoffAction = field(default_factory=LRBackoffAction)
    rollback: RollbackAction = field(default_factory=RollbackAction)
    qk_clip: QKClipAction = field(default_factory=QKClipAction)
    description: str = ""
    runbook: str = ""
    enabled: bool = True

    def __post_init__(self) -> None:
        # In this order, so that a rule with several bad fields names the same one as before.
        self._validate_selection()
        self._validate_bounds()
        self._validate_counts()
        self._validate_actions()

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # coercion of a frozen field, at construction

    def _validate_selection(self) -> None:
        for name in ("name", "quantity"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise RuleError(f"{name}={value!r} is not valid; use a non-empty string")
        self._set("condition", _coerce_enum(Condition, "condition", self.condition))
        self._set("aggregation", _coerce_enum(Aggregation, "aggregation", self.aggregation))
        self._set("severity", _coerce_enum(AlertSeverity, "severity", self.severity))
        raw: Any = self.targets
        targets = _globs((raw,) if isinstance(raw, str) else raw)
        if targets is None:
            raise RuleError(
                f"targets={self.targets!r} is not valid; use a non-empty list of fnmatch globs"
            )
        self._set("targets", targets)

    def _validate_bounds(self) -> None:
        cond = self.condition
        if cond is Condition.NON_FINITE:
            for name in ("threshold", "clear_threshold"):
                if getattr(self, name) is not None:
                    raise RuleError(
                        f"{name}={getattr(self, name)!r} is not valid for condition "
                        "'non_finite'; leave it null"
                    )
            return
        if self.threshold is None:
            raise RuleError(
                f"threshold=None is not valid for condition {cond.value!r}; give a finite number"
            )
        threshold = _check_number("threshold", self.threshold)
        self._set("threshold", threshold)
        if cond in _RELATIVE and threshold <= 0:
            raise RuleError(
                f"threshold={threshold!r} is not valid for condition {cond.value!r}; "
                "use a number > 0"
            )
        if self.clear_threshold is None:
            return
        clear = _check_number("clear_threshold", self.clear_threshold)
        self._set("clear_threshold", clear)
        # The clear bound must sit on the safe side of the trip bound, or the latch could be
        # clean and tripping at once.
        safe_below = cond in _SAFE_BELOW
        if (safe_below and clear > threshold) or (not safe_below and clear < threshold):
            relation = "<=" if safe_below else ">="
            raise RuleError(
                f"clear_threshold={clear!r} is not valid for condition {cond.value!r}; "
                f"use a number {relation} threshold ({threshold!r})"
            )

    def _validate_counts(self) -> None:
        if self.aggregation is Aggregation.AT_LEAST_K:
            check_int("k", self.k, 1)
        elif self.k is not None:
            raise RuleError(
                f"k={self.k!r} is not valid for aggregation {self.aggregation.value!r}; "
                "k is only for 'at_least_k' (leave it null)"
            )
        for name, minimum in (
            ("consecutive", 1),
            ("cooldown", 0),
            ("clear_after", 1),
            ("baseline_samples", 1),
            ("warmup", 0),
            ("window", 2),
            ("min_step", 0),
        ):
            check_int(name, getattr(self, name), minimum)
        if self.window > MAX_WINDOW:
            raise RuleError(f"window={self.window!r} is not valid; use an integer <= {MAX_WINDOW}")
        slack = _check_number("slack", self.slack)
        if slack < 0:
            raise RuleError(f"slack={slack!r} is not valid; use a number >= 0")
        self._set("slack", slack)
        alpha = _check_number("ema_alpha", self.ema_alpha)
        if not 0.0 < alpha <= 1.0:
            raise RuleError(f"ema_alpha={alpha!r} is not valid; use a number in (0, 1]")
        self._set("ema_alpha", alpha)
        for name in ("notify", "enabled"):
            if not isinstance(getattr(self, name), bool):
                raise RuleError(f"{name}={getattr(self, name)!r} is not valid; use true or false")
        for name in ("description", "runbook"):
            if not isinstance(getattr(self, name), str):
                raise RuleError(f"{name}={getattr(self, name)!r} is not valid; use a string")

    def _validate_actions(self) -> None:
        for action_cls in ACTIONS:
            name = action_cls.field_name
            value = getattr(self, name)
            if isinstance(value, Mapping):
                self._set(name, action_cls.from_dict(value))
            elif value is None:
                self._set(name, action_cls())
            elif not isinstance(value, action_cls):
                raise RuleError(f"{name}={value!r} is not valid; use an object or null")
        enabled = [name for name in ACTION_FIELDS if getattr(self, name).enabled]
        if len(enabled) > 1:
            raise RuleError(
                f"{' and '.join(f'{n}.enabled' for n in enabled)} are "
                f"{'both' if len(enabled) == 2 else 'all'} true; a rule orders one kind of "
                "command: turn all but one off, or make a second rule on the same quantity"
            )

    @property
    def action(self) -> AnyAction | None:
        """The enabled action (its command is ordered when the rule fires), if any."""
        for name in ACTION_FIELDS:
            action: AnyAction = getattr(self, name)
            if action.enabled:
                return action
        return None

    # -- selection -------------------------------------------------------------------------

    def matches(self, quantity: str, target: str) -> bool:
        """Whether a series (quantity, target) feeds this rule (case-sensitive fnmatch)."""
        return quantity == self.quantity and self.matches_target(target)

    def matches_target(self, target: str) -> bool:
        return any(fnmatchcase(target, glob) for glob in self.targets)

    # -- plain dicts (CRUD API, database) ----------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in _RULE_FIELDS}
        for name in ("condition", "aggregation", "severity"):
            data[name] = data[name].value
        data["targets"] = list(self.targets)
        for name in ACTION_FIELDS:
            data[name] = getattr(self, name).to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Rule:
        """Build and validate a rule from a plain dict; unknown or missing fields are errors."""
        if not isinstance(data, Mapping):
            raise RuleError(f"rule={data!r} is not valid; use an object")
        valid = set(_RULE_FIELDS)
        unknown = set(data) - valid
        if unknown:
            raise RuleError(f"rule has unknown field(s) {sorted(unknown)}; valid: {sorted(valid)}")
        missing = {"name", "quantity", "condition"} - set(data)
        if missing:
            raise RuleError(f"rule is missing required field(s) {sorted(missing)}")
        kwargs = dict(data)
        if kwargs.get("targets") is None:
            kwargs.pop("targets", None)
        return cls(**kwargs)

    def replace(self, **changes: Any) -> Rule:
        """A copy with some fields changed (validated like a new rule)."""
        data = self.to_dict()
        data.update(changes)
        for name in ACTION_FIELDS:
            if isinstance(data.get(name), Action):
                data[name] = data[name].to_dict()
        return Rule.from_dict(data)


_RULE_FIELDS = tuple(Rule.__dataclass_fields__)

__all__ = [
    "ACTIONS",
    "ACTION_FIELDS",
    "BOOLEAN_AGGREGATIONS",
    "HISTORY_CONDITIONS",
    "MAX_WINDOW",
    "Action",
    "Aggregation",
    "AnyAction",
    "Condition",
    "LRBackoffAction",
    "MSignAction",
    "QKClipAction",
    "RollbackAction",
    "Rule",
    "RuleError",
    "check_int",
]
