"""Pure alert engine: declarative rules over step-indexed series, evaluated in step order.

This module imports only the standard library, so the server, a worker or a test can drive it
without a framework. The caller owns persistence: the engine's state for one (rule, run) is a
plain JSON-serialisable ``dict`` (no NaN literals: non-finite floats are stored as the strings
``"NaN"``, ``"Infinity"``, ``"-Infinity"`` of docs/contract.md, so it fits a JSONB column).

Public API::

    rule = Rule(name=..., quantity=..., condition=Condition.BELOW, threshold=0.1, ...)
    state = new_state()                                   # or None
    state, transitions = evaluate(rule, state, samples)   # samples: (target, step, value)
    state, transitions = evaluate_steps(rule, state, {step: {target: value}})  # pre-grouped
    state, transitions = flush(rule, state)               # run finished: evaluate what waits

``evaluate`` never mutates the state it is given and never raises on data (NaN, ±Inf, replays,
out-of-order steps, unknown targets); it raises ``RuleError`` only for a malformed state or a
malformed sample (a step that is not an integer, a value that is not a number).

Step-order policy
-----------------
Samples are buffered by step and a step is evaluated only after every earlier buffered step.
The oldest buffered step ``s`` is evaluated when

1. every target present at the previously evaluated step has reported ``s`` (a target that
   stops reporting is waited for at most ``max_pending_steps`` distinct buffered steps), and
2. it is not after a gap: once two steps have been evaluated the engine knows the series'
   stride (the last step difference); a step further than one stride past the last evaluated
   step waits for the missing step, so a late batch that fills the gap is evaluated in order.
   A gap that is never filled is given up on after ``max_pending_steps`` later steps.
3. The very first step of a series has no expected target set, so it waits until a later step
   (or ``flush``) shows that its batch is over.

A sample at a step not after the last evaluated step (a replay, or data later than the bounded
lag) changes nothing. Within these bounds the result does not depend on how the samples are
split into calls or ordered inside them. The bounds in practice: the first two steps of a
series teach the engine its targets and its stride, so they must arrive complete (in one call,
or in order, as the probe sends them); after that, reordering, split steps and late spill
files that fill a gap of up to ``max_pending_steps`` steps give the in-order result.

State format (version 2)
------------------------
``{"v": 2, "watermark": last evaluated step | null, "stride": int | null, "expected": [targets
at the last evaluated step] | "*" (every target of "series", the usual case), "pending": [[step,
target, value], ...], "series": {target: {...}}, "aggregate": {...} | null, "alert":
{"firing", "episode", "first_step", "fired_step", "targets", "cooldown_until"}, "msign_steps":
[steps at which this rule ordered its command: MSign or a learning-rate backoff]}``.
Per-series state holds ``n`` (finite samples seen), the latch (``run``, ``clean``,
``tripped``, ``since``) and only the statistics the condition needs (``b_sum``/``b_n``
baseline, ``ema``, z-score ``window``), so a row stays O(targets x window) and small: ingest
rewrites it on every batch.
Version 1 (which also kept each series' ``last_step`` and ``value``, and every statistic) is
still read: ``evaluate`` and ``flush`` return it migrated to version 2.
Reset the state (``new_state()``) when a rule's condition fields are edited.

Per-target semantics
--------------------
For ``any`` / ``all`` / ``at_least_k`` each target runs its own condition and latch: a target
*trips* after ``consecutive`` consecutive tripping samples of its own and *clears* after
``clear_after`` consecutive clean samples (clean = on the safe side of ``clear_threshold``,
which defaults to ``threshold``; values between the two bounds keep the latch as it is). The
aggregation counts tripped targets among those present at the step. For ``mean`` / ``gmean``
/ ``min`` / ``max`` the targets present at a step are combined into one value and that
aggregated series runs the condition and latch; each target still runs its condition on its
own series so the alert can say which layers moved first. The alert fires when the
aggregation holds and resolves at the first step it does not; after resolving at step ``s`` it
cannot fire again before ``s + cooldown``.

Non-finite values (NaN, ±Inf) trip *every* condition, also during warm-up and before
``min_step``: a monitored quantity that is not a number is never healthy. They never enter a
baseline, EMA or z-score window, so one NaN does not poison the statistics, and they never
count as clean, so they cannot reset a counter towards resolution.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import Enum
from fnmatch import fnmatchcase
from math import isfinite
from typing import Any, ClassVar

STATE_VERSION = 2
# State "expected" value meaning: the targets at the last evaluated step are all of "series".
ALL_SERIES = "*"
DEFAULT_MAX_PENDING_STEPS = 8

MSIGN_ENGINES = ("svd", "newton_schulz")
MSIGN_GROUPS = ("attention", "all_2d")


class RuleError(ValueError):
    """A rule, rule dict or engine state is invalid; the message names field, value and fix."""


class Condition(str, Enum):
    ABOVE = "above"
    BELOW = "below"
    DROP_FROM_BASELINE = "drop_from_baseline"
    RATIO_TO_EMA = "ratio_to_ema"
    ZSCORE = "zscore"
    NON_FINITE = "non_finite"


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


class Severity(str, Enum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class TransitionKind(str, Enum):
    FIRING = "firing"
    RESOLVED = "resolved"
    # A firing alert orders its command again (``repeat_every``); no notification.
    REPEAT = "repeat"


def _valid(enum: type[Enum]) -> str:
    return ", ".join(repr(m.value) for m in enum)


def _coerce_enum(enum: type[Enum], field_name: str, value: Any) -> Any:
    if isinstance(value, enum):
        return value
    try:
        return enum(value)
    except ValueError:
        raise RuleError(f"{field_name}={value!r} is not valid; use one of {_valid(enum)}") from None


def _check_int(field_name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RuleError(f"{field_name}={value!r} is not valid; use an integer >= {minimum}")


def _check_number(field_name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RuleError(f"{field_name}={value!r} is not valid; use a finite number")
    return float(value)


@dataclass(frozen=True)
class _Orders:
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
        _check_int(f"{self.field_name}.max_orders", self.max_orders, 1)
        _check_int(f"{self.field_name}.window_steps", self.window_steps, 1)
        if self.repeat_every is not None:
            _check_int(f"{self.field_name}.repeat_every", self.repeat_every, 1)

    def command(self) -> dict[str, Any]:
        """The body of ``POST /api/v1/runs/{run_id}/commands`` that this action orders."""
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
class MSignAction(_Orders):
    """Order MSign when the rule fires (the MSign paper restores periodically, so
    ``repeat_every`` may order it again while the trouble lasts). ``targets`` is a group of
    docs/contract.md (``"attention"``, ``"all_2d"``) or a tuple of fnmatch globs over target
    names."""

    field_name: ClassVar[str] = "msign"
    targets: str | tuple[str, ...] = "all_2d"
    engine: str = "svd"

    def __post_init__(self) -> None:
        super().__post_init__()
        targets: Any = self.targets
        if isinstance(targets, str):
            if targets not in MSIGN_GROUPS:
                raise RuleError(
                    f"msign.targets={targets!r} is not valid; use one of {MSIGN_GROUPS} "
                    "or a list of fnmatch globs"
                )
        else:
            if isinstance(targets, (list, tuple)):
                targets = tuple(targets)
            if (
                not isinstance(targets, tuple)
                or not targets
                or not all(isinstance(t, str) and t for t in targets)
            ):
                raise RuleError(
                    f"msign.targets={self.targets!r} is not valid; use one of {MSIGN_GROUPS} "
                    "or a non-empty list of fnmatch globs"
                )
            object.__setattr__(self, "targets", targets)
        if self.engine not in MSIGN_ENGINES:
            raise RuleError(
                f"msign.engine={self.engine!r} is not valid; use one of {MSIGN_ENGINES}"
            )

    def command(self) -> dict[str, Any]:
        targets = self.targets if isinstance(self.targets, str) else list(self.targets)
        return {"kind": "msign", "args": {"targets": targets, "engine": self.engine}}

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        if not isinstance(self.targets, str):
            data["targets"] = list(self.targets)
        return data


@dataclass(frozen=True)
class LRBackoffAction(_Orders):
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
        return {"kind": "scale_lr", "args": {"factor": self.factor}}


@dataclass(frozen=True)
class Rule:
    """One declarative alert rule over one quantity; validated at construction.

    ``threshold`` means, by condition: ``above``/``below`` the bound; ``drop_from_baseline`` the
    ratio to the series' own baseline (mean of its first ``baseline_samples`` finite samples);
    ``ratio_to_ema`` the ratio of a value to the EMA of the previous values; ``zscore`` the
    |z| bound over the trailing ``window`` samples; ``non_finite`` takes none. ``warmup`` is a
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
    severity: Severity = Severity.WARNING
    cooldown: int = 0
    clear_threshold: float | None = None
    clear_after: int = 1
    baseline_samples: int = 5
    ema_alpha: float = 0.1
    warmup: int = 0
    window: int = 20
    min_step: int = 0
    notify: bool = True
    msign: MSignAction = field(default_factory=MSignAction)
    lr_backoff: LRBackoffAction = field(default_factory=LRBackoffAction)
    description: str = ""
    runbook: str = ""
    enabled: bool = True

    def __post_init__(self) -> None:
        for name in ("name", "quantity"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise RuleError(f"{name}={value!r} is not valid; use a non-empty string")
        cond = _coerce_enum(Condition, "condition", self.condition)
        object.__setattr__(self, "condition", cond)
        object.__setattr__(
            self, "aggregation", _coerce_enum(Aggregation, "aggregation", self.aggregation)
        )
        object.__setattr__(self, "severity", _coerce_enum(Severity, "severity", self.severity))
        targets: Any = self.targets
        if isinstance(targets, str):
            targets = (targets,)
        if isinstance(targets, list):
            targets = tuple(targets)
        if (
            not isinstance(targets, tuple)
            or not targets
            or not all(isinstance(t, str) and t for t in targets)
        ):
            raise RuleError(
                f"targets={self.targets!r} is not valid; use a non-empty list of fnmatch globs"
            )
        object.__setattr__(self, "targets", targets)

        if cond is Condition.NON_FINITE:
            for name in ("threshold", "clear_threshold"):
                if getattr(self, name) is not None:
                    raise RuleError(
                        f"{name}={getattr(self, name)!r} is not valid for condition "
                        "'non_finite'; leave it null"
                    )
        else:
            if self.threshold is None:
                raise RuleError(
                    f"threshold=None is not valid for condition {cond.value!r}; "
                    "give a finite number"
                )
            threshold = _check_number("threshold", self.threshold)
            object.__setattr__(self, "threshold", threshold)
            relative = (Condition.DROP_FROM_BASELINE, Condition.RATIO_TO_EMA, Condition.ZSCORE)
            if cond in relative and threshold <= 0:
                raise RuleError(
                    f"threshold={threshold!r} is not valid for condition {cond.value!r}; "
                    "use a number > 0"
                )
            if self.clear_threshold is not None:
                clear = _check_number("clear_threshold", self.clear_threshold)
                object.__setattr__(self, "clear_threshold", clear)
                # The clear bound must sit on the safe side of the trip bound, or the latch
                # could be clean and tripping at once.
                safe_below = cond in (Condition.ABOVE, Condition.RATIO_TO_EMA, Condition.ZSCORE)
                if safe_below and clear > threshold:
                    raise RuleError(
                        f"clear_threshold={clear!r} is not valid for condition {cond.value!r}; "
                        f"use a number <= threshold ({threshold!r})"
                    )
                if not safe_below and clear < threshold:
                    raise RuleError(
                        f"clear_threshold={clear!r} is not valid for condition {cond.value!r}; "
                        f"use a number >= threshold ({threshold!r})"
                    )

        if self.aggregation is Aggregation.AT_LEAST_K:
            _check_int("k", self.k, 1)
        elif self.k is not None:
            raise RuleError(
                f"k={self.k!r} is not valid for aggregation {self.aggregation.value!r}; "
                "k is only for 'at_least_k' (leave it null)"
            )
        _check_int("consecutive", self.consecutive, 1)
        _check_int("cooldown", self.cooldown, 0)
        _check_int("clear_after", self.clear_after, 1)
        _check_int("baseline_samples", self.baseline_samples, 1)
        _check_int("warmup", self.warmup, 0)
        _check_int("window", self.window, 2)
        _check_int("min_step", self.min_step, 0)
        alpha = _check_number("ema_alpha", self.ema_alpha)
        if not 0.0 < alpha <= 1.0:
            raise RuleError(f"ema_alpha={alpha!r} is not valid; use a number in (0, 1]")
        object.__setattr__(self, "ema_alpha", alpha)
        for name in ("notify", "enabled"):
            if not isinstance(getattr(self, name), bool):
                raise RuleError(f"{name}={getattr(self, name)!r} is not valid; use true or false")
        for name in ("description", "runbook"):
            if not isinstance(getattr(self, name), str):
                raise RuleError(f"{name}={getattr(self, name)!r} is not valid; use a string")
        for action_cls in (MSignAction, LRBackoffAction):
            name = action_cls.field_name
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, action_cls.from_dict(value))
            elif value is None:
                object.__setattr__(self, name, action_cls())
            elif not isinstance(value, action_cls):
                raise RuleError(f"{name}={value!r} is not valid; use an object or null")
        if self.msign.enabled and self.lr_backoff.enabled:
            raise RuleError(
                "msign.enabled and lr_backoff.enabled are both true; a rule orders one kind "
                "of command: turn one off, or make a second rule on the same quantity"
            )

    @property
    def action(self) -> MSignAction | LRBackoffAction | None:
        """The enabled action (its command is ordered when the rule fires), if any."""
        if self.msign.enabled:
            return self.msign
        if self.lr_backoff.enabled:
            return self.lr_backoff
        return None

    # -- selection -------------------------------------------------------------------------

    def matches(self, quantity: str, target: str) -> bool:
        """Whether a series (quantity, target) feeds this rule (case-sensitive fnmatch)."""
        return quantity == self.quantity and self.matches_target(target)

    def matches_target(self, target: str) -> bool:
        return any(fnmatchcase(target, glob) for glob in self.targets)

    # -- plain dicts (CRUD API, database) ----------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "quantity": self.quantity,
            "condition": self.condition.value,
            "threshold": self.threshold,
            "targets": list(self.targets),
            "aggregation": self.aggregation.value,
            "k": self.k,
            "consecutive": self.consecutive,
            "severity": self.severity.value,
            "cooldown": self.cooldown,
            "clear_threshold": self.clear_threshold,
            "clear_after": self.clear_after,
            "baseline_samples": self.baseline_samples,
            "ema_alpha": self.ema_alpha,
            "warmup": self.warmup,
            "window": self.window,
            "min_step": self.min_step,
            "notify": self.notify,
            "msign": self.msign.to_dict(),
            "lr_backoff": self.lr_backoff.to_dict(),
            "description": self.description,
            "runbook": self.runbook,
            "enabled": self.enabled,
        }

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
        for name in ("msign", "lr_backoff"):
            if isinstance(data.get(name), (MSignAction, LRBackoffAction)):
                data[name] = data[name].to_dict()
        return Rule.from_dict(data)


