"""How far an alert rule is from firing, in the rule's own terms: the runs page's "rule nearest
to firing", the run page's rule table and the ``rankguard_run_rule_margin`` gauges.

A margin is the signed distance from the value a rule judges to its trip bound, in the units
the rule states its threshold in: the quantity's own units for ``above``/``below``, a ratio to
the series' baseline for ``drop_from_baseline``, a ratio to the EMA for ``ratio_to_ema``, a |z|
for ``zscore``, the threshold's units for the conditions judged against the series' own
past (a z, a ratio to the window's mean, the CUSUM: ``history.score``). It is negative
exactly when the engine's check trips on that value (the engine's comparisons are strict,
so a value on the bound, margin 0, does not trip). A NaN or
±Inf value trips every condition: margin -inf. tests/server/test_alert_margin.py holds every
kind to ``checks.check`` (and whole rules to the engine) with property tests.

``relative`` divides the margin by the bound's size, so rules in different units rank
together: 0.5 means the value is half the bound's size away from it. A bound of 0 has no size:
such a rule ranks as safe (+inf) until it trips (-inf).

What it reads: the rule, its stored engine state (the baseline, EMA or z-score window of each
series) and the latest value of each target. The state may already have absorbed that latest
value (ingest evaluates as it stores), so an EMA or a z-score window includes it: the margin is
"the latest value against the statistics as stored", a little kinder to a spike than the check
that judged it. A value aggregation (``gmean``...) is combined as the engine combines it.

A condition adds its margin in one place: a function registered with ``@distance_of`` below.
A condition without one (a kind newer than this module) gets no margin, and says so.

Standard library only, like the engine.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rankguard.server.alerts import history
from rankguard.server.alerts.engine import _combine as combine  # the engine's aggregation
from rankguard.server.alerts.rules import (
    BOOLEAN_AGGREGATIONS,
    HISTORY_CONDITIONS,
    Aggregation,
    Condition,
    Rule,
)
from rankguard.server.alerts.state import is_firing, new_series

# A rule whose relative margin is below this is "near" its bound (a quarter of the bound's
# size): a display choice, not a calibrated one.
NEAR = 0.25


@dataclass(frozen=True)
class Distance:
    """A value against a bound in a rule's units: ``margin`` < 0 exactly when it trips."""

    value: float
    bound: float | None
    margin: float
    unit: str = ""  # appended to value and bound when shown ("× baseline", "|z|")


Judge = Callable[[Rule, Mapping[str, Any], float], "Distance | str"]
_KINDS: dict[str, Judge] = {}


def distance_of(condition: Condition) -> Callable[[Judge], Judge]:
    """Registers the margin of ``condition``: a function of (rule, one series' engine state,
    a finite value) returning a ``Distance``, or a string saying why there is none yet."""

    def register(judge: Judge) -> Judge:
        _KINDS[condition.value] = judge
        return judge

    return register


def known_conditions() -> list[str]:
    """The conditions that have a margin."""
    return sorted(_KINDS)


@distance_of(Condition.ABOVE)
def _above(rule: Rule, series: Mapping[str, Any], value: float) -> Distance:
    thr = float(rule.threshold)  # type: ignore[arg-type]  # validated by Rule
    # For finite floats a - b < 0 exactly when a < b (IEEE subtraction keeps the sign).
    return Distance(value, thr, thr - value)


@distance_of(Condition.BELOW)
def _below(rule: Rule, series: Mapping[str, Any], value: float) -> Distance:
    thr = float(rule.threshold)  # type: ignore[arg-type]
    return Distance(value, thr, value - thr)


@distance_of(Condition.DROP_FROM_BASELINE)
def _drop(rule: Rule, series: Mapping[str, Any], value: float) -> Distance | str:
    b_n = int(series.get("b_n", 0))
    if b_n < rule.baseline_samples:
        return f"baseline not yet known ({b_n} of {rule.baseline_samples} samples)"
    thr = float(rule.threshold)  # type: ignore[arg-type]
    base = float(series["b_sum"]) / b_n
    gap = value - thr * base  # the engine trips on value < thr * base: the sign is exact
    if base == 0:
        return Distance(value, 0.0, gap)  # no ratio to a zero baseline: the raw values
    margin = gap / abs(base)
    if margin == 0 and gap != 0:  # underflow: keep the sign the engine sees
        margin = math.copysign(5e-324, gap)
    return Distance(value / base, thr, margin, "× baseline")


@distance_of(Condition.RATIO_TO_EMA)
def _ratio(rule: Rule, series: Mapping[str, Any], value: float) -> Distance | str:
    ema = series.get("ema")
    if ema is None or ema <= 0:
        return "EMA not yet positive"
    thr = float(rule.threshold)  # type: ignore[arg-type]
    ratio = value / ema  # the engine's own ratio: trips on ratio > thr
    return Distance(ratio, thr, thr - ratio, "× EMA")


