"""Dashboard pages and their JSON without a browser: shells, figures, auth, offline assets."""

from __future__ import annotations

import json
import re
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import plotly
import pytest
from helpers import synthetic

from rankguard.dashboard import page
from rankguard.dashboard.routes import (
    CARTESIAN_TRACES,
    PAGE_PLOTLY_JS,
    PAGE_PLOTLY_URL,
    PLOTLY_JS,
    PLOTLY_URL,
    Payload,
    PayloadCache,
    plotly_js_version,
)
from rankguard.server.config import Settings
from rankguard.server.main import create_app
from rankguard.server.models import BLOCK as BLOCK_STEPS
from rankguard.server.models import Alert, Run
from rankguard.server.storage.heatmaps import heatmap_rows
from rankguard.server.storage.points import run_series

with warnings.catch_warnings():
    # starlette 1.x deprecates its TestClient over httpx (it wants httpx2); the client works.
    warnings.filterwarnings("ignore", message=".*starlette.testclient.*")
    from fastapi.testclient import TestClient

ADMIN = "rg_test-admin-token-for-dashboard-pages"
BLOCKS, STEPS = 2, 60  # 12 weight targets


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def make_token(client: TestClient, *scopes: str) -> str:
    resp = client.post(
        "/api/v1/tokens",
        json={"name": "-".join(scopes), "project": "default", "scopes": list(scopes)},
        headers=auth(ADMIN),
    )
    assert resp.status_code == 201, resp.text
    token: str = resp.json()["token"]
    return token


def seed_run(client: TestClient, token: str, *, nan_every: int = 0) -> str:
    """A run with every quantity, sa_cosine histograms, an alert and an intervention."""
    return synthetic.seed_via_api(client, token, blocks=BLOCKS, steps=STEPS, nan_every=nan_every)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    # The server's own alert rules would add alerts of their own to the synthetic run; these
    # tests count the alert events they seed.
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'rg.db'}",
        admin_token=ADMIN,
        alerts_enabled=False,
        allowed_hosts=["testserver"],  # the test client's Host
    )
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def run_id(client: TestClient) -> str:
    return seed_run(client, make_token(client, "ingest", "operate"))


def figures_by_id(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["id"]: f["figure"] for f in body["figures"]}


# --- shells and assets --------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/runs/0b0e4b2a-0000-4000-8000-000000000000"])
def test_pages_are_public_shells_without_data(client: TestClient, path: str) -> None:
    resp = client.get(path)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    html = resp.text
    assert 'id="token-form"' in html
    # Every asset is local: no CDN, no absolute URL at all in src/href.
    assert not re.search(r"https?://", html), re.findall(r"https?://\S+", html)
    for url in re.findall(r'(?:src|href)="([^"]+)"', html):
        assert url.startswith("/"), url
        assert client.get(url).status_code == 200, url


def test_run_page_has_a_div_per_figure(client: TestClient) -> None:
    html = client.get("/runs/some-run").text
    for fid in page.FIGURE_IDS:
        assert f'id="{fid}"' in html
    assert PAGE_PLOTLY_URL in html
    # run.js comes first: it asks for the figures while plotly.js compiles.
    assert html.index("/run.js") < html.index(PAGE_PLOTLY_URL)


def test_run_page_loads_the_vendored_cartesian_bundle_of_the_same_version(
    client: TestClient,
) -> None:
    version = plotly_js_version(PLOTLY_JS)
    assert version is not None
    assert PAGE_PLOTLY_JS.name == f"plotly-cartesian-{version}.min.js"
    assert plotly_js_version(PAGE_PLOTLY_JS) == version
    resp = client.get(PAGE_PLOTLY_URL)
    assert resp.status_code == 200
    assert resp.content == PAGE_PLOTLY_JS.read_bytes()
    assert "immutable" in resp.headers["cache-control"]


def test_token_input_cannot_leak_into_a_url(client: TestClient) -> None:
    html = client.get("/").text
    form = re.search(r"<form[^>]*id=\"token-form\"[^>]*>", html)
    assert form is not None and 'method="post"' in form.group(0)
    token_input = re.search(r"<input[^>]*id=\"token-input\"[^>]*>", html)
    assert token_input is not None and "name=" not in token_input.group(0)


