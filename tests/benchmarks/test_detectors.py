"""The lead-time benchmark's detectors and failure onset, on synthetic series."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from benchmarks import detectors  # noqa: E402
from benchmarks.early_warning import degradation_step, failure_of, trailing_mean  # noqa: E402
from rankguard.server.alerts import Condition, Rule  # noqa: E402


def noisy(n: int, level: float = 2.5, sd: float = 0.05, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [level + rng.gauss(0.0, sd) for _ in range(n)]


# --- baselines -----------------------------------------------------------------------------


def test_olmo_fires_on_six_sigma_spike_not_on_noise() -> None:
    losses = noisy(300)
    assert detectors.olmo_loss_spike(losses) is None
    spiked = [*losses[:200], 3.5, *losses[201:]]  # 1.0 above mean 2.5, sd 0.05: 20 sd
    assert detectors.olmo_loss_spike(spiked) == 200


def test_olmo_uses_only_the_previous_window() -> None:
    # A 5-sigma bump is below the 6-sigma bound; a 7-sigma one is above it.
    losses = [2.0 + (0.1 if i % 2 else -0.1) for i in range(200)]  # mean 2.0, std 0.1
    assert detectors.olmo_loss_spike([*losses, 2.5]) is None
    assert detectors.olmo_loss_spike([*losses, 2.7]) == 200


def test_olmo_needs_history_and_fires_on_nan() -> None:
    assert detectors.olmo_loss_spike([5.0, 100.0, 5.0]) is None  # too little history
    assert detectors.olmo_loss_spike([5.0, 4.0, math.nan]) == 2


def test_olmo_judges_only_with_a_full_window() -> None:
    # as OLMo-core's StabilityMonitorCallback: a 20-sigma spike after 127 losses is not judged,
    # the same spike after 128 is
    losses = noisy(200)
    assert detectors.olmo_loss_spike([*losses[:127], 3.5]) is None
    assert detectors.olmo_loss_spike([*losses[:128], 3.5]) == 128


def test_megatron_max_of_the_first_100_is_frozen() -> None:
    # Megatron's is_unexpectedly_large: the first 100 values only set the maximum
    warm = [3.0] * 99 + [4.0]
    assert detectors.megatron_spiky_loss([*warm, 39.0]) is None
    assert detectors.megatron_spiky_loss([*warm, 40.0]) == 100  # >= 10x the max, 4.0
    # a spike inside the first 100 is not judged and raises the bar for the rest of the run
    assert detectors.megatron_spiky_loss([3.0, 500.0, *[3.0] * 98, 400.0]) is None
    # the bar does not follow the run down: a later, lower level keeps the early maximum
    assert detectors.megatron_spiky_loss([*warm, *[0.5] * 200, 30.0]) is None
    assert detectors.megatron_large_grads([1.0] * 100 + [10.0]) == 100
    assert detectors.megatron_spiky_loss([1.0, math.inf]) == 1


def test_grad_norm_threshold_against_running_median() -> None:
    norms = noisy(120, level=1.0, sd=0.1)
    assert detectors.grad_norm_threshold(norms) is None
    assert detectors.grad_norm_threshold([*norms, 9.0]) is None
    assert detectors.grad_norm_threshold([*norms, 12.0]) == 120
    assert detectors.grad_norm_threshold([1.0] * 5 + [100.0]) is None  # needs 20 samples
    assert detectors.grad_norm_threshold([1.0] * 5 + [math.nan]) == 5


@pytest.mark.parametrize(
    ("fn", "kwargs"),
    [
        (detectors.olmo_loss_spike, {"window": 1}),
        (detectors.megatron_spiky_loss, {"factor": 0.5}),
        (detectors.megatron_unexpectedly_large, {"num_samples": 0}),
        (detectors.grad_norm_threshold, {"window": 0}),
    ],
)
def test_bad_parameters_are_named(fn: object, kwargs: dict[str, float]) -> None:
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        fn([1.0, 2.0], **kwargs)  # type: ignore[operator]


# --- rules through the alert engine --------------------------------------------------------


def test_rule_first_firing_in_step_order() -> None:
    rule = Rule(
        name="logit", quantity="attention_logit_max", condition=Condition.ABOVE, threshold=100.0
    )
    samples = [(t, s, 10.0 * (s // 5) ** 2) for s in range(5, 80, 5) for t in ("a", "b")]
    # 10 * k^2 > 100 first at k = 4 -> step 20; samples given shuffled.
    random.Random(0).shuffle(samples)
    assert detectors.rule_first_firing(rule, samples) == 20
    assert detectors.rule_first_firing(rule.replace(consecutive=3), samples) == 30
    assert detectors.rule_first_firing(rule.replace(threshold=1e6), samples) is None


def test_rule_first_firings_by_quantity_and_last_step_is_flushed() -> None:
    above = Rule(name="hi", quantity="q", condition=Condition.ABOVE, threshold=1.0)
    other = Rule(name="other", quantity="missing", condition=Condition.ABOVE, threshold=1.0)
    points = {"q": [["t", 5, 0.0], ["t", 10, 0.0], ["t", 15, 2.0]]}
    # Step 15 is the last one: only the flush evaluates it.
    assert detectors.rule_first_firings([above, other], points) == {"hi": 15, "other": None}


# --- failure onset -------------------------------------------------------------------------


def test_trailing_mean_and_non_finite() -> None:
    assert trailing_mean([1.0, 3.0, 5.0], window=2) == [1.0, 2.0, 4.0]
    assert trailing_mean([1.0, math.nan, 1.0], window=2)[1:] == [math.inf, math.inf]


def test_degradation_step_is_sustained_onset() -> None:
    control = [2.0] * 300
    # Above 1.15x for a while (100-129), back below, then above from 200 to the end.
    run = [2.0] * 100 + [3.0] * 30 + [2.0] * 70 + [3.0] * 100
    step = degradation_step(run, control, window=1)
    assert step == 200
    assert degradation_step(control, control) is None
    # Smoothing delays the onset: the trailing-25 mean passes 2.3 after 8 steps at 3.0.
    assert degradation_step(run, control, window=25) == 207


def test_failure_of_uses_onset_for_degradation_and_step_for_explosion() -> None:
    control = {"losses": [2.0] * 300}
    degraded = {"losses": [2.0] * 150 + [3.0] * 150}
    fail = failure_of(degraded, control)
    assert fail["kind"] == "silent_degradation" and fail["step"] == 150 + 7
    exploded = {"losses": [2.0] * 100 + [5.0] + [2.0] * 10}
    assert failure_of(exploded, control) == {"kind": "explosion", "step": 100}
    assert failure_of(control, control) == {"kind": None, "step": None}