@distance_of(Condition.ZSCORE)
def _zscore(rule: Rule, series: Mapping[str, Any], value: float) -> Distance | str:
    window: Sequence[float] = series.get("window", ())
    if len(window) < rule.window:
        return f"z-score window not yet full ({len(window)} of {rule.window} samples)"
    # As checks.check computes it (the property test holds the two together).
    mean = math.fsum(window) / len(window)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in window) / len(window))
    z = abs(value - mean) / std if std > 0 else (0.0 if value == mean else math.inf)
    thr = float(rule.threshold)  # type: ignore[arg-type]
    return Distance(z, thr, thr - z, "|z|")


def _history(rule: Rule, series: Mapping[str, Any], value: float) -> Distance | str:
    """The conditions judged against the series' own past (history.py), in the units of their
    threshold (a z, a ratio to the mean or the best, the CUSUM): margin = threshold - score.
    Where the condition is more than one bound (``rise_over_mean`` needs a rising value;
    ``>=`` trips on the bound itself) the check's verdict sets the sign: 0 when it does not
    trip, the smallest negative float when it does and the distance says otherwise."""
    state = dict(series)
    trips, _, bound, why = history.verdict(rule, state, value, True)
    if bound is None:
        return str(why[0])  # the statistic is not ready ("window not yet full")
    figure, thr, unit = history.score(rule, state, value)
    margin = thr - figure
    if trips and not margin < 0:
        margin = -5e-324
    elif not trips and margin < 0:
        margin = 0.0
    return Distance(figure, thr, margin, unit)


for _condition in HISTORY_CONDITIONS:
    distance_of(_condition)(_history)


@distance_of(Condition.NON_FINITE)
def _non_finite(rule: Rule, series: Mapping[str, Any], value: float) -> Distance:
    return Distance(value, None, math.inf)  # a finite value never trips it


def distance(rule: Rule, series: Mapping[str, Any] | None, value: float) -> Distance | str:
    """One value of one series against the rule (the check's verdict as a distance), or why
    there is no margin. ``series`` is that series' engine state (None: nothing seen yet)."""
    if not math.isfinite(value):
        return Distance(value, None, -math.inf)  # NaN and ±Inf trip every condition
    judge = _KINDS.get(rule.condition.value)
    if judge is None:
        return f"no margin for condition {rule.condition.value!r} yet"
    return judge(rule, series if series is not None else new_series(rule.condition), value)


@dataclass(frozen=True)
class Margin:
    """How far one rule of a run is from firing. ``margin`` None: not assessed (``note`` says
    why). ``target`` is the target that decides (boolean aggregations) or the aggregate."""

    rule: str
    quantity: str
    condition: str
    severity: str
    firing: bool
    margin: float | None = None
    relative: float | None = None
    value: float | None = None
    bound: float | None = None
    unit: str = ""
    target: str | None = None
    step: int | None = None
    armed: bool = True  # past warm-up and min_step: a value over the bound trips now
    # Not assessed although it could fire (it has data: statistics not ready, or a condition
    # without a margin). A rule without data or disabled cannot fire: not pending.
    pending: bool = False
    note: str = ""

    @property
    def assessed(self) -> bool:
        return self.margin is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "quantity": self.quantity,
            "condition": self.condition,
            "severity": self.severity,
            "firing": self.firing,
            "margin": self.margin,
            "relative": self.relative,
            "value": self.value,
            "bound": self.bound,
            "unit": self.unit,
            "target": self.target,
            "step": self.step,
            "armed": self.armed,
            "pending": self.pending,
            "note": self.note,
            "text": describe(self),
        }


def relative(d: Distance) -> float:
    """The margin as a fraction of the bound's size (the ranking key across rules)."""
    if d.margin < 0 and (d.bound is None or d.bound == 0 or math.isinf(d.margin)):
        return -math.inf
    if d.bound is None or d.bound == 0:
        return math.inf
    return d.margin / abs(d.bound)


def _decisive(rule: Rule, judged: list[tuple[str, Distance]]) -> tuple[str, Distance] | None:
    """The target whose margin is the rule's: for ``any`` the nearest, for ``all`` the
    farthest (every target must trip), for ``at_least_k`` the k-th nearest. A target without
    a margin cannot trip now: it never decides, so ``all`` (or ``at_least_k`` short of k
    assessed targets) has no margin until it can (None)."""
    ordered = sorted(judged, key=lambda item: (item[1].margin, item[0]))
    if rule.aggregation is Aggregation.ANY:
        return ordered[0] if ordered else None
    if rule.aggregation is Aggregation.ALL:
        return ordered[-1] if ordered else None
    k = int(rule.k)  # type: ignore[arg-type]  # validated for at_least_k
    return ordered[k - 1] if len(ordered) >= k else None


# Conditions whose margin reads no statistic: with no warm-up either, a rule of these needs
# only whether it fires, not its engine state (a reader of many runs may skip the state).
_STATELESS = frozenset({Condition.ABOVE.value, Condition.BELOW.value, Condition.NON_FINITE.value})


def needs_state(rule: Rule) -> bool:
    """Whether ``rule_margin`` reads the rule's engine state beyond its firing latch."""
    return rule.condition.value not in _STATELESS or rule.warmup > 0


