"""Conditions judged against a series' own recent past: the detectors the peers ship, as rule
kinds of the engine, so a user moving to rankguard keeps the alert they had.

Each follows the published source (values and comparisons as there; the rules of the default
pack that use them name the product and its defaults):

- ``zscore_above`` (OLMo-core ``StabilityMonitorCallback._is_spike``): the value is above the
  mean + ``threshold`` x the population std of the previous ``window`` values; judged only once
  the window is full, and never when the std is below 1e-10.
- ``max_ratio`` (Megatron-LM ``RerunStateMachine.is_unexpectedly_large``): the first
  ``window`` samples only set a maximum of |value|, frozen afterwards; from then on
  |value| >= ``threshold`` x that maximum trips.
- ``ratio_to_mean`` (llm-foundry ``KillLossSpike``): value >= ``threshold`` x the mean of the
  previous ``window`` values, judged once the window is full (its patience is ``consecutive``:
  patience 4 = 5 consecutive outliers).
- ``rise_over_mean`` (Lightning ``SpikeDetection``, ``mode="min"``, ``atol=None``): the value is
  above the previous one and |value - mean| >= ``threshold`` x |mean| (``rtol``), the mean
  running over the last ``window`` values; judged from one earlier value on.
- ``cusum``: Page's one-sided CUSUM over a robust baseline, as trainscope's default detector
  computes it: z = (value - median) / (1.4826 MAD) over the last ``window`` values,
  S = max(0, S + z - ``slack``), trips when S >= ``threshold`` (h), and S restarts at 0 after
  each trip. Upward only: a loss that falls faster than usual is no instability. S moves only
  once ``warmup`` samples were seen (trainscope's ``min_observations``).
- ``ratio_to_best``: the mean of the trailing ``window`` values (this one included) above
  ``threshold`` x the lowest such mean seen so far. At 1.0 with ``consecutive`` it is a stall
  (no new best for that many samples); above 1 a gradual divergence (the loss has risen that
  far above its best), the alert trackers lack (peers-2026-12.md, user asks).

- ``rise_from_baseline`` (rankguard's, for the precursors whose healthy level differs by model
  and optimizer): value > ``threshold`` x the run's own early level, the mean of the
  ``baseline_samples`` finite samples after the first ``warmup`` ones (those are skipped, not
  averaged: during a learning-rate warmup the early level is not yet the run's level).

After a trip the sample still enters the window: the peers stop the run at their first spike,
a monitor watches a run that goes on. A previous value is the previous finite one: non-finite
values never enter a window (and trip every condition, engine.py).

Every check reports its bound in the units of the value: the value this sample would have
needed to trip (for ``ratio_to_best`` and ``cusum``, given the window and S before it), so a
margin to firing reads the same for every kind. The state per series is bounded: at most
``window`` values (``rules.MAX_WINDOW``) and two numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from math import fsum
from typing import Any

from rankguard.server.alerts.rules import Condition, Rule

# The "why" templates (str.format, built only when a transition reports them).
_ZSCORE_ABOVE = "{0:.4g} > mean {1:.4g} + {2:.4g} x std {3:.4g} (over {4} samples) = {5:.4g}"
_MAX_RATIO = "|{0:.4g}| >= {1:.4g} x the early maximum {2:.4g} = {3:.4g}"
_RATIO_TO_MEAN = "{0:.4g} >= {1:.4g} x mean {2:.4g} (over {3} samples) = {4:.4g}"
_RISE = "{0:.4g} rose from {1:.4g} and is {2:.4g} x mean {3:.4g} away (over {4} samples)"
_CUSUM = "CUSUM {0:.4g} >= {1:.4g} (value {2:.4g}, median {3:.4g}, robust std {4:.4g})"
_RISE_BASE = "{0:.4g} > {1:.4g} x baseline {2:.4g} = {3:.4g}"
_BEST = "trailing mean {0:.4g} (over {1}) = {2:.4g} x its best {3:.4g} > {4:.4g}"
_WAIT = ("window not yet full",)
_NO_SPREAD = ("window has no spread",)
_NOT_POSITIVE = ("reference not positive",)
_MAD_SCALE = 1.4826  # MAD -> std of a normal distribution


def _quiet(why: tuple[Any, ...]) -> tuple[bool, bool, float | None, tuple[Any, ...]]:
    return False, True, None, why


Verdict = tuple[bool, bool, float | None, tuple[Any, ...]]  # trips, clean, bound, why


def _clear(rule: Rule) -> float:
    thr: float = rule.threshold  # type: ignore[assignment]  # validated: a number
    return thr if rule.clear_threshold is None else rule.clear_threshold


def _window(series: dict[str, Any]) -> Sequence[float]:
    return series.get("window", ())  # type: ignore[no-any-return]


def _zscore_above(rule: Rule, series: dict[str, Any], value: float, warm: bool) -> Verdict:
    window = _window(series)
    if len(window) < rule.window:
        return _quiet(_WAIT)
    mean = fsum(window) / len(window)
    std = math.sqrt(fsum((x - mean) ** 2 for x in window) / len(window))
    if std < 1e-10:  # OLMo-core: avoid numerical issues, no spike
        return _quiet(_NO_SPREAD)
    thr: float = rule.threshold  # type: ignore[assignment]
    bound = mean + thr * std
    why = (_ZSCORE_ABOVE, value, mean, thr, std, len(window), bound)
    return warm and value > bound, value <= mean + _clear(rule) * std, bound, why


def _max_ratio(rule: Rule, series: dict[str, Any], value: float, warm: bool) -> Verdict:
    if series.get("m_n", 0) < rule.window:
        return _quiet(_WAIT)
    largest: float = series["m_max"]
    thr: float = rule.threshold  # type: ignore[assignment]
    bound = thr * largest
    why = (_MAX_RATIO, value, thr, largest, bound)
    return warm and abs(value) >= bound, abs(value) < _clear(rule) * largest, bound, why


def _ratio_to_mean(rule: Rule, series: dict[str, Any], value: float, warm: bool) -> Verdict:
    window = _window(series)
    if len(window) < rule.window:
        return _quiet(_WAIT)
    mean = fsum(window) / len(window)
    if mean <= 0:
        return _quiet(_NOT_POSITIVE)
    thr: float = rule.threshold  # type: ignore[assignment]
    bound = thr * mean
    why = (_RATIO_TO_MEAN, value, thr, mean, len(window), bound)
    return warm and value >= bound, value < _clear(rule) * mean, bound, why


def _rise_over_mean(rule: Rule, series: dict[str, Any], value: float, warm: bool) -> Verdict:
    window = _window(series)
    if not window:
        return _quiet(_WAIT)
    mean = fsum(window) / len(window)
    thr: float = rule.threshold  # type: ignore[assignment]
    last = series.get("last")
    rising = last is None or value > last  # mode "min": a value at or below the last is better
    spread = abs(value - mean)
    why = (
        _RISE,
        value,
        last if last is not None else math.nan,
        spread / abs(mean) if mean else math.inf,
        mean,
        len(window),
    )
    trips = warm and rising and spread >= thr * abs(mean)
    # A value falling back is clean however far from the mean: the loss is recovering.
    clean = not rising or spread < _clear(rule) * abs(mean)
    return trips, clean, mean + thr * abs(mean), why


def _robust(window: Sequence[float]) -> tuple[float, float]:
    """Median and robust std (1.4826 MAD, at least 1e-12) of the window, as trainscope."""
    ordered = sorted(window)
    median = _median(ordered)
    spread = _median(sorted(abs(x - median) for x in ordered)) * _MAD_SCALE
    return median, max(spread, 1e-12)


def _median(ordered: Sequence[float]) -> float:
    # numpy's median (trainscope's): the mean of the middle pair for an even count
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2.0


def _cusum_step(rule: Rule, series: dict[str, Any], value: float) -> tuple[float, float, float]:
    """(S after this value, median, robust std) from the state before it."""
    median, std = _robust(_window(series))
    z = (value - median) / std
    return max(0.0, series.get("cusum", 0.0) + z - rule.slack), median, std


def _cusum(rule: Rule, series: dict[str, Any], value: float, warm: bool) -> Verdict:
    window = _window(series)
    if len(window) < 2 or series["n"] < rule.warmup:
        return _quiet(_WAIT)
    total, median, std = _cusum_step(rule, series, value)
    thr: float = rule.threshold  # type: ignore[assignment]
    # the value that would have brought S to h
    bound = median + std * (thr - series.get("cusum", 0.0) + rule.slack)
    why = (_CUSUM, total, thr, value, median, std)
    return warm and total >= thr, total < _clear(rule), bound, why


def _ratio_to_best(rule: Rule, series: dict[str, Any], value: float, warm: bool) -> Verdict:
    window, best = _window(series), series.get("best")
    if best is None or len(window) < rule.window:
        return _quiet(_WAIT)
    if best <= 0:
        return _quiet(_NOT_POSITIVE)
    width = rule.window
    earlier = fsum(window[len(window) - width + 1 :])  # the width - 1 values before this one
    mean = (earlier + value) / width
    thr: float = rule.threshold  # type: ignore[assignment]
    why = (_BEST, mean, width, mean / best, best, thr)
    bound = thr * best * width - earlier
    return warm and mean > thr * best, mean <= _clear(rule) * best, bound, why


def _rise_from_baseline(rule: Rule, series: dict[str, Any], value: float, warm: bool) -> Verdict:
    count = series.get("b_n", 0)
    if count < rule.baseline_samples:
        return _quiet(("baseline not yet known",))
    base = series["b_sum"] / count
    thr: float = rule.threshold  # type: ignore[assignment]
    bound = thr * base
    why = (_RISE_BASE, value, thr, base, bound)
    return warm and value > bound, value <= _clear(rule) * base, bound, why


def _over(a: float, b: float) -> float:
    return a / b if b else (math.inf if a > 0 else 0.0)


def score(rule: Rule, series: dict[str, Any], value: float) -> tuple[float, float, str]:
    """The value and its trip bound in the units of the rule's threshold (a z, a ratio, the
    CUSUM) and their name: what a margin compares. Only where ``verdict`` is not quiet (its
    statistic is ready)."""
    thr: float = rule.threshold  # type: ignore[assignment]
    if rule.condition is Condition.RATIO_TO_BEST:
        # as the fraction above the best: a stall rule (threshold 1) sits at its bound for as
        # long as the loss improves, so its bound has no size (margin.relative: safe until
        # it trips), and a divergence rule's size is the rise it allows
        window = _window(series)
        earlier = fsum(window[len(window) - rule.window + 1 :])
        ratio = _over((earlier + value) / rule.window, series["best"])
        return ratio - 1.0, thr - 1.0, "above best"
    figure, unit = _score(rule, series, value)
    return figure, thr, unit


def _score(rule: Rule, series: dict[str, Any], value: float) -> tuple[float, str]:
    cond, window = rule.condition, _window(series)
    if cond is Condition.MAX_RATIO:
        return _over(abs(value), series["m_max"]), "× early max"
    if cond is Condition.RISE_FROM_BASELINE:
        return _over(value, series["b_sum"] / series["b_n"]), "× baseline"
    if cond is Condition.CUSUM:
        return _cusum_step(rule, series, value)[0], "CUSUM"
    mean = fsum(window) / len(window)
    if cond is Condition.ZSCORE_ABOVE:
        std = math.sqrt(fsum((x - mean) ** 2 for x in window) / len(window))
        return _over(value - mean, std), "std above mean"
    if cond is Condition.RATIO_TO_MEAN:
        return _over(value, mean), "× mean"
    return _over(abs(value - mean), abs(mean)), "× |mean| off the mean"  # rise_over_mean


_CHECKS: dict[Condition, Callable[[Rule, dict[str, Any], float, bool], Verdict]] = {
    Condition.ZSCORE_ABOVE: _zscore_above,
    Condition.MAX_RATIO: _max_ratio,
    Condition.RATIO_TO_MEAN: _ratio_to_mean,
    Condition.RISE_OVER_MEAN: _rise_over_mean,
    Condition.CUSUM: _cusum,
    Condition.RATIO_TO_BEST: _ratio_to_best,
    Condition.RISE_FROM_BASELINE: _rise_from_baseline,
}


def verdict(rule: Rule, series: dict[str, Any], value: float, warm: bool) -> Verdict:
    """(trips, clean, bound, why) of a finite ``value`` given the series' state before it."""
    return _CHECKS[rule.condition](rule, series, value, warm)


