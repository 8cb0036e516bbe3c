"""The one downsampling rule (per bucket: the minimum, the maximum, the earliest on ties, and
the first NaN) against a plain-Python reference: in numpy on the points (``downsample``) and
in SQL on the ``point_blocks`` rollups (``read_points``), on every backend, with NaN, ±Inf
and tied values, and step ranges that cut blocks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from server_helpers import Project, TestClient

from rankguard.server.models import BLOCK
from rankguard.server.storage.downsample import downsample, read_points
from rankguard.server.storage.points import ColumnarPoints, insert_points, match_series


def reference_picks(bucket: list[int], values: list[float]) -> list[int]:
    """Indices kept, ascending: per bucket the minimum and the maximum (the earliest point
    on ties; ±Inf count) and the first NaN."""
    picks: set[int] = set()
    for b in sorted(set(bucket)):
        idx = [i for i, x in enumerate(bucket) if x == b]
        ok = [i for i in idx if not math.isnan(values[i])]
        if ok:
            picks.add(min(ok, key=lambda i: (values[i], i)))
            picks.add(min(ok, key=lambda i: (-values[i], i)))
        nans = [i for i in idx if math.isnan(values[i])]
        if nans:
            picks.add(nans[0])
    return sorted(picks)


def test_downsample_keeps_bucket_extremes_and_first_nan() -> None:
    rng = np.random.default_rng(3)
    steps = np.arange(0, 5000, 3, dtype=np.int64)
    values = rng.integers(0, 40, size=steps.size).astype(np.float64)  # many ties
    values[[10, 11, 500]] = np.nan
    values[700] = np.inf
    values[900] = -np.inf
    out_steps, out_values = downsample(steps, values, 100)
    buckets = 50  # max_points // 2 equal step buckets over [first, last]
    bucket = (steps - steps[0]) * buckets // (steps[-1] - steps[0] + 1)
    expect = reference_picks(bucket.tolist(), values.tolist())
    assert out_steps.tolist() == steps[expect].tolist()
    np.testing.assert_array_equal(out_values, values[expect])
    same = downsample(steps[:50], values[:50], 100)
    assert same[0].size == 50


def _rollup_buckets(steps: list[int], lo: int, hi: int, max_points: int) -> list[int]:
    """``read_points``' buckets of [lo, hi]: the full blocks cut into about max_points // 2
    buckets of k whole blocks, and the partial block at each end a bucket of its own."""
    first_full, last_full = -(-lo // BLOCK), (hi + 1) // BLOCK - 1
    k = max(1, -(-(last_full - first_full + 1) // max(1, max_points // 2)))
    out = []
    for s in steps:
        if s < first_full * BLOCK:
            out.append(-1)
        elif s > (last_full + 1) * BLOCK - 1:
            out.append(10**9)
        else:
            out.append((s // BLOCK - first_full) // k)
    return out


@pytest.fixture
def stored(client: TestClient, project: Project) -> tuple[TestClient, str, list[int], list[float]]:
    """A series from step 5 over 40 blocks: integer values (ties), NaN, ±Inf, a block of
    NaN only, and a block holding only NaN and +Inf."""
    rng = np.random.default_rng(11)
    steps = list(range(5, 40 * BLOCK + 37))
    values = rng.integers(0, 6, size=len(steps)).astype(float).tolist()
    for i in rng.choice(len(steps), 40, replace=False):
        values[i] = float(rng.choice([math.nan, math.inf, -math.inf]))
    for s in range(10 * BLOCK, 11 * BLOCK):
        values[s - 5] = math.nan
    for s in range(20 * BLOCK, 21 * BLOCK):
        values[s - 5] = math.inf if s % 3 else math.nan
    run_id = project.new_run()
    n = len(steps)
    batch = ColumnarPoints(["loss"] * n, ["global"] * n, [0] * n, steps, [0.0] * n, values)
    db = client.app.state.db  # type: ignore[attr-defined]
    with db.write() as session:
        insert_points(session=session, run_id=run_id, points=batch, known={})
    return client, run_id, steps, values


@pytest.mark.parametrize(
    ("step_min", "step_max", "max_points"),
    [(None, None, 40), (None, None, 200), (70, 2000, 30), (130, 1000, 61), (64, 2559, 20)],
)
def test_read_points_picks_by_the_rule_from_the_rollups(
    stored: tuple[TestClient, str, list[int], list[float]],
    step_min: int | None,
    step_max: int | None,
    max_points: int,
) -> None:
    client, run_id, steps, values = stored
    lo = max(steps[0], step_min or 0)
    hi = min(steps[-1], steps[-1] if step_max is None else step_max)
    inside = [i for i, s in enumerate(steps) if lo <= s <= hi]
    db = client.app.state.db  # type: ignore[attr-defined]
    with db.read() as session:
        (series,) = match_series(session=session, run_id=run_id, quantity=None, target=None)
        got_steps, got_values, _, total, downsampled = read_points(
            session=session, series_id=series.id, step_min=step_min, step_max=step_max,
            max_points=max_points,
        )  # fmt: skip
    assert total == len(inside) and downsampled is True
    bucket = _rollup_buckets([steps[i] for i in inside], lo, hi, max_points)
    expect = [inside[i] for i in reference_picks(bucket, [values[i] for i in inside])]
    assert got_steps == [steps[i] for i in expect]
    np.testing.assert_array_equal(got_values, [values[i] for i in expect])
