"""The pure alert engine: every condition and aggregation, NaN/Inf, step order, state."""

from __future__ import annotations

import ast
import json
import math
import random
import sys
from pathlib import Path
from typing import Any

import pytest

from rankguard.server import alerts
from rankguard.server.alerts import (
    Aggregation,
    Condition,
    LRBackoffAction,
    MSignAction,
    Rule,
    RuleError,
    Transition,
    TransitionKind,
    checks,
    engine,
    evaluate,
    evaluate_steps,
    flush,
    runbook,
)

NAN, INF = math.nan, math.inf


def samples_for(values: dict[str, list[float]], stride: int = 1) -> list[tuple[str, int, float]]:
    """(target, step, value) for each target's list, step i*stride; None skips a sample."""
    out = []
    for target, vals in values.items():
        for i, v in enumerate(vals):
            if v is not None:
                out.append((target, i * stride, v))
    return out


def by_step(samples: list[tuple[str, int, float]]) -> list[list[tuple[str, int, float]]]:
    steps = sorted({s[1] for s in samples})
    return [[s for s in samples if s[1] == step] for step in steps]


def drive(
    rule: Rule, batches: list[list[Any]], *, max_pending_steps: int = 8, do_flush: bool = True
) -> tuple[dict[str, Any], list[Transition]]:
    state: dict[str, Any] | None = None
    out: list[Transition] = []
    for batch in batches:
        state, transitions = evaluate(rule, state, batch, max_pending_steps=max_pending_steps)
        out.extend(transitions)
    if do_flush:
        state, transitions = flush(rule, state)
        out.extend(transitions)
    assert state is not None
    return state, out


def summary(transitions: list[Transition]) -> list[tuple[str, int, int, tuple[str, ...]]]:
    return [
        (t.kind.value, t.step, t.first_step, tuple(h.target for h in t.targets))
        for t in transitions
    ]


def rule(**kwargs: Any) -> Rule:
    base: dict[str, Any] = {"name": "r", "quantity": "q"}
    base.update(kwargs)
    return Rule(**base)


# -- every condition on one target ------------------------------------------------------------

CONDITION_CASES = [
    pytest.param(
        {"condition": "above", "threshold": 1.0},
        [0, 0, 2, 2, 0],
        [("firing", 2, 2), ("resolved", 4, 2)],
        id="above",
    ),
    pytest.param(
        {"condition": "below", "threshold": 1.0},
        [2, 2, 0, 0, 2],
        [("firing", 2, 2), ("resolved", 4, 2)],
        id="below",
    ),
    pytest.param(
        # baseline = mean(10, 12, 8) = 10; bound 5
        {"condition": "drop_from_baseline", "threshold": 0.5, "baseline_samples": 3},
        [10, 12, 8, 6, 4.9, 4, 9],
        [("firing", 4, 4), ("resolved", 6, 4)],
        id="drop_from_baseline",
    ),
    pytest.param(
        # a below-bound value before the baseline is complete cannot trip
        {"condition": "drop_from_baseline", "threshold": 0.5, "baseline_samples": 3},
        [10, 1, 10, 6, 2],
        [("firing", 4, 4)],
        id="drop_from_baseline-needs-baseline",
    ),
    pytest.param(
        # EMA(prev) = 1 at step 3, 5/1 > 2; EMA becomes 3, 1/3 is clean
        {"condition": "ratio_to_ema", "threshold": 2.0, "ema_alpha": 0.5},
        [1, 1, 1, 5, 1],
        [("firing", 3, 3), ("resolved", 4, 3)],
        id="ratio_to_ema",
    ),
    pytest.param(
        # the spike at step 1 falls inside the 2-sample warm-up
        {"condition": "ratio_to_ema", "threshold": 2.0, "ema_alpha": 0.5, "warmup": 2},
        [1, 5, 3, 3, 20],
        [("firing", 4, 4)],
        id="ratio_to_ema-warmup",
    ),
    pytest.param(
        # min_step counts steps, not samples
        {"condition": "above", "threshold": 1.0, "min_step": 3},
        [2, 2, 2, 2, 0],
        [("firing", 3, 3), ("resolved", 4, 3)],
        id="above-min_step",
    ),
    pytest.param(
        # window [2,1,2,1]: mean 1.5, std 0.5, z(10) = 17; then window [1,2,1,10]: z(1.5) = 0.53
        {"condition": "zscore", "threshold": 3.0, "window": 4},
        [1, 2, 1, 2, 1, 10, 1.5],
        [("firing", 5, 5), ("resolved", 6, 5)],
        id="zscore",
    ),
    pytest.param(
        # constant window: std 0, any other value is an infinite z-score
        {"condition": "zscore", "threshold": 3.0, "window": 3},
        [1, 1, 1, 1, 1.01],
        [("firing", 4, 4)],
        id="zscore-constant-window",
    ),
    pytest.param(
        {"condition": "non_finite"},
        [1, NAN, 1, INF, -INF, 1],
        [("firing", 1, 1), ("resolved", 2, 1), ("firing", 3, 3), ("resolved", 5, 3)],
        id="non_finite",
    ),
]


