"""dashboard/prometheus/rules.yml: `promtool check rules` is clean and the alerts fire as meant.

promtool comes from Debian's `prometheus` package. Without it these tests fail, unless
RANKGUARD_ALLOW_MISSING_TOOLS=1 is set (then they skip).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from rankguard.server.alerts.pack import default_rules

RULES = Path(__file__).resolve().parents[2] / "dashboard" / "prometheus" / "rules.yml"


FALLBACK = Path("/usr/bin/promtool")


def promtool() -> str:
    found = shutil.which("promtool") or (str(FALLBACK) if FALLBACK.exists() else None)
    if found:
        return found
    message = (
        "promtool not found on PATH or at /usr/bin/promtool: install Debian's `prometheus` "
        "package (apt-get install prometheus) or set RANKGUARD_ALLOW_MISSING_TOOLS=1 to skip"
    )
    if os.environ.get("RANKGUARD_ALLOW_MISSING_TOOLS") == "1":
        pytest.skip(message)
    pytest.fail(message)


def test_missing_promtool_fails_clearly_unless_allowed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setitem(globals(), "FALLBACK", tmp_path / "no-promtool")
    monkeypatch.delenv("RANKGUARD_ALLOW_MISSING_TOOLS", raising=False)
    with pytest.raises(pytest.fail.Exception, match="promtool not found"):
        promtool()
    monkeypatch.setenv("RANKGUARD_ALLOW_MISSING_TOOLS", "1")
    with pytest.raises(pytest.skip.Exception, match="RANKGUARD_ALLOW_MISSING_TOOLS"):
        promtool()


def load_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_promtool_check_rules_is_clean() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 18 rules found" in result.stdout


def test_every_rule_has_severity_and_annotations_and_mirrors_the_pack() -> None:
    rules = load_rules()
    for rule in rules:
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, rule["alert"]
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), rule["alert"]
    mirrored = {rule["labels"]["rankguard_rule"] for rule in rules}
    pack = {r.name: r for r in default_rules()}
    assert mirrored == set(pack)
    for rule in rules:
        assert rule["labels"]["severity"] == pack[rule["labels"]["rankguard_rule"]].severity.value


def _series(run: str, quantity: str, values: str, **labels: str) -> dict[str, str]:
    if "target" in labels:
        name = "rankguard_run_quantity_top"
        extra = f'target="{labels["target"]}"'
    else:
        name = "rankguard_run_quantity"
        extra = f'aggregate="{labels.get("aggregate", "max")}"'
    return {
        "series": f'{name}{{project="p", run="{run}", quantity="{quantity}", {extra}}}',
        "values": values,
    }


PACK_NAME = {
    "RankguardSASignDiversityCollapse": ("sa_sign_diversity_collapse", "critical"),
    "RankguardStableRankCollapse": ("stable_rank_collapse", "critical"),
    "RankguardJacobianAlignmentGain": ("jacobian_alignment_gain_above_one", "warning"),
    "RankguardGradNormSpike": ("grad_norm_spike", "warning"),
    "RankguardLossNonFinite": ("loss_non_finite", "critical"),
    "RankguardNonFiniteLossOrGrad": ("non_finite_loss_or_grad", "critical"),
    "RankguardAttentionLogitHigh": ("attention_logit_high", "warning"),
    "RankguardAttentionLogitDivergence": ("attention_logit_divergence", "critical"),
    "RankguardRepresentationCollapse": ("representation_collapse", "critical"),
    "RankguardUpdateRatioHigh": ("update_ratio_high", "critical"),
}


def _firing(alertname: str, at: str, runs: list[tuple[str, str, str]]) -> dict[str, Any]:
    """A promql test: at ``at`` exactly these (run, quantity, extra-label) alerts are firing."""
    rule_name, severity = PACK_NAME[alertname]
    samples = []
    for run, quantity, extra in runs:
        key, value = extra.split("=")
        labels = (
            f'ALERTS{{alertname="{alertname}", alertstate="firing", project="p", run="{run}", '
            f'quantity="{quantity}", {key}="{value}", rankguard_rule="{rule_name}", '
            f'severity="{severity}"}}'
        )
        samples.append({"labels": labels, "value": 1})
    return {
        "expr": f'ALERTS{{alertname="{alertname}", alertstate="firing"}}',
        "eval_time": at,
        "exp_samples": samples,
    }


def test_alerts_fire_on_their_signals(tmp_path: Path) -> None:
    series = [
        _series("sa", "sa_sign_diversity", "0.5 0.5 0.05x10", aggregate="min"),
        _series("sr", "stable_rank", "8 8 8 3x10", aggregate="mean"),
        _series("sr-ok", "stable_rank", "8 7 6 5x10", aggregate="mean"),
        _series("jac", "jacobian_alignment_gain", "0.5 1.5x10"),
        _series("gn", "grad_norm", "1x14 5 1x5"),
        {"series": 'rankguard_run_last_step{project="p", run="gn"}', "values": "100+10x25"},
        _series("gn-early", "grad_norm", "1x14 5 1x5"),
        {"series": 'rankguard_run_last_step{project="p", run="gn-early"}', "values": "0+1x25"},
        _series("nan", "loss", "1 1 NaN NaN"),
        _series("inf", "loss", "1 1 Inf Inf"),
        _series("nf", "non_finite", "0 0 3 3", target="grad"),
        _series("nf", "non_finite", "5 5 5 5", target="weight"),
        _series("att", "attention_logit_max", "10 2000 20000 20000"),
        _series("rep", "representation_stable_rank", "1.5 1.5 1.01x10", aggregate="mean"),
        _series("rep-ok", "representation_stable_rank", "1.5 1.03x11", aggregate="mean"),
        _series("hot", "update_ratio", "0.01 0.01 0.2 0.2", aggregate="mean"),
        _series("calm", "update_ratio", "0.01 0.03 0.04 0.04", aggregate="mean"),
    ]
    tests = [
        # `for: 5m`: active from 2m, pending at 6m, firing at 7m
        _firing("RankguardSASignDiversityCollapse", "6m", []),
        _firing(
            "RankguardSASignDiversityCollapse", "7m", [("sa", "sa_sign_diversity", "aggregate=min")]
        ),
        # 3 < 0.5 * 8 from 3m; the slow decline of sr-ok never halves
        _firing("RankguardStableRankCollapse", "8m", [("sr", "stable_rank", "aggregate=mean")]),
        _firing(
            "RankguardJacobianAlignmentGain",
            "6m",
            [("jac", "jacobian_alignment_gain", "aggregate=max")],
        ),
        # the spike at 15m fires only where the run is past step 50
        _firing("RankguardGradNormSpike", "14m", []),
        _firing("RankguardGradNormSpike", "15m", [("gn", "grad_norm", "aggregate=max")]),
        _firing("RankguardLossNonFinite", "1m", []),
        _firing(
            "RankguardLossNonFinite",
            "2m",
            [("inf", "loss", "aggregate=max"), ("nan", "loss", "aggregate=max")],
        ),
        _firing("RankguardNonFiniteLossOrGrad", "2m", [("nf", "non_finite", "target=grad")]),
        _firing(
            "RankguardAttentionLogitHigh", "1m", [("att", "attention_logit_max", "aggregate=max")]
        ),
        _firing("RankguardAttentionLogitDivergence", "1m", []),
        _firing(
            "RankguardAttentionLogitDivergence",
            "2m",
            [("att", "attention_logit_max", "aggregate=max")],
        ),
        # below 1.02 from 2m: firing at 7m; the healthy-looking 1.03 never fires
        _firing("RankguardUpdateRatioHigh", "1m", []),
        _firing("RankguardUpdateRatioHigh", "2m", [("hot", "update_ratio", "aggregate=mean")]),
        _firing("RankguardRepresentationCollapse", "6m", []),
        _firing(
            "RankguardRepresentationCollapse",
            "7m",
            [("rep", "representation_stable_rank", "aggregate=mean")],
        ),
    ]
    unit = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": tests}],
    }
    # YAML is a superset of JSON: promtool reads this file as it is.
    test_file = tmp_path / "rules_test.yml"
    test_file.write_text(json.dumps(unit, indent=1))
    result = subprocess.run(
        [promtool(), "test", "rules", str(test_file)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr
