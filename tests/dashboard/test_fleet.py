"""The fleet pages' JSON without a browser, on a fleet judged by the server's own rules
(tests/helpers/fleet.py): the runs list (filters, sorts, paging, margins, sparklines), the
margins endpoint and gauges, the compare view, the incident view and the pages' shells."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import fleet as seed

from rankguard.server.alerts.margin import rule_margin
from rankguard.server.alerts.rules import Rule
from rankguard.server.config import Settings
from rankguard.server.main import create_app
from rankguard.server.models import AlertRule
from rankguard.server.storage import overlay
from rankguard.server.storage.downsample import downsample
from rankguard.server.wire import decode_float

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*starlette.testclient.*")
    from fastapi.testclient import TestClient

ADMIN = "rg_test-admin-token-for-fleet-pages-0123"
METRICS = "rg_test-metrics-token-for-fleet-pages-01"


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Env:
    def __init__(self, client: TestClient, tokens: dict[str, str], fleet: seed.Fleet) -> None:
        self.client, self.tokens, self.fleet = client, tokens, fleet

    def get(self, url: str, token: str = "read", **params: Any) -> Any:
        resp = self.client.get(url, params=params, headers=auth(self.tokens[token]))
        assert resp.status_code == 200, resp.text
        return resp.json()

    def runs(self, **params: Any) -> dict[str, Any]:
        body: dict[str, Any] = self.get("/api/v1/dashboard/runs", **params)
        return body

    def names(self, **params: Any) -> list[str]:
        return [r["name"] for r in self.runs(**params)["data"]]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp: Path = tmp_path_factory.mktemp("fleet")
    settings = Settings(
        database_url=f"sqlite:///{tmp / 'rg.db'}",
        admin_token=ADMIN,
        allowed_hosts=["testserver"],
        metrics_token=METRICS,
    )
    with TestClient(create_app(settings)) as client:
        tokens = {}
        for scope in ("ingest", "read", "operate"):
            body = {"name": scope, "project": "default", "scopes": [scope]}
            resp = client.post("/api/v1/tokens", headers=auth(ADMIN), json=body)
            tokens[scope] = resp.json()["token"]
        fleet = seed.seed_fleet(client, ingest=tokens["ingest"], operate=tokens["operate"])
        # Another project's run: never listed, compared or opened with these tokens.
        client.post("/api/v1/projects", headers=auth(ADMIN), json={"name": "other"})
        other = client.post("/api/v1/runs", headers=auth(ADMIN),
                            json={"name": "secret", "project": "other"}).json()  # fmt: skip
        tokens["other_run"] = other["id"]
        yield Env(client, tokens, fleet)


# --- runs list ------------------------------------------------------------------------------


def test_runs_list_filters_by_status_firing_tag_and_search(env: Env) -> None:
    assert sorted(env.names()) == sorted(env.fleet.runs)
    assert env.names(status="failed") == ["nan-loss"]
    assert env.names(status="finished") == ["healthy-b"]
    assert sorted(env.names(firing="true")) == ["collapsing", "nan-loss"]
    assert "collapsing" not in env.names(firing="false")
    assert sorted(env.names(tag="hot-lr")) == ["incident", "near-logits"]
    assert env.names(tag="baseline") == ["healthy-a"]
    assert sorted(env.names(q="HEALTHY")) == ["healthy-a", "healthy-b"]  # case-insensitive
    assert env.names(q="%") == []  # LIKE wildcards are text
    run_id = env.fleet.runs["incident"]
    assert env.names(q=run_id[:8]) == ["incident"]
    assert env.names(project="default", status="running", tag="gpt", firing="false") == sorted(
        ["healthy-a", "near-logits", "incident"], key=env.names().index
    )
    body = env.runs()
    assert body["projects"] == ["default"]  # the token's own project only
    assert set(body["tags"]) == {"baseline", "fp16", "gpt", "hot-lr"}


def test_runs_list_sorts_and_pages_in_sql(env: Env) -> None:
    newest_first = env.names()
    assert newest_first[0] == "incident"  # registered last
    assert env.names(sort="started", order="asc") == newest_first[::-1]
    assert env.names(sort="name") == sorted(newest_first)
    assert env.names(sort="firing")[:2] in (["collapsing", "nan-loss"], ["nan-loss", "collapsing"])
    pages = [env.runs(sort="name", limit=4, page=p) for p in (1, 2)]
    assert [r["name"] for p in pages for r in p["data"]] == sorted(newest_first)
    assert pages[0]["count"] == pages[1]["count"] == len(newest_first)
    assert env.runs(page=9)["data"] == []


def test_risk_sort_puts_firing_then_nearest_first_and_certifies_the_rest(env: Env) -> None:
    rows = env.runs(sort="risk")["data"]
    health = {r["name"]: r["health"] for r in rows}
    assert health["collapsing"] == "firing" and health["nan-loss"] == "firing"
    assert health["near-logits"] == "near"
    assert health["healthy-a"] == "ok"
    assert {r["name"] for r in rows[:2]} == {"collapsing", "nan-loss"}
    # then past a bound (the incident's loss is still above its best: the stall rule trips),
    # then near one, then certified clear
    rank = {"firing": 0, "tripping": 1, "near": 2, "unknown": 3, "ok": 4}
    order = [rank[r["health"]] for r in rows]
    assert order == sorted(order) and order[-1] == rank["ok"], [r["health"] for r in rows]
    near = next(r for r in rows if r["name"] == "near-logits")["nearest"]
    bound = seed.NEAR_LOGIT / 0.92
    assert near["rule"] == "attention_logit_high" and near["bound"] == pytest.approx(bound)
    assert near["text"].endswith(f"(margin {bound - near['value']:.4g})")
    collapsing = next(r for r in rows if r["name"] == "collapsing")["nearest"]
    assert collapsing["rule"] == "stable_rank_collapse" and collapsing["firing"]
    assert collapsing["unit"] == "× baseline" and collapsing["margin"] < 0
    healthy = next(r for r in rows if r["name"] == "healthy-a")
    assert healthy["rules_pending"] == 0 and healthy["rules_assessed"] >= 4
    assert env.names(sort="risk", order="desc")[0] in ("healthy-a", "healthy-b", "incident")


def test_margins_follow_the_stored_rules_and_latest_values(env: Env) -> None:
    """The endpoint is ``rule_margin`` on the stored rule, state and latest values."""
    run_id = env.fleet.runs["near-logits"]
    body = env.get(f"/api/v1/runs/{run_id}/margins")
    with env.client.app.state.db.read() as session:  # type: ignore[attr-defined]
        row = session.query(AlertRule).filter_by(run_id=run_id, name="attention_logit_high").one()
        rule, state = Rule.from_dict(row.rule), row.state
    last = seed.STEPS - 1
    value = seed.NEAR_LOGIT * (0.5 + 0.5 * last / seed.STEPS)
    latest = {f"model.layers.{b}.attn": (last, value) for b in range(2)}
    expected = rule_margin(rule, state, latest).to_dict()
    [got] = [m for m in body["data"] if m["rule"] == "attention_logit_high"]
    assert got == pytest.approx(expected)
    assert body["nearest"]["rule"] == "attention_logit_high" and body["health"] == "near"
    resp = env.client.get(
        f"/api/v1/runs/{env.tokens['other_run']}/margins", headers=auth(env.tokens["read"])
    )
    assert resp.status_code == 404


def test_sparkline_is_the_downsampled_loss_with_its_spike(env: Env) -> None:
    row = next(r for r in env.runs(q="incident")["data"])
    spark = row["sparkline"]
    steps = np.arange(seed.STEPS)
    loss = np.array([4.0 * np.exp(-s / 80) + 0.6 for s in steps])
    loss[seed.SPIKE_AT : seed.SPIKE_AT + 6] += 0.5 * (np.arange(6) + 1)
    want_steps, want = downsample(steps, loss, 50)
    assert spark["steps"] == want_steps.tolist()
    assert spark["values"] == pytest.approx(want.tolist())
    assert max(spark["values"]) == pytest.approx(loss.max())  # the spike survives
    nan_row = next(r for r in env.runs(q="nan-loss")["data"])
    assert any(v == "NaN" for v in nan_row["sparkline"]["values"])
    assert nan_row["last_loss"] == "NaN"


def test_runs_list_rejects_bad_parameters_naming_the_field(env: Env) -> None:
    for params, field in (({"sort": "vibes"}, "sort"), ({"status": "paused"}, "status"),
                          ({"limit": 0}, "limit"), ({"firing": "maybe"}, "firing")):  # fmt: skip
        resp = env.client.get("/api/v1/dashboard/runs", params=params,
                              headers=auth(env.tokens["read"]))  # fmt: skip
        assert resp.status_code == 422, params
        assert resp.json()["detail"][0]["loc"][-1] == field
    assert env.client.get("/api/v1/dashboard/runs").status_code == 401
    resp = env.client.get("/api/v1/dashboard/runs", headers=auth(env.tokens["ingest"]))
    assert resp.status_code == 403


# --- gauges ---------------------------------------------------------------------------------


def test_margin_gauges_cover_active_runs_only(env: Env) -> None:
    text = env.client.get("/metrics", headers=auth(METRICS)).text
    lines = [ln for ln in text.splitlines() if ln.startswith("rankguard_run_rule_margin{")]
    runs = {re.search(r'run="([^"]+)"', ln).group(1) for ln in lines}  # type: ignore[union-attr]
    fleet = env.fleet.runs
    assert fleet["near-logits"] in runs and fleet["healthy-b"] not in runs  # finished
    assert fleet["nan-loss"] not in runs  # failed
    near = env.get(f"/api/v1/runs/{fleet['near-logits']}/margins")["data"]
    want = {m["rule"]: m for m in near if m["margin"] is not None}
    for ln in lines:
        if fleet["near-logits"] in ln:
            rule = re.search(r'rule="([^"]+)"', ln).group(1)  # type: ignore[union-attr]
            margin = decode_float(want.pop(rule)["margin"])  # +Inf: "Infinity" on the wire
            assert float(ln.rsplit(" ", 1)[1]) == pytest.approx(margin)
    assert want == {}
    assert (
        f'rankguard_run_rule_margin_relative{{project="default",rule="attention_logit_high",run="{fleet["near-logits"]}"}}'
        in text
    )


# --- compare --------------------------------------------------------------------------------


def compare(env: Env, *names: str, **params: Any) -> dict[str, Any]:
    runs = ",".join(env.fleet.runs[n] for n in names)
    body: dict[str, Any] = env.get("/api/v1/dashboard/compare", runs=runs, **params)
    return body


def traces(body: dict[str, Any], figure_id: str) -> list[dict[str, Any]]:
    [fig] = [f["figure"] for f in body["figures"] if f["id"] == figure_id]
    return [t for t in fig["data"] if t.get("mode") == "lines"]


def decode(array: Any) -> np.ndarray[Any, Any]:
    """A figure's array: a list, or plotly's base64 typed array."""
    if isinstance(array, dict):
        import base64

        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=np.dtype(array["dtype"]))
    return np.asarray(array, dtype=np.float64)


def test_compare_overlays_the_runs_in_order_with_their_events(env: Env) -> None:
    body = compare(env, "collapsing", "healthy-a", "incident")
    assert [r["name"] for r in body["runs"]] == ["collapsing", "healthy-a", "incident"]
    assert body["agg"] == "min" and body["quantity"] == "stable_rank"  # low is worse
    lines = traces(body, "fig-compare")
    assert [t["name"] for t in lines] == ["collapsing", "healthy-a", "incident"]
    assert len({t["line"]["color"] for t in lines}) == 3
    # min over the 4 targets per step: target 0 (sr + 0); collapsing drops to 0.08x after 150.
    steps = decode(lines[0]["x"])
    values = decode(lines[0]["y"])
    expected = np.array([8.0 * (0.08 if s > 150 else 1.0) + 0.01 * (s % 7) for s in steps])
    assert values == pytest.approx(expected)
    [fig] = [f["figure"] for f in body["figures"] if f["id"] == "fig-compare"]
    shapes = fig["layout"]["shapes"]
    by_colour = {t["name"]: t["line"]["color"] for t in lines}
    alerts = [s for s in shapes if s["name"] == "event-alert"]
    assert {s["line"]["color"] for s in alerts} == {by_colour["collapsing"], by_colour["incident"]}
    assert any(s["name"] == "event-intervention" for s in shapes)  # the applied MSign
    labels = [r["label"] for r in body["runs"]]
    assert [t["name"] for t in traces(body, "fig-compare-loss")] == labels


def test_compare_one_target_and_other_aggregates(env: Env) -> None:
    target = seed.TARGETS[1]
    body = compare(env, "healthy-a", "near-logits", target=target)
    [_, b] = traces(body, "fig-compare")
    assert decode(b["y"])[:3] == pytest.approx([10.0 + 0.01 * (s % 7) for s in range(3)])
    assert target in body["targets"] and body["target"] == target
    means = decode(traces(compare(env, "healthy-a", agg="mean"), "fig-compare")[0]["y"])
    assert means[0] == pytest.approx(6.0 + 1.5)  # targets sr + 0..3
    logits = compare(env, "near-logits", quantity="attention_logit_max")
    assert logits["agg"] == "max"


def test_rollup_aggregate_is_the_block_extreme(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past RAW_LIMIT points the min/max come from point_blocks: each column's extreme over
    every target and step of its blocks, exactly."""
    monkeypatch.setattr(overlay, "RAW_LIMIT", 10)
    body = compare(env, "collapsing")
    [line] = traces(body, "fig-compare")
    steps, values = decode(line["x"]), decode(line["y"])
    assert steps.tolist() == [0, 64, 128, 192]
    sr = [[(8.0 + i) * (0.08 if s > 150 else 1.0) + 0.01 * (s % 7) for s in range(seed.STEPS)]
          for i in range(4)]  # fmt: skip
    flat = np.min(np.array(sr), axis=0)
    assert values == pytest.approx([flat[b : b + 64].min() for b in (0, 64, 128, 192)])
    assert body["notes"] == ["collapsing: min over 4 targets per 64 steps"]
    # The mean reads the points again, at one sampled step in k (k: at most RAW_LIMIT points).
    body = compare(env, "collapsing", agg="mean")
    [line] = traces(body, "fig-compare")
    steps, values = decode(line["x"]), decode(line["y"])
    k = -(-4 * seed.STEPS // 10)
    assert steps.tolist() == list(range(0, seed.STEPS, k))
    assert values == pytest.approx(np.mean(np.array(sr), axis=0)[::k])
    assert body["notes"] == [f"collapsing: mean over 4 targets at one sampled step in {k}"]


def test_compare_limits_and_access(env: Env) -> None:
    read = auth(env.tokens["read"])
    ids = list(env.fleet.runs.values())
    resp = env.client.get(
        "/api/v1/dashboard/compare", params={"runs": ",".join(ids + ids[:1] + ["x"])}, headers=read
    )
    assert resp.status_code == 422 and "give 1 to 6" in resp.text
    mixed = ",".join([ids[0], env.tokens["other_run"]])
    resp = env.client.get("/api/v1/dashboard/compare", params={"runs": mixed}, headers=read)
    assert resp.status_code == 404
    resp = env.client.get("/api/v1/dashboard/compare", params={"runs": ids[0], "agg": "median"},
                          headers=read)  # fmt: skip
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"][-1] == "agg"


# --- incident -------------------------------------------------------------------------------


def test_incident_tells_what_fired_what_followed_and_how_it_ended(env: Env) -> None:
    body = env.get(f"/api/v1/dashboard/incidents/{env.fleet.alert_id}")
    alert = body["alert"]
    assert alert["rule"] == "grad_norm_spike" and alert["first_step"] == seed.SPIKE_AT
    assert alert["state"] == "resolved" and alert["resolved_step"] == seed.APPLIED_AT + 1
    assert body["targets"][0]["target"] == "global" and body["targets"][0]["since"] == seed.SPIKE_AT
    lo, hi = body["window"]
    assert lo < seed.SPIKE_AT < seed.APPLIED_AT < hi
    # Full resolution: every step of the window, for the alert's quantity and the loss.
    for fig in body["figures"]:
        [line] = [t for t in fig["figure"]["data"] if t.get("mode") == "lines"]
        assert decode(line["x"]).tolist() == list(range(lo, min(hi, seed.STEPS - 1) + 1))
    [command] = body["commands"]
    assert command["id"] == env.fleet.command_id and command["state"] == "applied"
    assert command["applied_step"] == seed.APPLIED_AT and not command["ordered_by_alert"]
    grad, loss = command["before_after"]
    assert grad["before"] == pytest.approx(1.6**9) and grad["before_step"] == seed.APPLIED_AT
    assert grad["after"] == pytest.approx(1.0 + 0.05 * math.sin(seed.APPLIED_AT + 1))
    assert loss["what"] == "loss" and loss["after_step"] == seed.APPLIED_AT + 1
    assert command["result"] == "4 matrices; median stable rank 3.4 → 8"
    kinds = [e["kind"] for e in body["events"]]
    assert kinds.index("quantity_unavailable") < kinds.index("skip_step")  # by step
    rollback = next(e for e in body["events"] if e["kind"] == "rollback")
    assert rollback["summary"] == (
        f"rolled back to step {seed.SPIKE_AT - 8}; skipped data steps "
        f"{seed.SPIKE_AT - 8}–{seed.APPLIED_AT}; LR × 0.5; loss 7.1 → 1.2"
    )
    other = next(e for e in body["events"] if e["kind"] == "checkpoint_saved")
    assert other["summary"] == "checkpoint_saved: path_hint=ring slot 3, bytes=1048576"
    assert body["outcome"]["state"] == "rolled back"
    assert "then resolved at step" in body["outcome"]["detail"]


def test_incident_of_another_project_is_404(env: Env) -> None:
    with env.client.app.state.db.write() as session:  # type: ignore[attr-defined]
        from rankguard.server.models import Alert

        session.add(Alert(id="alien-alert", run_id=env.tokens["other_run"], rule_name="r",
                          episode=1, quantity="loss", severity="warning", first_step=1,
                          fired_step=1, message="m", suggested_action=""))  # fmt: skip
    read = auth(env.tokens["read"])
    for alert_id in ("alien-alert", "nope"):
        url = f"/api/v1/dashboard/incidents/{alert_id}"
        assert env.client.get(url, headers=read).status_code == 404


@pytest.mark.parametrize("path", ["/compare?runs=a,b", "/incidents/x", "/runs/r/alerts/x",
                                  "/runs/r/incidents/latest?rule=y"])  # fmt: skip
def test_fleet_pages_are_shells_with_local_scripts_only(env: Env, path: str) -> None:
    resp = env.client.get(path)
    assert resp.status_code == 200 and 'id="token-form"' in resp.text
    html = resp.text
    assert not re.search(r"https?://", html)
    assert "<script>" not in html and not re.search(r"\son[a-z]+=", html)  # CSP: no inline
    for url in re.findall(r'(?:src|href)="([^"#]+)"', html):
        assert env.client.get(url).status_code == 200, url


def test_margin_cache_recomputes_what_moved(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's margins are recomputed when its status or rules change; when only its last
    step moved (a training run), after max_age_s."""
    from rankguard.dashboard import fleet as fleet_module

    computed: list[list[str]] = []
    rules = {"r1": (10, "edit-1")}
    monkeypatch.setattr(fleet_module, "rules_marks", lambda session, ids: dict(rules))
    monkeypatch.setattr(
        fleet_module,
        "run_margins",
        lambda session, ids: computed.append(sorted(ids)) or {i: [] for i in ids},
    )
    cache = fleet_module.MarginCache(max_age_s=3600)
    cache.margins(None, {"r1": ("running", 10)})  # type: ignore[arg-type]
    cache.margins(None, {"r1": ("running", 10)})  # type: ignore[arg-type]
    cache.margins(None, {"r1": ("running", 11)})  # type: ignore[arg-type]  # recent enough
    assert computed == [["r1"]]
    cache.margins(None, {"r1": ("finished", 11)})  # type: ignore[arg-type]
    rules["r1"] = (10, "edit-2")
    cache.margins(None, {"r1": ("finished", 11)})  # type: ignore[arg-type]
    assert computed == [["r1"]] * 3
    stale = fleet_module.MarginCache(max_age_s=0)
    stale.margins(None, {"r1": ("running", 1)})  # type: ignore[arg-type]
    stale.margins(None, {"r1": ("running", 2)})  # type: ignore[arg-type]
    assert len(computed) == 5
