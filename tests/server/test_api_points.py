"""Ingest and reads: NaN/Inf round trip, idempotent replay, limits, validation,
downsampling that keeps spikes, series index and histograms, on every backend."""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Iterator

import pytest
from server_helpers import Project, points_body

NON_FINITE = [1.5, "NaN", "Infinity", "-Infinity", -0.25]

JSON = {"Content-Type": "application/json"}


def _series(project: Project, run_id: str, **params: object) -> list[dict[str, object]]:
    r = project.api["read"].get(f"/runs/{run_id}/series", params=params)
    assert r.status_code == 200, r.text
    return list(r.json()["series"])


def test_nan_and_inf_round_trip_as_strings(project: Project) -> None:
    run_id = project.new_run()
    r = project.api["ingest"].post(
        f"/runs/{run_id}/points", json=points_body([1, 2, 3, 4, 5], NON_FINITE)
    )
    assert r.status_code == 200 and r.json() == {"received": 5, "inserted": 5}
    (series,) = _series(project, run_id, quantity="loss")
    assert series["values"] == NON_FINITE  # never null, never dropped
    assert series["steps"] == [1, 2, 3, 4, 5]
    assert series["wall_times"] == [1001.0, 1002.0, 1003.0, 1004.0, 1005.0]


def test_replay_changes_nothing(project: Project) -> None:
    run_id = project.new_run()
    body = points_body(list(range(10)), [float(i) for i in range(10)])
    api = project.api["ingest"]
    assert api.post(f"/runs/{run_id}/points", json=body).json()["inserted"] == 10
    replay = {**body, "value": [99.0] * 10}  # same (series, step): first write wins
    assert api.post(f"/runs/{run_id}/points", json=replay).json() == {
        "received": 10,
        "inserted": 0,
    }
    (series,) = _series(project, run_id, quantity="loss")
    assert series["values"] == [float(i) for i in range(10)] and series["total"] == 10
    index = project.api["read"].get(f"/runs/{run_id}/series/index").json()["series"]
    assert index == [
        {
            "quantity": "loss",
            "target": "global",
            "rank": 0,
            "count": 10,
            "first_step": 0,
            "last_step": 9,
        }
    ]
    assert project.api["read"].get(f"/runs/{run_id}").json()["last_step"] == 9
    # a partial replay inserts only the new steps and keeps the rollups exact
    overlap = points_body(list(range(5, 15)), [-1.0] * 4 + [float(i) for i in range(9, 15)])
    overlap["value"][0] = 1e9  # step 5 exists: this value must not appear anywhere
    assert api.post(f"/runs/{run_id}/points", json=overlap).json()["inserted"] == 5
    (series,) = _series(project, run_id, quantity="loss", max_points=4)
    assert series["total"] == 15 and 1e9 not in series["values"]
    assert (
        project.api["read"].get(f"/runs/{run_id}/series/index").json()["series"][0]["count"] == 15
    )


def test_optional_columns_default(project: Project) -> None:
    run_id = project.new_run()
    body = {"quantity": ["loss"], "target": ["global"], "step": [7], "value": [2.0]}
    assert project.api["ingest"].post(f"/runs/{run_id}/points", json=body).status_code == 200
    (series,) = _series(project, run_id, quantity="loss")
    assert series["rank"] == 0 and series["wall_times"][0] > 1.6e9  # the server's clock


def test_gzip_body_is_accepted(project: Project) -> None:
    run_id = project.new_run()
    raw = json.dumps(points_body([1, 2], [0.5, "NaN"])).encode()
    r = project.api["ingest"].post(
        f"/runs/{run_id}/points",
        content=gzip.compress(raw),
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert r.status_code == 200 and r.json()["inserted"] == 2


def test_body_over_the_limit_is_413_and_server_keeps_serving(project: Project) -> None:
    run_id = project.new_run()
    api = project.api["ingest"]
    assert api.post(f"/runs/{run_id}/points", json=points_body([1], [1.0])).status_code == 200
    n = 20_000  # ~400 kB of JSON against the fixture's 64 KiB limit
    big = json.dumps(points_body(list(range(n)), [1.0] * n)).encode()
    r = api.post(
        f"/runs/{run_id}/points", content=big, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 413 and "max_body_bytes" in r.json()["detail"]
    # a gzip body small on the wire but over the limit once inflated
    bomb = gzip.compress(b" " * (1024 * 1024))
    assert len(bomb) < 64 * 1024
    r = api.post(
        f"/runs/{run_id}/points", content=bomb, headers={"Content-Encoding": "gzip", **JSON}
    )
    assert r.status_code == 413 and "decompressed" in r.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    r = api.post(f"/runs/{run_id}/points", content=chunks(), headers=JSON)
    assert r.status_code == 413
    (series,) = _series(project, run_id, quantity="loss")
    assert series["steps"] == [1]  # what was stored before is still there


def test_bad_gzip_and_unknown_encoding(project: Project) -> None:
    run_id = project.new_run()
    api = project.api["ingest"]
    assert (
        api.post(
            f"/runs/{run_id}/points",
            content=b"not gzip",
            headers={"Content-Encoding": "gzip", **JSON},
        ).status_code
        == 400
    )
    assert (
        api.post(
            f"/runs/{run_id}/points", content=b"{}", headers={"Content-Encoding": "br", **JSON}
        ).status_code
        == 415
    )


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"value": [1.0, "oops"]}, "value"),
        ({"step": [1, -2]}, "step"),
        ({"step": [1, "x"]}, "step"),
        ({"quantity": ["loss", 3]}, "quantity"),
        ({"rank": [0]}, "rank"),  # length mismatch
        ({"wall_time": [1.0, 2.0, 3.0]}, "wall_time"),
    ],
)
def test_bad_batches_are_422_naming_the_field(
    project: Project, patch: dict[str, object], field: str
) -> None:
    run_id = project.new_run()
    body = {**points_body([1, 2], [1.0, 2.0]), **patch}
    r = project.api["ingest"].post(f"/runs/{run_id}/points", json=body)
    assert r.status_code == 422, r.text
    locs = [e["loc"] for e in r.json()["detail"]]
    assert any(loc[:2] == ["body", field] for loc in locs), locs
    assert project.api["read"].get(f"/runs/{run_id}/series/index").json()["series"] == []


