"""A rule's margin is negative exactly when the engine trips: per value against
``checks.check`` for every condition that has a margin, and per rule against the engine's
own verdict after evaluating the step (aggregations, statistics and all)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rankguard.server.alerts import Rule, checks, evaluate, flush
from rankguard.server.alerts.margin import (
    Margin,
    describe,
    distance,
    health,
    known_conditions,
    nearest,
    rule_margin,
)
from rankguard.server.alerts.rules import BOOLEAN_AGGREGATIONS, Aggregation, Condition
from rankguard.server.alerts.state import new_series

SPECIAL = (math.nan, math.inf, -math.inf)
TARGETS = ("a", "b", "c")


def test_every_condition_has_a_margin() -> None:
    # A new condition without one still works (no margin, said so); this says which do.
    assert known_conditions() == sorted(c.value for c in Condition)


@st.composite
def rules(draw: st.DrawFn, aggregation: Aggregation | None = None) -> Rule:
    condition = draw(st.sampled_from(known_conditions()))
    kwargs: dict[str, Any] = {
        "baseline_samples": draw(st.integers(1, 3)),
        "window": draw(st.integers(2, 4)),
        "ema_alpha": draw(st.sampled_from([0.1, 0.5, 1.0])),
    }
    if condition == Condition.CUSUM.value:
        kwargs["slack"] = draw(st.sampled_from([0.0, 0.5]))
    if condition != Condition.NON_FINITE.value:
        low = -1.0 if condition in ("above", "below") else 0.25  # the others: a ratio, z or h
        kwargs["threshold"] = draw(st.floats(low, 3.0))
    if aggregation is not None:
        kwargs["aggregation"] = aggregation
        if aggregation is Aggregation.AT_LEAST_K:
            kwargs["k"] = draw(st.integers(1, len(TARGETS)))
    return Rule(name="r", quantity="q", condition=condition, **kwargs)


def values_near(rule: Rule) -> st.SearchStrategy[float]:
    """Any float, the specials, and the rule's own bound exactly (where margin is 0)."""
    exact = [0.0, 1.0] + ([rule.threshold] if rule.threshold is not None else [])
    return st.one_of(st.floats(-4.0, 6.0), st.sampled_from(SPECIAL), st.sampled_from(exact))


@settings(max_examples=600, deadline=None, database=None)
@given(data=st.data())
def test_margin_is_negative_exactly_when_the_check_trips(data: st.DataObject) -> None:
    rule = data.draw(rules())
    series = new_series(rule.condition)
    for value in data.draw(st.lists(values_near(rule), max_size=8)):
        checks.step_series(rule, series, 0, value)
    value = data.draw(values_near(rule))
    verdict = checks.check(rule, series, 0, value)
    got = distance(rule, series, value)
    if isinstance(got, str):
        assert not verdict.trips, (got, verdict)  # no margin: the check cannot trip either
    else:
        assert (got.margin < 0) == verdict.trips, (got, verdict)
        if verdict.bound is not None and got.unit == "":
            assert got.bound == verdict.bound


@settings(max_examples=400, deadline=None, database=None)
@given(data=st.data())
def test_rule_margin_is_negative_exactly_when_the_engine_fires(data: st.DataObject) -> None:
    """Whole rules: after a history, the margin of the next step's values (given the state
    before it) is negative exactly when the engine, evaluating that step, is firing."""
    aggregation = data.draw(st.sampled_from(list(Aggregation)))
    rule = data.draw(rules(aggregation))
    history = data.draw(
        st.lists(
            st.fixed_dictionaries({t: values_near(rule) for t in TARGETS}), min_size=1, max_size=8
        )
    )
    samples = [(t, step, v) for step, at in enumerate(history) for t, v in at.items()]
    state, _ = evaluate(rule, None, samples)
    state, _ = flush(rule, state)
    step = len(history)
    now = data.draw(st.fixed_dictionaries({t: values_near(rule) for t in TARGETS}))
    margin = rule_margin(rule, state, {t: (step, v) for t, v in now.items()})
    after, _ = evaluate(rule, state, [(t, step, v) for t, v in now.items()])
    after, _ = flush(rule, after)
    fires = bool(after["alert"]["firing"])
    if margin.margin is None:
        assert not fires, margin
    else:
        assert (margin.margin < 0) == fires, (margin, after["alert"])


