"""Evaluation in step order: buffer samples by step, judge a step once it is complete, and
run each judged step through the targets' checks, the aggregation and the alert's latch.

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

import math
from collections.abc import Iterable, Mapping, Sequence
from math import isfinite
from typing import Any, NamedTuple

from rankguard.server.alerts.buffer import group, merge, ready_step
from rankguard.server.alerts.checks import Check, StepChecks, detail, step_series, step_targets
from rankguard.server.alerts.rules import BOOLEAN_AGGREGATIONS, Aggregation, Rule, check_int
from rankguard.server.alerts.state import (
    ALL_SERIES,
    Buffer,
    checked_state,
    new_series,
    read_pending,
    write_pending,
)
from rankguard.server.alerts.transitions import (
    TargetHit,
    Transition,
    TransitionKind,
    aggregate_firing,
    repeat_message,
    resolved_message,
    targets_firing,
)

DEFAULT_MAX_PENDING_STEPS = 8


class _Step(NamedTuple):
    """One judged step of one rule: its samples and the checks they got."""

    rule: Rule
    state: dict[str, Any]
    step: int
    values: dict[str, float]
    members: list[str]  # sorted(values)
    checks: StepChecks


class _Aggregate(NamedTuple):
    """The aggregation's verdict at a step: whether the alert's condition holds."""

    active: bool
    tripped: list[str]  # boolean aggregations: the tripped targets
    value: float | None = None  # value aggregations: the combined value ...
    check: Check | None = None  # ... its check ...
    since: int | None = None  # ... and since when the aggregated series trips


def _combine(aggregation: Aggregation, values: Sequence[float]) -> float:
    """The value of a value aggregation over one step's targets (NaN in, NaN out)."""
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


def _aggregate(at: _Step) -> _Aggregate:
    """Whether the rule's aggregation holds at this step (value aggregations run their own
    aggregated series through the condition and latch)."""
    rule, all_series = at.rule, at.state["series"]
    if rule.aggregation in BOOLEAN_AGGREGATIONS:
        tripped = [t for t in at.members if all_series[t]["tripped"]]
        if rule.aggregation is Aggregation.ANY:
            active = len(tripped) >= 1
        elif rule.aggregation is Aggregation.ALL:
            active = len(tripped) == len(at.members) > 0
        else:
            active = len(tripped) >= int(rule.k)  # type: ignore[arg-type]
        return _Aggregate(active, tripped)
    value = _combine(rule.aggregation, [at.values[t] for t in at.members])
    if at.state["aggregate"] is None:
        at.state["aggregate"] = new_series(rule.condition)
    series = at.state["aggregate"]
    verdict = step_series(rule, series, at.step, value)
    return _Aggregate(bool(series["tripped"]), [], value, verdict, series["since"])


def _hits(at: _Step, names: Iterable[str]) -> tuple[TargetHit, ...]:
    """The named targets present at the step, ordered by how early each started to trip
    (never-tripped ones last)."""
    all_series = at.state["series"]
    out = [
        TargetHit(t, at.values[t], all_series[t]["since"], at.checks.of(t).bound)
        for t in names
        if t in at.values
    ]
    out.sort(key=lambda h: (h.since is None, h.since if h.since is not None else 0, h.target))
    return tuple(out)


def _reported(at: _Step, agg: _Aggregate) -> tuple[list[str], int]:
    """The targets a firing names and the step its trouble began."""
    all_series = at.state["series"]
    if agg.check is None:
        reported = agg.tripped
        starts = [all_series[t]["since"] for t in reported]
    else:
        # The layers that moved: those crossing the condition on their own series.
        reported = [t for t in at.members if all_series[t]["since"] is not None] or at.members
        starts = [all_series[t]["since"] for t in reported]
        starts.append(agg.since)
    return reported, min((s for s in starts if s is not None), default=at.step)


def _transition(
    kind: TransitionKind,
    at: _Step,
    *,
    first_step: int,
    targets: tuple[TargetHit, ...],
    value: float | None,
    message: str,
    bound: float | None = None,
    notify: bool = True,
    order: tuple[dict[str, Any] | None, bool] = (None, False),
) -> Transition:
    """The one place a ``Transition`` is built; ``order`` is (command, suppressed)."""
    rule = at.rule
    return Transition(
        kind=kind,
        rule=rule.name,
        quantity=rule.quantity,
        severity=rule.severity,
        episode=at.state["alert"]["episode"],
        step=at.step,
        first_step=first_step,
        targets=targets,
        value=value,
        bound=bound,
        message=message,
        suggested_action=rule.runbook,
        notify=notify,
        command=order[0],
        command_suppressed=order[1],
    )