_RULE_FIELDS = tuple(Rule.__dataclass_fields__)


# --------------------------------------------------------------------------------------------
# Transitions
# --------------------------------------------------------------------------------------------


def encode_float(value: float | None) -> float | str | None:
    """A float as JSON can carry it: the contract's strings for NaN and ±Inf."""
    if value is None or math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


_DECODE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def decode_float(value: Any) -> float:
    """Inverse of ``encode_float``; also accepts ints and plain float strings."""
    if isinstance(value, str):
        if value in _DECODE:
            return _DECODE[value]
        return float(value)
    if isinstance(value, bool):
        raise ValueError(f"value={value!r} is not a number")
    return float(value)


@dataclass(frozen=True)
class TargetHit:
    """One target in an alert: its value at the step and when it itself started to trip."""

    target: str
    value: float
    since: int | None
    bound: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "value": encode_float(self.value),
            "since": self.since,
            "bound": encode_float(self.bound),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TargetHit:
        bound = data.get("bound")
        return cls(
            target=str(data["target"]),
            value=decode_float(data["value"]),
            since=data.get("since"),
            bound=None if bound is None else decode_float(bound),
        )


@dataclass(frozen=True)
class Transition:
    """An alert changing state: ``firing`` or ``resolved``.

    ``episode`` counts firings of this rule in this run (1, 2, ...): (rule, run, episode) keys an
    alert. ``first_step`` is when the trouble began (the earliest step at which a reported target
    started to trip), ``step`` when the rule decided. ``targets`` are ordered by how early they
    moved. ``command`` is the command this firing orders (MSign or a learning-rate backoff;
    ``None`` when the rule does not act, or ``command_suppressed`` when its rate limit held it
    back). ``suggested_action`` may
    contain the literal ``{run_id}``, for the caller to fill in.
    """

    kind: TransitionKind
    rule: str
    quantity: str
    severity: Severity
    episode: int
    step: int
    first_step: int
    targets: tuple[TargetHit, ...]
    value: float | None
    bound: float | None
    message: str
    suggested_action: str
    notify: bool = True
    command: dict[str, Any] | None = None
    command_suppressed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "rule": self.rule,
            "quantity": self.quantity,
            "severity": self.severity.value,
            "episode": self.episode,
            "step": self.step,
            "first_step": self.first_step,
            "targets": [t.to_dict() for t in self.targets],
            "value": encode_float(self.value),
            "bound": encode_float(self.bound),
            "message": self.message,
            "suggested_action": self.suggested_action,
            "notify": self.notify,
            "command": copy.deepcopy(self.command),
            "command_suppressed": self.command_suppressed,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Transition:
        value, bound = data.get("value"), data.get("bound")
        return cls(
            kind=TransitionKind(data["kind"]),
            rule=str(data["rule"]),
            quantity=str(data["quantity"]),
            severity=Severity(data["severity"]),
            episode=int(data["episode"]),
            step=int(data["step"]),
            first_step=int(data["first_step"]),
            targets=tuple(TargetHit.from_dict(t) for t in data.get("targets", ())),
            value=None if value is None else decode_float(value),
            bound=None if bound is None else decode_float(bound),
            message=str(data["message"]),
            suggested_action=str(data["suggested_action"]),
            notify=bool(data.get("notify", True)),
            command=copy.deepcopy(data.get("command")),
            command_suppressed=bool(data.get("command_suppressed", False)),
        )


