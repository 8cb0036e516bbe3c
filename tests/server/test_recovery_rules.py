"""The server's half of recovery: the ``rollback`` and ``qk_clip`` rule actions, the
auto-recover profile a run's registration turns on, and a firing rule queueing a rollback to
before the alert's first step (the probe caps one alert's rollbacks as one incident)."""

from __future__ import annotations

from typing import Any

import pytest
from server_helpers import Project, points_body

from rankguard.server.alerts.pack import (
    ATTENTION_LOGIT_DIVERGENCE,
    LOSS_NON_FINITE,
    REMEDIABLE,
    UPDATE_RATIO_HIGH,
    UPDATE_RATIO_RISE,
    default_rules,
)
from rankguard.server.alerts.profiles import AUTO_RECOVER, apply_profile, profile_of
from rankguard.server.alerts.rules import QKClipAction, RollbackAction, Rule, RuleError
from rankguard.server.vocab import CommandKind, ProbeEventKind


def test_the_new_actions_validate_and_order_their_commands() -> None:
    assert RollbackAction(enabled=True).command() == {
        "kind": "rollback",
        "args": {"lr_factor": 0.5},
    }
    assert QKClipAction(tau=50).command() == {"kind": "qk_clip", "args": {"tau": 50.0}}
    for bad in (0, 1.5, float("nan"), "half"):
        with pytest.raises(RuleError, match=r"rollback\.lr_factor"):
            RollbackAction(lr_factor=bad)  # type: ignore[arg-type]
    with pytest.raises(RuleError, match=r"qk_clip\.tau"):
        QKClipAction(tau=-1)
    assert {k.value for k in CommandKind} >= {"rollback", "qk_clip"}
    assert ProbeEventKind.ROLLBACK.value == "rollback"


def test_a_rule_orders_one_kind_of_command() -> None:
    base = {"name": "r", "quantity": "loss", "condition": "non_finite"}
    rule = Rule.from_dict({**base, "rollback": {"enabled": True, "lr_factor": 0.25}})
    assert rule.action == RollbackAction(enabled=True, lr_factor=0.25)
    assert Rule.from_dict(rule.to_dict()) == rule
    with pytest.raises(RuleError, match=r"msign\.enabled and rollback\.enabled"):
        Rule.from_dict({**base, "msign": {"enabled": True}, "rollback": {"enabled": True}})
    with pytest.raises(RuleError, match="rollback has unknown field"):
        Rule.from_dict({**base, "rollback": {"factor": 0.5}})


def test_the_auto_recover_profile_turns_on_one_action_where_each_applies() -> None:
    assert profile_of({"auto_recover": True}) == AUTO_RECOVER
    assert profile_of({"auto_recover": False}) is None and profile_of(None) is None
    rules = {r.name: r for r in apply_profile(default_rules(), AUTO_RECOVER)}
    for name in REMEDIABLE:
        if name not in (UPDATE_RATIO_HIGH, UPDATE_RATIO_RISE):
            assert rules[name].action is rules[name].msign, name
    # the probe backs off at the step; the rule would halve the same excursion again
    assert rules[UPDATE_RATIO_HIGH].action is None
    # a rise against the run's own level: the learning rate, not the weights
    assert rules[UPDATE_RATIO_RISE].action is rules[UPDATE_RATIO_RISE].lr_backoff
    assert rules[LOSS_NON_FINITE].action == rules[LOSS_NON_FINITE].rollback
    assert rules[ATTENTION_LOGIT_DIVERGENCE].msign.targets == "attention"
    assert all(r.action is None for r in apply_profile(default_rules(), None))


def actions(project: Project, run_id: str) -> dict[str, Any]:
    r = project.api["read"].get("/alert-rules", params={"run_id": run_id})
    assert r.status_code == 200, r.text
    out = {}
    for row in r.json()["data"]:
        rule = Rule.from_dict(row["rule"])
        out[rule.name] = None if rule.action is None else rule.action.command()["kind"]
    return out


def test_the_registration_switches_the_profile_on_for_that_run(project: Project) -> None:
    plain = project.new_run(config={"every": 5})
    recovering = project.new_run(config={"every": 5, "auto_recover": True})
    assert set(actions(project, plain).values()) == {None}
    kinds = actions(project, recovering)
    assert kinds[LOSS_NON_FINITE] == "rollback"
    assert kinds[ATTENTION_LOGIT_DIVERGENCE] == "msign"
    assert kinds[UPDATE_RATIO_HIGH] is None


def test_a_firing_rule_queues_a_rollback_to_before_its_first_step(project: Project) -> None:
    run_id = project.new_run(config={"auto_recover": True})
    ingest = project.api["ingest"]
    body = points_body(list(range(10)), [2.0] * 7 + ["NaN", "NaN", 2.0])
    assert ingest.post(f"/runs/{run_id}/points", json=body).status_code == 200
    commands = project.api["read"].get(f"/runs/{run_id}/commands").json()["data"]
    (command,) = [c for c in commands if c["kind"] == "rollback"]
    alerts = project.api["read"].get(f"/runs/{run_id}/alerts").json()["data"]
    (alert,) = [a for a in alerts if a["rule_name"] == LOSS_NON_FINITE]
    assert command["args"] == {
        "lr_factor": 0.5,
        "before_step": alert["first_step"],
        "incident": f"alert:{alert['id']}",
    }
    assert alert["first_step"] == 7


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        (
            {"kind": "rollback", "args": {"lr_factor": 1.5}},
            ["body", "rollback", "args", "lr_factor"],
        ),
        ({"kind": "rollback", "args": {"lr_factor": 0}}, ["body", "rollback", "args", "lr_factor"]),
        (
            {"kind": "rollback", "args": {"before_step": -1}},
            ["body", "rollback", "args", "before_step"],
        ),
        (
            {"kind": "rollback", "args": {"before_step": "10"}},
            ["body", "rollback", "args", "before_step"],
        ),
        (
            {"kind": "rollback", "args": {"incident": "x" * 201}},
            ["body", "rollback", "args", "incident"],
        ),
        ({"kind": "rollback", "args": {"reason": "mine"}}, ["body", "rollback", "args", "reason"]),
        ({"kind": "qk_clip", "args": {"tau": 0}}, ["body", "qk_clip", "args", "tau"]),
        ({"kind": "qk_clip", "args": {"tau": "Infinity"}}, ["body", "qk_clip", "args", "tau"]),
        (
            {"kind": "qk_clip", "args": {"logit_max": {"a": [1e9]}}},
            ["body", "qk_clip", "args", "logit_max"],
        ),
    ],
    ids=lambda v: str(v)[:40],
)
def test_rollback_and_qk_clip_arguments_are_bounded(
    project: Project, body: dict[str, Any], loc: list[Any]
) -> None:
    run = project.new_run()
    r = project.api["operate"].post(f"/runs/{run}/commands", json=body)
    assert r.status_code == 422, r.text
    assert loc in [e["loc"][: len(loc)] for e in r.json()["detail"]], r.json()


def test_rollback_and_qk_clip_within_bounds_are_queued_as_given(project: Project) -> None:
    run = project.new_run()
    for body in (
        {"kind": "rollback", "args": {"before_step": 120, "lr_factor": 0.25, "incident": "i"}},
        {"kind": "rollback"},
        {"kind": "qk_clip", "args": {"tau": 50}},
    ):
        r = project.api["operate"].post(f"/runs/{run}/commands", json=body)
        assert r.status_code == 201, r.text
        assert r.json()["args"] == body.get("args", {})
