"""The per-sample rule: the verdict on one value of one series (``check``), the trip/clear
latch it advances (``latch``) and the statistics it feeds (``absorb``); ``step_series`` is
the three in order, the reference every other path must agree with.

Cost model: this is the hot path of ingest (one call per rule, target and sampled step). So
``step_targets`` takes a fused path for the conditions whose check can be rebuilt later
(plain bounds and the frozen baseline, most of the default pack): one loop with the check and
the latch inlined and no ``Check`` per target, plus an all-inside shortcut for the usual step
where every value is finite and on the safe side of an above/below bound.
tests/server/test_alert_checks.py ties both to ``step_series`` with a property test.
"""

from __future__ import annotations

import math
from math import isfinite
from typing import Any, NamedTuple

from rankguard.server.alerts import history
from rankguard.server.alerts.rules import HISTORY_CONDITIONS, Condition, Rule
from rankguard.server.alerts.state import new_series


class Check(NamedTuple):
    """The verdict on one value of one series, taken before its statistics absorb it.

    ``why`` is a ``str.format`` template and its arguments: the text is built only when a
    transition reports it (:func:`detail`), since almost no sample trips.
    """

    trips: bool
    clean: bool
    bound: float | None
    why: tuple[Any, ...]


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
_NO_BASELINE_CHECK = Check(False, True, None, _NO_BASELINE)


def detail(check: Check) -> str:
    """The human-readable verdict of a check (``{:.4g}`` numbers)."""
    template: str = check.why[0]
    return template.format(*check.why[1:])


def check(rule: Rule, series: dict[str, Any], step: int, value: float) -> Check:
    """The verdict on ``value`` at ``step`` given the series' state before it."""
    cond = rule.condition
    if not isfinite(value):
        return Check(True, False, None, (_NOT_FINITE, value))
    if cond is Condition.NON_FINITE:
        return Check(False, True, None, _FINITE)
    thr: float = rule.threshold  # type: ignore[assignment]  # a float: validated by Rule
    clear = thr if rule.clear_threshold is None else rule.clear_threshold
    warm = series["n"] >= rule.warmup and step >= rule.min_step
    if cond in HISTORY_CONDITIONS:
        trips, clean, bound, why = history.verdict(rule, series, value, warm)
        return Check(trips, clean, bound, why)
    if cond is Condition.ABOVE:
        return Check(warm and value > thr, value <= clear, thr, (_ABOVE, value, thr))
    if cond is Condition.BELOW:
        return Check(warm and value < thr, value >= clear, thr, (_BELOW, value, thr))
    if cond is Condition.DROP_FROM_BASELINE:
        # .get: a statistic this condition has not stored yet starts empty (new_series)
        b_n = series.get("b_n", 0)
        if b_n < rule.baseline_samples:
            return _NO_BASELINE_CHECK
        base = series["b_sum"] / b_n
        bound = thr * base
        return Check(
            warm and value < bound, value >= clear * base, bound, (_DROP, value, thr, base, bound)
        )
    if cond is Condition.RATIO_TO_EMA:
        ema = series.get("ema")
        if ema is None or ema <= 0:
            # A ratio to a zero or negative EMA has no meaning for norms; stay quiet.
            return Check(False, True, None, _NO_EMA)
        ratio = value / ema
        why = (_RATIO, value, ratio, ema, thr)
        return Check(warm and ratio > thr, ratio <= clear, thr * ema, why)
    # ZSCORE over the trailing window of previous finite values (population std).
    window = series.get("window", ())
    if len(window) < rule.window:
        return Check(False, True, None, _NO_WINDOW)
    mean = math.fsum(window) / len(window)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in window) / len(window))
    # A constant window has std 0: any different value is an infinite z-score.
    z = abs(value - mean) / std if std > 0 else (0.0 if value == mean else math.inf)
    bound = mean + math.copysign(thr * std, value - mean)
    return Check(
        warm and z > thr, z <= clear, bound, (_ZSCORE, value, z, thr, mean, std, len(window))
    )


def latch(rule: Rule, series: dict[str, Any], step: int, trips: bool, clean: bool) -> None:
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