MSIGN_HOWTO = (
    "To order MSign (W <- ||W||_F/sqrt(r) * U V^T on the selected weights, which restores "
    "their stable rank): press 'MSign' on the run's dashboard page, or "
    'POST /api/v1/runs/{run_id}/commands {"kind": "msign", "args": {"targets": "all_2d", '
    '"engine": "svd"}} with an operate-scope token; the probe applies it at the next step '
    "boundary and acknowledges it."
)


def default_runbook(rule: Rule) -> str:
    """A generic runbook for rules that carry none of their own."""
    head = rule.description or f"{rule.quantity} tripped rule {rule.name!r}."
    return f"{head} Look at the named targets on the run's dashboard. {MSIGN_HOWTO}"


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------


def new_state() -> dict[str, Any]:
    """The state of a (rule, run) that has seen nothing yet."""
    return {
        "v": STATE_VERSION,
        "watermark": None,  # last evaluated step
        "stride": None,  # last difference between evaluated steps
        "expected": [],  # targets present at the last evaluated step
        "pending": [],  # [step, target, encoded value] not yet evaluated
        "series": {},  # target -> per-series state
        "aggregate": None,  # per-series state of the aggregated series (value aggregations)
        "alert": {
            "firing": False,
            "episode": 0,
            "first_step": None,
            "fired_step": None,
            "targets": [],
            "cooldown_until": None,
        },
        # steps at which this rule ordered its command (MSign or a learning-rate backoff; a
        # rule orders one kind), for the rate limit; the key predates the backoff
        "msign_steps": [],
    }


