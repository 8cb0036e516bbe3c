"""Instability detectors compared by the lead-time benchmark, each returning its first firing step.

Baselines (what trainers without rankguard have; the project's notes on peers, peers.md):

- :func:`olmo_loss_spike`: OLMo-core's loss-spike detector (``StabilityMonitorCallback``): the
  loss is more than ``sigmas`` (6) standard deviations above the mean of the previous
  ``window`` (128) losses. As in OLMo-core, it only judges once the window is full.
- :func:`megatron_spiky_loss` and :func:`megatron_large_grads`: Megatron-LM's
  ``--check-for-spiky-loss`` and ``--check-for-large-grads``, both
  ``RerunStateMachine.is_unexpectedly_large`` (threshold 10): the value is at least 10 times
  the largest of the first 100 values, which are only observed.
- :func:`grad_norm_threshold`: a stricter gradient-norm threshold of ours (no peer ships it):
  the norm is more than ``factor`` (10) times the median of the previous ``window`` (100).

All of them also fire on a non-finite value (every trainer checks for NaN; OLMo-core's
callback itself would not, as NaN > threshold is false) and need ``min_history`` finite
earlier values before they can fire on a finite one.

rankguard: :func:`rule_first_firings` runs rules of the alert engine
(``rankguard.server.alerts``) offline over recorded probe series, in step order, and
returns each rule's first ``firing`` step (the step at which the engine decided).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rankguard.server.alerts import Rule, TransitionKind, evaluate, flush

__all__ = [
    "grad_norm_threshold",
    "megatron_large_grads",
    "megatron_spiky_loss",
    "megatron_unexpectedly_large",
    "olmo_loss_spike",
    "rule_first_firing",
    "rule_first_firings",
]


def _check(name: str, value: float, minimum: float) -> None:
    if not value >= minimum:
        raise ValueError(f"{name}={value!r} is not valid; use a number >= {minimum}")


def _finite_history(values: Sequence[float], i: int, window: int) -> list[float]:
    return [v for v in values[max(0, i - window) : i] if math.isfinite(v)]


def olmo_loss_spike(
    losses: Sequence[float], *, window: int = 128, sigmas: float = 6.0, min_history: int = 128
) -> int | None:
    """First step whose loss > mean + ``sigmas`` x std of the previous ``window`` losses
    (OLMo-core ``StabilityMonitorCallback._is_spike``: judged only with a full window)."""
    _check("window", window, 2)
    _check("sigmas", sigmas, 0.0)
    _check("min_history", min_history, 2)
    for i, loss in enumerate(losses):
        if not math.isfinite(loss):
            return i
        history = _finite_history(losses, i, window)
        if len(history) < min_history:
            continue
        mean = statistics.fmean(history)
        std = statistics.pstdev(history, mean)
        if std >= 1e-10 and loss > mean + sigmas * std:
            return i
    return None


def megatron_unexpectedly_large(
    values: Sequence[float], *, factor: float = 10.0, num_samples: int = 100
) -> int | None:
    """Megatron-LM's ``RerunStateMachine.is_unexpectedly_large``: the first ``num_samples``
    finite values only set a maximum (frozen afterwards); from then on the first value
    >= ``factor`` x that maximum fires. (Megatron leaves NaN/Inf to its NaN check, on by
    default; here a non-finite value fires too, as for every baseline.)"""
    _check("factor", factor, 1.0)
    _check("num_samples", num_samples, 1)
    seen, largest = 0, 0.0
    for i, value in enumerate(values):
        if not math.isfinite(value):
            return i
        if seen < num_samples:
            seen += 1
            largest = max(largest, abs(value))
        elif abs(value) >= factor * largest:
            return i
    return None


def megatron_spiky_loss(losses: Sequence[float], *, factor: float = 10.0) -> int | None:
    """``--check-for-spiky-loss``: loss >= 10x the largest of the first 100 losses."""
    return megatron_unexpectedly_large(losses, factor=factor)


def megatron_large_grads(grad_norms: Sequence[float], *, factor: float = 10.0) -> int | None:
    """``--check-for-large-grads``: gradient norm >= 10x the largest of the first 100 (Megatron
    checks each gradient bucket's norm; the recordings hold the global norm)."""
    return megatron_unexpectedly_large(grad_norms, factor=factor)


def grad_norm_threshold(
    grad_norms: Sequence[float], *, window: int = 100, factor: float = 10.0, min_history: int = 20
) -> int | None:
    """First step whose gradient norm > ``factor`` x the median of the previous ``window``."""
    _check("window", window, 1)
    _check("factor", factor, 1.0)
    _check("min_history", min_history, 1)
    for i, g in enumerate(grad_norms):
        if not math.isfinite(g):
            return i
        history = _finite_history(grad_norms, i, window)
        if len(history) >= min_history and g > factor * statistics.median(history):
            return i
    return None


def rule_first_firing(rule: Rule, samples: Iterable[Sequence[Any]]) -> int | None:
    """First step at which ``rule`` fires over ``samples`` ((target, step, value) of its
    quantity), evaluated in step order as a live run would feed the engine, then flushed."""
    ordered = sorted(((str(t), int(s), v) for t, s, v in samples), key=lambda x: x[1])
    state, transitions = evaluate(rule, None, ordered)
    _, tail = flush(rule, state)
    for transition in [*transitions, *tail]:
        if transition.kind is TransitionKind.FIRING:
            return transition.step
    return None


def rule_first_firings(
    rules: Sequence[Rule], points: Mapping[str, Sequence[Sequence[Any]]]
) -> dict[str, int | None]:
    """``{rule.name: first firing step}`` for each enabled rule over ``{quantity: samples}``."""
    return {
        rule.name: rule_first_firing(rule, points.get(rule.quantity, ()))
        for rule in rules
        if rule.enabled
    }
