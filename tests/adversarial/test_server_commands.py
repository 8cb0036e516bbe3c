"""Failure 3 (server side): the server queued any command arguments, e.g. ``pss`` with
``scale=1e39`` (the weights became Inf/NaN) and ``scale_lr`` with ``factor=1e-300`` (the
learning rate stuck at 0.0). Every way a command is queued now checks its kind's model:
an operator's order (422 naming the field), an inbound alert, an alert rule."""

from __future__ import annotations

from typing import Any

import pytest
from server_helpers import Api, Project

BAD_COMMANDS = [
    ({"kind": "pss", "args": {"scale": 1e39}}, ["body", "pss", "args", "scale"]),
    ({"kind": "pss", "args": {"scale": 0}}, ["body", "pss", "args", "scale"]),
    ({"kind": "pss", "args": {"scale": "Infinity"}}, ["body", "pss", "args", "scale"]),
    ({"kind": "pss", "args": {"temperature": -1}}, ["body", "pss", "args", "temperature"]),
    ({"kind": "pss", "args": {"k": 10**12}}, ["body", "pss", "args", "k"]),
    ({"kind": "pss", "args": {"variant": "melt"}}, ["body", "pss", "args", "variant"]),
    ({"kind": "scale_lr", "args": {"factor": 1e-300}}, ["body", "scale_lr", "args", "factor"]),
    ({"kind": "scale_lr", "args": {"factor": 1e300}}, ["body", "scale_lr", "args", "factor"]),
    ({"kind": "scale_lr", "args": {"factor": "NaN"}}, ["body", "scale_lr", "args", "factor"]),
    ({"kind": "scale_lr", "args": {"factor": "0.5"}}, ["body", "scale_lr", "args", "factor"]),
    ({"kind": "scale_lr", "args": {}}, ["body", "scale_lr", "args", "factor"]),
    ({"kind": "msign", "args": {"engine": "gpu-magic"}}, ["body", "msign", "args", "engine"]),
    ({"kind": "msign", "args": {"targets": []}}, ["body", "msign", "args", "targets"]),
    ({"kind": "msign", "args": {"targets": "everything"}}, ["body", "msign", "args", "targets"]),
    ({"kind": "msign", "args": {"iterations": 10**9}}, ["body", "msign", "args", "iterations"]),
    ({"kind": "set_probe", "args": {"every": 0}}, ["body", "set_probe", "args", "every"]),
    ({"kind": "set_probe", "args": {"every": 2**62}}, ["body", "set_probe", "args", "every"]),
    ({"kind": "undo", "args": {"snapshot": 3}}, ["body", "undo", "args", "snapshot"]),
    ({"kind": "msign", "ttl_s": "Infinity"}, ["body", "msign", "ttl_s"]),
    ({"kind": "detonate", "args": {}}, ["body", "kind"]),
]


@pytest.mark.parametrize(("body", "loc"), BAD_COMMANDS, ids=lambda v: str(v)[:40])
def test_out_of_bounds_commands_are_422_naming_the_field(
    project: Project, body: dict[str, Any], loc: list[Any]
) -> None:
    run = project.new_run()
    r = project.api["operate"].post(f"/runs/{run}/commands", json=body)
    assert r.status_code == 422, r.text
    assert loc in [e["loc"][: len(loc)] for e in r.json()["detail"]], r.json()
    assert project.api["read"].get(f"/runs/{run}/commands").json()["count"] == 0


def test_commands_within_bounds_are_queued_as_given(project: Project) -> None:
    run = project.new_run()
    operate: Api = project.api["operate"]
    for body in (
        {"kind": "pss", "args": {"scale": 10, "k": 3, "variant": "clip"}},
        {"kind": "scale_lr", "args": {"factor": 1e-4}},
        {"kind": "msign", "args": {"targets": ["*.attn.*"], "engine": "newton_schulz"}},
        {"kind": "set_probe", "args": {"every": 10, "disable": ["jacobian_alignment"]}},
        {"kind": "undo"},
    ):
        r = operate.post(f"/runs/{run}/commands", json=body)
        assert r.status_code == 201, r.text
        assert r.json()["args"] == body.get("args", {})


def test_inbound_alerts_cannot_order_an_invalid_command(project: Project) -> None:
    run = project.new_run()
    labels = {"alertname": "x", "rankguard_run": run, "rankguard_action": "msign"}
    too_many = ",".join(f"h.{i}.*" for i in range(300))  # the contract allows 256 globs
    for extra in ({"rankguard_targets": too_many}, {"rankguard_engine": "warp"}):
        alert = {"status": "firing", "labels": {**labels, **extra}}
        r = project.api["operate"].post(
            "/inbound/alertmanager", json={"version": "4", "status": "firing", "alerts": [alert]}
        )
        assert r.status_code == 200, r.text
        assert r.json()["commands"] == [], extra
        assert r.json()["ignored"][0]["reason"]
    assert project.api["read"].get(f"/runs/{run}/commands").json()["count"] == 0


@pytest.mark.parametrize(
    ("kind", "args", "field"),
    [
        ("pss", {"scale": 1e39}, "args.scale"),
        ("scale_lr", {"factor": 1e-300}, "args.factor"),
        ("msign", {"engine": "x"}, "args.engine"),
        ("nope", {}, "kind"),
    ],
)
def test_every_queue_path_validates(kind: str, args: dict[str, Any], field: str) -> None:
    """``storage.enqueue_command`` (operators, inbound alerts and alert rules all queue
    through it) refuses what the API refuses."""
    from rankguard.server.commands import InvalidCommand, validate_command

    with pytest.raises(InvalidCommand, match=field.replace(".", r"\.")):
        validate_command(kind, args)


def test_alert_rules_cannot_order_out_of_bounds_commands(project: Project) -> None:
    """A rule whose action would order an invalid command is refused when it is saved."""
    rule = {"name": "r", "quantity": "loss", "condition": "above", "threshold": 1.0}
    operate = project.api["operate"]
    backoff = {**rule, "lr_backoff": {"enabled": True, "factor": 1e-300}}
    r = operate.post("/alert-rules", json={"rule": backoff})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "rule.lr_backoff"]
    fine = {**rule, "lr_backoff": {"factor": 0.5}}
    assert operate.post("/alert-rules", json={"rule": fine}).status_code == 201
