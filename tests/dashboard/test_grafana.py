"""The provisioned Grafana dashboard: structure, datasource wiring, metric names, and every
PromQL expression parsed by a real Prometheus."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from helpers.prometheus import running_prometheus

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "dashboard" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "rankguard.json"
CONTRACT = ROOT / "docs" / "contract.md"
# Grafana's own macros, replaced by what Grafana would send for a 1-hour view.
MACROS = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "${__rate_interval}": "1m",
}
LABEL_VALUES = re.compile(r"^label_values\((?:(?P<metric>.+),\s*)?(?P<label>\w+)\)$")


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panel_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def query_variables(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """The variables that query Prometheus (a textbox holds a value, no query)."""
    return [v for v in dashboard["templating"]["list"] if v["type"] == "query"]


def variable_queries(dashboard: dict[str, Any]) -> list[str]:
    out = []
    for variable in query_variables(dashboard):
        query = variable.get("query")
        out.append(query["query"] if isinstance(query, dict) else query)
    return out


def to_promql(expr: str) -> str:
    """Substitutes template variables and macros the way Grafana does before querying."""
    match = LABEL_VALUES.match(expr.strip())
    if match:  # a Grafana variable query, not PromQL: check its selector instead
        return match.group("metric") or "up"
    for macro, value in MACROS.items():
        expr = expr.replace(macro, value)
    expr = expr.replace("${run}", "demo-run").replace("$run", "demo-run")
    assert "$" not in expr, f"unsubstituted template variable left in {expr!r}"
    return expr


def test_dashboard_structure() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "rankguard-runs"
    assert dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    for panel in dashboard["panels"]:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), f"panel {panel['title']!r}: duplicate refIds"


def test_panels_do_not_overlap() -> None:
    occupied: dict[tuple[int, int], str] = {}
    for panel in load_dashboard()["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in occupied, f"{panel['title']!r} overlaps {occupied[x, y]!r}"
                occupied[x, y] = panel["title"]


def test_run_variable_reads_last_step_metric() -> None:
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    run = variables["run"]
    assert run["type"] == "query"
    assert run["query"] == "label_values(rankguard_run_last_step, run)"
    assert run["multi"] is True and run["includeAll"] is True


def test_every_query_uses_the_provisioned_datasource() -> None:
    provisioned = yaml.safe_load((GRAFANA / "datasources" / "prometheus.yml").read_text())
    [source] = provisioned["datasources"]
    assert source["url"] == "http://prometheus:9090"
    dashboard = load_dashboard()
    refs = [p["datasource"] for p in dashboard["panels"]]
    refs += [t["datasource"] for p in dashboard["panels"] for t in p["targets"]]
    refs += [v["datasource"] for v in query_variables(dashboard)]
    assert {(r["type"], r["uid"]) for r in refs} == {("prometheus", source["uid"])}


def test_required_panels_present() -> None:
    exprs = [expr for _, expr in panel_exprs(load_dashboard())]
    joined = "\n".join(exprs)
    for quantity, aggregate in [
        ("loss", "mean"),
        ("grad_norm", "max"),
        ("stable_rank", "min"),
        ("stable_rank", "mean"),
        ("sa_sign_diversity", "min"),
        ("jacobian_alignment_gain", "max"),
        ("attention_logit_max", "max"),
        ("representation_stable_rank", "mean"),
        ("update_ratio", "mean"),
    ]:
        assert f'quantity="{quantity}", aggregate="{aggregate}"' in joined, (quantity, aggregate)
    assert "rankguard_alerts_firing" in joined
    assert "rate(rankguard_points_ingested_total[5m])" in joined
    assert re.search(
        r"histogram_quantile\(0\.95, .*rankguard_http_request_duration_seconds_bucket", joined
    )
    # Per-run panels follow the run selector.
    for expr in exprs:
        if "rankguard_run_" in expr or "rankguard_alerts_firing" in expr:
            assert 'run=~"$run"' in expr, expr


def test_metric_names_exist_in_the_contract() -> None:
    contract = set(re.findall(r"rankguard_[a-z_]+", CONTRACT.read_text()))
    dashboard = load_dashboard()
    used = set()
    for expr in [e for _, e in panel_exprs(dashboard)] + variable_queries(dashboard):
        used |= set(re.findall(r"rankguard_[a-z_]+", expr))
    assert used
    for name in used:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in contract or base in contract, f"{name} is not in docs/contract.md"


@pytest.mark.prometheus
def test_every_expression_parses_in_real_prometheus() -> None:
    dashboard = load_dashboard()
    queries = [(title, expr) for title, expr in panel_exprs(dashboard)]
    queries += [("variable", q) for q in variable_queries(dashboard)]
    with running_prometheus() as base_url:
        for title, expr in queries:
            promql = to_promql(expr)
            response = httpx.get(f"{base_url}/api/v1/query", params={"query": promql}, timeout=10)
            body = response.json()
            assert response.status_code == 200 and body["status"] == "success", (
                f"panel {title!r}: {promql!r} -> {response.status_code} {body}"
            )


@pytest.mark.prometheus
def test_prometheus_rejects_a_broken_expression() -> None:
    """Guards the check above: a parse error must come back as a failure."""
    with running_prometheus() as base_url:
        response = httpx.get(
            f"{base_url}/api/v1/query", params={"query": "rate(rankguard_x[5m]"}, timeout=10
        )
    assert response.status_code == 400
    assert response.json()["errorType"] == "bad_data"


def test_fleet_panel_ranks_runs_by_rule_margin_and_links_back() -> None:
    """The fleet table: the (run, rule) pairs nearest to firing, from the margin gauge, with
    links to rankguard's run page and to the rule's latest incident there."""
    dashboard = load_dashboard()
    [fleet] = [p for p in dashboard["panels"] if p["title"].startswith("Fleet:")]
    [target] = fleet["targets"]
    assert target["expr"] == 'bottomk(25, rankguard_run_rule_margin_relative{run=~"$run"})'
    assert target["instant"] is True and target["format"] == "table"
    links = {
        o["matcher"]["options"]: o["properties"][0]["value"][0]["url"]
        for o in fleet["fieldConfig"]["overrides"]
        if o["properties"][0]["id"] == "links"
    }
    assert links["run"] == "${rankguard_url}/runs/${__data.fields.run}"
    assert links["rule"] == (
        "${rankguard_url}/runs/${__data.fields.run}/incidents/latest?rule=${__data.fields.rule}"
    )
    [url] = [v for v in dashboard["templating"]["list"] if v["name"] == "rankguard_url"]
    assert url["type"] == "textbox" and url["query"].startswith("http")


def test_links_point_at_pages_the_server_serves() -> None:
    """Every ``${rankguard_url}`` link of the dashboard names a page route of the server."""
    from rankguard.dashboard.routes import pages

    served = [re.compile("^" + re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(r.path)) + "$")
              for r in pages.routes]  # fmt: skip
    urls = re.findall(r'"(\$\{rankguard_url\}[^"]*)"', DASHBOARD.read_text())
    assert len(urls) >= 4
    for url in urls:
        path = url.removeprefix("${rankguard_url}").split("?")[0] or "/"
        path = re.sub(r"\$\{[^}]+\}", "x", path)
        assert any(p.match(path) for p in served), url