@pytest.mark.parametrize(("kwargs", "values", "expected"), CONDITION_CASES)
def test_condition(kwargs: dict[str, Any], values: list[float], expected: list[tuple]) -> None:
    r = rule(**kwargs)
    _, transitions = drive(r, by_step(samples_for({"a": values})))
    assert [(k, s, f) for k, s, f, _ in summary(transitions)] == expected


# -- non-finite values under every other condition -------------------------------------------

NAN_CASES = [
    pytest.param({"condition": "above", "threshold": 1.0}, [0, NAN, 0], id="above-nan"),
    pytest.param({"condition": "above", "threshold": 1.0}, [0, -INF, 0], id="above-neg-inf"),
    pytest.param({"condition": "below", "threshold": 1.0}, [2, INF, 2], id="below-inf"),
    pytest.param({"condition": "below", "threshold": 1.0}, [2, NAN, 2], id="below-nan"),
    pytest.param(
        {"condition": "drop_from_baseline", "threshold": 0.5, "baseline_samples": 1},
        [2, NAN, 2],
        id="drop-nan",
    ),
    pytest.param({"condition": "ratio_to_ema", "threshold": 2.0}, [1, INF, 1], id="ema-inf"),
    pytest.param({"condition": "zscore", "threshold": 3.0, "window": 2}, [1, NAN, 2], id="z-nan"),
]


@pytest.mark.parametrize(("kwargs", "values"), NAN_CASES)
def test_non_finite_trips_every_condition(kwargs: dict[str, Any], values: list[float]) -> None:
    _, transitions = drive(rule(**kwargs), by_step(samples_for({"a": values})))
    assert [(k, s) for k, s, _, _ in summary(transitions)] == [("firing", 1), ("resolved", 2)]
    assert "not finite" in transitions[0].message


def test_nan_does_not_reset_consecutive_counter() -> None:
    r = rule(condition="above", threshold=1.0, consecutive=3)
    _, transitions = drive(r, by_step(samples_for({"a": [0, 2, NAN, 2, 0]})))
    assert summary(transitions) == [("firing", 3, 1, ("a",)), ("resolved", 4, 1, ("a",))]


def test_nan_does_not_count_as_clean() -> None:
    r = rule(condition="above", threshold=1.0, clear_after=2)
    _, transitions = drive(r, by_step(samples_for({"a": [2, 0, NAN, 0, 0]})))
    assert [(k, s) for k, s, _, _ in summary(transitions)] == [("firing", 0), ("resolved", 4)]


@pytest.mark.parametrize(
    ("kwargs", "values", "expected_first_fire"),
    [
        # NaN in the baseline phase fires once but does not enter the baseline (still 10)
        (
            {"condition": "drop_from_baseline", "threshold": 0.5, "baseline_samples": 3},
            [10, NAN, 10, 10, 6, 4],
            [("firing", 1), ("resolved", 2), ("firing", 5)],
        ),
        # NaN never enters the z-score window: [1, 2] stays the window, 1.5 is fine
        (
            {"condition": "zscore", "threshold": 3.0, "window": 2},
            [1, 2, NAN, 1.5, 100],
            [("firing", 2), ("resolved", 3), ("firing", 4)],
        ),
        # NaN never enters the EMA
        (
            {"condition": "ratio_to_ema", "threshold": 2.0, "ema_alpha": 1.0},
            [1, NAN, 1.5, 4],
            [("firing", 1), ("resolved", 2), ("firing", 3)],
        ),
    ],
)
def test_nan_does_not_poison_statistics(
    kwargs: dict[str, Any], values: list[float], expected_first_fire: list[tuple]
) -> None:
    _, transitions = drive(rule(**kwargs), by_step(samples_for({"a": values})))
    assert [(k, s) for k, s, _, _ in summary(transitions)] == expected_first_fire


# -- aggregations ------------------------------------------------------------------------------

STAIRS = {"a": [2, 0, 0, 0, 0], "b": [2, 2, 0, 0, 0], "c": [2, 2, 2, 0, 2]}

AGGREGATION_CASES = [
    pytest.param(
        {"aggregation": "any", "condition": "below", "threshold": 1.0},
        STAIRS,
        [("firing", 1, 1, ("a",))],
        id="any",
    ),
    pytest.param(
        {"aggregation": "all", "condition": "below", "threshold": 1.0},
        STAIRS,
        [("firing", 3, 1, ("a", "b", "c")), ("resolved", 4, 1, ("a", "b", "c"))],
        id="all-ordered-by-first-move",
    ),
    pytest.param(
        {"aggregation": "at_least_k", "k": 2, "condition": "below", "threshold": 1.0},
        STAIRS,
        [("firing", 2, 1, ("a", "b"))],
        id="at_least_k",
    ),
    pytest.param(
        # means 2, 4/3, 2/3, 0, 2/3
        {"aggregation": "mean", "condition": "below", "threshold": 1.0},
        STAIRS,
        [("firing", 2, 1, ("a", "b"))],
        id="mean",
    ),
    pytest.param(
        {"aggregation": "min", "condition": "below", "threshold": 1.0},
        STAIRS,
        [("firing", 1, 1, ("a",))],
        id="min",
    ),
    pytest.param(
        {"aggregation": "max", "condition": "below", "threshold": 1.0},
        STAIRS,
        [("firing", 3, 1, ("a", "b", "c")), ("resolved", 4, 1, ("a", "b", "c"))],
        id="max",
    ),
    pytest.param(
        # gmean: 4, 4, sqrt(16*0.25)=2, 1 -> below 1.5 at step 3; b moved first (step 2)
        {"aggregation": "gmean", "condition": "below", "threshold": 1.5},
        {"a": [4, 4, 4, 1], "b": [4, 4, 1, 1]},
        [("firing", 3, 2, ("b", "a"))],
        id="gmean",
    ),
    pytest.param(
        # drop from the aggregate's own baseline (gmean 4 -> bound 2): gmean 2 at step 2 is not
        # below, 1 at step 3 is; b alone dropped below half its own baseline at step 2
        {
            "aggregation": "gmean",
            "condition": "drop_from_baseline",
            "threshold": 0.5,
            "baseline_samples": 2,
        },
        {"a": [4, 4, 4, 1], "b": [4, 4, 1, 1]},
        [("firing", 3, 2, ("b", "a"))],
        id="gmean-drop",
    ),
]


