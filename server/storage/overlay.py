"""Reads for overlaying runs (the compare view): which quantities and targets the runs have,
and one quantity of one run aggregated over its targets (min, max or mean per step).

Aggregates, cost model: up to ``RAW_LIMIT`` points the aggregation runs in SQL over the
points, one row per step (exact at full resolution; a bucket of steps when there are more
steps than ``columns``). Beyond it, ``min`` and ``max`` come from the ``point_blocks``
rollups, one column per power-of-two number of blocks (exact extremes of the column, 1/BLOCK
of the rows: a 1,000-target × 2,000-step run is 32k rows instead of 2M, but columns of
BLOCK steps), and ``mean`` from the points at every k-th sampled step, k chosen to read at
most RAW_LIMIT points (exact at those steps; a mean over every point of a large run took
seconds per run).

NaN is data, as in ``/metrics``: ``min``/``max`` skip NaN (NaN only when every value is) and
``mean`` is NaN at a step where any target is NaN. Rank 0 only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from rankguard.server.models import BLOCK, Series
from rankguard.server.storage._sql import fetch_tuples, id_list
from rankguard.server.storage.downsample import Steps, Values
from rankguard.server.storage.points import SeriesRow

RAW_LIMIT = 250_000
AGGREGATES = ("min", "mean", "max")


def run_quantities(session: Session, run_ids: Sequence[str]) -> list[str]:
    """The quantities any of the runs has points or histograms for, sorted."""
    rows = session.scalars(
        select(Series.quantity).where(Series.run_id.in_(list(run_ids))).distinct()
    )
    return sorted(set(rows))


def quantity_targets(session: Session, run_ids: Sequence[str], quantity: str) -> list[str]:
    """The distinct targets of ``quantity`` over the runs (rank 0)."""
    rows = session.scalars(
        select(Series.target)
        .where(Series.run_id.in_(list(run_ids)), Series.quantity == quantity, Series.rank == 0)
        .distinct()
    )
    return list(rows)


def series_row(session: Session, run_id: str, quantity: str, target: str) -> SeriesRow | None:
    """The rank-0 series of (run, quantity, target), if it exists."""
    found = session.scalar(
        select(Series.id).where(
            Series.run_id == run_id,
            Series.quantity == quantity,
            Series.target == target,
            Series.rank == 0,
        )
    )
    return None if found is None else SeriesRow(int(found), quantity, target, 0)


@dataclass(frozen=True)
class Aggregate:
    """One run's quantity aggregated over ``targets`` targets: a point per step (``width``
    1) or per column of ``width`` steps (its first step), and where it came from."""

    steps: Steps
    values: Values
    targets: int
    width: int
    source: str  # "points" | "rollup"


def _series_ids(session: Session, run_id: str, quantity: str) -> list[int]:
    return [
        int(i)
        for i in session.scalars(
            select(Series.id).where(
                Series.run_id == run_id, Series.quantity == quantity, Series.rank == 0
            )
        )
    ]


def _nan_test(dialect: str) -> str:
    # SQLite stores NaN as NULL (db.FloatValue); PostgreSQL keeps it, and orders it above
    # every number, so MIN/MAX/AVG must not see it.
    return "value IS NULL" if dialect == "sqlite" else "value = 'NaN'::float8"


def layer_aggregate(
    session: Session, run_id: str, quantity: str, agg: str, *, columns: int
) -> Aggregate | None:
    """``quantity`` of the run aggregated over its targets with ``agg`` (min, mean, max);
    None when it has no points."""
    if agg not in AGGREGATES:
        raise ValueError(f"agg={agg!r} is not valid; use one of {', '.join(AGGREGATES)}")
    ids = _series_ids(session, run_id, quantity)
    if not ids:
        return None
    conn = session.connection()
    n, b0, b1 = conn.exec_driver_sql(
        "SELECT COALESCE(SUM(n), 0), MIN(block), MAX(block) FROM point_blocks "
        f"WHERE series_id IN ({id_list(ids)})"
    ).one()
    if b0 is None:
        return None
    if int(n) > RAW_LIMIT:
        if agg != "mean":
            return _from_rollup(session, ids, int(b0), int(b1), agg, columns)
        stride = -(-int(n) // RAW_LIMIT)
        steps = _every_kth_step(session, ids[0], stride)
        source = f"one sampled step in {stride}"
        return _from_points(session, ids, agg, 1, steps=steps, source=source)
    # A bucket of steps per column when there are more steps than columns.
    span_steps = (int(b1) - int(b0) + 1) * BLOCK
    width = 1 if span_steps <= columns else -(-span_steps // columns)
    return _from_points(session, ids, agg, width)


def _every_kth_step(session: Session, series_id: int, k: int) -> list[int]:
    """Every k-th step one series was sampled at (the quantity's targets share a schedule)."""
    rows = fetch_tuples(
        session.connection(),
        f"SELECT step FROM points WHERE series_id = {int(series_id)} ORDER BY step",
    )
    return [int(r[0]) for r in rows[::k]]


def _from_points(
    session: Session,
    ids: list[int],
    agg: str,
    width: int,
    *,
    steps: list[int] | None = None,
    source: str = "points",
) -> Aggregate:
    """The aggregate per step (per bucket of ``width`` steps), over every point or only at
    ``steps``."""
    conn = session.connection()
    nan = _nan_test(conn.dialect.name)
    bucket = "step" if width == 1 else f"(step / {width}) * {width}"
    func = {"min": "MIN", "max": "MAX", "mean": "AVG"}[agg]
    only = "" if steps is None else f" AND step IN ({id_list(steps)})"
    rows = fetch_tuples(
        conn,
        f"SELECT {bucket} AS b, {func}(CASE WHEN {nan} THEN NULL ELSE value END), "
        f"SUM(CASE WHEN {nan} THEN 1 ELSE 0 END) FROM points "
        f"WHERE series_id IN ({id_list(ids)}){only} GROUP BY b ORDER BY b",
    )
    table = np.array(rows, dtype=np.float64).reshape(-1, 3)  # NULL -> nan
    values = table[:, 1]
    if agg == "mean":
        values = np.where(table[:, 2] > 0, np.nan, values)  # any NaN target: NaN
    stride = width if steps is None or len(steps) < 2 else steps[1] - steps[0]
    return Aggregate(table[:, 0].astype(np.int64), values, len(ids), stride, source)


def _from_rollup(
    session: Session, ids: list[int], b0: int, b1: int, agg: str, columns: int
) -> Aggregate:
    k = 1
    while b1 // k - b0 // k + 1 > columns:
        k *= 2
    pick = "MIN(min_value)" if agg == "min" else "MAX(max_value)"
    rows = fetch_tuples(
        session.connection(),
        f"SELECT block / {k} AS c, {pick} FROM point_blocks "
        f"WHERE series_id IN ({id_list(ids)}) GROUP BY c ORDER BY c",
    )
    table = np.array(rows, dtype=np.float64).reshape(-1, 2)  # a column of NaN only: NULL
    steps = table[:, 0].astype(np.int64) * (k * BLOCK)
    return Aggregate(steps, table[:, 1], len(ids), k * BLOCK, "rollup")
