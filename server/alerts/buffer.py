"""The step buffer in front of the engine: samples validated and grouped by step, merged into
a rule's pending buffer (only its targets, only steps after its watermark), and the test of
whether the oldest buffered step is complete (the step-order policy of ``engine``).

Cost model: ingest hands over whole steps as ``{target: value}`` dicts, which merge at C speed;
target selection is cached per glob tuple, since fnmatch costs more than the rest of a
sample's ingest.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from typing import Any

from rankguard.server.alerts.rules import Rule, RuleError
from rankguard.server.alerts.state import ALL_SERIES, Buffer
from rankguard.server.wire import decode_float

# Selector verdicts per target-glob tuple, shared by calls: a run's target names recur in every
# batch. Bounded, as target names come from clients.
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


def group(samples: Iterable[Any]) -> Buffer:
    """Validated ``(target, step, value)`` samples as {step: {target: value}}, the first value
    of a (target, step) kept, as ingest keeps the first."""
    by_step: Buffer = {}
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


def merge(
    rule: Rule, state: dict[str, Any], buffer: Buffer, by_step: Mapping[int, Mapping[str, float]]
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


def ready_step(
    state: dict[str, Any], buffer: Buffer, steps: list[int], i: int, max_pending_steps: int
) -> bool:
    """Whether ``steps[i]``, the oldest buffered step, is evaluated now (the policy in
    ``engine``'s docstring)."""
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


__all__ = ["group", "merge", "ready_step"]
