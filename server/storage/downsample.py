"""Downsampled reads of series: the API's ``read_points`` (one series, a step range) and the
dashboard's ``read_lines`` (many series at once).

One rule picks the points, ``bucket_extremes``: cut the series into buckets of steps and keep,
in each, the point with the minimum value, the one with the maximum (the earliest on ties;
±Inf are extremes, so spikes survive) and the first NaN. It runs in one of two places:

- on the points themselves (numpy), for series short enough to read whole: ``downsample``
  cuts [first step, last step] into max_points // 2 equal buckets;
- on the ``point_blocks`` rollups (SQL in ``read_points``), for long ones: a rollup row
  already holds its block's min, max and first NaN, so a bucket of whole blocks costs one
  row per block instead of BLOCK points (a 1M-point series: ~16k rows). Buckets are then
  whole blocks, plus the two partial blocks at the range's ends, which are read raw and
  picked by ``bucket_extremes`` itself. tests/server/test_downsample.py holds the SQL to the
  numpy rule point for point.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import Connection, bindparam, text
from sqlalchemy.orm import Session

from rankguard.server.models import BLOCK
from rankguard.server.storage._sql import chunks, fetch_tuples, id_list
from rankguard.server.storage.points import SeriesRow

# Series of up to this many points are read whole (in batches) by ``read_lines`` and
# downsampled with numpy; longer ones through ``read_points``, which scans the rollup.
WHOLE_SERIES_POINTS = 20_000

Steps = npt.NDArray[np.int64]
Values = npt.NDArray[np.float64]


def bucket_extremes(bucket: npt.NDArray[np.int64], values: Values) -> npt.NDArray[np.bool_]:
    """Which points to keep: per bucket (``bucket`` non-decreasing, one id per point) the
    minimum, the maximum (the earliest on ties; ±Inf count) and the first NaN."""
    nan = np.isnan(values)
    keep = np.zeros(values.size, dtype=bool)
    for key in (np.where(nan, np.inf, values), np.where(nan, np.inf, -values)):
        order = np.lexsort((key, bucket))  # by bucket, then value: a bucket's first is its pick
        first = order[np.r_[True, bucket[order][1:] != bucket[order][:-1]]]
        keep[first[~nan[first]]] = True
    nan_at = np.flatnonzero(nan)
    if nan_at.size:
        keep[nan_at[np.r_[True, bucket[nan_at][1:] != bucket[nan_at][:-1]]]] = True
    return keep


def downsample(steps: Steps, values: Values, max_points: int) -> tuple[Steps, Values]:
    """At most ~``max_points`` points of a step-sorted series: ``bucket_extremes`` over
    max_points // 2 equal step buckets. Fewer points come back unchanged."""
    if steps.size <= max_points:
        return steps, values
    buckets = max(1, max_points // 2)
    lo, span = int(steps[0]), int(steps[-1]) - int(steps[0]) + 1
    keep = bucket_extremes((steps - lo) * buckets // span, values)  # (n,), non-decreasing
    return steps[keep], values[keep]


# --- one series, from the rollups -------------------------------------------------------


def read_points(
    *,
    session: Session,
    series_id: int,
    step_min: int | None,
    step_max: int | None,
    max_points: int,
) -> tuple[list[int], list[float], list[float], int, bool]:
    """Points of one series in [step_min, step_max]. With more than ``max_points`` the full
    blocks of the range are cut into about max_points // 2 buckets of whole blocks and the
    partial blocks at its ends form a bucket each; ``bucket_extremes`` picks in each.

    The work is done in SQL over the ``point_blocks`` rollups, so a 1M-point series costs a
    scan of ~16k block rows; only the <= 2 blocks cut by the range's ends are read as raw
    points. Returns (steps, values, wall_times, total, downsampled)."""
    conn = session.connection()
    bounds = _clamped_range(conn, series_id, step_min, step_max)
    if bounds is None:
        return [], [], [], 0, False
    lo, hi = bounds
    # Blocks entirely inside [lo, hi]; the partial blocks at the ends are read raw.
    first_full = -(-lo // BLOCK)
    last_full = (hi + 1) // BLOCK - 1
    p: dict[str, Any] = {"sid": series_id, "lo": lo, "hi": hi, "b0": first_full, "b1": last_full}
    total = 0
    if first_full <= last_full:
        total = int(
            conn.execute(
                text(
                    "SELECT COALESCE(SUM(n), 0) FROM point_blocks WHERE series_id = :sid "
                    "AND block >= :b0 AND block <= :b1"
                ),
                p,
            ).scalar_one()
        )
        # Two range scans (an OR of both ranges made SQLite scan the whole series).
        p["e0"], p["e1"] = first_full * BLOCK, (last_full + 1) * BLOCK
        edge_sql = (
            "SELECT step, value, wall_time FROM points WHERE series_id = :sid AND step >= :lo "
            "AND step < :e0 UNION ALL SELECT step, value, wall_time FROM points "
            "WHERE series_id = :sid AND step >= :e1 AND step <= :hi ORDER BY 1"
        )
    else:  # the whole range lies inside one block
        edge_sql = (
            "SELECT step, value, wall_time FROM points WHERE series_id = :sid "
            "AND step >= :lo AND step <= :hi ORDER BY step"
        )
    edges = conn.execute(text(edge_sql), p).all()
    total += len(edges)
    if total <= max_points:
        rows = conn.execute(
            text(
                "SELECT step, value, wall_time FROM points WHERE series_id = :sid "
                "AND step >= :lo AND step <= :hi ORDER BY step"
            ),
            p,
        ).all()
        return (*_columns(rows), total, False)

    buckets = max(1, max_points // 2)
    p["k"] = max(1, -(-(last_full - first_full + 1) // buckets))  # blocks per bucket
    steps: set[int] = set()
    for sql in _PICK_SQL[conn.dialect.name]:
        steps.update(row[0] for row in conn.execute(text(sql), p) if row[0] is not None)
    steps.update(_edge_picks(edges, first_full * BLOCK))
    return (*_columns(_rows_at(conn, series_id, sorted(steps))), total, True)


def _clamped_range(
    conn: Connection, series_id: int, step_min: int | None, step_max: int | None
) -> tuple[int, int] | None:
    """[step_min, step_max] clamped to the series' own first and last step (two PK index
    seeks), so buckets cover data, not the empty tail of an open-ended range; None when
    nothing is left."""
    first, last = conn.execute(
        text(
            "SELECT (SELECT MIN(step) FROM points WHERE series_id = :sid), "
            "(SELECT MAX(step) FROM points WHERE series_id = :sid)"
        ),
        {"sid": series_id},
    ).one()
    if first is None:
        return None
    lo = max(first, step_min or 0)
    hi = min(last, step_max if step_max is not None else last)
    return None if lo > hi else (lo, hi)


# Per bucket of :k blocks: the step of the bucket's min, of its max, and its first NaN.
# SQLite: a bare column next to a single MIN()/MAX() comes from the row holding that
# extreme (documented SQLite behaviour). PostgreSQL: DISTINCT ON. Blocks of NaN only have
# NULL extremes and are left out of the min/max.
_BLOCKS = "FROM point_blocks WHERE series_id = :sid AND block >= :b0 AND block <= :b1"
_BUCKET = "(block - :b0) / :k"
_PICK_SQL = {
    "sqlite": (
        f"SELECT min_step, MIN(min_value) {_BLOCKS} AND min_value IS NOT NULL GROUP BY {_BUCKET}",
        f"SELECT max_step, MAX(max_value) {_BLOCKS} AND max_value IS NOT NULL GROUP BY {_BUCKET}",
        f"SELECT MIN(nan_step) {_BLOCKS} AND nan_step IS NOT NULL GROUP BY {_BUCKET}",
    ),
    "postgresql": (
        f"SELECT DISTINCT ON ({_BUCKET}) min_step {_BLOCKS} AND min_value IS NOT NULL "
        f"ORDER BY {_BUCKET}, min_value, min_step",
        f"SELECT DISTINCT ON ({_BUCKET}) max_step {_BLOCKS} AND max_value IS NOT NULL "
        f"ORDER BY {_BUCKET}, max_value DESC, max_step",
        f"SELECT MIN(nan_step) {_BLOCKS} AND nan_step IS NOT NULL GROUP BY {_BUCKET}",
    ),
}


def _edge_picks(edges: Sequence[Any], split: int) -> list[int]:
    """The picks among the raw edge rows (step-ordered (step, value, ...)): the rows before
    ``split`` are one bucket, the rest another."""
    if not edges:
        return []
    steps = np.array([r[0] for r in edges], dtype=np.int64)
    values = np.array([math.nan if r[1] is None else r[1] for r in edges], dtype=np.float64)
    keep = bucket_extremes((steps >= split).astype(np.int64), values)
    return [int(s) for s in steps[keep]]


def _rows_at(conn: Connection, series_id: int, steps: list[int]) -> list[Any]:
    """(step, value, wall_time) of the series at ``steps`` (sorted), in step order."""
    if conn.dialect.name == "postgresql":
        # A join on an unnested array keeps the PK index lookups (= ANY / IN lists of this
        # size were planned as sequential scans).
        return list(
            conn.execute(
                text(
                    "SELECT p.step, p.value, p.wall_time FROM unnest(CAST(:steps AS bigint[])) "
                    "AS s(step) JOIN points p ON p.series_id = :sid AND p.step = s.step "
                    "ORDER BY p.step"
                ),
                {"sid": series_id, "steps": steps},
            ).all()
        )
    rows: list[Any] = []
    for i in range(0, len(steps), 5000):
        rows.extend(
            conn.execute(
                text(
                    "SELECT step, value, wall_time FROM points WHERE series_id = :sid "
                    "AND step IN :steps ORDER BY step"
                ).bindparams(bindparam("steps", expanding=True)),
                {"sid": series_id, "steps": steps[i : i + 5000]},
            ).all()
        )
    return rows


def _columns(rows: Sequence[Any]) -> tuple[list[int], list[float], list[float]]:
    steps = [int(r[0]) for r in rows]
    values = [math.nan if r[1] is None else float(r[1]) for r in rows]
    walls = [float(r[2]) for r in rows]
    return steps, values, walls


# --- many series, for the dashboard -----------------------------------------------------


def read_lines(
    session: Session, series: Sequence[SeriesRow], *, max_points: int
) -> list[dict[str, Any]]:
    """Each series downsampled to ~``max_points`` as ``{quantity, target, rank, steps,
    values}`` (numpy arrays); series without points (histogram-only) are left out.

    Series of up to WHOLE_SERIES_POINTS points are read together, a chunk of series per
    statement, as plain tuples that numpy converts in C, and cut by ``downsample``: one
    statement instead of ~5 per series. Their counts come from the rollup. Longer series go
    through ``read_points``."""
    if not series:
        return []
    conn = session.connection()
    counts: dict[int, int] = {}
    for chunk in chunks([s.id for s in series]):
        for sid, n in fetch_tuples(
            conn,
            "SELECT series_id, SUM(n) FROM point_blocks "
            f"WHERE series_id IN ({id_list(chunk)}) GROUP BY series_id",
        ):
            counts[int(sid)] = int(n)
    whole = [s.id for s in series if 0 < counts.get(s.id, 0) <= WHOLE_SERIES_POINTS]
    read = _read_whole(conn, whole, max_points)
    out = []
    for s in series:
        if s.id in read:
            out.append(series_dict(s, *read[s.id]))
        elif counts.get(s.id, 0) > WHOLE_SERIES_POINTS:
            step_list, value_list, _, total, _ = read_points(
                session=session, series_id=s.id, step_min=None, step_max=None,
                max_points=max_points,
            )  # fmt: skip
            if total:
                steps = np.asarray(step_list, np.int64)
                out.append(series_dict(s, steps, np.asarray(value_list, np.float64)))
    return out


def _read_whole(
    conn: Connection, ids: list[int], max_points: int
) -> dict[int, tuple[Steps, Values]]:
    """The series ``ids`` read whole and downsampled, by series id."""
    read: dict[int, tuple[Steps, Values]] = {}
    # Chunks of whole series keep each statement's rows (and memory) bounded.
    per_statement = max(1, 200_000 // WHOLE_SERIES_POINTS)
    for chunk in chunks(ids, per_statement):
        rows = fetch_tuples(
            conn,
            "SELECT series_id, step, value FROM points "
            f"WHERE series_id IN ({id_list(chunk)}) ORDER BY series_id, step",
        )
        if not rows:
            continue
        table = np.array(rows, dtype=np.float64)  # (rows, 3); NULL (SQLite's NaN) -> nan
        sids = table[:, 0].astype(np.int64)
        starts = np.flatnonzero(np.r_[True, sids[1:] != sids[:-1]])
        for a, b in zip(starts.tolist(), [*starts[1:].tolist(), sids.size], strict=True):
            steps = table[a:b, 1].astype(np.int64)
            read[int(sids[a])] = downsample(steps, table[a:b, 2], max_points)
    return read


def series_dict(s: SeriesRow, steps: Steps, values: Values) -> dict[str, Any]:
    """A series as the dashboard's figure builders take it."""
    return {"quantity": s.quantity, "target": s.target, "rank": s.rank, "steps": steps,
            "values": values}  # fmt: skip