def _fire(at: _Step, agg: _Aggregate) -> Transition:
    """The alert starts firing: open an episode, name the targets, order the action."""
    rule, alert = at.rule, at.state["alert"]
    reported, first_step = _reported(at, agg)
    alert["firing"] = True
    alert["episode"] += 1
    alert["first_step"] = first_step
    alert["fired_step"] = at.step
    hits = _hits(at, reported)
    alert["targets"] = [h.target for h in hits]
    if agg.check is not None:
        message = aggregate_firing(rule, at.step, len(at.members), detail(agg.check), hits)
        bound = agg.check.bound
    else:
        message = targets_firing(
            rule, at.step, len(at.members), hits, lambda target: detail(at.checks.of(target))
        )
        bound = hits[0].bound if hits else None
    order = _order(rule, at.state, at.step) if rule.action is not None else (None, False)
    return _transition(
        TransitionKind.FIRING,
        at,
        first_step=first_step,
        targets=hits,
        value=agg.value,
        message=message,
        bound=bound,
        notify=rule.notify,
        order=order,
    )


def _repeat(at: _Step, agg: _Aggregate) -> list[Transition]:
    """A firing alert whose action repeats orders its command again, when due and allowed."""
    if not _repeat_due(at.rule, at.state, at.step):
        return []
    command, suppressed = _order(at.rule, at.state, at.step)
    if command is None:
        return []
    return [
        _transition(
            TransitionKind.REPEAT,
            at,
            first_step=int(at.state["alert"]["first_step"]),
            targets=(),
            value=agg.value,
            message=repeat_message(at.rule, at.step, command["kind"]),
            notify=False,
            order=(command, suppressed),
        )
    ]


def _resolve(at: _Step, agg: _Aggregate) -> Transition:
    """The alert's condition no longer holds: close the episode, start the cooldown."""
    rule, alert = at.rule, at.state["alert"]
    alert["firing"] = False
    alert["cooldown_until"] = at.step + rule.cooldown
    hits = _hits(at, alert["targets"])
    return _transition(
        TransitionKind.RESOLVED,
        at,
        first_step=int(alert["first_step"]),
        targets=hits,
        value=agg.value,
        message=resolved_message(
            rule, at.step, agg.value, hits, alert["fired_step"], alert["first_step"]
        ),
        notify=rule.notify,
    )


def _evaluate_step(
    rule: Rule, state: dict[str, Any], step: int, values: dict[str, float], members: list[str]
) -> list[Transition]:
    """Evaluate one complete step: per-target series, aggregation, alert latch, actions.

    ``members`` is ``sorted(values)``. Messages and target lists are built only on a transition.
    """
    checks = step_targets(rule, state["series"], step, values, members)
    at = _Step(rule, state, step, values, members, checks)
    agg = _aggregate(at)
    if not rule.enabled:
        return []  # statistics stay current; the alert latch waits for the rule to be enabled
    alert = state["alert"]
    if alert["firing"]:
        return _repeat(at, agg) if agg.active else [_resolve(at, agg)]
    cooldown_until = alert["cooldown_until"]
    if agg.active and (cooldown_until is None or step >= cooldown_until):
        return [_fire(at, agg)]
    return []


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


def _drain(
    rule: Rule, state: dict[str, Any], buffer: Buffer, max_pending_steps: int, force: bool
) -> list[Transition]:
    """Evaluate the buffered steps that are ready (all of them with ``force``), in order."""
    transitions: list[Transition] = []
    steps = sorted(buffer)
    i = 0
    while i < len(steps) and (force or ready_step(state, buffer, steps, i, max_pending_steps)):
        step = steps[i]
        values = buffer.pop(step)
        members = sorted(values)
        if state["watermark"] is not None:
            state["stride"] = step - state["watermark"]
        state["watermark"] = step
        state["expected"] = members
        transitions.extend(_evaluate_step(rule, state, step, values, members))
        i += 1
    write_pending(state, buffer)
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
    return evaluate_steps(rule, state, group(samples), max_pending_steps=max_pending_steps)


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
    check_int("max_pending_steps", max_pending_steps, 1)
    new = checked_state(state, rule)
    buffer = read_pending(new)
    merge(rule, new, buffer, by_step)
    return new, _drain(rule, new, buffer, max_pending_steps, force=False)


def flush(rule: Rule, state: Mapping[str, Any] | None) -> tuple[dict[str, Any], list[Transition]]:
    """Evaluate every buffered step now, in order (call when a run finishes)."""
    new = checked_state(state, rule)
    return new, _drain(rule, new, read_pending(new), DEFAULT_MAX_PENDING_STEPS, force=True)


__all__ = ["DEFAULT_MAX_PENDING_STEPS", "evaluate", "evaluate_steps", "flush"]