@pytest.mark.parametrize(("kwargs", "values", "expected"), AGGREGATION_CASES)
def test_aggregation(
    kwargs: dict[str, Any], values: dict[str, list[float]], expected: list
) -> None:
    _, transitions = drive(rule(**kwargs), by_step(samples_for(values)))
    assert summary(transitions) == expected


@pytest.mark.parametrize(
    ("aggregation", "values", "expected"),
    [
        ("mean", [1.0, 2.0, 6.0], 3.0),
        ("gmean", [1.0, 4.0, 16.0], 4.0),
        ("gmean", [0.0, 4.0], 0.0),
        ("gmean", [-1.0, 4.0], NAN),
        ("gmean", [INF, 4.0], INF),
        ("min", [3.0, -INF], -INF),
        ("max", [3.0, 1.0], 3.0),
        ("mean", [INF, 1.0], INF),
        ("mean", [INF, -INF], NAN),
        ("max", [NAN, 1.0], NAN),
        ("min", [1.0, NAN], NAN),
    ],
)
def test_aggregate_values(aggregation: str, values: list[float], expected: float) -> None:
    got = engine._combine(Aggregation(aggregation), values)
    if math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(expected)


def test_value_aggregation_with_nan_member_trips() -> None:
    r = rule(aggregation="mean", condition="below", threshold=1.0)
    _, transitions = drive(r, by_step(samples_for({"a": [2, NAN, 2], "b": [2, 2, 2]})))
    assert summary(transitions) == [("firing", 1, 1, ("a",)), ("resolved", 2, 1, ("a",))]
    assert transitions[0].value is not None and math.isnan(transitions[0].value)


def test_aggregation_uses_targets_present_at_the_step() -> None:
    # b does not report step 2 (given up on after the bounded lag); 'all' then means 'a' alone
    r = rule(aggregation="all", condition="below", threshold=1.0)
    values = {"a": [2, 2, 0, 0], "b": [2, 2, None, 2]}
    _, transitions = drive(r, by_step(samples_for(values)), max_pending_steps=1)
    assert summary(transitions) == [("firing", 2, 2, ("a",)), ("resolved", 3, 2, ("a",))]


def test_selector_globs_filter_targets() -> None:
    r = rule(condition="below", threshold=1.0, targets=["h.0.*", "h.1.*"])
    samples = [("h.0.w", 0, 2), ("h.5.w", 0, 0), ("h.0.w", 1, 0), ("h.5.w", 1, 0)]
    state, transitions = drive(r, [samples])
    assert summary(transitions) == [("firing", 1, 1, ("h.0.w",))]
    assert set(state["series"]) == {"h.0.w"}


# -- consecutive, cooldown, hysteresis ---------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "values", "expected"),
    [
        ({"consecutive": 3}, [2, 2, 0, 2, 2, 2, 0], [("firing", 5, 3), ("resolved", 6, 3)]),
        ({"consecutive": 2}, [2, 0, 2, 0, 2], []),
        # resolve at 2 -> no re-fire before 2 + 5; fires at 7 while still above
        (
            {"cooldown": 5},
            [0, 2, 0, 2, 2, 2, 2, 2, 0],
            [("firing", 1, 1), ("resolved", 2, 1), ("firing", 7, 3), ("resolved", 8, 3)],
        ),
        ({"cooldown": 0}, [2, 0, 2], [("firing", 0, 0), ("resolved", 1, 0), ("firing", 2, 2)]),
        # hysteresis: clear bound 5; 8 is in the band and holds the alert
        (
            {"threshold": 10.0, "clear_threshold": 5.0},
            [0, 11, 8, 8, 4],
            [("firing", 1, 1), ("resolved", 4, 1)],
        ),
        # clear after 2 clean samples; a band value restarts the count
        (
            {"threshold": 10.0, "clear_threshold": 5.0, "clear_after": 2},
            [0, 11, 4, 8, 4, 4],
            [("firing", 1, 1), ("resolved", 5, 1)],
        ),
        # re-tripping while latched keeps the episode's first step
        ({"clear_after": 3}, [0, 2, 0, 2, 0, 0, 0], [("firing", 1, 1), ("resolved", 6, 1)]),
    ],
)
def test_consecutive_cooldown_hysteresis(
    kwargs: dict[str, Any], values: list[float], expected: list[tuple]
) -> None:
    base: dict[str, Any] = {"condition": "above", "threshold": 1.0}
    base.update(kwargs)
    _, transitions = drive(rule(**base), by_step(samples_for({"a": values})))
    assert [(k, s, f) for k, s, f, _ in summary(transitions)] == expected