def test_drop_from_baseline_is_in_ratio_units() -> None:
    rule = Rule(name="sr", quantity="stable_rank", condition="drop_from_baseline",
                threshold=0.12, baseline_samples=2, aggregation="gmean")  # fmt: skip
    state, _ = evaluate(rule, None, [("a", 0, 10.0), ("a", 1, 10.0), ("a", 2, 10.0)])
    state, _ = flush(rule, state)
    m = rule_margin(rule, state, {"a": (3, 3.1)})
    assert m.unit == "× baseline"
    assert m.value == pytest.approx(0.31) and m.bound == 0.12
    assert m.margin == pytest.approx(0.19) and m.relative == pytest.approx(0.19 / 0.12)
    assert describe(m) == "0.31 × baseline vs bound 0.12 × baseline (margin 0.19)"
    assert m.target == "gmean over 1 target(s)"


def test_boolean_aggregations_pick_the_deciding_target() -> None:
    latest = {"a": (5, 0.9), "b": (5, 0.2), "c": (5, 0.5)}
    for aggregation, k, target in (("any", None, "b"), ("all", None, "a"), ("at_least_k", 2, "c")):
        rule = Rule(name="d", quantity="q", condition="below", threshold=0.1,
                    aggregation=aggregation, k=k)  # fmt: skip
        m = rule_margin(rule, None, latest)
        assert m.target == target, aggregation
    rule = Rule(name="d", quantity="q", condition="below", threshold=0.1,
                aggregation="at_least_k", k=4)  # fmt: skip
    m = rule_margin(rule, None, latest)
    assert m.margin is None and not m.pending and "fewer than 4" in m.note


def test_not_assessed_says_why() -> None:
    drop = Rule(name="d", quantity="q", condition="drop_from_baseline", threshold=0.5)
    m = rule_margin(drop, None, {"a": (1, 1.0)})
    assert m.margin is None and m.pending and "baseline not yet known (0 of 5" in m.note
    assert rule_margin(drop, None, {}).note == "no q data yet"
    assert not rule_margin(drop, None, {}).pending
    off = Rule(name="d", quantity="q", condition="above", threshold=1.0, enabled=False)
    assert rule_margin(off, None, {"a": (1, 5.0)}).note == "rule disabled"


def test_a_condition_without_a_margin_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    from rankguard.server.alerts import margin as margin_module

    monkeypatch.delitem(margin_module._KINDS, "zscore")
    rule = Rule(name="z", quantity="q", condition="zscore", threshold=3.0)
    m = rule_margin(rule, None, {"a": (1, 1.0)})
    assert m.margin is None and m.pending
    assert m.note == "no margin for condition 'zscore' yet"
    # A NaN still trips it, whatever the condition: that margin needs no kind.
    assert rule_margin(rule, None, {"a": (1, math.nan)}).margin == -math.inf


def test_warmup_is_reported_and_nonfinite_always_trips() -> None:
    rule = Rule(name="g", quantity="grad_norm", condition="above", threshold=5.0,
                warmup=3, min_step=10)  # fmt: skip
    m = rule_margin(rule, None, {"global": (2, 9.0)})
    assert m.margin == -4.0 and not m.armed and "warming up" in m.note
    m = rule_margin(rule, None, {"global": (2, math.inf)})
    assert m.margin == -math.inf and m.relative == -math.inf


def m(name: str, rel: float | None, *, firing: bool = False, pending: bool = False) -> Margin:
    margin = None if rel is None else rel
    return Margin(rule=name, quantity="q", condition="above", severity="warning",
                  firing=firing, margin=margin, relative=rel, pending=pending)  # fmt: skip


def test_nearest_and_health() -> None:
    assert nearest([m("a", 2.0), m("b", 0.5), m("c", None)]) == m("b", 0.5)
    assert nearest([m("a", 2.0), m("b", 0.5, firing=True)]).rule == "b"  # type: ignore[union-attr]
    assert nearest([m("c", None)]) is None
    assert health([m("a", 2.0), m("b", 0.5)], 0) == "ok"
    assert health([m("a", 2.0), m("b", 0.1)], 0) == "near"
    assert health([m("a", 2.0), m("b", -0.1)], 0) == "tripping"
    assert health([m("a", 2.0)], 1) == "firing"
    assert health([m("a", 2.0), m("b", None, pending=True)], 0) == "unknown"
    assert health([m("a", 2.0), m("b", None)], 0) == "ok"  # b has no data: it cannot fire
    assert health([], 0) == "unknown"


@pytest.mark.parametrize("aggregation", sorted(a.value for a in Aggregation))
def test_every_aggregation_gives_a_margin(aggregation: str) -> None:
    rule = Rule(name="x", quantity="q", condition="above", threshold=1.0,
                aggregation=aggregation, k=1 if aggregation == "at_least_k" else None)  # fmt: skip
    got = rule_margin(rule, None, {"a": (1, 0.5), "b": (1, 0.25)})
    assert got.margin is not None and got.margin > 0
    assert (Aggregation(aggregation) in BOOLEAN_AGGREGATIONS) == (got.target in ("a", "b"))