def test_plotly_js_is_the_installed_package_file(client: TestClient) -> None:
    resp = client.get(PLOTLY_URL)
    assert resp.status_code == 200
    assert resp.content == PLOTLY_JS.read_bytes()
    assert plotly.__version__ in PLOTLY_URL
    assert "immutable" in resp.headers["cache-control"]


@pytest.mark.parametrize("name", ["..%2Fpage.py", ".hidden.js", "missing.js", "runs.html"])
def test_static_route_serves_only_known_files(client: TestClient, name: str) -> None:
    assert client.get(f"/dashboard/static/{name}").status_code == 404


def test_static_scripts_reference_no_remote_url(client: TestClient) -> None:
    for name in ("common.js", "runs.js", "run.js", "compare.js", "incident.js", "rankguard.css"):
        text = client.get(f"/dashboard/static/{name}").text
        assert not re.search(r"https?://", text), name


# --- data --------------------------------------------------------------------------------


def test_figures_endpoint_returns_every_figure_with_data(client: TestClient, run_id: str) -> None:
    token = make_token(client, "read")
    resp = client.get(f"/api/v1/runs/{run_id}/figures", headers=auth(token))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    figs = figures_by_id(body)
    assert list(figs) == list(page.FIGURE_IDS)
    for fid, fig in figs.items():
        assert fig["layout"]["meta"]["figure_id"] == fid
        assert fig["data"], f"{fid} has no traces"
        shapes = {s.get("name") for s in fig["layout"].get("shapes", [])}
        assert {"event-alert", "event-intervention"} <= shapes, fid
    heat = figs["fig-stable-rank"]["data"][0]
    assert heat["type"] == "heatmap"
    # The page's plotly.js is the cartesian bundle: every trace must be one it draws.
    types = {t.get("type", "scatter") for fig in figs.values() for t in fig["data"]}
    assert types <= CARTESIAN_TRACES, types
    revs = [f["rev"] for f in body["figures"]]
    assert len(set(revs)) == len(revs)
    assert len(heat["y"]) == BLOCKS * 6
    assert body["run"]["id"] == run_id
    [alert] = body["alerts"]
    assert alert["state"] == "firing"
    assert alert["targets"] == ["model.layers.1.attn.q_proj.weight"]
    assert alert["step"] == int(STEPS * 0.7)
    assert alert["suggested_action"] == f"Order MSign on run {run_id}"
    kinds = [e["kind"] for e in body["timeline"]]
    assert "alert" in kinds and "intervention" in kinds
    assert sorted(body["cosine_targets"]) == sorted(synthetic.weight_targets(BLOCKS)[:2])


def no_throttle(client: TestClient) -> None:
    """Every data change rebuilds at once (a slow machine could make a tiny build look slow
    enough to be throttled)."""
    client.app.state.dashboard_payload_cache = PayloadCache(throttle_factor=0.0)  # type: ignore[attr-defined]


def test_figures_etag_gives_304_until_data_changes(client: TestClient, run_id: str) -> None:
    no_throttle(client)
    token = make_token(client, "ingest", "read")
    url = f"/api/v1/runs/{run_id}/figures"
    etag = client.get(url, headers=auth(token)).headers["etag"]
    assert client.get(url, headers={**auth(token), "If-None-Match": etag}).status_code == 304
    more = synthetic.points(blocks=BLOCKS, steps=1, start=STEPS)
    assert client.post(f"/api/v1/runs/{run_id}/points", json=more, headers=auth(token)).is_success
    again = client.get(url, headers={**auth(token), "If-None-Match": etag})
    assert again.status_code == 200
    assert again.headers["etag"] != etag


def test_cosine_target_selects_one_target(client: TestClient, run_id: str) -> None:
    target = synthetic.weight_targets(BLOCKS)[1]
    resp = client.get(
        f"/api/v1/runs/{run_id}/figures",
        params={"cosine_target": target},
        headers=auth(make_token(client, "read")),
    )
    fig = figures_by_id(resp.json())["fig-sa-cosine"]
    assert target in fig["layout"]["title"]["text"]