def test_episodes_count_up() -> None:
    r = rule(condition="above", threshold=1.0)
    _, transitions = drive(r, by_step(samples_for({"a": [2, 0, 2, 0]})))
    assert [t.episode for t in transitions] == [1, 1, 2, 2]


# -- the MSign action and its rate limit -------------------------------------------------------


def test_msign_rate_limit() -> None:
    msign = MSignAction(
        enabled=True, targets="attention", engine="newton_schulz", max_orders=2, window_steps=100
    )
    r = rule(condition="above", threshold=1.0, msign=msign)
    values = [2, 0] * 7  # fires at steps 0, 20, 40, ... (stride 10)
    _, transitions = drive(r, by_step(samples_for({"a": values}, stride=10)))
    fired = [t for t in transitions if t.kind is TransitionKind.FIRING]
    ordered = [t.step for t in fired if t.command is not None]
    suppressed = [t.step for t in fired if t.command_suppressed]
    assert ordered == [0, 20, 100, 120]
    assert suppressed == [40, 60, 80]
    assert fired[0].command == {
        "kind": "msign",
        "args": {"targets": "attention", "engine": "newton_schulz"},
    }
    assert all(t.command is None for t in transitions if t.kind is TransitionKind.RESOLVED)


def test_msign_disabled_orders_nothing() -> None:
    r = rule(condition="above", threshold=1.0, msign=MSignAction(enabled=False))
    _, transitions = drive(r, by_step(samples_for({"a": [2, 0, 2]})))
    assert all(t.command is None and not t.command_suppressed for t in transitions)


def test_msign_glob_targets_in_command() -> None:
    action = MSignAction(enabled=True, targets=["h.0.*", "h.1.*"])
    assert action.command()["args"]["targets"] == ["h.0.*", "h.1.*"]


def test_lr_backoff_halves_at_every_sample_while_firing_within_the_rate_limit() -> None:
    backoff = LRBackoffAction(
        enabled=True, factor=0.5, repeat_every=5, max_orders=4, window_steps=100
    )
    r = Rule(
        name="hot",
        quantity="update_ratio",
        condition=Condition.ABOVE,
        threshold=0.05,
        aggregation="gmean",
        clear_after=2,
        lr_backoff=backoff,
    )
    values = [0.01, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.01, 0.01, 0.01]  # steps 0, 5, ... 45
    _, transitions = drive(r, by_step(samples_for({"a": values, "b": values}, stride=5)))
    ordered = [(t.kind, t.step, t.command) for t in transitions if t.command is not None]
    command = {"kind": "scale_lr", "args": {"factor": 0.5}}
    assert ordered == [
        (TransitionKind.FIRING, 5, command),
        (TransitionKind.REPEAT, 10, command),
        (TransitionKind.REPEAT, 15, command),
        (TransitionKind.REPEAT, 20, command),  # the 4th order: the rate limit holds the rest
    ]
    assert [t.step for t in transitions if t.kind is TransitionKind.RESOLVED] == [40]
    assert "scale_lr ordered again" in transitions[1].message
    assert Rule.from_dict(r.to_dict()) == r


def test_a_rule_orders_one_kind_of_command() -> None:
    with pytest.raises(RuleError, match="both true"):
        rule(
            condition="above",
            threshold=1.0,
            msign=MSignAction(enabled=True),
            lr_backoff=LRBackoffAction(enabled=True),
        )
    r = rule(condition="above", threshold=1.0, lr_backoff={"enabled": True, "factor": 0.25})
    assert r.action == LRBackoffAction(enabled=True, factor=0.25)
    assert rule(condition="above", threshold=1.0).action is None


# -- step order: out of order, replays, gaps, lag ----------------------------------------------


def _random_data(seed: int, steps: int = 30, stride: int = 10) -> list[tuple[str, int, float]]:
    rng = random.Random(seed)
    out = []
    for target in ("a", "b", "c"):
        level = 5.0
        for i in range(steps):
            level = max(0.05, level + rng.gauss(0, 1.2))
            value = level if rng.random() > 0.05 else rng.choice([NAN, INF])
            out.append((target, i * stride, value))
    return out


ORDER_RULES = [
    pytest.param(
        rule(condition="below", threshold=3.0, consecutive=2, clear_after=2), id="below-any"
    ),
    pytest.param(
        rule(condition="above", threshold=6.0, aggregation="at_least_k", k=2), id="above-k"
    ),
    pytest.param(
        rule(
            condition="drop_from_baseline", threshold=0.6, aggregation="gmean", baseline_samples=3
        ),
        id="drop-gmean",
    ),
    pytest.param(rule(condition="ratio_to_ema", threshold=1.5, warmup=3, cooldown=30), id="ema"),
    pytest.param(
        rule(condition="zscore", threshold=1.5, window=5, aggregation="max"), id="zscore-max"
    ),
    pytest.param(rule(condition="non_finite", aggregation="any"), id="non-finite-any"),
    pytest.param(
        rule(
            condition="below",
            threshold=3.0,
            msign=MSignAction(enabled=True, max_orders=1, window_steps=50),
        ),
        id="msign",
    ),
]


