"""Alerting through the API on both backends: rules installed per run, evaluation on ingest
with state in the database, alerts, alert events, MSign commands with their rate limit,
webhooks with a delivery log, and the inbound Alertmanager/Grafana endpoints."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
from helpers.webhook_receiver import webhook_receiver
from server_helpers import ADMIN_TOKEN, Api, Project, TestClient, make_settings

from rankguard.server import storage
from rankguard.server.alerts.pack import (
    SA_COLLAPSE,
    STABLE_RANK_COLLAPSE,
    UPDATE_RATIO_HIGH,
    default_rule_dicts,
)
from rankguard.server.alerts.service import _rank0_by_step
from rankguard.server.config import Settings
from rankguard.server.main import create_app
from rankguard.server.notify import signing

QUANTITY = "sa_sign_diversity"
TARGETS = [f"transformer.h.{i}.mlp.c_fc.weight" for i in range(6)]
# Collapse order: h.3 first (not the alphabetical first), then the others, 10 steps apart.
ONSET = {TARGETS[i]: 50 + 10 * k for k, i in enumerate([3, 0, 5, 1, 4, 2])}
STRIDE = 10
# The collapse rule of these tests, fixed here (the default pack's values are calibrated
# elsewhere and may change): D < 0.1 for 3 consecutive samples, cleared after 3 clean ones.
SA_RULE: dict[str, Any] = {
    "name": SA_COLLAPSE,
    "quantity": QUANTITY,
    "condition": "below",
    "threshold": 0.1,
    "consecutive": 3,
    "clear_after": 3,
    "cooldown": 0,
    "severity": "critical",
    "msign": {
        "enabled": True,
        "targets": "all_2d",
        "engine": "svd",
        "max_orders": 1,
        "window_steps": 1000,
        "repeat_every": None,
    },
}


def sa_run(project: Project) -> str:
    """A run whose only rule is SA_RULE (a project rule, copied into the new run)."""
    r = project.api["operate"].post("/alert-rules", json={"rule": SA_RULE})
    assert r.status_code == 201, r.text
    return project.new_run()


def diversity_batch(
    steps: range, onset: dict[str, int], recover_at: int | None = None
) -> dict[str, Any]:
    """Columnar sa_sign_diversity: 0.8 (healthy) until a target's onset, then 0.05 until
    ``recover_at``."""
    q, t, s, v = [], [], [], []
    for step in steps:
        for target in TARGETS:
            collapsed = onset[target] <= step and (recover_at is None or step < recover_at)
            q.append(QUANTITY)
            t.append(target)
            s.append(step)
            v.append(0.05 if collapsed else 0.8)
    return {"quantity": q, "target": t, "step": s, "value": v}


def ingest(api: Api, run_id: str, body: dict[str, Any]) -> dict[str, Any]:
    r = api.post(f"/runs/{run_id}/points", json=body)
    assert r.status_code == 200, r.text
    return dict(r.json())


def patch_json(api: Api, path: str, body: dict[str, Any]) -> Any:
    return api.client.patch(f"/api/v1{path}", headers=api.headers, json=body)


def rule_id(api: Api, run_id: str, name: str) -> int:
    rules = api.get("/alert-rules", params={"run_id": run_id}).json()["data"]
    return next(int(r["id"]) for r in rules if r["name"] == name)


def alerts(api: Api, run_id: str) -> list[dict[str, Any]]:
    r = api.get(f"/runs/{run_id}/alerts")
    assert r.status_code == 200, r.text
    return list(reversed(r.json()["data"]))  # oldest first


def test_update_ratio_rule_orders_lr_backoffs_once_its_action_is_on(project: Project) -> None:
    ingest_api, operate, read = project.api["ingest"], project.api["operate"], project.api["read"]
    run = project.new_run()
    hot = rule_id(operate, run, UPDATE_RATIO_HIGH)
    patch = patch_json(operate, f"/alert-rules/{hot}", {"rule": {"lr_backoff": {"enabled": True}}})
    assert patch.status_code == 200, patch.text
    assert patch.json()["rule"]["lr_backoff"]["factor"] == 0.5  # merged, not replaced
    both = patch_json(operate, f"/alert-rules/{hot}", {"rule": {"msign": {"enabled": True}}})
    assert both.status_code == 422 and "both true" in both.text

    weights = ["transformer.h.0.mlp.c_fc.weight", "transformer.h.1.mlp.c_fc.weight"]
    ratios = [0.01, 0.01, 0.2, 0.2, 0.1, 0.01, 0.01]  # steps 0, 5, ... 30
    steps = [5 * i for i, _ in enumerate(ratios) for _ in weights]
    body = {
        "quantity": ["update_ratio"] * len(steps),
        "target": weights * len(ratios),
        "step": steps,
        "value": [v for v in ratios for _ in weights],
    }
    ingest(ingest_api, run, body)
    [alert] = alerts(read, run)
    assert (alert["fired_step"], alert["state"], alert["resolved_step"]) == (10, "resolved", 25)
    commands = read.get(f"/runs/{run}/commands").json()["data"]
    # fired at 10, halved again at each hot sample (15, 20), resolved by the first calm one
    assert [(c["kind"], c["args"]) for c in commands] == [("scale_lr", {"factor": 0.5})] * 3
    assert {c["created_by"] for c in commands} == {f"alert:{alert['id']}"}


def test_new_run_gets_the_default_pack_specialised(project: Project) -> None:
    params = [{"name": f"transformer.h.{i}.attn.c_attn.weight", "shape": [8, 24]} for i in range(8)]
    run = project.new_run(parameters=params)
    rules = project.api["read"].get("/alert-rules", params={"run_id": run}).json()["data"]
    assert [r["name"] for r in rules] == [d["name"] for d in default_rule_dicts()]
    stable = next(r for r in rules if r["name"] == STABLE_RANK_COLLAPSE)
    # The first quarter of 8 blocks: the early layers of MSign Fig. 1.
    assert stable["rule"]["targets"] == ["transformer.h.0.*", "transformer.h.1.*"]
    assert all(r["run_id"] == run and r["firing"] is False for r in rules)
    # The project has no rules of its own yet.
    assert project.api["read"].get("/alert-rules").json()["count"] == 0


def test_project_rules_replace_the_pack_for_later_runs(project: Project) -> None:
    rule = {"name": "loss_high", "quantity": "loss", "condition": "above", "threshold": 10.0}
    r = project.api["operate"].post("/alert-rules", json={"rule": rule})
    assert r.status_code == 201, r.text
    assert r.json()["run_id"] is None and r.json()["rule"]["threshold"] == 10.0
    run = project.new_run()
    rules = project.api["read"].get("/alert-rules", params={"run_id": run}).json()["data"]
    assert [x["name"] for x in rules] == ["loss_high"]
    ingest(
        project.api["ingest"],
        run,
        {
            "quantity": ["loss"] * 3,
            "target": ["global"] * 3,
            "step": [0, 1, 2],
            "value": [1.0, 50.0, 60.0],
        },
    )
    fired = alerts(project.api["read"], run)
    assert [(a["rule_name"], a["fired_step"], a["state"]) for a in fired] == [
        ("loss_high", 1, "firing")
    ]


def test_finishing_a_run_judges_the_steps_held_back(project: Project) -> None:
    rule = {"name": "loss_high", "quantity": "loss", "condition": "above", "threshold": 10.0}
    assert project.api["operate"].post("/alert-rules", json={"rule": rule}).status_code == 201
    run = project.new_run()
    body = {"quantity": ["loss"] * 4, "target": ["global"] * 4, "step": [0, 1, 2, 10]}
    ingest(project.api["ingest"], run, {**body, "value": [1.0, 2.0, 3.0, 60.0]})
    # step 10 follows a gap in a stride-1 series: the engine waits for the missing steps (a
    # late spill file may still bring them) before judging it
    assert alerts(project.api["read"], run) == []
    assert project.api["ingest"].post(f"/runs/{run}/finish").status_code == 200
    fired = alerts(project.api["read"], run)
    assert [(a["rule_name"], a["fired_step"], a["state"]) for a in fired] == [
        ("loss_high", 10, "firing")
    ]
    events = project.api["read"].get(f"/runs/{run}/events", params={"kind": "alert"}).json()
    assert [(e["payload"]["kind"], e["step"]) for e in events["data"]] == [("firing", 10)]
    # finishing again is a no-op and judges nothing twice
    assert project.api["ingest"].post(f"/runs/{run}/finish").status_code == 200
    assert len(alerts(project.api["read"], run)) == 1


def test_invalid_rules_are_422_naming_the_field(project: Project) -> None:
    bad = {"name": "x", "quantity": "loss", "condition": "sideways", "threshold": 1.0}
    r = project.api["operate"].post("/alert-rules", json={"rule": bad})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "rule"]
    assert "condition='sideways'" in r.json()["detail"][0]["msg"]
    # read scope cannot edit
    good = {"name": "x", "quantity": "loss", "condition": "above", "threshold": 1.0}
    assert project.api["read"].post("/alert-rules", json={"rule": good}).status_code == 403


def test_collapse_fires_once_names_the_first_layer_and_resolves(project: Project) -> None:
    ingest_api, operate = project.api["ingest"], project.api["operate"]
    run = project.new_run()  # the default pack ...
    sa = rule_id(operate, run, SA_COLLAPSE)
    # ... with its SA rule replaced by this test's (PUT) and its action switched on (PATCH).
    off = {**SA_RULE, "msign": {**SA_RULE["msign"], "enabled": False}}
    assert operate.client.put(
        f"/api/v1/alert-rules/{sa}", headers=operate.headers, json={"rule": off}
    ).is_success
    patch = patch_json(operate, f"/alert-rules/{sa}", {"rule": {"msign": {"enabled": True}}})
    assert patch.status_code == 200, patch.text
    assert patch.json()["rule"]["msign"] == SA_RULE["msign"]

    first = diversity_batch(range(0, 100, STRIDE), ONSET)
    ingest(ingest_api, run, first)
    ingest(ingest_api, run, diversity_batch(range(100, 120, STRIDE), ONSET))
    fired = alerts(project.api["read"], run)
    assert len(fired) == 1
    alert = fired[0]
    # h.3 dropped at step 50 and tripped after 3 consecutive samples (50, 60, 70).
    assert (alert["state"], alert["first_step"], alert["fired_step"]) == ("firing", 50, 70)
    assert alert["targets"][0]["target"] == TARGETS[3]
    assert alert["targets"][0]["since"] == 50
    assert alert["severity"] == "critical"

    # The msign action queued one command for the run, created by the alert.
    commands = project.api["read"].get(f"/runs/{run}/commands").json()["data"]
    assert [(c["kind"], c["created_by"]) for c in commands] == [("msign", f"alert:{alert['id']}")]
    assert alert["command_id"] == commands[0]["id"]

    # Replaying a batch (the probe's spill replay) changes nothing.
    assert ingest(ingest_api, run, first)["inserted"] == 0
    assert len(alerts(project.api["read"], run)) == 1

    # Recovery from step 120: clear_after=3 -> resolved at 140.
    recovered = {t: 10**9 for t in TARGETS}
    ingest(ingest_api, run, diversity_batch(range(120, 200, STRIDE), recovered))
    [alert] = alerts(project.api["read"], run)
    assert (alert["state"], alert["resolved_step"]) == ("resolved", 140)

    # A second collapse inside msign.window_steps fires again but orders no second command.
    again = {t: 200 for t in TARGETS}
    ingest(ingest_api, run, diversity_batch(range(200, 260, STRIDE), again))
    both = alerts(project.api["read"], run)
    assert [(a["episode"], a["state"]) for a in both] == [(1, "resolved"), (2, "firing")]
    assert both[1]["command_suppressed"] is True and both[1]["command_id"] is None
    commands = project.api["read"].get(f"/runs/{run}/commands").json()["data"]
    assert len(commands) == 1

    # The dashboard's events: one per transition, payload = Transition.to_dict().
    events = project.api["read"].get(f"/runs/{run}/events", params={"kind": "alert"}).json()
    assert [(e["payload"]["kind"], e["step"]) for e in events["data"]] == [
        ("firing", 70),
        ("resolved", 140),
        ("firing", 220),
    ]
    assert events["data"][0]["payload"]["alert_id"] == alert["id"]
    # Project-wide listing and one alert by id.
    listed = project.api["read"].get("/alerts", params={"state": "firing"}).json()["data"]
    assert [a["id"] for a in listed] == [both[1]["id"]]
    assert project.api["read"].get(f"/alerts/{alert['id']}").json()["rule_name"] == SA_COLLAPSE


def test_alerts_are_private_to_their_project(project: Project, other_project: Project) -> None:
    run = sa_run(project)
    ingest(project.api["ingest"], run, diversity_batch(range(0, 120, STRIDE), ONSET))
    [alert] = alerts(project.api["read"], run)
    other = other_project.api["read"]
    assert other.get(f"/alerts/{alert['id']}").status_code == 404
    assert other.get(f"/runs/{run}/alerts").status_code == 404
    assert other.get("/alert-rules", params={"run_id": run}).status_code == 404
    assert other.get("/alerts").json()["count"] == 0
    sa = rule_id(project.api["read"], run, SA_COLLAPSE)
    assert other_project.api["operate"].delete(f"/alert-rules/{sa}").status_code == 404
    assert project.api["operate"].delete(f"/alert-rules/{sa}").status_code == 204
    # The alert outlives its rule.
    assert project.api["read"].get(f"/alerts/{alert['id']}").json()["rule_id"] is None


def test_metrics_and_runs_list_count_the_same_firing_alerts(
    client: TestClient, project: Project
) -> None:
    """One definition of "alerts firing" (the alerts table), read by /metrics and by the
    dashboard's runs list alike: 1 while the collapse alert fires, 0 once it resolved."""
    run = sa_run(project)
    read = project.api["read"]
    admin_headers = {"Authorization": f"Bearer {project.tokens['admin']}"}

    def counts() -> tuple[float, int]:
        wanted = f'rankguard_alerts_firing{{project="{project.name}",run="{run}",'
        line = next(
            ln for ln in project.api["admin"].client.get(
                "/metrics", headers=admin_headers
            ).text.splitlines()
            if ln.startswith(wanted) and 'severity="critical"' in ln
        )  # fmt: skip
        [row] = [r for r in read.get("/dashboard/runs").json()["data"] if r["id"] == run]
        return float(line.rsplit(" ", 1)[1]), int(row["alerts_firing"])

    ingest(project.api["ingest"], run, diversity_batch(range(0, 120, STRIDE), ONSET))
    assert counts() == (1.0, 1)
    recovered = {t: 10**9 for t in TARGETS}
    ingest(project.api["ingest"], run, diversity_batch(range(120, 200, STRIDE), recovered))
    assert alerts(read, run)[0]["state"] == "resolved"
    assert counts() == (0.0, 0)