def absorb(rule: Rule, series: dict[str, Any], value: float) -> None:
    """Feed a finite value to the statistics of a history condition (before ``n`` counts it).

    Windows are new lists, never edited in place: the state's copy shares the old one.
    """
    cond = rule.condition
    if cond is Condition.RISE_FROM_BASELINE:
        count = series.get("b_n", 0)
        if series["n"] >= rule.warmup and count < rule.baseline_samples:
            series["b_sum"] = series.get("b_sum", 0.0) + value
            series["b_n"] = count + 1
        return
    if cond is Condition.MAX_RATIO:
        if series.get("m_n", 0) < rule.window:
            series["m_n"] = series.get("m_n", 0) + 1
            series["m_max"] = max(series.get("m_max", 0.0), abs(value))
        return
    if cond is Condition.CUSUM and len(_window(series)) >= 2 and series["n"] >= rule.warmup:
        total = _cusum_step(rule, series, value)[0]
        thr: float = rule.threshold  # type: ignore[assignment]
        series["cusum"] = 0.0 if total >= thr else total  # restart after a trip, as trainscope
    window = [*_window(series), value][-rule.window :]
    series["window"] = window
    if cond is Condition.RISE_OVER_MEAN:
        series["last"] = value
    elif cond is Condition.RATIO_TO_BEST and len(window) == rule.window:
        mean = fsum(window) / len(window)
        best = series.get("best")
        series["best"] = mean if best is None else min(best, mean)


def new_statistics(condition: Condition) -> dict[str, Any]:
    """The statistics a history condition keeps per series, before its first sample."""
    if condition is Condition.MAX_RATIO:
        return {"m_n": 0, "m_max": 0.0}
    if condition is Condition.RISE_FROM_BASELINE:
        return {"b_sum": 0.0, "b_n": 0}
    stats: dict[str, Any] = {"window": []}
    if condition is Condition.RISE_OVER_MEAN:
        stats["last"] = None
    elif condition is Condition.CUSUM:
        stats["cusum"] = 0.0
    elif condition is Condition.RATIO_TO_BEST:
        stats["best"] = None
    return stats


__all__ = ["Verdict", "absorb", "new_statistics", "score", "verdict"]