def rule_margin(
    rule: Rule,
    state: Mapping[str, Any] | None,
    latest: Mapping[str, tuple[int, float]],
    *,
    firing: bool | None = None,
) -> Margin:
    """The margin of ``rule`` given its engine ``state`` and the latest (step, value) of each
    target of its quantity (targets outside its selector are ignored). ``firing`` overrides
    the state's alert latch (a caller that knows it without the state, see ``needs_state``)."""
    head = (rule.name, rule.quantity, rule.condition.value, rule.severity.value)
    fires = is_firing(state) if firing is None else firing

    def make(**fields: Any) -> Margin:
        return Margin(*head, fires, **fields)

    if not rule.enabled:
        return make(note="rule disabled")
    chosen = {t: sv for t, sv in latest.items() if rule.matches_target(t)}
    if not chosen:
        return make(note=f"no {rule.quantity} data yet")
    step = max(s for s, _ in chosen.values())
    all_series: Mapping[str, Any] = (state or {}).get("series") or {}
    if rule.aggregation in BOOLEAN_AGGREGATIONS:
        judged: list[tuple[str, Distance]] = []
        reasons: list[str] = []
        for target, (_, value) in chosen.items():
            d = distance(rule, all_series.get(target), value)
            if isinstance(d, str):
                reasons.append(d)
            else:
                judged.append((target, d))
        if reasons and rule.aggregation is Aggregation.ALL:
            judged = []  # a target that cannot trip yet keeps "all" from firing
        picked = _decisive(rule, judged)
        if picked is None:
            if not reasons:  # at_least_k with fewer targets than k: it cannot fire
                return make(step=step, note=f"fewer than {rule.k} targets report")
            return make(step=step, pending=True, note=reasons[0])
        target, d = picked
        series = all_series.get(target)
        note = f"{len(reasons)} target(s) not assessed yet: {reasons[0]}" if reasons else ""
    else:
        names = sorted(chosen)
        value = combine(rule.aggregation, [chosen[t][1] for t in names])
        series = (state or {}).get("aggregate")
        d_or_reason = distance(rule, series, value)
        target = f"{rule.aggregation.value} over {len(names)} target(s)"
        if isinstance(d_or_reason, str):
            return make(target=target, step=step, pending=True, note=d_or_reason)
        d, note = d_or_reason, ""
    seen = int(series["n"]) if series else 0
    armed = seen >= rule.warmup and step >= rule.min_step
    if not armed:
        note = (note + "; " if note else "") + (
            f"warming up ({seen} of {rule.warmup} samples, min step {rule.min_step})"
        )
    return make(
        margin=d.margin,
        relative=relative(d),
        value=d.value,
        bound=d.bound,
        unit=d.unit,
        target=target,
        step=step,
        armed=armed,
        note=note,
    )


def _num(value: float | None) -> str:
    if value is None:
        return "n/a"
    if math.isnan(value):
        return "NaN"
    return f"{value:.4g}" if math.isfinite(value) else str(value).replace("inf", "Inf")


def describe(m: Margin) -> str:
    """One line in the rule's own terms, e.g. ``0.31 × baseline vs bound 0.12 × baseline
    (margin 0.19)``."""
    if m.margin is None:
        return m.note or "not assessed"
    unit = f" {m.unit}" if m.unit else ""
    if m.bound is None:
        return "finite (trips only on NaN/Inf)" if m.margin > 0 else f"{_num(m.value)}: not finite"
    text = f"{_num(m.value)}{unit} vs bound {_num(m.bound)}{unit} (margin {_num(m.margin)})"
    return f"{text}; {m.note}" if m.note else text


def nearest(margins: Sequence[Margin]) -> Margin | None:
    """The assessed rule nearest to firing (smallest relative margin; firing rules first)."""
    assessed = [m for m in margins if m.relative is not None]
    if not assessed:
        return None
    return min(assessed, key=lambda m: (not m.firing, m.relative, m.rule))


def health(margins: Sequence[Margin], alerts_firing: int) -> str:
    """A run's badge: ``firing`` (an alert fires), ``tripping`` (a value is past a bound, not
    yet fired: consecutive samples, warm-up, cooldown), ``near`` (within NEAR of a bound),
    ``ok`` (every rule that has data is assessed and clear: certified not at risk), or
    ``unknown`` (a rule with data cannot be assessed yet, or none has data)."""
    if alerts_firing > 0 or any(m.firing for m in margins):
        return "firing"
    assessed = [m for m in margins if m.relative is not None]
    if any(m.relative < 0 for m in assessed if m.relative is not None):
        return "tripping"
    if any(m.relative < NEAR for m in assessed if m.relative is not None):
        return "near"
    return "ok" if assessed and not any(m.pending for m in margins) else "unknown"


__all__ = [
    "NEAR",
    "Distance",
    "Margin",
    "describe",
    "distance",
    "distance_of",
    "health",
    "known_conditions",
    "nearest",
    "needs_state",
    "relative",
    "rule_margin",
]
