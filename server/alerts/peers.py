"""The detectors users already run, as built-in rules with their published defaults: a user who
moves to rankguard keeps the alert they had (names after the product, values from its source,
each condition defined in ``history.py``).

They watch the loss (the probe reports every step's loss) or the global gradient norm (the
probe reports it at sample steps, so a window of N samples spans N x ``every`` steps there,
where the trainers see every step). ``peer_rules()`` returns them all; the default pack takes
the ones that stayed quiet on every healthy benchmark run (``pack.py``).
"""

from __future__ import annotations

from rankguard.server.alerts.rules import Condition, Rule
from rankguard.server.vocab import AlertSeverity

OLMO_LOSS_SPIKE = "olmo_loss_spike"
OLMO_GRAD_NORM_SPIKE = "olmo_grad_norm_spike"
MEGATRON_SPIKY_LOSS = "megatron_spiky_loss"
MEGATRON_LARGE_GRADS = "megatron_large_grads"
LIGHTNING_SPIKE = "lightning_spike_detection"
FOUNDRY_KILL_LOSS_SPIKE = "llmfoundry_kill_loss_spike"
WANDB_ZSCORE = "wandb_loss_zscore"
CUSUM_LOSS = "loss_cusum"
LOSS_STALL = "loss_stall"
LOSS_DIVERGENCE = "loss_gradual_divergence"

_CHECK_RUN = (
    "Look at the loss and gradient-norm panels around the step named: a spike that recovers "
    "by itself needs nothing; one that repeats or grows calls for a lower learning rate, "
    "skipping the batches around it, or a rollback to a checkpoint before it."
)


def _loss_rule(name: str, condition: Condition, description: str, **fields: object) -> Rule:
    quantity = str(fields.pop("quantity", "loss"))
    return Rule(
        name=name,
        quantity=quantity,
        condition=condition,
        targets=("global",),
        severity=AlertSeverity.WARNING,
        description=description,
        runbook=_CHECK_RUN,
        **fields,  # type: ignore[arg-type]
    )


def peer_rules() -> list[Rule]:
    """Every peer detector with its published defaults (and rankguard's stall/divergence)."""
    return [
        _loss_rule(
            OLMO_LOSS_SPIKE,
            Condition.ZSCORE_ABOVE,
            "OLMo-core StabilityMonitorCallback: loss above the mean + 6 std of the previous "
            "128 values (judged with a full window).",
            threshold=6.0,
            window=128,
        ),
        _loss_rule(
            OLMO_GRAD_NORM_SPIKE,
            Condition.ZSCORE_ABOVE,
            "OLMo-core StabilityMonitorCallback on the gradient norm: above the mean + 6 std of "
            "the previous 128 samples.",
            quantity="grad_norm",
            threshold=6.0,
            window=128,
        ),
        _loss_rule(
            MEGATRON_SPIKY_LOSS,
            Condition.MAX_RATIO,
            "Megatron-LM --check-for-spiky-loss: loss at least 10x the largest of the first 100.",
            threshold=10.0,
            window=100,
        ),
        _loss_rule(
            MEGATRON_LARGE_GRADS,
            Condition.MAX_RATIO,
            "Megatron-LM --check-for-large-grads: gradient norm at least 10x the largest of the "
            "first 100 samples (Megatron checks each gradient bucket; this is the global norm).",
            quantity="grad_norm",
            threshold=10.0,
            window=100,
        ),
        _loss_rule(
            LIGHTNING_SPIKE,
            Condition.RISE_OVER_MEAN,
            "Lightning SpikeDetection (mode min, window 10, warmup 1, rtol 2): the loss rose and "
            "is at least 2x its running mean away from it, i.e. >= 3x the mean.",
            threshold=2.0,
            window=10,
            warmup=1,
        ),
        _loss_rule(
            FOUNDRY_KILL_LOSS_SPIKE,
            Condition.RATIO_TO_MEAN,
            "llm-foundry KillLossSpike: loss >= 2x the mean of the previous 100 for more than "
            "4 consecutive steps (patience 4).",
            threshold=2.0,
            window=100,
            consecutive=5,
        ),
        _loss_rule(
            WANDB_ZSCORE,
            Condition.ZSCORE,
            "W&B Automations MetricZScoreFilter (window 30, threshold 3, either direction) on "
            "the loss: |z| > 3 against the previous 30 values.",
            threshold=3.0,
            window=30,
        ),
        _loss_rule(
            CUSUM_LOSS,
            Condition.CUSUM,
            "Page's CUSUM on the loss with trainscope's defaults (h 6, slack 1, median/MAD over "
            "the last 200, from 30 samples), upward only.",
            threshold=6.0,
            slack=1.0,
            window=200,
            warmup=30,
        ),
        _loss_rule(
            LOSS_STALL,
            Condition.RATIO_TO_BEST,
            "The loss stopped improving: its trailing 50-step mean made no new best for 150 "
            "consecutive steps (calibrated on the benchmark's healthy runs).",
            threshold=1.0,
            window=50,
            consecutive=150,
        ),
        _loss_rule(
            LOSS_DIVERGENCE,
            Condition.RATIO_TO_BEST,
            "Gradual divergence: the loss's trailing 25-step mean is 10% above its best for 10 "
            "consecutive steps (calibrated on the benchmark's healthy runs).",
            threshold=1.10,
            window=25,
            consecutive=10,
        ),
    ]


__all__ = [
    "CUSUM_LOSS",
    "FOUNDRY_KILL_LOSS_SPIKE",
    "LIGHTNING_SPIKE",
    "LOSS_DIVERGENCE",
    "LOSS_STALL",
    "MEGATRON_LARGE_GRADS",
    "MEGATRON_SPIKY_LOSS",
    "OLMO_GRAD_NORM_SPIKE",
    "OLMO_LOSS_SPIKE",
    "WANDB_ZSCORE",
    "peer_rules",
]
