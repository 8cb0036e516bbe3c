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


# --- the peers' detectors: the server's rules over per-step series ----------------------------
# (their definitions against the published sources: tests/server/test_alert_history.py)


def test_peers_see_every_step_of_the_loss_and_gradient_norm() -> None:
    from rankguard.server.alerts.peers import MEGATRON_LARGE_GRADS, OLMO_LOSS_SPIKE, peer_rules

    rules = [r for r in peer_rules() if r.name in (OLMO_LOSS_SPIKE, MEGATRON_LARGE_GRADS)]
    losses = noisy(300)
    grads = noisy(300, level=1.0, sd=0.1, seed=1)
    quiet = detectors.peer_first_firings(rules, {"losses": losses, "grad_norms": grads})
    assert quiet == {OLMO_LOSS_SPIKE: None, MEGATRON_LARGE_GRADS: None}
    spiked = {
        "losses": [*losses[:200], 3.5, *losses[201:]],  # 20 sd above the mean: OLMo at 200
        "grad_norms": [*grads[:250], 20.0, *grads[251:]],  # >= 10x the early max
    }
    assert detectors.peer_first_firings(rules, spiked) == {
        OLMO_LOSS_SPIKE: 200,
        MEGATRON_LARGE_GRADS: 250,
    }


def test_peer_rules_need_a_per_step_series() -> None:
    rule = Rule(name="x", quantity="stable_rank", condition=Condition.ABOVE, threshold=1.0)
    with pytest.raises(ValueError, match="stable_rank"):
        detectors.peer_first_firings([rule], {"losses": [1.0], "grad_norms": [1.0]})


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
