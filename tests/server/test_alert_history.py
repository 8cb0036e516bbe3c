"""The history conditions (the peers' detectors as rule kinds) against their published sources.

Each reference below is a plain transcription of the source's algorithm (cited in
``server/alerts/history.py``), run over the same series; the engine's first firing must equal
the reference's first detection on every series, spiky or quiet.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from collections import deque
from collections.abc import Callable, Sequence

import pytest

from rankguard.server.alerts import Condition, Rule, RuleError, evaluate, flush
from rankguard.server.alerts.peers import peer_rules
from rankguard.server.alerts.transitions import TransitionKind

Series = list[float]


def first_firing(rule: Rule, values: Sequence[float]) -> int | None:
    samples = [("global", i, v) for i, v in enumerate(values)]
    state, transitions = evaluate(rule, None, samples)
    _, tail = flush(rule, state)
    return next((t.step for t in [*transitions, *tail] if t.kind is TransitionKind.FIRING), None)


def rule(condition: Condition, threshold: float, **fields: object) -> Rule:
    return Rule(
        name="r",
        quantity="loss",
        condition=condition,
        threshold=threshold,
        **fields,  # type: ignore[arg-type]
    )


# --- references, transcribed from the sources ---------------------------------------------------


def olmo_reference(values: Series, window: int = 128, sigmas: float = 6.0) -> int | None:
    """OLMo-core StabilityMonitorCallback: _is_spike on the history, then append (bounded)."""
    history: list[float] = []
    for i, v in enumerate(values):
        if len(history) >= window:
            mean = sum(history) / len(history)
            std = math.sqrt(sum((x - mean) ** 2 for x in history) / len(history))
            if std >= 1e-10 and v > mean + sigmas * std:
                return i
        history.append(v)
        if len(history) > window:
            history.pop(0)
    return None


def megatron_reference(values: Series, threshold: float = 10.0, num: int = 100) -> int | None:
    """Megatron-LM RerunStateMachine.is_unexpectedly_large."""
    count, largest = 0, 0.0
    for i, v in enumerate(values):
        value = abs(v)
        if count < num:
            count += 1
            largest = max(largest, value)
            continue
        if value >= largest * threshold:
            return i
    return None


def foundry_reference(
    values: Series, patience: int = 4, multiplier: float = 2.0, window: int = 100
) -> int | None:
    """llm-foundry KillLossSpike.batch_end / detect_loss_spike (the loss-spike branch)."""
    losses: deque[float] = deque(maxlen=window)
    outliers = 0
    for i, v in enumerate(values):
        if len(losses) == window:
            mean = statistics.fmean(losses)
            if v >= mean * multiplier:
                outliers += 1
                if outliers > patience:
                    return i
            elif outliers > 0:
                outliers = 0
        losses.append(v)
    return None


def lightning_reference(
    values: Series, window: int = 10, warmup: int = 1, rtol: float = 2.0
) -> int | None:
    """Lightning SpikeDetection (mode min, atol None): raises at the first spike."""
    running: deque[float] = deque(maxlen=window)
    last = 0.0
    for i, v in enumerate(values):
        if i >= warmup:
            mean = statistics.fmean(running)
            if not v - last <= 0.0 and abs(v - mean) >= abs(rtol * mean):
                return i
        running.append(v)
        last = v
    return None


def cusum_reference(
    values: Series, h: float = 6.0, slack: float = 1.0, window: int = 200, min_obs: int = 30
) -> int | None:
    """trainscope ChangePointDetector.update (its positive sum: the upward change)."""
    history: deque[float] = deque()
    positive = 0.0
    for i, v in enumerate(values):
        if len(history) < min_obs:
            history.append(v)
            continue
        median = statistics.median(history)
        std = max(statistics.median(abs(x - median) for x in history) * 1.4826, 1e-12)
        positive = max(0.0, positive + (v - median) / std - slack)
        history.append(v)
        if len(history) > window:
            history.popleft()
        if positive >= h:
            return i
    return None


def best_reference(values: Series, ratio: float, window: int, patience: int) -> int | None:
    """Trailing mean above ratio x its lowest earlier value, ``patience`` samples in a row."""
    best, run = math.inf, 0
    for i in range(window - 1, len(values)):
        mean = statistics.fmean(values[i - window + 1 : i + 1])
        if best < math.inf and mean > ratio * best:
            run += 1
            if run >= patience:
                return i
        else:
            run = 0
        best = min(best, mean)
    return None


# --- series: quiet, spiky, drifting ---------------------------------------------------------------


def series(seed: int, n: int = 400) -> Series:
    """A falling loss with noise, and, by seed, a spike, a drift or a jump late in the run."""
    rng = random.Random(seed)
    out = [2.0 + 3.0 * math.exp(-i / 60) + rng.gauss(0.0, 0.05) for i in range(n)]
    kind = seed % 4
    at = rng.randrange(150, 350)
    if kind == 1:  # one-step spike of a random size
        out[at] *= rng.choice([1.5, 2.5, 4.0, 40.0])
    elif kind == 2:  # slow upward drift
        for i in range(at, n):
            out[i] += 0.01 * (i - at)
    elif kind == 3:  # a jump that stays
        for i in range(at, n):
            out[i] *= rng.choice([1.2, 2.2, 3.5])
    return out


SEEDS = range(24)


def rise_reference(values: Series, ratio: float, skip: int, count: int) -> int | None:
    """value > ratio x the mean of the ``count`` values after the first ``skip``."""
    if len(values) < skip + count:
        return None
    base = statistics.fmean(values[skip : skip + count])
    return next((i for i in range(skip + count, len(values)) if values[i] > ratio * base), None)


CASES: list[tuple[str, Rule, Callable[[Series], int | None]]] = [
    ("olmo", rule(Condition.ZSCORE_ABOVE, 6.0, window=128), olmo_reference),
    ("megatron", rule(Condition.MAX_RATIO, 10.0, window=100), megatron_reference),
    (
        "megatron_low",
        rule(Condition.MAX_RATIO, 1.2, window=100),
        lambda v: megatron_reference(v, threshold=1.2),
    ),
    ("foundry", rule(Condition.RATIO_TO_MEAN, 2.0, window=100, consecutive=5), foundry_reference),
    (
        "foundry_tight",
        rule(Condition.RATIO_TO_MEAN, 1.15, window=100, consecutive=5),
        lambda v: foundry_reference(v, multiplier=1.15),
    ),
    ("lightning", rule(Condition.RISE_OVER_MEAN, 2.0, window=10, warmup=1), lightning_reference),
    (
        "lightning_tight",
        rule(Condition.RISE_OVER_MEAN, 0.1, window=10, warmup=1),
        lambda v: lightning_reference(v, rtol=0.1),
    ),
    (
        "cusum",
        rule(Condition.CUSUM, 6.0, slack=1.0, window=200, warmup=30),
        cusum_reference,
    ),
    (
        "stall",
        rule(Condition.RATIO_TO_BEST, 1.0, window=25, consecutive=40),
        lambda v: best_reference(v, 1.0, 25, 40),
    ),
    (
        "rise_from_baseline",
        rule(Condition.RISE_FROM_BASELINE, 1.3, warmup=150, baseline_samples=5),
        lambda v: rise_reference(v, 1.3, 150, 5),
    ),
    (
        "divergence",
        rule(Condition.RATIO_TO_BEST, 1.1, window=25, consecutive=3),
        lambda v: best_reference(v, 1.1, 25, 3),
    ),
]


@pytest.mark.parametrize(("name", "the_rule", "reference"), CASES, ids=[c[0] for c in CASES])
def test_first_firing_matches_the_source(
    name: str, the_rule: Rule, reference: Callable[[Series], int | None]
) -> None:
    fired = 0
    for seed in SEEDS:
        values = series(seed)
        expected = reference(values)
        assert first_firing(the_rule, values) == expected, (name, seed)
        fired += expected is not None
    assert 0 < fired < len(SEEDS) or name in ("olmo", "megatron"), (name, fired)


def test_the_cases_fire_and_stay_quiet() -> None:
    # the comparisons above are not vacuous: each published detector fires on some series
    # and not on all
    for name, _, reference in CASES:
        outcomes = {reference(series(seed)) is None for seed in SEEDS}
        assert outcomes == {True, False}, name


def test_lightning_ignores_a_value_below_the_previous_one() -> None:
    # 1, then 10 (a spike above 3x the mean); from 20 down to 15 is "better" in mode min
    r = rule(Condition.RISE_OVER_MEAN, 2.0, window=10, warmup=1)
    assert first_firing(r, [1.0, 1.0, 1.0, 10.0]) == 3
    assert lightning_reference([1.0, 1.0, 1.0, 10.0]) == 3
    assert first_firing(r, [1.0, 20.0, 15.0]) == 1


def test_lightning_rule_resolves_once_the_value_falls_back() -> None:
    # a falling value is clean however far it still is from the mean: the loss recovers
    r = rule(Condition.RISE_OVER_MEAN, 2.0, window=10, warmup=1)
    samples = [("global", i, v) for i, v in enumerate([1.0, 1.0, 1.0, 20.0, 19.0])]
    _, transitions = evaluate(r, None, samples)
    kinds = [(t.kind, t.step) for t in transitions]
    assert kinds == [(TransitionKind.FIRING, 3), (TransitionKind.RESOLVED, 4)]


def test_olmo_never_fires_on_a_window_without_spread() -> None:
    r = rule(Condition.ZSCORE_ABOVE, 6.0, window=128)
    assert first_firing(r, [2.0] * 128 + [100.0]) is None
    assert first_firing(r, [2.0, 2.2] * 64 + [100.0]) == 128


def test_megatron_freezes_the_early_maximum() -> None:
    r = rule(Condition.MAX_RATIO, 10.0, window=100)
    warm = [3.0] * 99 + [4.0]
    assert first_firing(r, [*warm, 39.0]) is None
    assert first_firing(r, [*warm, 40.0]) == 100
    assert first_firing(r, [*warm, *[0.5] * 200, 30.0]) is None  # the bar does not follow down


def test_non_finite_trips_every_history_condition_at_once() -> None:
    for _, the_rule, _ in CASES:
        one = the_rule.replace(consecutive=1)
        assert first_firing(one, [2.0, 2.1, math.nan]) == 2, the_rule.condition


@pytest.mark.parametrize(("name", "the_rule", "reference"), CASES, ids=[c[0] for c in CASES])
def test_the_bound_is_the_value_that_would_trip(
    name: str, the_rule: Rule, reference: Callable[[Series], int | None]
) -> None:
    """The reported bound (what a margin to firing reads) is in the value's units: a value just
    past it trips the sample, one just short of it does not (one-sample rules)."""
    from rankguard.server.alerts.checks import check, step_series
    from rankguard.server.alerts.state import new_series

    one = the_rule.replace(consecutive=1)
    values = series(4)  # quiet: every window has spread
    st = new_series(one.condition)
    for i, v in enumerate(values[:250]):
        step_series(one, st, i, v)
    bound = check(one, st, 250, values[250]).bound
    assert bound is not None and math.isfinite(bound), name
    eps = 1e-6 * max(1.0, abs(bound))
    assert check(one, dict(st), 250, bound + eps).trips, name
    assert not check(one, dict(st), 250, bound - eps).trips, name


def test_state_is_json_safe_and_bounded() -> None:
    for the_rule in peer_rules():
        values = [*series(3, n=3000), math.inf]
        state, _ = evaluate(the_rule, None, [("global", i, v) for i, v in enumerate(values)])
        text = json.dumps(state, allow_nan=False)  # no NaN/Inf literal anywhere
        for s in state["series"].values():
            assert len(s.get("window", ())) <= the_rule.window
        assert len(text) < 40 * the_rule.window + 2000, the_rule.name


def test_split_batches_give_the_same_result() -> None:
    values = series(7)
    samples = [("global", i, v) for i, v in enumerate(values)]
    for _, the_rule, _ in CASES:
        whole, t1 = evaluate(the_rule, None, samples)
        state, t2 = None, []
        for k in range(0, len(samples), 37):
            state, t = evaluate(the_rule, state, samples[k : k + 37])
            t2 += t
        assert [(t.kind, t.step) for t in t1] == [(t.kind, t.step) for t in t2]
        assert whole == state


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"condition": "cusum", "threshold": 0.0}, "threshold"),
        ({"condition": "max_ratio", "threshold": -1.0}, "threshold"),
        ({"condition": "ratio_to_best", "threshold": 1.0, "window": 5000}, "window"),
        ({"condition": "cusum", "threshold": 5.0, "slack": -0.1}, "slack"),
        ({"condition": "zscore_above", "threshold": 6.0, "clear_threshold": 7.0}, "clear"),
    ],
)
def test_bad_history_rules_name_the_field(fields: dict[str, object], message: str) -> None:
    with pytest.raises(RuleError, match=message):
        Rule.from_dict({"name": "r", "quantity": "loss", **fields})


def test_peer_rules_round_trip_through_dicts() -> None:
    for the_rule in peer_rules():
        assert Rule.from_dict(json.loads(json.dumps(the_rule.to_dict()))) == the_rule
