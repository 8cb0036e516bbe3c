"""Heatmap reads: every series of a quantity binned to at most ``columns`` step buckets, each
keeping its minimum (both heatmaps' danger direction is low; the builders reduce cells by
min), for the dashboard's layer × step heatmaps.

Cost model: up to ``raw_limit`` points in all, the points themselves are binned (full
resolution; on SQLite in one statement per chunk of series, each series coming back as
comma-joined strings that numpy parses). Beyond that the ``point_blocks`` rollup is read
instead: its per-block minimum is exactly a min-binned column and it is 1/BLOCK of the rows
(a 1,000 × 2,000 heatmap: 32k rows instead of 2M, ~50 ms instead of seconds).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from rankguard.server.models import BLOCK
from rankguard.server.storage._sql import chunks, fetch_tuples, id_list
from rankguard.server.storage.downsample import read_lines, series_dict
from rankguard.server.storage.points import SeriesRow

# Heatmaps of up to this many points (per quantity) are binned from the points themselves;
# larger ones from the point_blocks rollup (columns of whole BLOCKs: reading and binning
# millions of points costs ~1 µs each on SQLite, seconds for a large model).
HEATMAP_RAW_LIMIT = 250_000


@dataclass(frozen=True)
class HeatmapRows:
    """Series ready for a heatmap builder: each holds at most one finite point per column
    (at the column's first step) plus NaN/+Inf points that flag its column. ``width`` is the
    column width in steps (1: one column per step)."""

    series: list[dict[str, Any]]
    width: int


def heatmap_rows(
    session: Session,
    series: Sequence[SeriesRow],
    *,
    last_step: int | None,
    columns: int,
    raw_limit: int = HEATMAP_RAW_LIMIT,
) -> HeatmapRows:
    """Every series binned to at most ``columns`` equal step buckets, each keeping its
    minimum. From the rollup (beyond ``raw_limit`` points) columns are whole blocks, merged in
    powers of two (so they stay put while the run grows), and never narrower than BLOCK
    steps: resolution traded for a page that opens in time on a large model."""
    if not series:
        return HeatmapRows([], 1)
    ids = [s.id for s in series]
    total, block_lo, block_hi = 0, None, None
    conn = session.connection()
    for chunk in chunks(ids):
        n, b0, b1 = conn.exec_driver_sql(
            "SELECT COALESCE(SUM(n), 0), MIN(block), MAX(block) FROM point_blocks "
            f"WHERE series_id IN ({id_list(chunk)})"
        ).one()
        total += int(n)
        if b0 is not None:
            block_lo = int(b0) if block_lo is None else min(block_lo, int(b0))
            block_hi = int(b1) if block_hi is None else max(block_hi, int(b1))
    if block_lo is None or block_hi is None:
        return HeatmapRows([], 1)
    if total <= raw_limit:
        if conn.dialect.name == "sqlite":
            return _from_points(session, series, last_step=last_step, columns=columns)
        return HeatmapRows(read_lines(session, series, max_points=2 * columns), 1)
    return _from_blocks(session, series, block_lo, block_hi, columns=columns)


def _from_blocks(
    session: Session, series: Sequence[SeriesRow], block_lo: int, block_hi: int, *, columns: int
) -> HeatmapRows:
    """One column per ``k`` consecutive rollup blocks (k a power of two): MIN(min_value) is
    the column's minimum, MAX(max_value) = +Inf and a nan_step flag the column as the
    builder would flag it (a -Inf minimum stands for the column: drawn at the low end)."""
    k = 1
    while block_hi // k - block_lo // k + 1 > columns:
        k *= 2
    width = k * BLOCK
    conn = session.connection()
    by_id = {s.id: s for s in series}
    out: list[dict[str, Any]] = []
    for chunk in chunks([s.id for s in series]):
        if k == 1:
            sql = (
                "SELECT series_id, block, min_value, max_value, nan_step FROM point_blocks "
                f"WHERE series_id IN ({id_list(chunk)}) ORDER BY series_id, block"
            )
        else:
            sql = (
                f"SELECT series_id, block / {k} AS c, MIN(min_value), MAX(max_value), "
                "MIN(nan_step) FROM point_blocks "
                f"WHERE series_id IN ({id_list(chunk)}) GROUP BY series_id, c "
                "ORDER BY series_id, c"
            )
        rows = fetch_tuples(conn, sql)
        if not rows:
            continue
        # None (no finite value, no NaN) -> nan; ±Inf come back as floats.
        table = np.array(rows, dtype=np.float64)  # (rows, 5)
        sids = table[:, 0].astype(np.int64)
        starts = np.flatnonzero(np.r_[True, sids[1:] != sids[:-1]])
        ends = np.r_[starts[1:], sids.size]
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            col = table[a:b, 1].astype(np.int64) * width
            low, high, nan_at = table[a:b, 2], table[a:b, 3], table[a:b, 4]
            flag_nan = ~np.isnan(nan_at) & ~np.isnan(low)  # all-NaN columns are NaN already
            flag_inf = np.isposinf(high) & ~np.isposinf(low)
            steps = np.concatenate([col, col[flag_nan], col[flag_inf]])
            values = np.concatenate(
                [low, np.full(int(flag_nan.sum()), np.nan), np.full(int(flag_inf.sum()), np.inf)]
            )
            out.append(series_dict(by_id[int(sids[a])], steps, values))
    return HeatmapRows(out, width)


def _from_points(
    session: Session, series: Sequence[SeriesRow], *, last_step: int | None, columns: int
) -> HeatmapRows:
    """SQLite, few points: one statement per chunk of series; the bucketing runs in SQL and
    each series comes back as comma-joined strings that numpy parses, instead of a Python
    tuple per point. A bucket that held a NaN also returns a NaN point, so the builder still
    flags it. Width 1 (no more steps than columns) returns every point as it is."""
    conn = session.connection()
    probe_ids = id_list([series[0].id, series[-1].id])
    lo = conn.exec_driver_sql(
        f"SELECT MIN(step) FROM points WHERE series_id IN ({probe_ids})"
    ).scalar()
    hi = last_step
    if lo is None or hi is None:
        rows = read_lines(session, series, max_points=2 * columns)
        return HeatmapRows(rows, 1)
    lo = int(lo)
    width = max(1, -(-(int(hi) - lo + 1) // columns))
    by_id = {s.id: s for s in series}
    out: list[dict[str, Any]] = []
    for chunk in chunks([s.id for s in series]):
        buckets_by_series = conn.exec_driver_sql(
            "SELECT series_id, group_concat(b), group_concat(COALESCE(m, 'nan')), "
            "group_concat(n) FROM ("
            f"  SELECT series_id, (step - {lo}) / {width} AS b, MIN(value) AS m, "
            "   SUM(value IS NULL) AS n"
            f"  FROM points WHERE series_id IN ({id_list(chunk)}) GROUP BY series_id, b"
            ") GROUP BY series_id"
        )
        for sid, b_text, m_text, n_text in buckets_by_series:
            buckets = np.fromstring(b_text, dtype=np.int64, sep=",")
            values = np.fromstring(m_text, dtype=np.float64, sep=",")
            nans = np.fromstring(n_text, dtype=np.int64, sep=",")
            steps = lo + buckets * width
            extra = (nans > 0) & ~np.isnan(values)  # a NaN beside finite values in a bucket
            if extra.any():
                steps = np.concatenate([steps, steps[extra]])
                values = np.concatenate([values, np.full(int(extra.sum()), np.nan)])
            out.append(series_dict(by_id[int(sid)], steps, values))
    return HeatmapRows(out, width)