def _new_series(condition: Condition) -> dict[str, Any]:
    series: dict[str, Any] = {
        "n": 0,  # finite samples absorbed
        "run": 0,  # consecutive tripping samples
        "clean": 0,  # consecutive clean samples while tripped
        "tripped": False,
        "since": None,  # first step of the current crossing
    }
    # Only the statistics this condition reads: the state is rewritten on every batch, so
    # unused keys would cost JSON work on each ingest.
    if condition is Condition.DROP_FROM_BASELINE:
        series["b_sum"] = 0.0
        series["b_n"] = 0
    elif condition is Condition.RATIO_TO_EMA:
        series["ema"] = None
    elif condition is Condition.ZSCORE:
        series["window"] = []
    return series


def _copy_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """A private copy that evaluation may change, sharing what it only ever replaces.

    Evaluation mutates the top-level dict, ``alert`` and the per-series dicts in place; it
    replaces ``expected``, ``pending``, ``msign_steps``, ``alert["targets"]`` and each series'
    ``window`` by new lists and never edits them. So one level of copying per dict is enough,
    which costs a fraction of ``copy.deepcopy`` (the hot path of ingest: one call per rule and
    batch over O(targets) series).
    """
    new = dict(state)
    new["alert"] = dict(state["alert"])
    new["series"] = {t: dict(s) for t, s in state["series"].items()}
    if state["aggregate"] is not None:
        new["aggregate"] = dict(state["aggregate"])
    return new


def _migrate_v1(state: dict[str, Any], condition: Condition) -> dict[str, Any]:
    """Version 1 -> 2: series lose ``last_step``, ``value`` (never read) and the statistics
    their condition does not use; the rest is the same."""
    keep = set(_new_series(condition))
    state["series"] = {
        t: {k: v for k, v in s.items() if k in keep} for t, s in state["series"].items()
    }
    if state["aggregate"] is not None:
        state["aggregate"] = {k: v for k, v in state["aggregate"].items() if k in keep}
    state["v"] = STATE_VERSION
    return state


def _checked_state(state: Mapping[str, Any] | None, rule: Rule) -> dict[str, Any]:
    if state is None:
        return new_state()
    version = state.get("v") if isinstance(state, Mapping) else state
    if version not in (1, STATE_VERSION) or isinstance(version, bool):
        raise RuleError(
            f"state version {version!r} is not valid; use a state from new_state() "
            f"(version {STATE_VERSION}; version 1 is read and migrated)"
        )
    try:
        new = _copy_state(state)  # TypeError if not a Mapping
        return new if version == STATE_VERSION else _migrate_v1(new, rule.condition)
    except (KeyError, TypeError, ValueError) as exc:
        raise RuleError(
            f"state is malformed ({type(exc).__name__}: {exc}); use a state from new_state()"
        ) from None


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

# The verdict on one value of one series, taken before its statistics absorb it:
# (trips, clean, bound, why). ``why`` is a str.format template and its arguments; the text is
# built only when a transition reports it (``_detail``), since almost no sample trips. A plain
# tuple, as one is made per (rule, target, step) on ingest.
_Check = tuple[bool, bool, float | None, tuple[Any, ...]]

_NOT_FINITE = "{0:.4g} is not finite"
_FINITE = ("finite",)
_NO_BASELINE = ("baseline not yet known",)
_NO_EMA = ("EMA not yet positive",)
_NO_WINDOW = ("window not yet full",)
_ABOVE = "{0:.4g} > {1:.4g}"
_BELOW = "{0:.4g} < {1:.4g}"
_DROP = "{0:.4g} < {1:.4g} x baseline {2:.4g} = {3:.4g}"
_RATIO = "{0:.4g} = {1:.4g} x EMA {2:.4g} > {3:.4g} x EMA"
_ZSCORE = "{0:.4g} has |z| = {1:.4g} > {2:.4g} (mean {3:.4g}, std {4:.4g} over {5} samples)"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _detail(check: _Check) -> str:
    """The human-readable verdict of a check (``{:.4g}`` numbers, like ``_fmt``)."""
    why = check[3]
    template: str = why[0]
    return template.format(*why[1:])