def _wait_deliveries(api: Api, alert_id: str, n: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 20
    while True:
        rows = api.get(f"/alerts/{alert_id}/deliveries").json()["data"]
        done = [d for d in rows if d["outcome"] in ("delivered", "failed")]
        if len(done) >= n:
            return list(rows)
        assert time.monotonic() < deadline, rows
        time.sleep(0.05)


def test_webhooks_deliver_signed_payloads_and_log_them(project: Project) -> None:
    operate, read = project.api["operate"], project.api["read"]
    with webhook_receiver() as receiver:
        ids = {}
        for fmt in ("json", "slack", "alertmanager"):
            r = operate.post(
                "/webhooks",
                json={"name": fmt, "url": receiver.url(f"/{fmt}"), "format": fmt, "secret": "s3"},
            )
            assert r.status_code == 201, r.text
            assert r.json()["has_secret"] is True and "secret" not in r.json()
            ids[fmt] = r.json()["id"]
        run = sa_run(project)
        ingest(project.api["ingest"], run, diversity_batch(range(0, 120, STRIDE), ONSET))
        [alert] = alerts(read, run)
        got = receiver.wait_for(3)
        by_path = {g.path: g for g in got}
        for g in got:
            assert signing.verify_signature(
                g.body,
                "s3",
                g.headers.get("X-Rankguard-Signature"),
                g.headers.get("X-Rankguard-Timestamp"),
            )
        assert by_path["/json"].json()["alert_id"] == alert["id"]
        assert by_path["/json"].json()["targets"][0]["target"] == TARGETS[3]
        assert "blocks" in by_path["/slack"].json()
        am = by_path["/alertmanager"].json()
        assert am["alerts"][0]["labels"]["alertname"] == SA_COLLAPSE
        assert am["status"] == "firing"
        log = _wait_deliveries(read, alert["id"], 3)
        assert {d["outcome"] for d in log} == {"delivered"}
        assert all(d["attempts"][0]["status_code"] == 200 for d in log)
        hook_log = read.get(f"/webhooks/{ids['json']}/deliveries").json()["data"]
        assert [d["alert_id"] for d in hook_log] == [alert["id"]]

        # Disabled webhooks get nothing; a min_severity above the alert's filters it out.
        assert patch_json(operate, f"/webhooks/{ids['slack']}", {"enabled": False}).is_success
        run2 = project.new_run()
        ingest(project.api["ingest"], run2, diversity_batch(range(0, 120, STRIDE), ONSET))
        got = receiver.wait_for(5)
        assert sorted(g.path for g in got[3:]) == ["/alertmanager", "/json"]
    listed = read.get("/webhooks").json()
    assert listed["count"] == 3 and all("secret" not in w for w in listed["data"])


def test_test_notification_is_sent_signed_in_each_format(project: Project) -> None:
    operate = project.api["operate"]
    with webhook_receiver() as receiver:
        for fmt in ("json", "slack", "alertmanager"):
            created = operate.post(
                "/webhooks",
                json={"name": fmt, "url": receiver.url(f"/{fmt}"), "format": fmt, "secret": "k"},
            )
            hook = created.json()["id"]
            r = operate.post(f"/webhooks/{hook}/test")
            assert r.status_code == 200, r.text
            result = r.json()
            assert (result["delivered"], result["status_code"], result["error"]) == (
                True,
                200,
                None,
            )
            [got] = [g for g in receiver.wait_for(1) if g.path == f"/{fmt}"]
            assert got.json() == result["body"]
            assert signing.verify_signature(
                got.body,
                "k",
                got.headers.get("X-Rankguard-Signature"),
                got.headers.get("X-Rankguard-Timestamp"),
            )
        assert "test notification" in receiver.requests[0].json()["message"]
        # a test is not an alert: nothing in the delivery log
        assert project.api["read"].get(f"/webhooks/{hook}/deliveries").json()["count"] == 0
    # a receiver that is gone: a clear failure, at once (one try), not an error of the server
    r = operate.post(f"/webhooks/{hook}/test")
    assert r.status_code == 200
    assert r.json()["delivered"] is False and r.json()["error"]
    # the read scope cannot send
    assert project.api["read"].post(f"/webhooks/{hook}/test").status_code == 403


def test_failed_deliveries_are_logged(project: Project) -> None:
    with webhook_receiver() as receiver:
        receiver.status = 400  # a 4xx is final: not retried
        project.api["operate"].post(
            "/webhooks", json={"name": "bad", "url": receiver.url("/x"), "format": "json"}
        )
        run = sa_run(project)
        ingest(project.api["ingest"], run, diversity_batch(range(0, 120, STRIDE), ONSET))
        [alert] = alerts(project.api["read"], run)
        [row] = _wait_deliveries(project.api["read"], alert["id"], 1)
    assert (row["outcome"], row["status_code"], len(row["attempts"])) == ("failed", 400, 1)


def _am_payload(run: str, status: str = "firing", **labels: str) -> dict[str, Any]:
    return {
        "version": "4",
        "status": status,
        "alerts": [
            {
                "status": status,
                "labels": {"alertname": "RankguardSACollapse", "run": run, **labels},
                "annotations": {},
                "fingerprint": "abc123",
            }
        ],
    }


def test_inbound_alertmanager_orders_msign_once(project: Project, other_project: Project) -> None:
    run = project.new_run()
    operate = project.api["operate"]
    body = _am_payload(run, rankguard_action="msign", rankguard_targets="attention")
    r = operate.post("/inbound/alertmanager", json=body)
    assert r.status_code == 200, r.text
    [command] = r.json()["commands"]
    assert command["kind"] == "msign" and command["args"]["targets"] == "attention"
    assert command["created_by"].startswith("inbound:alertmanager:")
    # Alertmanager repeats a firing alert: no second command while the first is open.
    again = operate.post("/inbound/alertmanager", json=body).json()
    assert again["commands"] == [] and "already queued" in again["ignored"][0]["reason"]
    # Resolved, no action, another project's run: nothing ordered.
    resolved = _am_payload(run, status="resolved", rankguard_action="msign")
    assert operate.post("/inbound/alertmanager", json=resolved).json()["commands"] == []
    assert operate.post("/inbound/grafana", json=_am_payload(run)).json()["commands"] == []
    foreign = other_project.api["operate"].post("/inbound/alertmanager", json=body).json()
    assert "not found" in foreign["ignored"][0]["reason"]
    assert project.api["read"].post("/inbound/alertmanager", json=body).status_code == 403
    bad = operate.post("/inbound/alertmanager", json={"nothing": 1})
    assert bad.status_code == 422
    # Legacy Grafana notification.
    legacy = {
        "ruleName": "r",
        "state": "alerting",
        "tags": {"run": run, "rankguard_action": "msign"},
    }
    assert len(operate.post("/inbound/grafana", json=legacy).json()["commands"]) == 1
    commands = project.api["read"].get(f"/runs/{run}/commands").json()["data"]
    assert len(commands) == 2


def test_alerts_enabled_false_evaluates_nothing(tmp_sqlite: str) -> None:
    settings: Settings = make_settings(tmp_sqlite, alerts_enabled=False)
    with TestClient(create_app(settings)) as client:
        project = Project(Api(client, ADMIN_TOKEN))
        run = sa_run(project)
        ingest(project.api["ingest"], run, diversity_batch(range(0, 120, STRIDE), ONSET))
        assert alerts(project.api["read"], run) == []
        # Rules are still installed and editable.
        assert project.api["read"].get("/alert-rules", params={"run_id": run}).json()["count"] > 0


@pytest.mark.parametrize("field", ["condition", "threshold"])
def test_editing_a_condition_restarts_state_and_closes_the_alert(
    project: Project, field: str
) -> None:
    run = sa_run(project)
    ingest(project.api["ingest"], run, diversity_batch(range(0, 120, STRIDE), ONSET))
    sa = rule_id(project.api["read"], run, SA_COLLAPSE)
    change = (
        {"threshold": 0.01} if field == "threshold" else {"condition": "above", "threshold": 2.0}
    )
    operate = project.api["operate"]
    r = patch_json(operate, f"/alert-rules/{sa}", {"rule": change})
    assert r.status_code == 200 and r.json()["firing"] is False
    [alert] = alerts(project.api["read"], run)
    assert alert["state"] == "resolved" and "edited" in alert["resolved_message"]


@pytest.mark.parametrize("layout", ["probe order", "shuffled"])
def test_batch_grouping_matches_a_point_by_point_walk(layout: str) -> None:
    """The rules see each quantity's rank-0 samples by step, the first of duplicates kept,
    whatever the order of the batch (the grouping walks runs of equal quantity and step)."""
    rng = random.Random(3)
    rows = [
        (q, f"t{t}", rank, step, float(rng.randint(0, 9)))
        for step in (5, 6)
        for q in ("stable_rank", "loss", "grad_norm")
        for t in range(4)
        for rank in (0, 1)
    ]
    rows += rng.sample(rows, 10)  # duplicates, with other values
    rows = [(q, t, r, s, v + 100 * i) for i, (q, t, r, s, v) in enumerate(rows)]
    if layout == "shuffled":
        rng.shuffle(rows)
    expected: dict[str, dict[int, dict[str, float]]] = {"stable_rank": {}, "loss": {}}
    for q, t, r, s, v in rows:
        if r == 0 and q in expected:
            expected[q].setdefault(s, {}).setdefault(t, v)
    points = storage.ColumnarPoints(
        quantity=[row[0] for row in rows],
        target=[row[1] for row in rows],
        rank=[row[2] for row in rows],
        step=[row[3] for row in rows],
        wall_time=[0.0] * len(rows),
        value=[row[4] for row in rows],
    )
    assert _rank0_by_step(points, {"stable_rank", "loss"}) == expected
    one_rank = storage.ColumnarPoints(**{**vars(points), "rank": [0] * len(rows)})
    assert _rank0_by_step(one_rank, {"loss"})["loss"][5]["t0"] == next(
        v for q, t, _, s, v in rows if (q, t, s) == ("loss", "t0", 5)
    )
