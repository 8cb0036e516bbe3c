"""The default rule pack: papers' values, dict round trip, remediation switch, early blocks."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from rankguard.server.alerts import (
    Aggregation,
    Condition,
    Rule,
    Transition,
    evaluate,
    flush,
    pack,
)
from rankguard.server.vocab import AlertSeverity


def by_name(rules: list[Rule]) -> dict[str, Rule]:
    return {r.name: r for r in rules}


def run_rule(rule: Rule, samples: list[tuple[str, int, Any]]) -> list[Transition]:
    state, out = evaluate(rule, None, samples)
    _, rest = flush(rule, state)
    return out + rest


def test_pack_names_are_unique_and_quantities_are_contract_names() -> None:
    rules = pack.default_rules()
    # rankguard's 11 rules and the 7 peers' detectors that stayed quiet on healthy runs
    assert len({r.name for r in rules}) == len(rules) == 11 + len(pack.PACK_PEERS) == 18
    assert [r.name for r in rules[11:]] == list(pack.PACK_PEERS)
    contract = {
        "loss",
        "stable_rank",
        "sa_sign_diversity",
        "jacobian_alignment_gain",
        "grad_norm",
        "non_finite",
        "attention_logit_max",
        "representation_stable_rank",
        "update_ratio",
    }
    assert {r.quantity for r in rules} == contract
    assert all(r.runbook and r.description for r in rules)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            pack.SA_COLLAPSE,
            {"quantity": "sa_sign_diversity", "condition": Condition.BELOW,
             "threshold": 0.006325, "aggregation": Aggregation.MEAN, "consecutive": 3,
             "severity": AlertSeverity.CRITICAL, "min_step": 50},
        ),
        (
            pack.STABLE_RANK_COLLAPSE,
            {"quantity": "stable_rank", "condition": Condition.DROP_FROM_BASELINE,
             "threshold": 0.1158, "aggregation": Aggregation.GMEAN, "targets": ("*",),
             "severity": AlertSeverity.CRITICAL, "min_step": 50},
        ),
        (
            pack.JACOBIAN_GAIN,
            {"quantity": "jacobian_alignment_gain", "condition": Condition.RISE_FROM_BASELINE,
             "threshold": 26.78, "aggregation": Aggregation.MAX, "baseline_samples": 2,
             "consecutive": 1, "min_step": 50},
        ),
        (
            pack.GRAD_NORM_SPIKE,
            {"quantity": "grad_norm", "condition": Condition.RATIO_TO_EMA, "threshold": 4.352,
             "ema_alpha": 0.1, "targets": ("global",), "warmup": 50, "min_step": 50,
             "cooldown": 30},
        ),
        (pack.LOSS_NON_FINITE, {"quantity": "loss", "condition": Condition.NON_FINITE}),
        (
            pack.NON_FINITE_VALUES,
            {"quantity": "non_finite", "condition": Condition.ABOVE, "threshold": 0.0,
             "targets": ("loss", "grad")},
        ),
        (
            pack.ATTENTION_LOGIT_HIGH,
            {
                "quantity": "attention_logit_max",
                "threshold": 27.6,
                "severity": AlertSeverity.WARNING,
            },
        ),
        (
            pack.ATTENTION_LOGIT_DIVERGENCE,
            {
                "quantity": "attention_logit_max",
                "threshold": 1e3,
                "severity": AlertSeverity.CRITICAL,
            },
        ),
        (
            pack.REPRESENTATION_COLLAPSE,
            {"quantity": "representation_stable_rank", "condition": Condition.BELOW,
             "threshold": 1.013, "aggregation": Aggregation.GMEAN, "consecutive": 2,
             "clear_threshold": 1.033, "clear_after": 4, "min_step": 10,
             "severity": AlertSeverity.CRITICAL},
        ),
        (
            pack.UPDATE_RATIO_HIGH,
            {"quantity": "update_ratio", "condition": Condition.ABOVE, "threshold": 0.09813,
             "aggregation": Aggregation.GMEAN, "consecutive": 1, "clear_after": 1,
             "min_step": 0, "severity": AlertSeverity.CRITICAL},
        ),
        (
            pack.UPDATE_RATIO_RISE,
            {"quantity": "update_ratio", "condition": Condition.RISE_FROM_BASELINE,
             "threshold": 3.869, "aggregation": Aggregation.GMEAN, "warmup": 10,
             "baseline_samples": 5, "severity": AlertSeverity.CRITICAL},
        ),
    ],
)  # fmt: skip
def test_calibrated_values(name: str, expected: dict[str, Any]) -> None:
    rule = by_name(pack.default_rules())[name]
    for field_name, value in expected.items():
        assert getattr(rule, field_name) == value, field_name


def test_msign_present_but_off_by_default_and_on_with_remediate() -> None:
    off = by_name(pack.default_rules())
    on = by_name(pack.default_rules(remediate=True))
    for name in pack.REMEDIABLE:
        assert off[name].action is None
        assert on[name].action is not None
        assert on[name].severity is AlertSeverity.CRITICAL
        if name not in (pack.UPDATE_RATIO_HIGH, pack.UPDATE_RATIO_RISE):
            assert on[name].msign.enabled is True and on[name].msign.engine == "svd"
    # the update-ratio rules halve the learning rate at every sample while they fire
    for name in (pack.UPDATE_RATIO_HIGH, pack.UPDATE_RATIO_RISE):
        hot = on[name]
        assert hot.msign.enabled is False
        assert hot.lr_backoff.factor == 0.5 and hot.lr_backoff.repeat_every == 1
        assert hot.action.command() == {"kind": "scale_lr", "args": {"factor": 0.5}}
    for name in (pack.SA_COLLAPSE, pack.STABLE_RANK_COLLAPSE):
        assert on[name].msign.targets == "all_2d" and on[name].msign.repeat_every is None
    # the logit divergence repeats MSign on the attention weights while it fires
    divergence = on[pack.ATTENTION_LOGIT_DIVERGENCE]
    assert divergence.msign.targets == "attention" and divergence.msign.repeat_every == 10
    assert divergence.cooldown == 0 and divergence.clear_after == 4
    # the representation collapse repeats MSign on every 2-D weight while it fires
    collapse = on[pack.REPRESENTATION_COLLAPSE]
    assert collapse.msign.targets == "all_2d" and collapse.msign.repeat_every == 10
    for name in set(off) - set(pack.REMEDIABLE):
        assert on[name].action is None


def test_dicts_round_trip_through_json() -> None:
    for data in pack.default_rule_dicts(remediate=True):
        back = Rule.from_dict(json.loads(json.dumps(data, allow_nan=False)))
        assert back.to_dict() == data


def test_pack_rules_fire_on_their_signals() -> None:
    rules = by_name(pack.default_rules(remediate=True))

    # The mean D over every layer: one collapsed layer among healthy ones is routine and stays
    # quiet; nearly every layer collapsed (mean under ~0.006) for 3 probes fires.
    one = [
        (t, s, 0.0 if t == "h.0.w" else 0.3) for s in range(0, 120, 10) for t in ("h.0.w", "h.1.w")
    ]
    assert run_rule(rules[pack.SA_COLLAPSE], one) == []
    sa = [(t, s, 0.5 if s < 60 else 0.001) for s in range(0, 120, 10) for t in ("h.0.w", "h.1.w")]
    (fired,) = run_rule(rules[pack.SA_COLLAPSE], sa)
    assert fired.step == 80 and fired.first_step == 60 and fired.command is not None

    sr = [(t, s, 8.0 if s < 60 else 0.8) for s in range(0, 100, 10) for t in ("h.0.w", "h.1.w")]
    (fired,) = run_rule(rules[pack.STABLE_RANK_COLLAPSE], sr)
    assert fired.step == 70 and fired.first_step == 60
    assert fired.bound == pytest.approx(0.1158 * 8.0)

    # grad norm: steady 1.0 then a 5x spike at step 80 (after 50 samples and step 50)
    gn = [("global", s, 5.0 if s == 80 else 1.0) for s in range(0, 100)]
    transitions = run_rule(rules[pack.GRAD_NORM_SPIKE], gn)
    assert [(t.kind.value, t.step) for t in transitions] == [("firing", 80), ("resolved", 81)]
    # the same spike inside the warm-up is ignored
    early = [("global", s, 5.0 if s == 20 else 1.0) for s in range(0, 100)]
    assert run_rule(rules[pack.GRAD_NORM_SPIKE], early) == []

    loss = [("global", 0, 2.0), ("global", 1, math.nan)]
    assert [t.step for t in run_rule(rules[pack.LOSS_NON_FINITE], loss)] == [1]

    nf = [("loss", 0, 0), ("grad", 0, 0), ("weight", 0, 3), ("loss", 1, 0), ("grad", 1, 12)]
    (fired,) = run_rule(rules[pack.NON_FINITE_VALUES], nf)
    assert fired.step == 1 and [h.target for h in fired.targets] == ["grad"]

    logits = [("h.0.attn", 0, 20.0), ("h.0.attn", 1, 200.0), ("h.0.attn", 2, 2e3)]
    assert [t.step for t in run_rule(rules[pack.ATTENTION_LOGIT_HIGH], logits)] == [1]
    assert [t.step for t in run_rule(rules[pack.ATTENTION_LOGIT_DIVERGENCE], logits)] == [2]

    # representation collapse: the geometric mean over the layers' inputs, so one layer
    # still spread (the embedding's input) does not hide the others at 1.0; a healthy
    # post-LN dip to ~1.03 stays quiet
    rsr = [("h.0.attn", s, 1.1) for s in range(5, 60, 5)] + [
        (f"h.{i}.mlp", s, 1.0 if s >= 20 else 1.3) for s in range(5, 60, 5) for i in range(1, 8)
    ]  # from step 20: gmean = 1.1 ** (1 / 8) = 1.012
    fired, *repeats = run_rule(rules[pack.REPRESENTATION_COLLAPSE], rsr)
    assert fired.step == 25 and fired.first_step == 20 and fired.command is not None
    assert fired.command["args"]["targets"] == "all_2d"
    # while it lasts, MSign is ordered again every 10 steps
    assert [(t.kind.value, t.step) for t in repeats] == [
        ("repeat", 35),
        ("repeat", 45),
        ("repeat", 55),
    ]
    dip = [(t, s, 1.03) for s in range(5, 60, 5) for t in ("h.0.attn", "h.1.mlp")]
    assert run_rule(rules[pack.REPRESENTATION_COLLAPSE], dip) == []

    # update ratio: one hot weight among calm ones is not the gmean crossing ~0.1; all hot is,
    # and the LR is halved at every hot sample; the first calm one resolves it, and a later
    # hot one fires again
    ratios = [0.01, 0.01, 0.4, 0.2, 0.12, 0.04, 0.04, 0.16, 0.04, 0.04]  # steps 0, 5, ...
    one_hot = [("h.0.w", 5 * i, 0.4) for i in range(10)] + [
        (f"h.{k}.w", 5 * i, 0.01) for i in range(10) for k in (1, 2, 3)
    ]
    assert run_rule(rules[pack.UPDATE_RATIO_HIGH], one_hot) == []
    hot = [(t, 5 * i, v) for i, v in enumerate(ratios) for t in ("h.0.w", "h.1.w")]
    transitions = run_rule(rules[pack.UPDATE_RATIO_HIGH], hot)
    assert [(t.kind.value, t.step) for t in transitions] == [
        ("firing", 10),
        ("repeat", 15),
        ("repeat", 20),
        ("resolved", 25),
        ("firing", 35),
        ("resolved", 40),
    ]
    assert transitions[0].command == {"kind": "scale_lr", "args": {"factor": 0.5}}

    # the same ratio against the run's own level: samples 10-14 set it (0.01, after a warmup
    # at 0.001); a step at 5x that level fires, one at 3x does not, whatever the optimizer's
    # absolute scale
    level = [0.001] * 10 + [0.01] * 10 + [0.03, 0.01, 0.05, 0.01]
    rise = [(t, 5 * i, v) for i, v in enumerate(level) for t in ("h.0.w", "h.1.w")]
    transitions = run_rule(rules[pack.UPDATE_RATIO_RISE], rise)
    assert [(t.kind.value, t.step) for t in transitions] == [("firing", 110), ("resolved", 115)]
    assert transitions[0].bound == pytest.approx(3.869 * 0.01)
    scaled = [(t, s, 10 * v) for t, s, v in rise]  # the same run at 10x the scale
    assert [t.step for t in run_rule(rules[pack.UPDATE_RATIO_RISE], scaled)][:1] == [110]

    # a*M > 1 is routine on healthy runs, at a level set by the model and optimizer; the rule
    # judges the largest pair against the run's own first two samples (10 here), after step 50
    gain = [
        (p, s, v)
        for s, v in [(25, 8.0), (50, 12.0), (75, 200.0), (100, 280.0)]
        for p in ("h.0->h.1", "h.1->h.2")
    ]
    assert [t.step for t in run_rule(rules[pack.JACOBIAN_GAIN], gain)] == [100]
    scaled = [(p, s, 50 * v) for p, s, v in gain]  # the same run at a 50x higher level
    assert [t.step for t in run_rule(rules[pack.JACOBIAN_GAIN], scaled)] == [100]


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (
            [f"transformer.h.{i}.attn.c_attn.weight[q]" for i in range(12)]
            + ["transformer.wte.weight", "lm_head.weight"],
            ["transformer.h.0.*", "transformer.h.1.*", "transformer.h.2.*"],
        ),
        (
            [f"model.layers.{i}.mlp.up_proj.weight" for i in range(5)],
            ["model.layers.0.*", "model.layers.1.*"],  # ceil(0.25 * 5) = 2
        ),
        (["blocks.0.attn.qkv.weight"], ["blocks.0.*"]),
        # experts numbered inside numbered blocks: the outermost numbered container is the
        # block list
        (
            [f"layers.{i}.experts.{j}.w1" for i in range(8) for j in range(4)],
            ["layers.0.*", "layers.1.*"],
        ),
        (["encoder.weight", "decoder.weight"], []),
    ],
)
def test_early_block_globs(names: list[str], expected: list[str]) -> None:
    assert pack.early_block_globs(names) == expected


def test_early_block_globs_escape_brackets() -> None:
    globs = pack.early_block_globs(["net[a].0.w", "net[a].1.w", "net[a].2.w", "net[a].3.w"])
    assert globs == ["net[[]a].0.*"]
    rule = by_name(pack.default_rules())[pack.STABLE_RANK_COLLAPSE].replace(targets=globs)
    assert rule.matches_target("net[a].0.w") and not rule.matches_target("neta.0.w")


def test_specialise_points_stable_rank_at_early_blocks_only() -> None:
    names = [f"transformer.h.{i}.mlp.c_fc.weight" for i in range(8)]
    rules = pack.specialise(pack.default_rules(), names)
    special = by_name(rules)
    assert special[pack.STABLE_RANK_COLLAPSE].targets == (
        "transformer.h.0.*",
        "transformer.h.1.*",
    )
    default = by_name(pack.default_rules())
    for name in set(default) - {pack.STABLE_RANK_COLLAPSE}:
        assert special[name] == default[name]
    assert pack.specialise(pack.default_rules(), ["w"]) == pack.default_rules()


def test_early_block_globs_rejects_bad_fraction() -> None:
    with pytest.raises(ValueError, match="fraction"):
        pack.early_block_globs(["h.0.w"], fraction=0.0)
