"""/metrics: the gauges of active runs read from the database, the counters, the optional
token, and the exposition text passing ``promtool check metrics``."""

from __future__ import annotations

import math
import subprocess

import pytest
from helpers.tools import require_tool
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import ADMIN_TOKEN, Api, Project, TestClient, make_settings, points_body

from rankguard.server.exposition import aggregate, top_targets
from rankguard.server.main import create_app

TARGETS = [f"transformer.h.{i}.attn.c_attn.weight" for i in range(7)]


def samples(
    client: TestClient, **headers: str
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    r = client.get("/metrics", headers=headers or {"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert r.status_code == 200, r.text
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return (name, frozenset(labels.items()))


def stable_rank_body(step: int, values: list[float]) -> dict[str, object]:
    return {
        "quantity": ["stable_rank"] * len(TARGETS),
        "target": TARGETS,
        "step": [step] * len(TARGETS),
        "value": values,
    }


def test_run_gauges_follow_the_latest_values(client: TestClient, project: Project) -> None:
    run = project.new_run()
    ingest = project.api["ingest"]
    ingest.post(f"/runs/{run}/points", json=stable_rank_body(10, [9.0] * 7))
    latest = [5.0, 3.5, 8.0, 2.25, 7.0, 6.0, 4.0]
    ingest.post(f"/runs/{run}/points", json=stable_rank_body(20, latest))
    ingest.post(f"/runs/{run}/points", json=points_body([20], [1.5]))  # loss
    got = samples(client)
    p = project.name
    assert (
        got[
            key(
                "rankguard_run_quantity",
                project=p,
                run=run,
                quantity="stable_rank",
                aggregate="min",
            )
        ]
        == 2.25
    )
    assert (
        got[
            key(
                "rankguard_run_quantity",
                project=p,
                run=run,
                quantity="stable_rank",
                aggregate="max",
            )
        ]
        == 8.0
    )
    assert math.isclose(
        got[
            key(
                "rankguard_run_quantity",
                project=p,
                run=run,
                quantity="stable_rank",
                aggregate="mean",
            )
        ],
        sum(latest) / 7,
    )
    assert (
        got[key("rankguard_run_quantity", project=p, run=run, quantity="loss", aggregate="mean")]
        == 1.5
    )
    top = {
        k[1]
        for k in got
        if k[0] == "rankguard_run_quantity_top"
        and ("run", run) in k[1]
        and ("quantity", "stable_rank") in k[1]
    }
    # the 5 lowest stable ranks
    assert {dict(t)["target"] for t in top} == {TARGETS[i] for i in (3, 1, 6, 0, 5)}
    assert got[key("rankguard_run_last_step", project=p, run=run)] == 20
    assert got[key("rankguard_alerts_firing", project=p, run=run, severity="critical")] == 0
    assert got[key("rankguard_points_ingested_total")] >= 15
    route = "/api/v1/runs/{run_id}/points"
    assert got[key("rankguard_http_requests_total", method="POST", route=route, status="200")] >= 3
    # A finished run is no longer exported.
    assert ingest.post(f"/runs/{run}/finish").status_code == 200
    assert not any(("run", run) in k[1] for k in samples(client))


def test_metrics_token_protects_the_endpoint(tmp_sqlite: str) -> None:
    settings = make_settings(tmp_sqlite, metrics_token="scrape-secret")
    with TestClient(create_app(settings)) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert samples(client, Authorization="Bearer scrape-secret")


def test_metrics_scope_and_project_binding(
    client: TestClient, admin: Api, project: Project
) -> None:
    """A token needs the metrics scope (admin implies it); a project's token sees its own
    runs only, and an open endpoint is a setting, not the default."""
    other = Project(admin)
    mine, theirs = project.new_run(), other.new_run()
    for p, run in ((project, mine), (other, theirs)):
        p.api["ingest"].post(f"/runs/{run}/points", json=stable_rank_body(1, [1.0] * 7))
    assert client.get("/metrics").status_code == 401
    read_only = {"Authorization": f"Bearer {project.tokens['read']}"}
    assert client.get("/metrics", headers=read_only).status_code == 403
    minted = admin.post(
        "/tokens", json={"name": "prom", "project": project.name, "scopes": ["metrics"]}
    ).json()["token"]
    got = samples(client, Authorization=f"Bearer {minted}")
    runs = {dict(labels).get("run") for _, labels in got}
    assert mine in runs and theirs not in runs
    assert not any(name == "rankguard_commands_total" for name, _ in got)  # server-wide
    everything = samples(client)  # the unbound admin token
    assert {mine, theirs} <= {dict(labels).get("run") for _, labels in everything}


def test_metrics_open_is_explicit(tmp_sqlite: str) -> None:
    with TestClient(create_app(make_settings(tmp_sqlite, metrics_open=True))) as client:
        assert client.get("/metrics").status_code == 200


def test_exposition_passes_promtool(client: TestClient, project: Project) -> None:
    promtool = require_tool("promtool", hint="on Debian: apt-get install prometheus")
    run = project.new_run()
    project.api["ingest"].post(f"/runs/{run}/points", json=stable_rank_body(1, [1.0] * 7))
    project.api["ingest"].post(f"/runs/{run}/points", json=points_body([1], ["NaN"]))
    body = client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).text
    assert "rankguard_run_quantity{" in body
    check = subprocess.run(
        [promtool, "check", "metrics"], input=body.encode(), capture_output=True, timeout=60
    )
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([1.0, 2.0, 3.0], {"min": 1.0, "mean": 2.0, "max": 3.0}),
        ([1.0, math.nan, 3.0], {"min": 1.0, "mean": math.nan, "max": 3.0}),
        ([math.nan], {"min": math.nan, "mean": math.nan, "max": math.nan}),
        ([math.inf, -math.inf], {"min": -math.inf, "mean": math.nan, "max": math.inf}),
    ],
)
def test_aggregate_keeps_nan_as_data(values: list[float], expected: dict[str, float]) -> None:
    got = aggregate(values)
    for name, want in expected.items():
        assert (math.isnan(got[name]) and math.isnan(want)) or got[name] == want


def test_top_targets_worst_first() -> None:
    values = {"a": 3.0, "b": 1.0, "c": math.nan, "d": 2.0}
    assert top_targets("stable_rank", values, k=3) == ["c", "b", "d"]
    assert top_targets("grad_norm", values, k=3) == ["c", "a", "d"]


def test_unbound_admin_sees_every_project(admin: Api) -> None:
    assert admin.client.get("/metrics", headers=admin.headers).status_code == 200