def test_runs_summary_lists_status_step_loss_and_alerts(client: TestClient, run_id: str) -> None:
    resp = client.get("/api/v1/dashboard/runs", headers=auth(make_token(client, "read")))
    assert resp.status_code == 200
    [row] = resp.json()["data"]
    assert row["id"] == run_id
    assert row["status"] == "running"
    assert row["last_step"] == STEPS - 1
    expected = synthetic.points(blocks=BLOCKS, steps=STEPS)["value"][STEPS - 1]  # loss comes first
    assert row["last_loss"] == pytest.approx(expected)
    # The seeded alert is an event only: firing alerts are rows of the alerts table.
    assert row["alerts_firing"] == 0


def test_runs_summary_counts_the_alerts_firing(client: TestClient, run_id: str) -> None:
    """Alerts firing: the rows of the alerts table in state firing (as /metrics counts them),
    whatever their severity; a resolved one is not counted."""
    db = client.app.state.db  # type: ignore[attr-defined]
    with db.write() as session:
        for episode, (severity, state) in enumerate(
            [("critical", "firing"), ("warning", "firing"), ("critical", "resolved")]
        ):
            session.add(
                Alert(
                    id=str(uuid.uuid4()), run_id=run_id, rule_name="r", episode=episode,
                    quantity="stable_rank", severity=severity, state=state, first_step=1,
                    fired_step=2, message="m", suggested_action="",
                )
            )  # fmt: skip
    token = make_token(client, "read")
    [row] = client.get("/api/v1/dashboard/runs", headers=auth(token)).json()["data"]
    assert row["alerts_firing"] == 2


def test_figure_revisions_are_stable_and_follow_the_data(client: TestClient, run_id: str) -> None:
    no_throttle(client)
    token = make_token(client, "ingest", "read")
    url = f"/api/v1/runs/{run_id}/figures"
    first = {f["id"]: f["rev"] for f in client.get(url, headers=auth(token)).json()["figures"]}
    db = client.app.state.db  # type: ignore[attr-defined]
    with db.read() as session:
        run = session.get(Run, run_id)
        rebuilt = json.loads(page.figure_payload(page.build_figures(session, run, [])))
    # Same data, same JSON: a refresh that changes nothing redraws nothing.
    with db.read() as session:
        run = session.get(Run, run_id)
        again = json.loads(page.figure_payload(page.build_figures(session, run, [])))
    assert [f["rev"] for f in rebuilt] == [f["rev"] for f in again]
    more = synthetic.points(blocks=BLOCKS, steps=1, start=STEPS)
    assert client.post(f"{url[: -len('/figures')]}/points", json=more, headers=auth(token))
    later = {f["id"]: f["rev"] for f in client.get(url, headers=auth(token)).json()["figures"]}
    assert later["fig-stable-rank"] != first["fig-stable-rank"]
    assert later["fig-sa-cosine"] == first["fig-sa-cosine"]  # no new histogram


def test_payload_cache_throttles_only_slow_rebuilds() -> None:
    cache = PayloadCache()
    now = time.monotonic()
    cache.put("r|", Payload('"a"', "A", now, build_s=10.0))
    assert cache.get("r|", '"a"') is not None
    stale = cache.get("r|", '"b"')  # newer data, but the last build was slow and recent
    assert stale is not None and stale.body == "A"
    assert cache.get("other|", '"b"') is None
    cache.put("r|", Payload('"c"', "C", now - 100.0, build_s=10.0))
    assert cache.get("r|", '"d"').body == "A"  # type: ignore[union-attr]  # the newest build
    fast = PayloadCache()
    fast.put("r|", Payload('"a"', "A", now, build_s=0.01))
    assert fast.get("r|", '"b"') is None  # cheap builds are never served stale
    off = PayloadCache(throttle_factor=0.0)
    off.put("r|", Payload('"a"', "A", now, build_s=10.0))
    assert off.get("r|", '"b"') is None
    old = PayloadCache()
    old.put("r|", Payload('"a"', "A", now - 100.0, build_s=1.0))
    assert old.get("r|", '"b"') is None


