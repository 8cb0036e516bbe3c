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
from benchmarks.rescue import AlertLoop  # noqa: E402
from rankguard.probe import MemoryTransport  # noqa: E402
from rankguard.server.alerts import Condition, MSignAction, Rule  # noqa: E402


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


# --- the rescue loop pushes the rule's MSign into the probe's transport ----------------------


def _batch(quantity: str, rows: list[tuple[str, int, float]]) -> dict[str, object]:
    return {
        "points": {
            "quantity": [quantity] * len(rows),
            "target": [t for t, _, _ in rows],
            "rank": [0] * len(rows),
            "step": [s for _, s, _ in rows],
            "wall_time": [0.0] * len(rows),
            "value": [v for _, _, v in rows],
        }
    }


def test_alert_loop_orders_msign_once_per_firing_within_rate_limit() -> None:
    rule = Rule(
        name="collapse",
        quantity="sa_sign_diversity",
        condition=Condition.BELOW,
        threshold=0.1,
        cooldown=10,
        msign=MSignAction(enabled=True, targets="attention", max_orders=2, window_steps=1000),
    )
    loop = AlertLoop([rule])
    transport = MemoryTransport()
    values = [0.5, 0.05, 0.05, 0.5, 0.5, 0.5, 0.05, 0.5, 0.5, 0.5, 0.5, 0.05, 0.5]
    for i, v in enumerate(values):
        loop(5 * i, [_batch("sa_sign_diversity", [("w", 5 * i, v)])], transport)
    # Firings at steps 5 (episode 1) and 30 (after cooldown); the third at 55 is rate-limited.
    # Each step is evaluated when the next arrives, so the order is pushed one sample later.
    assert [a["step"] for a in loop.alerts] == [5, 30, 55]
    assert [a["command"] for a in loop.alerts] == [True, True, False]
    commands = transport.take_commands()
    assert [c["id"] for c in commands] == ["collapse-1-5", "collapse-2-30"]  # rule-episode-step
    assert commands[0]["kind"] == "msign" and commands[0]["args"]["targets"] == "attention"
    assert [o["kind"] for o in loop.orders] == ["msign", "msign"]


def test_rescue_rules_back_off_the_lr_unless_msign_only() -> None:
    from benchmarks.rescue import rules_for
    from rankguard.server.alerts.pack import UPDATE_RATIO_HIGH, UPDATE_RATIO_RISE

    names = [f"transformer.h.{i}.mlp.c_fc.weight" for i in range(4)]
    full = {r.name: r for r in rules_for(names)}
    assert full[UPDATE_RATIO_HIGH].action.command()["kind"] == "scale_lr"  # type: ignore[union-attr]
    msign_only = {r.name: r for r in rules_for(names, msign_only=True)}
    assert not msign_only[UPDATE_RATIO_HIGH].enabled and not msign_only[UPDATE_RATIO_RISE].enabled
    lr_rules = (UPDATE_RATIO_HIGH, UPDATE_RATIO_RISE)
    assert all(r.enabled == full[n].enabled for n, r in msign_only.items() if n not in lr_rules)