def _check(rule: Rule, series: dict[str, Any], step: int, value: float) -> _Check:
    cond = rule.condition
    if not isfinite(value):
        return (True, False, None, (_NOT_FINITE, value))
    if cond is Condition.NON_FINITE:
        return (False, True, None, _FINITE)
    thr: float = rule.threshold  # type: ignore[assignment]  # a float: validated by Rule
    clear = thr if rule.clear_threshold is None else rule.clear_threshold
    warm = series["n"] >= rule.warmup and step >= rule.min_step
    if cond is Condition.ABOVE:
        return (warm and value > thr, value <= clear, thr, (_ABOVE, value, thr))
    if cond is Condition.BELOW:
        return (warm and value < thr, value >= clear, thr, (_BELOW, value, thr))
    if cond is Condition.DROP_FROM_BASELINE:
        # .get: a statistic this condition has not stored yet starts empty (_new_series)
        b_n = series.get("b_n", 0)
        if b_n < rule.baseline_samples:
            return (False, True, None, _NO_BASELINE)
        base = series["b_sum"] / b_n
        bound = thr * base
        return (
            warm and value < bound,
            value >= clear * base,
            bound,
            (_DROP, value, thr, base, bound),
        )
    if cond is Condition.RATIO_TO_EMA:
        ema = series.get("ema")
        if ema is None or ema <= 0:
            # A ratio to a zero or negative EMA has no meaning for norms; stay quiet.
            return (False, True, None, _NO_EMA)
        ratio = value / ema
        return (warm and ratio > thr, ratio <= clear, thr * ema, (_RATIO, value, ratio, ema, thr))
    # ZSCORE over the trailing window of previous finite values (population std).
    window = series.get("window", ())
    if len(window) < rule.window:
        return (False, True, None, _NO_WINDOW)
    mean = math.fsum(window) / len(window)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in window) / len(window))
    # A constant window has std 0: any different value is an infinite z-score.
    z = abs(value - mean) / std if std > 0 else (0.0 if value == mean else math.inf)
    return (
        warm and z > thr,
        z <= clear,
        mean + math.copysign(thr * std, value - mean),
        (_ZSCORE, value, z, thr, mean, std, len(window)),
    )


def _latch(rule: Rule, series: dict[str, Any], step: int, trips: bool, clean: bool) -> None:
    """Advance one series' trip/clear latch by one sample."""
    if trips:
        if series["since"] is None:
            series["since"] = step
        run = series["run"] + 1
        series["run"] = run
        series["clean"] = 0
        if run >= rule.consecutive:
            series["tripped"] = True
        return
    series["run"] = 0
    if not series["tripped"]:
        series["since"] = None
    elif clean:
        count = series["clean"] + 1
        if count >= rule.clear_after:
            series["tripped"] = False
            series["since"] = None
            count = 0
        series["clean"] = count
    else:  # between the clear and trip bounds: hold the latch, restart the clean count
        series["clean"] = 0


# Conditions whose check can be rebuilt after the sample was absorbed (``_check`` on the
# series as it is now gives the same bound and text): the verdict depends on the value and on
# statistics the sample does not change. A ``drop_from_baseline`` check is so once the baseline
# is known (it freezes then); before, ``_step_fused`` keeps the check itself.
_REBUILDABLE = frozenset(
    {Condition.ABOVE, Condition.BELOW, Condition.NON_FINITE, Condition.DROP_FROM_BASELINE}
)
_NO_BASELINE_CHECK: _Check = (False, True, None, _NO_BASELINE)


def _step_fused(
    rule: Rule,
    all_series: dict[str, Any],
    step: int,
    values: dict[str, float],
    members: list[str],
    checks: dict[str, _Check],
) -> None:
    """``_step_series`` over a step's targets for a ``_REBUILDABLE`` condition, in one loop.

    The hot path of ingest (the default pack is plain bounds and one baseline rule): one loop
    with the check and the latch inlined, and no check tuple per target, as ``_check`` on the
    updated series gives its bound and text again on a transition. Same results as
    ``_step_series``.
    """
    cond = rule.condition
    finite_ok = cond is Condition.NON_FINITE
    above = cond is Condition.ABOVE
    drop = cond is Condition.DROP_FROM_BASELINE
    thr: float = rule.threshold  # type: ignore[assignment]  # None only for non_finite
    clear = thr if rule.clear_threshold is None else rule.clear_threshold
    if not (finite_ok or drop) and _all_inside(values, thr, above):
        _step_inside(rule, all_series, step, values, clear, above)
        return
    step_ok = step >= rule.min_step
    warmup = rule.warmup
    baseline_samples = rule.baseline_samples
    for target in members:
        series = all_series.get(target)
        if series is None:
            series = all_series[target] = _new_series(cond)
        value = values[target]
        # -- the verdict (as _check), before the statistics absorb the sample
        if not isfinite(value):
            trips, clean = True, False
        else:
            if finite_ok:
                trips, clean = False, True
            elif drop:
                b_n = series.get("b_n", 0)
                if b_n < baseline_samples:
                    trips, clean = False, True
                    checks[target] = _NO_BASELINE_CHECK
                    series["b_sum"] = series.get("b_sum", 0.0) + value
                    series["b_n"] = b_n + 1
                else:
                    base = series["b_sum"] / b_n
                    trips = value < thr * base and step_ok and series["n"] >= warmup
                    clean = value >= clear * base
            elif above:
                trips = value > thr and step_ok and series["n"] >= warmup
                clean = value <= clear
            else:
                trips = value < thr and step_ok and series["n"] >= warmup
                clean = value >= clear
            series["n"] += 1
        # -- the latch (as _latch); the common case first: healthy and not tripped
        if not trips and not series["tripped"]:
            series["run"] = 0
            series["since"] = None
        else:
            _latch(rule, series, step, trips, clean)


def _all_inside(values: dict[str, float], thr: float, above: bool) -> bool:
    """Whether every value of the step is finite and on the safe side of an above/below bound:
    the usual step, which no target trips whatever its warm-up."""
    try:
        if not isfinite(math.fsum(values.values())):  # NaN/Inf in, or an overflow
            return False
    except (ValueError, OverflowError):  # inf + -inf, or an intermediate overflow
        return False
    return max(values.values()) <= thr if above else min(values.values()) >= thr


def _step_inside(
    rule: Rule,
    all_series: dict[str, Any],
    step: int,
    values: dict[str, float],
    clear: float,
    above: bool,
) -> None:
    """``_step_fused`` for a step that ``_all_inside`` passed: no sample trips, so each series
    absorbs its sample and a latch moves only where a target was tripped or on its way."""
    cond = rule.condition
    for target, value in values.items():
        series = all_series.get(target)
        if series is None:
            series = all_series[target] = _new_series(cond)
        series["n"] += 1
        if series["tripped"]:
            _latch(rule, series, step, False, value <= clear if above else value >= clear)
        elif series["run"]:  # tripping samples short of `consecutive`: the run is broken
            series["run"] = 0
            series["since"] = None