def test_malformed_json_is_422(project: Project) -> None:
    run_id = project.new_run()
    for path in (f"/runs/{run_id}/points", "/runs"):
        r = project.api["ingest"].post(
            path, content=b'{"quantity": [', headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 422, (path, r.text)
    r = project.api["ingest"].post(f"/runs/{run_id}/points", content=b"\x80\xff", headers=JSON)
    assert r.status_code == 422  # not even UTF-8
    r = project.api["ingest"].post("/runs", json={"name": "x", "world_size": "many"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "world_size"]


def test_points_for_unknown_run_is_404(project: Project) -> None:
    r = project.api["ingest"].post("/runs/nope/points", json=points_body([1], [1.0]))
    assert r.status_code == 404


def test_downsampling_keeps_the_spike_and_the_nan(project: Project) -> None:
    run_id = project.new_run()
    n = 20_000
    values: list[object] = [math.sin(i / 50.0) for i in range(n)]
    values[12_345] = 1e6  # the spike
    values[777] = -1e6  # and a negative one
    values[15_001] = "NaN"
    values[16_002] = "Infinity"
    api = project.api["ingest"]
    for lo in range(0, n, 1000):  # under the fixture's 64 KiB body limit (inflated)
        raw = json.dumps(points_body(list(range(lo, lo + 1000)), values[lo : lo + 1000]))
        r = api.post(
            f"/runs/{run_id}/points",
            content=gzip.compress(raw.encode()),
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )
        assert r.status_code == 200, r.text
    (s,) = _series(project, run_id, quantity="loss", max_points=200)
    assert s["downsampled"] is True and s["total"] == n
    assert len(s["steps"]) <= 200 + 10  # min + max per bucket (+ NaN markers, edge buckets)
    got = dict(zip(s["steps"], s["values"], strict=True))
    assert got[12_345] == 1e6 and got[777] == -1e6
    assert got[15_001] == "NaN" and got[16_002] == "Infinity"
    assert s["steps"] == sorted(s["steps"])
    # every returned point is a real stored point
    assert all(got[k] == values[k] for k in got)
    # a step range cut inside blocks still keeps the spike and counts exactly
    (r,) = _series(
        project, run_id, quantity="loss", step_min=12_001, step_max=13_999, max_points=100
    )
    assert r["total"] == 1999 and r["downsampled"] is True
    assert 12_345 in r["steps"] and min(r["steps"]) >= 12_001 and max(r["steps"]) <= 13_999
    (full,) = _series(project, run_id, quantity="loss", step_min=100, step_max=199)
    assert full["steps"] == list(range(100, 200)) and full["downsampled"] is False


def test_series_globs_and_index(project: Project) -> None:
    run_id = project.new_run()
    api = project.api["ingest"]
    for target in ("h.0.attn.c_attn.weight[q]", "h.0.mlp.c_fc.weight", "h.1.attn.c_proj.weight"):
        api.post(
            f"/runs/{run_id}/points",
            json=points_body([1, 2], [1.0, 2.0], quantity="stable_rank", target=target),
        )
    api.post(f"/runs/{run_id}/points", json=points_body([5], [0.1]))
    got = _series(project, run_id, quantity="stable_rank", target="*attn*")
    assert [s["target"] for s in got] == ["h.0.attn.c_attn.weight[q]", "h.1.attn.c_proj.weight"]
    got = _series(project, run_id, quantity="stable_*", target="h.[0]*")
    assert len(got) == 2
    index = project.api["read"].get(f"/runs/{run_id}/series/index").json()["series"]
    assert [(e["quantity"], e["count"]) for e in index] == [("loss", 1)] + [("stable_rank", 2)] * 3


def test_histograms_round_trip(project: Project) -> None:
    run_id = project.new_run()
    h = {
        "quantity": "sa_cosine",
        "target": "w",
        "step": 3,
        "edges": [-1.0, 0.0, 1.0],
        "counts": [2.0, "NaN"],
    }
    api = project.api["ingest"]
    assert api.post(f"/runs/{run_id}/histograms", json={"histograms": [h]}).json()["inserted"] == 1
    assert api.post(f"/runs/{run_id}/histograms", json={"histograms": [h]}).json()["inserted"] == 0
    got = project.api["read"].get(f"/runs/{run_id}/histograms", params={"quantity": "sa_*"})
    (out,) = got.json()["histograms"]
    assert out["edges"] == [-1.0, 0.0, 1.0] and out["counts"] == [2.0, "NaN"] and out["step"] == 3
    bad = {**h, "counts": [1.0]}
    r = api.post(f"/runs/{run_id}/histograms", json={"histograms": [bad]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "edges"


def test_events(project: Project) -> None:
    run_id = project.new_run()
    r = project.api["operate"].post(
        f"/runs/{run_id}/events", json={"kind": "note", "step": 4, "payload": {"x": 1}}
    )
    assert r.status_code == 201
    got = project.api["read"].get(f"/runs/{run_id}/events", params={"kind": "note"}).json()
    assert got["count"] == 1 and got["data"][0]["payload"] == {"x": 1}