def _post_points(client: TestClient, token: str, run_id: str, values: np.ndarray) -> None:
    targets, steps = values.shape
    batch = {
        "quantity": ["stable_rank"] * values.size,
        "target": [f"t{i}" for i in range(targets) for _ in range(steps)],
        "step": list(range(steps)) * targets,
        "value": [str(v) if not np.isfinite(v) else float(v) for v in values.ravel()],
    }
    batch["value"] = [
        {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}.get(v, v) if isinstance(v, str)
        else v
        for v in batch["value"]
    ]  # fmt: skip
    resp = client.post(f"/api/v1/runs/{run_id}/points", json=batch, headers=auth(token))
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("columns", [500, 2])
def test_heatmap_from_the_rollup_is_the_block_minimum_with_flags(
    client: TestClient, columns: int
) -> None:
    """Beyond raw_limit points a column is k whole BLOCKs (k a power of two) and holds their
    minimum (numpy reference); a NaN or +Inf in a column with finite values adds a flag."""
    token = make_token(client, "ingest", "read")
    run_id = client.post("/api/v1/runs", json={"name": "big"}, headers=auth(token)).json()["id"]
    steps = 5 * BLOCK_STEPS - 20
    values = np.random.default_rng(2).random((2, steps))
    values[1, 70] = np.nan
    values[1, 200] = np.inf
    _post_points(client, token, run_id, values)
    db = client.app.state.db  # type: ignore[attr-defined]
    with db.read() as session:
        run = session.get(Run, run_id)
        read = heatmap_rows(
            session, run_series(session, run_id), last_step=run.last_step,
            columns=columns, raw_limit=0,
        )  # fmt: skip
    k = 1 if columns == 500 else 4  # 5 blocks into <= 2 columns: 4 blocks per column
    width = k * BLOCK_STEPS
    assert read.width == width
    by_target = {s["target"]: s for s in read.series}
    for i in range(2):
        s = by_target[f"t{i}"]
        finite = np.isfinite(s["values"])
        got = dict(zip(s["steps"][finite].tolist(), s["values"][finite].tolist(), strict=True))
        row = np.where(np.isfinite(values[i]), values[i], np.nan)
        expect = {
            c * width: float(np.nanmin(row[c * width : (c + 1) * width]))
            for c in range(-(-steps // width))
        }
        assert got == pytest.approx(expect)
    b = by_target["t1"]
    assert b["steps"][np.isnan(b["values"])].tolist() == [70 // width * width]
    assert b["steps"][np.isposinf(b["values"])].tolist() == [200 // width * width]
    assert np.isfinite(by_target["t0"]["values"]).all()


def test_nan_laden_run_still_draws(client: TestClient) -> None:
    token = make_token(client, "ingest", "read")
    run_id = seed_run(client, token, nan_every=7)
    resp = client.get(f"/api/v1/runs/{run_id}/figures", headers=auth(token))
    assert resp.status_code == 200
    figs = figures_by_id(json.loads(resp.text))  # strict JSON: no NaN literal
    assert all(fig["data"] for fig in figs.values())
    loss_names = {t.get("name") for t in figs["fig-loss"]["data"]}
    assert "NaN values" in loss_names


# --- auth --------------------------------------------------------------------------------


def test_data_needs_a_token(client: TestClient, run_id: str) -> None:
    for url in (f"/api/v1/runs/{run_id}/figures", "/api/v1/dashboard/runs"):
        assert client.get(url).status_code == 401
        assert client.get(url, headers=auth("rg_not-a-token")).status_code == 401


def test_read_token_views_but_cannot_command(client: TestClient, run_id: str) -> None:
    token = make_token(client, "read")
    assert client.get(f"/api/v1/runs/{run_id}/figures", headers=auth(token)).status_code == 200
    order = {"kind": "msign", "args": {"targets": "attention", "engine": "svd"}}
    resp = client.post(f"/api/v1/runs/{run_id}/commands", json=order, headers=auth(token))
    assert resp.status_code == 403
    operate = make_token(client, "operate")
    resp = client.post(f"/api/v1/runs/{run_id}/commands", json=order, headers=auth(operate))
    assert resp.status_code == 201
    assert resp.json()["state"] == "queued"


def test_ingest_token_cannot_view(client: TestClient, run_id: str) -> None:
    token = make_token(client, "ingest")
    assert client.get(f"/api/v1/runs/{run_id}/figures", headers=auth(token)).status_code == 403


def test_other_projects_run_is_404(client: TestClient, run_id: str) -> None:
    resp = client.post(
        "/api/v1/tokens",
        json={"name": "other", "project": "other", "scopes": ["read"]},
        headers=auth(ADMIN),
    )
    if resp.status_code == 404:  # the project must exist first
        client.post("/api/v1/projects", json={"name": "other"}, headers=auth(ADMIN))
        resp = client.post(
            "/api/v1/tokens",
            json={"name": "other", "project": "other", "scopes": ["read"]},
            headers=auth(ADMIN),
        )
    assert resp.status_code == 201, resp.text
    other = resp.json()["token"]
    assert client.get(f"/api/v1/runs/{run_id}/figures", headers=auth(other)).status_code == 404
    assert client.get("/api/v1/dashboard/runs", headers=auth(other)).json()["data"] == []


def test_no_auth_mode_serves_data_without_a_token(tmp_path: Path) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'rg.db'}", no_auth=True, allowed_hosts=["testserver"]
    )
    with TestClient(create_app(settings)) as c:
        run = c.post("/api/v1/runs", json={"name": "open"}).json()
        resp = c.get(f"/api/v1/runs/{run['id']}/figures")
        assert resp.status_code == 200
        figs = figures_by_id(resp.json())
        assert list(figs) == list(page.FIGURE_IDS)  # empty run: every figure, "no data yet"
        assert c.get("/api/v1/dashboard/runs").json()["count"] == 1


def test_heatmap_read_bins_to_bucket_minima_and_keeps_nan(client: TestClient) -> None:
    """More steps than heatmap columns: each bucket is its minimum (numpy reference), and a
    bucket holding a NaN beside finite values still reports the NaN."""
    token = make_token(client, "ingest", "read")
    run_id = client.post("/api/v1/runs", json={"name": "long"}, headers=auth(token)).json()["id"]
    steps = 3 * page.HEATMAP_COLUMNS + 7
    rng = np.random.default_rng(1)
    values = rng.random((2, steps))
    values[1, 10] = np.nan
    batch = {
        "quantity": ["stable_rank"] * (2 * steps),
        "target": ["a"] * steps + ["b"] * steps,
        "step": list(range(steps)) * 2,
        "value": ["NaN" if np.isnan(v) else float(v) for v in values.ravel()],
    }
    resp = client.post(f"/api/v1/runs/{run_id}/points", json=batch, headers=auth(token))
    assert resp.status_code == 200, resp.text
    db = client.app.state.db  # type: ignore[attr-defined]
    with db.read() as session:
        run = session.get(Run, run_id)
        rows = run_series(session, run_id)
        read = heatmap_rows(
            session, rows, last_step=run.last_step, columns=page.HEATMAP_COLUMNS
        ).series
    width = -(-steps // page.HEATMAP_COLUMNS)
    by_target = {s["target"]: s for s in read}
    for i, target in enumerate(("a", "b")):
        s = by_target[target]
        finite = ~np.isnan(s["values"])
        got = dict(zip(s["steps"][finite].tolist(), s["values"][finite].tolist(), strict=True))
        expect = {
            b * width: float(np.nanmin(values[i, b * width : (b + 1) * width]))
            for b in range(-(-steps // width))
        }
        assert got == pytest.approx(expect)
    assert np.isnan(by_target["b"]["values"]).sum() == 1
    assert by_target["b"]["steps"][np.isnan(by_target["b"]["values"])].tolist() == [
        10 // width * width
    ]
    assert not np.isnan(by_target["a"]["values"]).any()