def _step_series(rule: Rule, series: dict[str, Any], step: int, value: float) -> _Check:
    """Check one sample of a series, advance its trip/clear latch, absorb it in the statistics."""
    check = _check(rule, series, step, value)
    _latch(rule, series, step, check[0], check[1])
    # -- statistics: only finite values, after the check, and only those the condition needs
    if isfinite(value):
        series["n"] += 1
        cond = rule.condition
        if cond is Condition.DROP_FROM_BASELINE:
            b_n = series.get("b_n", 0)
            if b_n < rule.baseline_samples:
                series["b_sum"] = series.get("b_sum", 0.0) + value
                series["b_n"] = b_n + 1
        elif cond is Condition.RATIO_TO_EMA:
            ema = series.get("ema")
            # The EMA always follows the run, tripping samples included: PSS skips the update
            # because it also discards the step; a monitor watches a run that goes on.
            series["ema"] = (
                value if ema is None else rule.ema_alpha * value + (1 - rule.ema_alpha) * ema
            )
        elif cond is Condition.ZSCORE:
            # A new list, never an in-place edit: the copy of the state shares the old one.
            series["window"] = [*series.get("window", ()), value][-rule.window :]
    return check


def _aggregate(aggregation: Aggregation, values: Sequence[float]) -> float:
    # Fast paths, one pass, for the usual all-finite (and, for gmean, all-positive) step; a
    # finite sum proves that, and the result is then the general path's.
    try:
        if aggregation is Aggregation.GMEAN:
            log_sum = math.fsum(map(math.log, values))  # ValueError for a value <= 0
            if isfinite(log_sum):
                return math.exp(log_sum / len(values))
        elif aggregation is Aggregation.MEAN:
            total = math.fsum(values)  # ValueError for inf + -inf
            if isfinite(total):
                return total / len(values)
    except (ValueError, OverflowError):
        pass
    if any(math.isnan(v) for v in values):
        return math.nan
    if aggregation is Aggregation.MIN:
        return min(values)
    if aggregation is Aggregation.MAX:
        return max(values)
    if aggregation is Aggregation.GMEAN:
        # exp(mean log x): the early-layer stable-rank aggregate of MSign Fig. 1. Defined for
        # x >= 0; a negative value makes it NaN (which trips, like any non-finite value).
        if any(v < 0 for v in values):
            return math.nan
        if any(v == 0 for v in values):
            return 0.0
        if any(math.isinf(v) for v in values):
            return math.inf
        return math.exp(math.fsum(math.log(v) for v in values) / len(values))
    infinite = {v for v in values if math.isinf(v)}
    if infinite:
        return math.nan if len(infinite) == 2 else infinite.pop()
    return math.fsum(values) / len(values)


def _ready_step(
    state: dict[str, Any],
    buffer: dict[int, dict[str, Any]],
    steps: list[int],
    i: int,
    max_pending_steps: int,
) -> bool:
    """Whether ``steps[i]``, the oldest buffered step, is evaluated now (module policy)."""
    first = steps[i]
    if len(steps) - i > max_pending_steps:
        return True  # bounded lag: stop waiting for a target or a gap
    expected = state["expected"]
    if not expected:
        return len(steps) - i > 1  # first step: wait until a later step shows its batch is over
    if expected == ALL_SERIES:
        if not state["series"].keys() <= buffer[first].keys():
            return False
    elif not set(expected) <= buffer[first].keys():
        return False
    stride, watermark = state["stride"], state["watermark"]
    # A step further than one stride ahead seems to follow a missing one; wait for it.
    return stride is None or first <= watermark + stride


def _runbook(rule: Rule) -> str:
    return rule.runbook or default_runbook(rule)


def _describe(rule: Rule) -> str:
    if rule.aggregation is Aggregation.ANY:
        scope = "any target"
    elif rule.aggregation is Aggregation.ALL:
        scope = "all targets"
    elif rule.aggregation is Aggregation.AT_LEAST_K:
        scope = f"at least {rule.k} targets"
    else:
        scope = f"{rule.aggregation.value} over targets"
    times = f" for {rule.consecutive} consecutive samples" if rule.consecutive > 1 else ""
    return f"{scope}{times}"


