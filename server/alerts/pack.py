"""The default alert rules installed for every new run: the papers' values until calibrated.

The rules are data (``Rule`` objects); the server stores them per run with ``Rule.to_dict()``
and users edit them through the rules API. Sources (the project's notes on the papers,
papers.md): §6.3 (SA sign diversity), §6.1 (stable-rank geometric mean over early layers),
§1.4 (a·M > 1), §6.4 (PSS gradient-norm trigger), §6.7 (attention logits).
dashboard/prometheus/rules.yml carries the Prometheus equivalents:
tests/dashboard/test_prometheus_rules.py checks that it mirrors the pack's rules and
severities; its bounds follow these by hand.

The actions of the critical rules are present but off: MSign on the spectral and attention
rules, a learning-rate backoff (``scale_lr``) on the update-ratio rule. A user turns one on
per rule, or installs ``default_rules(remediate=True)``.

Thresholds marked "calibrated" were chosen on development seeds of the scenario catalog so
that no healthy control fires, and evaluated on seeds recorded after the pack was frozen
(benchmarks/early_warning.py; the history is in BENCHMARKS.md, "The default rule pack"). The
absolute attention-logit and update-ratio bounds depend on the model (head dim, scale,
initialisation); re-check them on a healthy run of your own model.

``default_rules`` is one long list literal: it is data, each value next to its reason.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

from rankguard.server.alerts.peers import peer_rules
from rankguard.server.alerts.rules import (
    Aggregation,
    Condition,
    LRBackoffAction,
    MSignAction,
    Rule,
)
from rankguard.server.alerts.runbook import MSIGN_HOWTO
from rankguard.server.vocab import AlertSeverity, MSignEngine, TargetGroup

SA_COLLAPSE = "sa_sign_diversity_collapse"
STABLE_RANK_COLLAPSE = "stable_rank_collapse"
JACOBIAN_GAIN = "jacobian_alignment_gain_above_one"
GRAD_NORM_SPIKE = "grad_norm_spike"
LOSS_NON_FINITE = "loss_non_finite"
NON_FINITE_VALUES = "non_finite_loss_or_grad"
ATTENTION_LOGIT_HIGH = "attention_logit_high"
ATTENTION_LOGIT_DIVERGENCE = "attention_logit_divergence"
REPRESENTATION_COLLAPSE = "representation_collapse"
UPDATE_RATIO_HIGH = "update_ratio_high"
UPDATE_RATIO_RISE = "update_ratio_rise"

# Rules whose firing may order a command: MSign (the critical spectral ones and the logit
# divergence) or, for the update ratio, a learning-rate backoff.
REMEDIABLE = (
    SA_COLLAPSE,
    STABLE_RANK_COLLAPSE,
    ATTENTION_LOGIT_DIVERGENCE,
    REPRESENTATION_COLLAPSE,
    UPDATE_RATIO_HIGH,
    UPDATE_RATIO_RISE,
)

# The peers' detectors (peers.py) in the default pack: those that fired on no healthy
# development run of any family (benchmarks/calibration.py, quiet_peers).
PACK_PEERS: tuple[str, ...] = (
    "olmo_loss_spike",
    "olmo_grad_norm_spike",
    "megatron_spiky_loss",
    "megatron_large_grads",
    "lightning_spike_detection",
    "llmfoundry_kill_loss_spike",
    "loss_stall",
)

# Cooldown of the rules whose MSign restores on re-firing: short, so the MSign can repeat.
_REMEDY_COOLDOWN = 20


def _refiring_msign(enabled: bool) -> MSignAction:
    """MSign on every 2-D weight when the alert fires: one MSign restores the stable rank, the
    alert resolves, and if the rank collapses again the rule re-fires after its cooldown and
    orders another, at most 5 per 100 steps (benchmarks/rescue.py: one alone did not hold)."""
    return MSignAction(
        enabled=enabled,
        targets=TargetGroup.ALL_2D.value,
        engine=MSignEngine.SVD.value,
        max_orders=5,
        window_steps=100,
    )


def _repeating_msign(targets: TargetGroup, enabled: bool) -> MSignAction:
    """MSign on ``targets`` every 10 steps while the alert fires (at most 30 per 100 steps):
    the MSign paper's periodic restoration. One MSign lifts the attention logits or the
    representations for a few steps only, and a run whose weights keep growing needs it
    repeated (benchmarks/rescue.py, ``qk_lr_overflow`` and ``postln_no_warmup``)."""
    return MSignAction(
        enabled=enabled,
        targets=targets.value,
        engine=MSignEngine.SVD.value,
        repeat_every=10,
        max_orders=30,
        window_steps=100,
    )


def _halving_lr(enabled: bool) -> LRBackoffAction:
    """Halve the learning rate at every sample the alert fires on (at most 10 halvings per
    100 steps). The update ratio is proportional to the LR, so with the rule resolving at the
    first clean sample the backoff stops by itself once the steps are small again, and starts
    again if the user's schedule heats up later; resolving later kept halving through the
    clean samples and starved a run of its learning rate (BENCHMARKS.md)."""
    return LRBackoffAction(
        enabled=enabled, factor=0.5, repeat_every=1, max_orders=10, window_steps=100
    )


def default_rules(*, remediate: bool = False) -> list[Rule]:
    """The default pack: rankguard's own rules (:func:`core_rules`) and the peers' detectors
    that stayed quiet on every healthy development run (``PACK_PEERS``); ``remediate=True``
    turns on the action of the critical rules (MSign, or the learning-rate backoff of the
    update-ratio rules)."""
    peers = [r for r in peer_rules() if r.name in PACK_PEERS]
    return [*core_rules(remediate=remediate), *peers]


def core_rules(*, remediate: bool = False) -> list[Rule]:
    """rankguard's own rules, before the peers' detectors join (``benchmarks/calibration.py``
    sets their calibrated values by a procedure, so a family can be scored by a pack
    calibrated without it)."""
    msign = _refiring_msign(remediate)
    return [
        Rule(
            name=SA_COLLAPSE,
            quantity="sa_sign_diversity",
            condition=Condition.BELOW,
            # calibrated (papers: 0.1 in some layer). Some layer has D = 0 at most probes of
            # healthy runs of both architectures, so "any layer" cannot separate; neither can
            # the fraction of layers under 0.1, the mean relative to its early level, the mean
            # over the attention projections or its 25-step drop (BENCHMARKS.md, "Precursor
            # transfer"). The mean over every layer can, only where nearly every layer
            # collapses: on healthy runs it stays above ~0.0077 over 3 consecutive probes.
            threshold=0.006325,
            aggregation=Aggregation.MEAN,
            consecutive=3,
            clear_after=3,
            severity=AlertSeverity.CRITICAL,
            min_step=50,
            cooldown=_REMEDY_COOLDOWN,
            msign=msign,
            description=(
                "Spectral-alignment sign diversity D, averaged over every layer, below the "
                "calibrated bound for 3 consecutive probes after step 50: nearly every layer's "
                "inputs sit on one side of its top singular direction (papers.md §6.3 suggests "
                "0.1 in some layer, which fires on every healthy benchmark run)."
            ),
            runbook=(
                "The inputs of the named layers have nearly all moved to one side of the weight's "
                "top singular direction (D = 2 min(p+, 1-p+) near 0): the SA paper reports this "
                "ahead of loss explosions. Check the loss and grad-norm panels; lower the learning "
                "rate or restore rank with MSign, which replaces each selected W by "
                "||W||_F/sqrt(r) U V^T (same Frobenius norm, all singular values equal). "
                + MSIGN_HOWTO
            ),
        ),
        Rule(
            name=STABLE_RANK_COLLAPSE,
            quantity="stable_rank",
            condition=Condition.DROP_FROM_BASELINE,
            # calibrated: 0.12 (papers: 0.5). Healthy runs fall to 0.14-0.33 of their early
            # baseline as they learn (post-LN lowest); the failing logit-growth runs to ~0.10.
            threshold=0.1158,
            # Early-layer selection needs the run's block names; see early_block_globs() and
            # specialise(). Until then the geometric mean runs over every weight target.
            targets=("*",),
            aggregation=Aggregation.GMEAN,
            baseline_samples=5,
            consecutive=2,
            clear_threshold=0.1448,
            clear_after=2,
            severity=AlertSeverity.CRITICAL,
            min_step=50,  # the first steps' fall of the stable rank is learning, not collapse
            cooldown=_REMEDY_COOLDOWN,
            msign=msign,
            description=(
                "Geometric-mean stable rank fell below 0.12x the run's own baseline (mean of "
                "its first 5 samples) after step 50 (calibrated; MSign Fig. 1 watches the early "
                "layers, papers.md §6.1)."
            ),
            runbook=(
                "Stable rank ||W||_F^2/sigma_1^2 collapsing means a few directions dominate the "
                "weights; MSign Thm 4.4 ties this to larger layer Jacobians and, with aligned "
                "layers, to exploding gradients. The layers listed first moved first. MSign "
                "restores full stable rank (all singular values equal, Frobenius norm kept). "
                + MSIGN_HOWTO
            ),
        ),
        Rule(
            name=REPRESENTATION_COLLAPSE,
            quantity="representation_stable_rank",
            condition=Condition.BELOW,
            # calibrated: 1.02 (PSS gives no bound). The geometric mean over the layers' inputs
            # of SR(Z) - 1 is 0.0095-0.0125 on the collapsing post-LN runs from step 10 on and
            # never below 0.030 on a healthy run (post-LN lowest); 1.02 sits between the two.
            threshold=1.013,
            aggregation=Aggregation.GMEAN,
            consecutive=2,
            # Resolve only once the representations are clearly spread again (4 samples above
            # 1.05): a lift just over the bound right after an MSign is not yet a recovery.
            clear_threshold=1.033,
            clear_after=4,
            severity=AlertSeverity.CRITICAL,
            min_step=10,
            msign=_repeating_msign(TargetGroup.ALL_2D, remediate),
            description=(
                "Geometric-mean representation stable rank SR(Z) = ||Z||_F^2/sigma_1(Z)^2 of "
                "the layers' inputs below 1.02 for 2 consecutive probes after step 10: every "
                "token's representation points along one direction (calibrated on the "
                "benchmark models; PSS, papers.md §3). Absolute, so model-dependent: re-check "
                "it on a healthy run of your own model."
            ),
            runbook=(
                "The representations have collapsed to rank one (PSS's representation "
                "singularity): the loss stalls near the unigram entropy while the run looks "
                "calm. Typical causes are a high learning rate without warmup, especially "
                "post-LN. MSign on every 2-D weight, repeated while the collapse lasts, "
                "restores the spread (the rescue benchmark); also lower the LR or add "
                "warmup. " + MSIGN_HOWTO
            ),
        ),
        Rule(
            name=UPDATE_RATIO_HIGH,
            quantity="update_ratio",
            condition=Condition.ABOVE,
            # calibrated: 0.05 (no paper bound; a weight moving 5% of its norm in one optimizer
            # step). On the development seeds the geometric mean over the 2-D weights peaks
            # at 0.016-0.018 on healthy pre-LN runs and 0.033-0.034 on healthy post-LN ones
            # (warmup), and reaches 0.06-0.15 on the LR ramp, 0.2-0.26 in the hot-LR window,
            # ~1.3 at the 100x LR spike and 0.8 at step 0 of post-LN without warmup.
            threshold=0.09813,
            aggregation=Aggregation.GMEAN,
            consecutive=1,
            clear_after=1,
            severity=AlertSeverity.CRITICAL,
            lr_backoff=_halving_lr(remediate),
            description=(
                "Geometric-mean update-to-weight ratio ||W_after - W_before||_F/||W_before||_F "
                "of one optimizer step above 0.05 (calibrated on the benchmark models): the "
                "learning rate is too high for the weights' scale."
            ),
            runbook=(
                "Every step moves the weights by more than 5% of their norm: the learning rate "
                "is too high (a ramp or warmup that overshoots, a wrong LR on resume, no "
                "warmup). Lower it; with the action on, rankguard halves it at every sample "
                'while this fires: POST /api/v1/runs/{run_id}/commands {"kind": "scale_lr", '
                '"args": {"factor": 0.5}} with an operate-scope token (on top of your '
                'schedule; {"factor": 2} undoes one halving, never above your schedule).'
            ),
        ),
        Rule(
            name=UPDATE_RATIO_RISE,
            quantity="update_ratio",
            condition=Condition.RISE_FROM_BASELINE,
            # calibrated: 4.0 (no paper bound). The same ratio relative to the run's own level
            # (samples 10-14, after a 50-step warmup at every=5): an absolute bound is the
            # optimizer's scale (Lion and SGD steps sit 3-10x below AdamW's), a jump of the
            # run's own steps is not.
            threshold=3.869,
            aggregation=Aggregation.GMEAN,
            warmup=10,
            baseline_samples=5,
            consecutive=1,
            clear_after=1,
            severity=AlertSeverity.CRITICAL,
            lr_backoff=_halving_lr(remediate),
            description=(
                "Geometric-mean update-to-weight ratio of one optimizer step above 4x the run's "
                "own level (the mean of its samples 10-14, after the first 10: a warmup is not "
                "the level); calibrated on the benchmark's families."
            ),
            runbook=(
                "The weights move several times faster per step than they did early in this "
                "run: the learning rate (or a multiplier on it) rose, or the gradients did. "
                "Lower it; with the action on, rankguard halves it at every sample while this "
                'fires: POST /api/v1/runs/{run_id}/commands {"kind": "scale_lr", "args": '
                '{"factor": 0.5}} with an operate-scope token.'
            ),
        ),
        Rule(
            name=JACOBIAN_GAIN,
            quantity="jacobian_alignment_gain",
            # calibrated, relative (papers: a*M > 1, sufficient not necessary). a*M exceeds 1 on
            # every healthy run, and its healthy level is the model's and optimizer's: up to
            # ~35 on AdamW runs, ~630 on a healthy SGD run, so no absolute bound transfers.
            # Against the run's own first two Jacobian samples (steps 25, 50 at the benchmark's
            # cadence), healthy runs of both architectures stay within ~22x (with the HF
            # Jacobian of issue 17: a healthy Llama-Lion run reaches 22x; 11x before it).
            condition=Condition.RISE_FROM_BASELINE,
            threshold=26.78,
            aggregation=Aggregation.MAX,
            baseline_samples=2,
            consecutive=1,
            severity=AlertSeverity.WARNING,
            min_step=50,
            cooldown=200,
            description=(
                "The largest adjacent-block Jacobian alignment times spectral norm a*M rose "
                "above the calibrated multiple of the run's own level (its first two Jacobian "
                "samples), after step 50 (MSign Thm 4.2's exponential-growth zone starts at "
                "a*M > 1, papers.md §1.4, which healthy runs pass all the time)."
            ),
            runbook=(
                "When a*M > 1 across blocks the product of block Jacobians can grow exponentially "
                "with depth, so gradients can explode. Watch stable rank and grad norm; if they "
                "also move, MSign lowers M by flattening the spectrum. " + MSIGN_HOWTO
            ),
        ),
        Rule(
            name=GRAD_NORM_SPIKE,
            quantity="grad_norm",
            condition=Condition.RATIO_TO_EMA,
            # calibrated (PSS: 2.5). At 2.5 the gradient noise of healthy runs trips it late
            # (steps 300-395); the healthy development runs reach 3.76x their EMA.
            threshold=4.352,
            targets=("global",),
            ema_alpha=0.1,
            # PSS fires when t > 50 (steps). The engine counts warm-up in samples: with
            # grad_norm sampled every step both bounds are the same; with sparser sampling the
            # 50-sample warm-up keeps the EMA meaningful and min_step keeps the paper's bound.
            warmup=50,
            min_step=50,
            cooldown=30,
            severity=AlertSeverity.WARNING,
            description=(
                "Global gradient norm above 4x its EMA (alpha 0.1) after 50 samples and step "
                "50, cooldown 30 steps: the PSS trigger (papers.md §6.4 uses 2.5x; calibrated)."
            ),
            runbook=(
                "A gradient-norm spike relative to its recent average often precedes a loss "
                "spike. Check whether it coincides with stable-rank or SA collapse; a PSS or "
                'MSign command ({"kind": "pss"} or {"kind": "msign"}) can be ordered from the '
                "dashboard. " + MSIGN_HOWTO
            ),
        ),
        Rule(
            name=LOSS_NON_FINITE,
            quantity="loss",
            condition=Condition.NON_FINITE,
            targets=("global",),
            severity=AlertSeverity.CRITICAL,
            description="The training loss is NaN or infinite.",
            runbook=(
                "The run has diverged or hit a numerical fault (overflow in fp16/bf16, a bad "
                "batch, a division by zero). Stop or roll back to the last checkpoint; lower the "
                "learning rate or enable loss scaling. MSign cannot repair NaN weights."
            ),
        ),
        Rule(
            name=NON_FINITE_VALUES,
            quantity="non_finite",
            condition=Condition.ABOVE,
            threshold=0.0,
            targets=("loss", "grad"),
            severity=AlertSeverity.CRITICAL,
            description="The probe counted NaN/Inf elements in the loss or the gradients.",
            runbook=(
                "Non-finite gradients reach the optimizer state and then the weights. Skip the "
                "step (GradScaler does for fp16), check the data batch, lower the learning rate, "
                "or roll back to the last checkpoint."
            ),
        ),
        Rule(
            name=ATTENTION_LOGIT_HIGH,
            quantity="attention_logit_max",
            condition=Condition.ABOVE,
            # calibrated (papers: 1e3). Healthy runs here peak at ~23 (the logits the model
            # computes: after RoPE, masked); 1e3 came after the loss had already degraded in
            # the logit-growth runs.
            threshold=27.6,
            aggregation=Aggregation.ANY,
            severity=AlertSeverity.WARNING,
            cooldown=200,
            description="Max attention logit above 50 (calibrated; Wortsman et al. use 1e3, "
            "papers.md §6.7).",
            runbook=(
                "Attention logits this large saturate the softmax (one-hot attention) and "
                "degrade the loss. Consider qk-layernorm or z-loss; MSign on the attention "
                'weights ({"targets": "attention"}) shrinks their top singular values. '
                + MSIGN_HOWTO
            ),
        ),
        Rule(
            name=ATTENTION_LOGIT_DIVERGENCE,
            quantity="attention_logit_max",
            condition=Condition.ABOVE,
            threshold=1e3,  # calibrated: 1e3 (papers: 1e4, reached only after the failure here)
            aggregation=Aggregation.ANY,
            severity=AlertSeverity.CRITICAL,
            # Resolve only after 4 clean samples and re-fire at once: a logit that dips under
            # the bound right after an MSign is not yet a recovery.
            clear_after=4,
            msign=_repeating_msign(TargetGroup.ATTENTION, remediate),
            description="Max attention logit above 1e3 (calibrated; Wortsman et al. see divergence "
            "at 1e4, papers.md §6.7).",
            runbook=(
                "Wortsman et al. observe divergence above 1e4. Roll back to a checkpoint before "
                "the rise, enable qk-layernorm, or apply MSign to the attention weights. "
                + MSIGN_HOWTO
            ),
        ),
    ]


def default_rule_dicts(*, remediate: bool = False) -> list[dict[str, object]]:
    """The default pack as plain dicts, ready for the rules table."""
    return [rule.to_dict() for rule in default_rules(remediate=remediate)]


_BLOCK = re.compile(r"^(?P<prefix>(?:[^.]+\.)*?[^.]+\.)(?P<index>\d+)\.")


def _glob_escape(text: str) -> str:
    # fnmatch has no escape(); wrapping a special character in brackets matches it literally.
    return re.sub(r"([*?\[])", r"[\1]", text)


def early_block_globs(target_names: Iterable[str], fraction: float = 0.25) -> list[str]:
    """Globs selecting the first ``fraction`` of the model's blocks (at least one block).

    The block container is the dotted prefix followed by an integer index that has the most
    distinct indices (``transformer.h.``, ``model.layers.``, ``blocks.``...). Returns ``[]``
    when no numbered blocks are found, in which case callers keep ``["*"]``.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction={fraction!r} is not valid; use a number in (0, 1]")
    indices: dict[str, set[int]] = {}
    for name in target_names:
        match = _BLOCK.match(name)
        if match:
            indices.setdefault(match["prefix"], set()).add(int(match["index"]))
    if not indices:
        return []
    # Most blocks wins; ties go to the shorter (outer) prefix, then alphabetical.
    prefix = min(indices, key=lambda p: (-len(indices[p]), len(p), p))
    blocks = sorted(indices[prefix])
    count = max(1, math.ceil(fraction * len(blocks)))
    return [f"{_glob_escape(prefix)}{i}.*" for i in blocks[:count]]


def specialise(rules: Sequence[Rule], target_names: Iterable[str]) -> list[Rule]:
    """Point the stable-rank rule at the early blocks of a run whose target names are known."""
    globs = early_block_globs(target_names)
    if not globs:
        return list(rules)
    return [
        rule.replace(targets=globs)
        if rule.name == STABLE_RANK_COLLAPSE and rule.targets == ("*",)
        else rule
        for rule in rules
    ]


__all__ = [
    "ATTENTION_LOGIT_DIVERGENCE",
    "ATTENTION_LOGIT_HIGH",
    "GRAD_NORM_SPIKE",
    "JACOBIAN_GAIN",
    "LOSS_NON_FINITE",
    "NON_FINITE_VALUES",
    "PACK_PEERS",
    "REMEDIABLE",
    "REPRESENTATION_COLLAPSE",
    "SA_COLLAPSE",
    "STABLE_RANK_COLLAPSE",
    "UPDATE_RATIO_HIGH",
    "UPDATE_RATIO_RISE",
    "core_rules",
    "default_rule_dicts",
    "default_rules",
    "early_block_globs",
    "specialise",
]
