"""The per-sample rule has one reference (``checks.step_series``); the fused fast path and its
all-inside shortcut must give the same series states, and the same bounds and texts for the
checks a transition reports, on any data."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from rankguard.server.alerts import Rule, checks
from rankguard.server.alerts.state import new_series

TARGETS = ("a", "b", "c")
SPECIAL = (math.nan, math.inf, -math.inf)


@st.composite
def rebuildable_rules(draw: st.DrawFn) -> Rule:
    condition = draw(st.sampled_from(sorted(c.value for c in checks.REBUILDABLE)))
    kwargs: dict[str, Any] = {
        "consecutive": draw(st.integers(1, 3)),
        "clear_after": draw(st.integers(1, 3)),
        "warmup": draw(st.integers(0, 3)),
        "min_step": draw(st.integers(0, 6)),
        "baseline_samples": draw(st.integers(1, 3)),
    }
    if condition != "non_finite":
        low = 0.25 if condition == "drop_from_baseline" else -1.0
        threshold = draw(st.floats(low, 1.5))
        kwargs["threshold"] = threshold
        if draw(st.booleans()):  # hysteresis: the clear bound on the safe side
            gap = draw(st.floats(0.0, 1.0))
            kwargs["clear_threshold"] = threshold - gap if condition == "above" else threshold + gap
    return Rule(name="r", quantity="q", condition=condition, **kwargs)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Rule, list[dict[str, float]]]:
    """A rule and steps of samples; the values include the rule's own bounds exactly (and 1.0,
    so that a baseline of ones puts a drop rule's bounds on them too)."""
    rule = draw(rebuildable_rules())
    bounds = [b for b in (rule.threshold, rule.clear_threshold) if b is not None]
    exact = st.sampled_from([0.0, 1.0, 1.0, *bounds])
    values = st.one_of(st.floats(-2.0, 3.0), st.sampled_from(SPECIAL), exact, exact)
    steps = st.dictionaries(st.sampled_from(TARGETS), values, min_size=1, max_size=len(TARGETS))
    return rule, draw(st.lists(steps, min_size=1, max_size=14))


@settings(max_examples=500, deadline=None, database=None)
@given(scenario=scenarios())
def test_fast_path_matches_the_reference(scenario: tuple[Rule, list[dict[str, float]]]) -> None:
    rule, data = scenario
    reference: dict[str, Any] = {}
    fast: dict[str, Any] = {}
    for step, values_at in enumerate(data):
        members = sorted(values_at)
        expected = {}
        for target in members:
            series = reference.setdefault(target, new_series(rule.condition))
            expected[target] = checks.step_series(rule, series, step, values_at[target])
        got = checks.step_targets(rule, fast, step, values_at, members)
        assert fast == reference, f"series differ at step {step}"
        for target in members:
            # What a transition reports of a check: its bound and its text (a rebuilt check's
            # trips/clean may differ: the warm-up count has moved on). repr: NaN compares.
            want = (expected[target].bound, expected[target].why)
            assert repr((got.of(target).bound, got.of(target).why)) == repr(want), (step, target)