def _evaluate_step(
    rule: Rule,
    state: dict[str, Any],
    step: int,
    values: dict[str, float],
    members: list[str],
) -> list[Transition]:
    """Evaluate one complete step: per-target series, aggregation, alert latch, actions.

    ``members`` is ``sorted(values)``. Messages and target lists are built only on a transition.
    """
    all_series = state["series"]
    checks: dict[str, _Check] = {}
    rebuildable = rule.condition in _REBUILDABLE
    if rebuildable:
        _step_fused(rule, all_series, step, values, members, checks)
    else:
        for target in members:
            series = all_series.get(target)
            if series is None:
                series = all_series[target] = _new_series(rule.condition)
            checks[target] = _step_series(rule, series, step, values[target])

    def check_of(target: str) -> _Check:
        check = checks.get(target)
        if check is None:  # only for _REBUILDABLE conditions
            return _check(rule, all_series[target], step, values[target])
        return check

    agg_value: float | None = None
    agg_check: _Check | None = None
    agg_since: int | None = None
    if rule.aggregation in BOOLEAN_AGGREGATIONS:
        tripped = [t for t in members if all_series[t]["tripped"]]
        if rule.aggregation is Aggregation.ANY:
            active = len(tripped) >= 1
        elif rule.aggregation is Aggregation.ALL:
            active = len(tripped) == len(members) > 0
        else:
            active = len(tripped) >= int(rule.k)  # type: ignore[arg-type]
    else:
        agg_value = _aggregate(rule.aggregation, [values[t] for t in members])
        if state["aggregate"] is None:
            state["aggregate"] = _new_series(rule.condition)
        agg_series = state["aggregate"]
        agg_check = _step_series(rule, agg_series, step, agg_value)
        active = bool(agg_series["tripped"])
        agg_since = agg_series["since"]

    def reported_and_first_step() -> tuple[list[str], int]:
        """The targets a firing names and the step its trouble began (only on firing)."""
        if agg_check is None:
            reported = tripped
            starts = [all_series[t]["since"] for t in tripped]
        else:
            # The layers that moved: those crossing the condition on their own series.
            reported = [t for t in members if all_series[t]["since"] is not None] or members
            starts = [all_series[t]["since"] for t in reported]
            starts.append(agg_since)
        return reported, min((s for s in starts if s is not None), default=step)

    if not rule.enabled:
        return []  # statistics stay current; the alert latch waits for the rule to be enabled
    alert = state["alert"]
    transitions: list[Transition] = []

    def hits(names: Iterable[str]) -> tuple[TargetHit, ...]:
        out = []
        for t in names:
            if t not in values:
                continue
            since = all_series[t]["since"]
            out.append(TargetHit(t, values[t], since, check_of(t)[2]))
        # Ordered by how early each target itself started to trip; never-tripped ones last.
        out.sort(key=lambda h: (h.since is None, h.since if h.since is not None else 0, h.target))
        return tuple(out)

    if not alert["firing"]:
        cooldown_until = alert["cooldown_until"]
        if active and (cooldown_until is None or step >= cooldown_until):
            reported, first_step = reported_and_first_step()
            alert["firing"] = True
            alert["episode"] += 1
            alert["first_step"] = first_step
            alert["fired_step"] = step
            target_hits = hits(reported)
            alert["targets"] = [h.target for h in target_hits]
            if agg_check is not None:
                what = (
                    f"{rule.aggregation.value}({rule.quantity}) over {len(members)} target(s) "
                    f"= {_detail(agg_check)}"
                )
                moved = ", ".join(
                    f"{h.target} = {_fmt(h.value)}"
                    + (f" (since step {h.since})" if h.since is not None else "")
                    for h in target_hits[:5]
                )
                message = f"{what}; layers that moved first: {moved}"
                bound = agg_check[2]
            else:
                parts = [
                    f"{h.target}: {_detail(check_of(h.target))}"
                    + (f" since step {h.since}" if h.since is not None else "")
                    for h in target_hits[:5]
                ]
                more = f" and {len(target_hits) - 5} more" if len(target_hits) > 5 else ""
                message = (
                    f"{rule.quantity} on {len(target_hits)} of {len(members)} target(s) "
                    f"({_describe(rule)}): " + "; ".join(parts) + more
                )
                bound = target_hits[0].bound if target_hits else None
            message = f"[{rule.severity.value}] rule {rule.name!r}: {message} (step {step})"
            command, suppressed = (
                _order(rule, state, step) if rule.action is not None else (None, False)
            )
            transitions.append(
                Transition(
                    kind=TransitionKind.FIRING,
                    rule=rule.name,
                    quantity=rule.quantity,
                    severity=rule.severity,
                    episode=alert["episode"],
                    step=step,
                    first_step=first_step,
                    targets=target_hits,
                    value=agg_value,
                    bound=bound,
                    message=message,
                    suggested_action=_runbook(rule),
                    notify=rule.notify,
                    command=command,
                    command_suppressed=suppressed,
                )
            )
    elif active and _repeat_due(rule, state, step):
        command, suppressed = _order(rule, state, step)
        if command is not None:
            transitions.append(
                Transition(
                    kind=TransitionKind.REPEAT,
                    rule=rule.name,
                    quantity=rule.quantity,
                    severity=rule.severity,
                    episode=alert["episode"],
                    step=step,
                    first_step=int(alert["first_step"]),
                    targets=(),
                    value=agg_value,
                    bound=None,
                    message=f"[repeat] rule {rule.name!r} still firing at step {step}: "
                    f"{command['kind']} ordered again",
                    suggested_action=_runbook(rule),
                    notify=False,
                    command=command,
                    command_suppressed=suppressed,
                )
            )
    elif not active:
        alert["firing"] = False
        alert["cooldown_until"] = step + rule.cooldown
        target_hits = hits(alert["targets"])
        shown = ", ".join(f"{h.target} = {_fmt(h.value)}" for h in target_hits[:5])
        value_text = (
            f" {rule.aggregation.value} = {_fmt(agg_value)};" if agg_value is not None else ""
        )
        message = (
            f"[resolved] rule {rule.name!r}: {rule.quantity} back within bounds at step {step};"
            f"{value_text} {shown or 'targets not reported at this step'}"
            f" (fired at step {alert['fired_step']}, first step {alert['first_step']})"
        )
        transitions.append(
            Transition(
                kind=TransitionKind.RESOLVED,
                rule=rule.name,
                quantity=rule.quantity,
                severity=rule.severity,
                episode=alert["episode"],
                step=step,
                first_step=int(alert["first_step"]),
                targets=target_hits,
                value=agg_value,
                bound=None,
                message=message,
                suggested_action=_runbook(rule),
                notify=rule.notify,
            )
        )
    return transitions


def _order(rule: Rule, state: dict[str, Any], step: int) -> tuple[dict[str, Any] | None, bool]:
    """The command the rule's enabled action orders at this step, or (None, True) when the
    rate limit holds it back."""
    action = rule.action
    assert action is not None  # callers check
    horizon = step - action.window_steps
    recent = [s for s in state["msign_steps"] if s > horizon]
    command: dict[str, Any] | None = None
    if len(recent) < action.max_orders:
        command = action.command()
        recent.append(step)
    state["msign_steps"] = recent
    return command, command is None


def _repeat_due(rule: Rule, state: dict[str, Any], step: int) -> bool:
    """Whether a firing alert should order its command again at ``step``."""
    action = rule.action
    every = action.repeat_every if action is not None else None
    if every is None:
        return False
    last = max(state["msign_steps"], default=None)
    return last is None or step - last >= every


def _buffer(state: dict[str, Any]) -> dict[int, dict[str, float]]:
    """The pending list as {step: {target: value}} (the stored form is a flat encoded list)."""
    buffer: dict[int, dict[str, float]] = {}
    try:
        for step, target, value in state["pending"]:
            buffer.setdefault(int(step), {})[target] = decode_float(value)
    except (KeyError, TypeError, ValueError) as exc:
        raise RuleError(
            f"state is malformed (pending: {type(exc).__name__}: {exc}); "
            "use a state from new_state()"
        ) from None
    return buffer


# Selector verdicts per target-glob tuple, shared by calls: a run's target names recur in every
# batch, and fnmatch costs more than the rest of a sample's ingest. Bounded, as target names
# come from clients.
_SELECTIONS: dict[tuple[str, ...], dict[str, bool]] = {}
_SELECTIONS_MAX_GLOBS = 1024
_SELECTIONS_MAX_TARGETS = 65536


