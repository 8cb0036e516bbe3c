"""The fleet reads on both backends (SQLite and PostgreSQL): tags and search in SQL, loss
sparklines from the rollup, aggregates over targets with NaN as data, the latest values
margins read, and the incident window's reads."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from server_helpers import Project, TestClient, points_body

from rankguard.server.models import BLOCK
from rankguard.server.storage import fleet, incidents, overlay
from rankguard.server.storage.downsample import downsample
from rankguard.server.storage.points import SeriesRow
from rankguard.server.wire import wire_floats


def post(project: Project, run_id: str, body: dict[str, Any]) -> None:
    """In batches under the test server's body limit."""
    n = len(body["step"])
    for lo in range(0, n, 1000):
        part = {k: v[lo : lo + 1000] for k, v in body.items()}
        resp = project.api["ingest"].post(f"/runs/{run_id}/points", json=part)
        assert resp.status_code == 200, resp.text


def db(client: TestClient) -> Any:
    return client.app.state.db  # type: ignore[attr-defined]


def test_tags_and_search_filter_in_sql(client: TestClient, project: Project) -> None:
    a = project.new_run(name="Alpha_1", config={"tags": ["gpt", "hot"]})
    b = project.new_run(name="beta%", config={"tags": ["gpt"]})
    project.new_run(name="gamma", config={"tags": "not-a-list"})
    with db(client).read() as session:
        from rankguard.server.models import Run

        project_id = session.get(Run, a).project_id

        def ids(**f: Any) -> set[str]:
            rows, count = fleet.list_run_rows(
                session, fleet.RunFilter(project_id=project_id, **f), sort="name",
                descending=False, limit=50, offset=0,
            )  # fmt: skip
            assert count == len(rows)
            return {r.id for r in rows}

        assert ids(tag="gpt") == {a, b}
        assert ids(tag="hot") == {a}
        assert ids(tag="not-a-list") == set()  # a string is not a list of tags
        assert ids(search="alpha_") == {a}  # case-insensitive; _ is a character
        assert ids(search="a%") == {b}  # % is a character, not a wildcard
        assert ids(search="ALPHA") == {a}
        assert fleet.tag_names(session, project_id) == ["gpt", "hot"]


def test_sparkline_from_the_rollup_keeps_spikes_and_nan(
    client: TestClient, project: Project
) -> None:
    run_id = project.new_run()
    steps = np.arange(5000)
    values = 3.0 + np.sin(steps / 300.0)
    values[3217] = 40.0
    values[4100] = np.nan
    post(project, run_id, points_body(steps.tolist(), wire_floats(values.tolist())))
    with db(client).read() as session:
        [(got_steps, got)] = fleet.sparklines(session, [run_id], points=50).values()
    assert 3217 in got_steps.tolist() and np.nanmax(got) == 40.0
    assert 4100 in got_steps.tolist() and np.isnan(got[got_steps.tolist().index(4100)])
    assert got_steps.size <= 52 and np.all(np.diff(got_steps) > 0)
    # Exactly the downsampling rule over each block's min, max (earliest) and first NaN.
    picks: set[int] = set()
    for lo in range(0, steps.size, BLOCK):
        block = values[lo : lo + BLOCK]
        if np.isnan(block).any():
            picks.add(lo + int(np.flatnonzero(np.isnan(block))[0]))
        picks |= {lo + int(np.nanargmin(block)), lo + int(np.nanargmax(block))}
    at = np.array(sorted(picks))
    want_steps, want = downsample(at, values[at], 50)
    assert got_steps.tolist() == want_steps.tolist()
    assert np.array_equal(got, want, equal_nan=True)


def test_short_sparkline_reads_the_points(client: TestClient, project: Project) -> None:
    run_id = project.new_run()
    steps = list(range(0, 300, 3))
    values = [1.0 / (1 + s) for s in steps]
    post(project, run_id, points_body(steps, values))
    with db(client).read() as session:
        [(got_steps, got)] = fleet.sparklines(session, [run_id], points=50).values()
    want_steps, want = downsample(np.array(steps), np.array(values), 50)
    assert got_steps.tolist() == want_steps.tolist() and got == pytest.approx(want)


def test_aggregate_over_targets_treats_nan_as_data(client: TestClient, project: Project) -> None:
    run_id = project.new_run()
    a = [1.0, 2.0, math.nan, 4.0]
    b = [3.0, -1.0, 5.0, math.inf]
    for target, vals in (("a", a), ("b", b)):
        post(project, run_id, points_body([0, 1, 2, 3], wire_floats(vals), "q", target))
    with db(client).read() as session:
        got = {agg: overlay.layer_aggregate(session, run_id, "q", agg, columns=100)
               for agg in ("min", "max", "mean")}  # fmt: skip
    assert got["min"] is not None and got["min"].steps.tolist() == [0, 1, 2, 3]
    assert got["min"].values.tolist() == [1.0, -1.0, 5.0, 4.0]  # NaN skipped
    assert got["max"].values.tolist() == [3.0, 2.0, 5.0, math.inf]  # type: ignore[union-attr]
    mean = got["mean"].values  # type: ignore[union-attr]
    assert mean[:2].tolist() == [2.0, 0.5] and math.isnan(mean[2]) and mean[3] == math.inf
    with db(client).read() as session:
        assert overlay.layer_aggregate(session, run_id, "nothing", "min", columns=10) is None


def test_latest_values_and_incident_reads(client: TestClient, project: Project) -> None:
    run_id = project.new_run()
    post(project, run_id, points_body([0, 2, 4, 6], [1.0, 2.0, "NaN", 4.0], "g", "x"))
    post(project, run_id, points_body([0, 2, 4], [5.0, 6.0, 7.0], "g", "y"))
    with db(client).read() as session:
        latest = fleet.latest_values(session, [run_id], {"g"})[run_id]["g"]
        assert latest == {"x": (6, 4.0), "y": (4, 7.0)}
        rows = incidents.series_rows(session, run_id, "g", ["y", "x", "missing"])
        assert [r.target for r in rows] == ["y", "x"]
        window = incidents.window_points(session, rows, 2, 4)
        assert [w["target"] for w in window] == ["y", "x"]
        assert window[1]["steps"].tolist() == [2, 4] and math.isnan(window[1]["values"][1])
        near = incidents.around(session, rows, 3)
        by_target = {r.target: near[r.id] for r in rows}
        assert by_target["y"] == ((2, 6.0), (4, 7.0))
        assert by_target["x"][0] == (2, 2.0) and math.isnan(by_target["x"][1][1])  # type: ignore[index]
        assert incidents.around(session, [SeriesRow(rows[0].id, "g", "y", 0)], 9)[rows[0].id] == (
            (4, 7.0),
            None,
        )