def _in_order(r: Rule, data: list[tuple[str, int, float]]) -> tuple[dict[str, Any], list[dict]]:
    state, transitions = drive(r, by_step(data))
    return state, [t.to_dict() for t in transitions]


@pytest.mark.parametrize("r", ORDER_RULES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_out_of_order_and_replay_match_in_order(r: Rule, seed: int) -> None:
    data = _random_data(seed)
    ref_state, ref = _in_order(r, data)
    assert ref, "the data must make the rule fire, or the comparison proves nothing"

    rng = random.Random(100 + seed)
    stride = 10
    # The start of a series arrives in order (it sets the expected targets and the stride);
    # after that, samples move up to 3 strides from their place, split into random batches.
    start = [s for s in data if s[1] <= stride]
    rest = sorted(
        (s for s in data if s[1] > stride), key=lambda s: s[1] + rng.uniform(0, 3 * stride)
    )
    batches: list[list[Any]] = [start]
    i = 0
    while i < len(rest):
        n = rng.randint(1, 12)
        batches.append(rest[i : i + n])
        i += n
    with_replays = [*batches, *(b for b in batches if rng.random() < 0.5)]
    # a spill file: steps 100..150 arrive after everything else
    spilled = [s for s in data if 100 <= s[1] <= 150]
    live = [s for s in data if not 100 <= s[1] <= 150]
    variants = {
        "all-at-once": [data],
        "reversed-in-one-call": [list(reversed(data))],
        "locally-shuffled-batches": batches,
        "locally-shuffled-with-replays": with_replays,
        "spill-replayed-late": [*by_step(live), spilled],
        "in-order-then-everything-again": [*by_step(data), data],
    }
    for name, variant in variants.items():
        state, transitions = drive(r, variant, max_pending_steps=10_000)
        assert [t.to_dict() for t in transitions] == ref, name
        assert state == ref_state, name


def _grouped(batch: list[tuple[str, int, float]]) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for target, step, value in batch:
        out.setdefault(step, {}).setdefault(target, value)
    return out


@pytest.mark.parametrize("r", ORDER_RULES)
def test_grouped_samples_match_triples(r: Rule) -> None:
    data = _random_data(4)
    ref_state, ref = _in_order(r, data)
    rng = random.Random(4)
    # Batches that split steps, and replay some: the grouped merge must keep first values.
    order = sorted(data, key=lambda s: s[1] + rng.uniform(0, 15))
    batches = [order[i : i + 7] for i in range(0, len(order), 7)]
    batches += [b for b in batches if rng.random() < 0.3]
    state: dict[str, Any] | None = None
    transitions: list[Transition] = []
    for batch in batches:
        state, more = evaluate_steps(r, state, _grouped(batch), max_pending_steps=10_000)
        transitions.extend(more)
    state, more = flush(r, state)
    assert [t.to_dict() for t in transitions + more] == ref
    assert state == ref_state


SHORTCUT_RULES = [
    pytest.param(
        rule(condition="below", threshold=3.0, clear_threshold=4.0, consecutive=3, clear_after=2),
        id="below-hysteresis",
    ),
    pytest.param(
        rule(
            condition="above",
            threshold=6.0,
            clear_threshold=5.0,
            consecutive=2,
            aggregation="at_least_k",
            k=2,
        ),
        id="above-k-hysteresis",
    ),
    pytest.param(
        rule(condition="below", threshold=4.0, aggregation="gmean", consecutive=2), id="gmean"
    ),
]


@pytest.mark.parametrize("r", SHORTCUT_RULES)
def test_all_inside_shortcut_matches_the_per_series_path(
    r: Rule, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps with every value on the safe side of an above/below bound skip the per-target
    checks; the result must be the general path's (``_step_series`` on every target), also for
    latches that are tripped or part way to tripping when such a step comes."""
    rng = random.Random(11)
    data = []
    for target in ("a", "b"):  # two targets, so that whole steps fall on the safe side
        level = 4.5
        for i in range(400):
            level = min(8.0, max(1.0, level + rng.gauss(0, 0.8)))
            data.append((target, i, level if rng.random() > 0.01 else NAN))
    shortcuts = 0
    step_inside = checks._step_inside

    def counted(*args: Any) -> None:
        nonlocal shortcuts
        shortcuts += 1
        step_inside(*args)

    monkeypatch.setattr(checks, "_step_inside", counted)
    fast_state, fast = _in_order(r, data)
    monkeypatch.setattr(checks, "REBUILDABLE", frozenset())  # no fused path at all
    slow_state, slow = _in_order(r, data)
    assert len(fast) > 4, "the data must fire and resolve, or the comparison proves little"
    assert shortcuts > 50, "the data rarely took the shortcut: the comparison proves little"
    assert fast == slow
    assert fast_state == slow_state


def test_grouped_samples_keep_the_callers_dicts() -> None:
    r = rule(condition="above", threshold=1.0)
    first = {0: {"a": 0.0, "b": 0.0}}
    state, _ = evaluate_steps(r, None, first)
    second = {0: {"a": 9.0}, 1: {"a": 0.5, "b": 0.5}}
    state, transitions = evaluate_steps(r, state, second)
    assert first == {0: {"a": 0.0, "b": 0.0}} and second == {0: {"a": 9.0}, 1: {"a": 0.5, "b": 0.5}}
    # Steps 0 and 1 were judged, step 0 with the first a = 0.0: a = 9.0 would have fired.
    assert state["watermark"] == 1 and transitions == []


@pytest.mark.parametrize("r", ORDER_RULES)
def test_state_json_round_trip(r: Rule) -> None:
    data = _random_data(7)
    ref_state, ref = _in_order(r, data)
    batches = by_step(data)
    for cut in (1, len(batches) // 3, len(batches) // 2 + 1):
        # split inside a step too, so the pending buffer (with NaN/Inf values) is persisted
        head = [s for b in batches[:cut] for s in b] + batches[cut][:1]
        tail = batches[cut][1:] + [s for b in batches[cut + 1 :] for s in b]
        state, first = evaluate(r, None, head)
        text = json.dumps(state, allow_nan=False)  # a JSONB column rejects NaN literals
        state, second = evaluate(r, json.loads(text), tail)
        state, third = flush(r, json.loads(json.dumps(state, allow_nan=False)))
        assert [t.to_dict() for t in first + second + third] == ref
        assert state == ref_state


def test_evaluate_does_not_mutate_its_input_state() -> None:
    r = rule(condition="above", threshold=1.0)
    state, _ = evaluate(r, None, [("a", 0, 0.0), ("a", 1, 2.0)])
    frozen = json.dumps(state)
    evaluate(r, state, [("a", 2, 2.0), ("a", 3, 2.0)])
    assert json.dumps(state) == frozen


def test_replayed_step_with_other_value_changes_nothing() -> None:
    r = rule(condition="above", threshold=1.0)
    state, _ = evaluate(r, None, [("a", 0, 0.0), ("a", 1, 0.0), ("b", 0, 0.0), ("b", 1, 0.0)])
    assert state["watermark"] == 1
    again, transitions = evaluate(r, state, [("a", 1, 50.0), ("b", 0, 50.0)])
    assert transitions == [] and again == state


def test_duplicate_pending_sample_keeps_first_value() -> None:
    r = rule(condition="above", threshold=1.0)
    state, _ = evaluate(r, None, [("a", 0, 0.0), ("a", 0, 5.0)])
    assert state["pending"] == [[0, "a", 0.0]]


def test_first_step_waits_for_a_later_step() -> None:
    r = rule(condition="above", threshold=1.0)
    state, transitions = evaluate(r, None, [("a", 0, 5.0)])
    assert transitions == [] and state["watermark"] is None
    state, transitions = evaluate(r, state, [("b", 0, 5.0)])  # same step, other target: joins
    assert transitions == []
    state, transitions = evaluate(r, state, [("a", 1, 0.0)])
    assert summary(transitions) == [("firing", 0, 0, ("a", "b"))]


def test_step_waits_for_every_expected_target() -> None:
    r = rule(condition="above", threshold=1.0)
    state, _ = evaluate(r, None, [("a", 0, 0.0), ("b", 0, 0.0), ("a", 1, 0.0), ("b", 1, 0.0)])
    state, transitions = evaluate(r, state, [("a", 2, 5.0)])
    assert transitions == [] and state["watermark"] == 1
    state, transitions = evaluate(r, state, [("b", 2, 0.0)])
    assert summary(transitions) == [("firing", 2, 2, ("a",))]


def test_late_batch_filling_a_gap_is_evaluated_in_order() -> None:
    r = rule(condition="above", threshold=1.0, consecutive=2)
    data = samples_for({"a": [0, 0, 0, 0, 5, 0, 5, 5]}, stride=10)
    _, ref = drive(r, by_step(data))
    gap_step = 40
    early = [s for s in data if s[1] != gap_step]
    late = [s for s in data if s[1] == gap_step]
    state, transitions = evaluate(r, None, early)
    assert state["watermark"] == 30  # 50.. wait behind the missing step 40
    state, more = evaluate(r, state, late)
    state, rest = flush(r, state)
    assert [t.to_dict() for t in transitions + more + rest] == [t.to_dict() for t in ref]


def test_gap_never_filled_is_given_up_after_bounded_lag() -> None:
    r = rule(condition="above", threshold=1.0)
    data = [("a", s, 0.0) for s in (0, 10, 20, 40, 50, 60)]
    state, _ = evaluate(r, None, data, max_pending_steps=2)
    # 40 waited for 30 until 3 steps were pending; then the stride became 20 and 50, 60 followed
    assert state["watermark"] == 60 and state["stride"] == 10 and state["pending"] == []
    # 30 is now behind the watermark: dropped
    state2, transitions = evaluate(r, state, [("a", 30, 99.0)], max_pending_steps=2)
    assert transitions == [] and state2 == state


def test_flush_evaluates_everything_pending() -> None:
    r = rule(condition="above", threshold=1.0)
    state, transitions = evaluate(r, None, [("a", 0, 5.0)])
    assert transitions == []
    state, transitions = flush(r, state)
    assert summary(transitions) == [("firing", 0, 0, ("a",))]
    assert state["pending"] == []


def test_disabled_rule_tracks_statistics_but_emits_nothing() -> None:
    r = rule(condition="drop_from_baseline", threshold=0.5, baseline_samples=2, enabled=False)
    state, transitions = drive(r, by_step(samples_for({"a": [10, 10, 1]})), do_flush=True)
    assert transitions == [] and state["series"]["a"]["b_n"] == 2
    assert not state["alert"]["firing"]
    enabled = r.replace(enabled=True)
    _, transitions = evaluate(enabled, state, [("a", 3, 1.0)])
    assert summary(transitions) == [("firing", 3, 2, ("a",))]


def test_bad_state_version_is_an_error() -> None:
    r = rule(condition="above", threshold=1.0)
    with pytest.raises(RuleError, match="state version"):
        evaluate(r, {"v": 99}, [])


def test_wire_strings_are_accepted_as_values() -> None:
    r = rule(condition="non_finite")
    _, transitions = drive(r, [[("a", 0, 1.0), ("a", 1, "NaN"), ("a", 2, "Infinity")]])
    assert summary(transitions) == [("firing", 1, 1, ("a",))]
    assert math.isnan(transitions[0].targets[0].value)


# -- transitions: message, suggested action, dict form ----------------------------------------


def test_firing_message_names_value_bound_and_rule() -> None:
    r = Rule(
        name="sa_collapse",
        quantity="sa_sign_diversity",
        condition="below",
        threshold=0.1,
        consecutive=2,
    )
    data = samples_for({"h.3.attn.weight": [0.5, 0.04, 0.03], "h.1.mlp.weight": [0.5, 0.5, 0.5]})
    _, transitions = drive(r, by_step(data))
    (t,) = transitions
    assert "sa_collapse" in t.message and "0.03 < 0.1" in t.message
    assert "h.3.attn.weight" in t.message and "since step 1" in t.message
    assert t.targets[0].bound == 0.1 and t.targets[0].value == 0.03 and t.targets[0].since == 1
    # The engine reports the rule's own runbook (none here); the service completes it.
    assert t.suggested_action == ""
    action = runbook.suggested_action(r, "run-7")
    assert "POST /api/v1/runs/run-7/commands" in action and '"kind": "msign"' in action


def test_aggregate_message_names_baseline_bound() -> None:
    r = rule(
        quantity="stable_rank",
        condition="drop_from_baseline",
        threshold=0.5,
        aggregation="gmean",
        baseline_samples=1,
    )
    _, transitions = drive(r, by_step(samples_for({"a": [8, 2], "b": [8, 2]})))
    (t,) = transitions
    assert "gmean(stable_rank)" in t.message and "0.5 x baseline 8 = 4" in t.message
    assert t.value == pytest.approx(2.0) and t.bound == pytest.approx(4.0)


def test_aggregate_message_names_targets_that_did_not_trip_themselves() -> None:
    # b is new at step 3 (its own warm-up not done), so no target trips on its own: the
    # message names every target, without a "since".
    r = rule(condition="below", threshold=1.0, aggregation="mean", warmup=2)
    data = [*samples_for({"a": [5, 5, 5, 5, 5]}), ("b", 3, -10.0), ("b", 4, 5.0)]
    _, transitions = drive(r, by_step(data))
    firing = transitions[0]
    assert firing.kind is TransitionKind.FIRING and firing.step == 3
    assert "layers that moved first: a = 5, b = -10 (step 3)" in firing.message


def test_transition_dict_round_trip_is_json_safe() -> None:
    r = rule(condition="non_finite")
    _, transitions = drive(r, by_step(samples_for({"a": [1, NAN, 1]})))
    for t in transitions:
        data = json.loads(json.dumps(t.to_dict(), allow_nan=False))
        assert Transition.from_dict(data).to_dict() == t.to_dict()


# -- rules: validation and dict form -----------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field_name"),
    [
        ({"condition": "sideways", "threshold": 1.0}, "condition"),
        ({"condition": "above"}, "threshold"),
        ({"condition": "above", "threshold": math.nan}, "threshold"),
        ({"condition": "non_finite", "threshold": 1.0}, "threshold"),
        ({"condition": "drop_from_baseline", "threshold": 0.0}, "threshold"),
        ({"condition": "above", "threshold": 1.0, "aggregation": "median"}, "aggregation"),
        ({"condition": "above", "threshold": 1.0, "aggregation": "at_least_k"}, "k"),
        ({"condition": "above", "threshold": 1.0, "k": 2}, "k"),
        ({"condition": "above", "threshold": 1.0, "consecutive": 0}, "consecutive"),
        ({"condition": "above", "threshold": 1.0, "severity": "fatal"}, "severity"),
        ({"condition": "above", "threshold": 1.0, "cooldown": -1}, "cooldown"),
        ({"condition": "above", "threshold": 1.0, "clear_threshold": 2.0}, "clear_threshold"),
        ({"condition": "below", "threshold": 1.0, "clear_threshold": 0.5}, "clear_threshold"),
        ({"condition": "above", "threshold": 1.0, "ema_alpha": 0.0}, "ema_alpha"),
        ({"condition": "above", "threshold": 1.0, "window": 1}, "window"),
        ({"condition": "above", "threshold": 1.0, "targets": []}, "targets"),
        ({"condition": "above", "threshold": 1.0, "msign": {"engine": "qr"}}, "msign.engine"),
        ({"condition": "above", "threshold": 1.0, "msign": {"targets": "mlp"}}, "msign.targets"),
        ({"condition": "above", "threshold": 1.0, "msign": {"max_orders": 0}}, "msign.max_orders"),
        (
            {"condition": "above", "threshold": 1.0, "lr_backoff": {"factor": 1.0}},
            "lr_backoff.factor",
        ),
        (
            {"condition": "above", "threshold": 1.0, "lr_backoff": {"factor": "x"}},
            "lr_backoff.factor",
        ),
        (
            {"condition": "above", "threshold": 1.0, "lr_backoff": {"repeat_every": 0}},
            "lr_backoff.repeat_every",
        ),
        ({"condition": "above", "threshold": 1.0, "name": ""}, "name"),
    ],
)
def test_rule_validation_names_the_field(kwargs: dict[str, Any], field_name: str) -> None:
    with pytest.raises(RuleError) as excinfo:
        rule(**kwargs)
    assert str(excinfo.value).startswith(field_name)
    assert "valid" in str(excinfo.value)


def test_rule_dict_round_trip() -> None:
    r = rule(
        condition="ratio_to_ema",
        threshold=2.5,
        targets=["global"],
        aggregation="at_least_k",
        k=1,
        clear_threshold=2.0,
        msign=MSignAction(enabled=True, targets=("h.0.*",), engine="newton_schulz"),
    )
    data = json.loads(json.dumps(r.to_dict()))
    assert Rule.from_dict(data) == r


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (
            {"name": "x", "quantity": "q", "condition": "above", "threshold": 1, "colour": 1},
            "unknown field",
        ),
        ({"name": "x", "condition": "above"}, "missing required"),
        (
            {"name": "x", "quantity": "q", "condition": "above", "threshold": 1, "msign": {"x": 1}},
            "msign has unknown",
        ),
        ([1, 2], "use an object"),
    ],
)
def test_rule_from_dict_errors(data: Any, match: str) -> None:
    with pytest.raises(RuleError, match=match):
        Rule.from_dict(data)


def test_rule_matches() -> None:
    r = rule(condition="above", threshold=1.0, targets=["transformer.h.0.*"])
    assert r.matches("q", "transformer.h.0.attn.c_attn.weight[q]")
    assert not r.matches("q", "transformer.h.10.attn.c_attn.weight")
    assert not r.matches("other", "transformer.h.0.attn.c_attn.weight")


def test_engine_imports_only_the_standard_library() -> None:
    """The pure engine (the alerts package but its service, store and runbook) imports only
    the standard library and the server's own stdlib-only modules (vocab, wire)."""
    package = Path(alerts.__file__).parent
    pure = {
        "__init__",
        "rules",
        "state",
        "checks",
        "history",
        "buffer",
        "engine",
        "transitions",
        "pack",
        "peers",
    }
    own = {f"rankguard.server.alerts.{name}" for name in pure} | {
        "rankguard.server.alerts",
        "rankguard.server.vocab",
        "rankguard.server.wire",
        # the pack's runbook texts; itself stdlib-only (checked below)
        "rankguard.server.alerts.runbook",
    }
    server = Path(alerts.__file__).parents[1]
    sources = [package / f"{name}.py" for name in [*pure, "runbook"]]
    sources += [server / "vocab.py", server / "wire.py"]
    modules = set()
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                modules.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules.add(node.module)
    outside = {m for m in modules - own if m.split(".")[0] not in sys.stdlib_module_names}
    assert outside == set()
    assert modules, "the walk found no imports: the check is broken"


@pytest.mark.parametrize(
    "sample",
    [("a", 1.5, 1.0), ("a", "3", 1.0), ("a", True, 1.0), ("a", 3, "lots"), (7, 3, 1.0)],
)
def test_malformed_sample_is_a_rule_error(sample: tuple[Any, Any, Any]) -> None:
    r = rule(condition="above", threshold=1.0)
    with pytest.raises(RuleError, match="sample"):
        evaluate(r, None, [sample])


def test_repeat_every_reorders_msign_while_firing_within_the_rate_limit() -> None:
    rule = Rule(
        name="logit",
        quantity="attention_logit_max",
        condition=Condition.ABOVE,
        threshold=1e3,
        msign=MSignAction(enabled=True, targets="attention", max_orders=3, window_steps=100,
                          repeat_every=10),
    )  # fmt: skip
    samples = [("h.0.attn", step, 5e3 if step >= 20 else 1.0) for step in range(0, 100, 5)]
    state, transitions = evaluate(rule, None, samples)
    state, tail = flush(rule, state)
    ordered = [(t.kind, t.step) for t in transitions + tail if t.command is not None]
    # fired at 20, then again every 10 steps while firing, until 3 orders per 100 steps
    assert ordered == [
        (TransitionKind.FIRING, 20),
        (TransitionKind.REPEAT, 30),
        (TransitionKind.REPEAT, 40),
    ]
    assert all(not t.notify for t in transitions if t.kind is TransitionKind.REPEAT)
    round_trip = Rule.from_dict(rule.to_dict())
    assert round_trip.msign.repeat_every == 10