def _selection(rule: Rule) -> dict[str, bool]:
    selection = _SELECTIONS.get(rule.targets)
    if selection is None or len(selection) > _SELECTIONS_MAX_TARGETS:
        if len(_SELECTIONS) >= _SELECTIONS_MAX_GLOBS:
            _SELECTIONS.clear()
        selection = _SELECTIONS[rule.targets] = {}
    return selection


def _selected(rule: Rule, selection: dict[str, bool], target: str) -> bool:
    verdict = selection.get(target)
    if verdict is None:
        verdict = selection[target] = rule.matches_target(target)
    return verdict


def _group(samples: Iterable[Any]) -> dict[int, dict[str, float]]:
    """Validated ``(target, step, value)`` samples as {step: {target: value}}, the first value
    of a (target, step) kept, as ingest keeps the first."""
    by_step: dict[int, dict[str, float]] = {}
    last_step: Any = None
    at_step: dict[str, float] = {}
    for sample in samples:
        target, raw_step, raw = sample
        if type(target) is not str:
            raise RuleError(f"sample target={target!r} is not valid; use a string")
        if type(raw_step) is int and type(raw) is float:  # what ingest hands over
            step, value = raw_step, raw
        else:
            try:
                if isinstance(raw_step, bool):
                    raise TypeError
                step = operator.index(raw_step)
                value = decode_float(raw)
            except (TypeError, ValueError):
                raise RuleError(
                    f"sample ({target!r}, {raw_step!r}, {raw!r}) is not valid; use an integer "
                    "step and a number or 'NaN'/'Infinity'/'-Infinity'"
                ) from None
        if step != last_step:  # samples come grouped by step: look the step up once a group
            at_step = by_step.setdefault(step, {})
            last_step = step
        if target not in at_step:
            at_step[target] = value
    return by_step


def _merge(
    rule: Rule,
    state: dict[str, Any],
    buffer: dict[int, dict[str, float]],
    by_step: Mapping[int, Mapping[str, float]],
) -> None:
    """Add new samples, grouped by step, to the pending buffer: only the rule's targets, only
    steps after the watermark, and the first value of a (target, step) wins."""
    watermark = state["watermark"]
    # A catch-all selector keeps every target: whole dicts merge without a per-target test.
    every_target = rule.targets == ("*",)
    selection = _selection(rule)
    for step, values in by_step.items():
        if watermark is not None and step <= watermark:
            continue  # replay or later than the bounded lag: changes nothing
        if not every_target:
            values = {t: v for t, v in values.items() if _selected(rule, selection, t)}
        if not values:
            continue
        held = buffer.get(step)
        # {**new, **held}: what was buffered first keeps its value.
        buffer[step] = dict(values) if held is None else {**values, **held}


def _drain(
    rule: Rule,
    state: dict[str, Any],
    buffer: dict[int, dict[str, float]],
    max_pending_steps: int,
    force: bool,
) -> list[Transition]:
    transitions: list[Transition] = []
    steps = sorted(buffer)
    i = 0
    while i < len(steps) and (force or _ready_step(state, buffer, steps, i, max_pending_steps)):
        step = steps[i]
        values = buffer.pop(step)
        members = sorted(values)
        if state["watermark"] is not None:
            state["stride"] = step - state["watermark"]
        state["watermark"] = step
        state["expected"] = members
        transitions.extend(_evaluate_step(rule, state, step, values, members))
        i += 1
    state["pending"] = [
        [s, t, encode_float(v)] for s in sorted(buffer) for t, v in sorted(buffer[s].items())
    ]
    expected = state["expected"]
    # Every step's targets get a series, so equal sizes mean equal sets: store the short form.
    if expected and expected != ALL_SERIES and len(expected) == len(state["series"]):
        state["expected"] = ALL_SERIES
    return transitions


def evaluate(
    rule: Rule,
    state: Mapping[str, Any] | None,
    samples: Iterable[Any],
    *,
    max_pending_steps: int = DEFAULT_MAX_PENDING_STEPS,
) -> tuple[dict[str, Any], list[Transition]]:
    """Feed new samples of ``rule.quantity`` to a rule; return the new state and transitions.

    ``samples`` are ``(target, step, value)`` triples in any order; targets outside the rule's
    selector are ignored, so the caller may pass every new sample of the quantity. ``value`` may
    be a float or one of the contract's strings for non-finite values. A disabled rule still
    tracks its statistics (so enabling it later does not misfire on a stale baseline) but
    emits no transitions.
    """
    return evaluate_steps(rule, state, _group(samples), max_pending_steps=max_pending_steps)


def evaluate_steps(
    rule: Rule,
    state: Mapping[str, Any] | None,
    by_step: Mapping[int, Mapping[str, float]],
    *,
    max_pending_steps: int = DEFAULT_MAX_PENDING_STEPS,
) -> tuple[dict[str, Any], list[Transition]]:
    """``evaluate`` for samples already grouped as {step: {target: value}} with ``int`` steps,
    ``str`` targets and ``float`` values (what ingest holds after validation): a whole step
    merges at once instead of sample by sample. The caller's dicts are not changed."""
    _check_int("max_pending_steps", max_pending_steps, 1)
    new = _checked_state(state, rule)
    buffer = _buffer(new)
    _merge(rule, new, buffer, by_step)
    return new, _drain(rule, new, buffer, max_pending_steps, force=False)


def flush(rule: Rule, state: Mapping[str, Any] | None) -> tuple[dict[str, Any], list[Transition]]:
    """Evaluate every buffered step now, in order (call when a run finishes)."""
    new = _checked_state(state, rule)
    return new, _drain(rule, new, _buffer(new), DEFAULT_MAX_PENDING_STEPS, force=True)


def is_firing(state: Mapping[str, Any] | None) -> bool:
    """Whether the alert of this (rule, run) state is firing."""
    return bool(state and state["alert"]["firing"])


__all__ = [
    "BOOLEAN_AGGREGATIONS",
    "DEFAULT_MAX_PENDING_STEPS",
    "MSIGN_ENGINES",
    "MSIGN_GROUPS",
    "MSIGN_HOWTO",
    "STATE_VERSION",
    "Aggregation",
    "Condition",
    "LRBackoffAction",
    "MSignAction",
    "Rule",
    "RuleError",
    "Severity",
    "TargetHit",
    "Transition",
    "TransitionKind",
    "decode_float",
    "default_runbook",
    "encode_float",
    "evaluate",
    "flush",
    "is_firing",
    "new_state",
]