def absorb(rule: Rule, series: dict[str, Any], value: float) -> None:
    """Feed one value to the statistics: only finite values, only those the condition needs."""
    if not isfinite(value):
        return
    cond = rule.condition
    if cond in HISTORY_CONDITIONS:
        history.absorb(rule, series, value)  # reads the count before this sample
    series["n"] += 1
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


def step_series(rule: Rule, series: dict[str, Any], step: int, value: float) -> Check:
    """The reference: check one sample of a series, advance its latch, absorb it."""
    verdict = check(rule, series, step, value)
    latch(rule, series, step, verdict.trips, verdict.clean)
    absorb(rule, series, value)
    return verdict


# Conditions whose check can be rebuilt after the sample was absorbed (``check`` on the series
# as it is now gives the same bound and text): the verdict depends on the value and on
# statistics the sample does not change. A ``drop_from_baseline`` check is so once the baseline
# is known (it freezes then); before, ``_step_fused`` keeps the check itself.
REBUILDABLE = frozenset(
    {Condition.ABOVE, Condition.BELOW, Condition.NON_FINITE, Condition.DROP_FROM_BASELINE}
)


class StepChecks:
    """The checks of one step's targets, after ``step_targets`` ran; those the fused path did
    not keep are rebuilt on demand (only a transition asks). A rebuilt check has the bound and
    the text of the original, which is what a transition reports; its ``trips``/``clean`` may
    differ (the series' warm-up count has moved on) and are not read."""

    __slots__ = ("_kept", "_rule", "_series", "_step", "_values")

    def __init__(
        self,
        rule: Rule,
        all_series: dict[str, Any],
        step: int,
        values: dict[str, float],
        kept: dict[str, Check],
    ) -> None:
        self._rule, self._series, self._step = rule, all_series, step
        self._values, self._kept = values, kept

    def of(self, target: str) -> Check:
        kept = self._kept.get(target)
        if kept is None:  # only for REBUILDABLE conditions
            return check(self._rule, self._series[target], self._step, self._values[target])
        return kept


def step_targets(
    rule: Rule, all_series: dict[str, Any], step: int, values: dict[str, float], members: list[str]
) -> StepChecks:
    """Run one step's samples (``members`` is ``sorted(values)``) through their series."""
    kept: dict[str, Check] = {}
    if rule.condition in REBUILDABLE:
        _step_fused(rule, all_series, step, values, members, kept)
    else:
        for target in members:
            series = all_series.get(target)
            if series is None:
                series = all_series[target] = new_series(rule.condition)
            kept[target] = step_series(rule, series, step, values[target])
    return StepChecks(rule, all_series, step, values, kept)


def _step_fused(
    rule: Rule,
    all_series: dict[str, Any],
    step: int,
    values: dict[str, float],
    members: list[str],
    kept: dict[str, Check],
) -> None:
    """``step_series`` over a step's targets for a ``REBUILDABLE`` condition, in one loop with
    ``check`` and ``latch`` inlined; keeps only the checks that cannot be rebuilt."""
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
            series = all_series[target] = new_series(cond)
        value = values[target]
        # -- the verdict, before the statistics absorb the sample
        if not isfinite(value):
            trips, clean = True, False
        else:
            if finite_ok:
                trips, clean = False, True
            elif drop:
                b_n = series.get("b_n", 0)
                if b_n < baseline_samples:
                    trips, clean = False, True
                    kept[target] = _NO_BASELINE_CHECK
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
        # -- the latch; the common case first: healthy and not tripped
        if not trips and not series["tripped"]:
            series["run"] = 0
            series["since"] = None
        else:
            latch(rule, series, step, trips, clean)


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
            series = all_series[target] = new_series(cond)
        series["n"] += 1
        if series["tripped"]:
            latch(rule, series, step, False, value <= clear if above else value >= clear)
        elif series["run"]:  # tripping samples short of `consecutive`: the run is broken
            series["run"] = 0
            series["since"] = None


__all__ = [
    "REBUILDABLE",
    "Check",
    "StepChecks",
    "absorb",
    "check",
    "detail",
    "latch",
    "step_series",
    "step_targets",
]
