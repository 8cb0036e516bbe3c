"""Series and points: series ids, the ingest hot path and the ``point_blocks`` rollups, the
lookups of a run's series, and latest values (the runs list's, the running runs' for
``/metrics``).

The hot path is ``insert_points``: one statement per request, driver-level executemany on
SQLite and one ``unnest`` insert on PostgreSQL, ``ON CONFLICT DO NOTHING`` on both so a
replayed batch changes nothing. Series ids are resolved in bulk and cached by the caller.
The rows that were new are folded into ``point_blocks`` (one row per BLOCK steps of a series:
count, min, max, first NaN), which the downsampled reads (``storage.downsample``), the
heatmaps (``storage.heatmaps``) and the counts read instead of the points.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, func, select, text, update
from sqlalchemy.orm import Session

from rankguard.server.models import BLOCK, Point, PointBlock, Run, Series
from rankguard.server.storage._sql import chunks, dialect_insert, id_list
from rankguard.server.vocab import RunStatus

SeriesKey = tuple[str, str, int]  # (quantity, target, rank)


# --- ingest -----------------------------------------------------------------------------


def resolve_series(
    *, session: Session, run_id: str, keys: set[SeriesKey], known: dict[SeriesKey, int]
) -> dict[SeriesKey, int]:
    """Ids for ``keys``: from ``known`` (the cache), else created. Returns only new entries."""
    missing = keys - known.keys()
    if not missing:
        return {}
    insert = dialect_insert(session)
    stmt = insert(Series).on_conflict_do_nothing(
        index_elements=["run_id", "quantity", "target", "rank"]
    )
    session.execute(
        stmt, [{"run_id": run_id, "quantity": q, "target": t, "rank": r} for q, t, r in missing]
    )
    rows = session.execute(
        select(Series.id, Series.quantity, Series.target, Series.rank).where(
            Series.run_id == run_id
        )
    )
    return {(q, t, r): sid for sid, q, t, r in rows}


@dataclass(frozen=True)
class ColumnarPoints:
    """Validated, equal-length columns of one ingest request."""

    quantity: list[str]
    target: list[str]
    rank: list[int]
    step: list[int]
    wall_time: list[float]
    value: list[float]


def insert_points(
    *, session: Session, run_id: str, points: ColumnarPoints, known: dict[SeriesKey, int]
) -> tuple[int, dict[SeriesKey, int]]:
    """Insert a columnar batch idempotently and fold the rows that were new into the
    ``point_blocks`` rollups. Returns (rows inserted, new series ids); the caller adds the
    ids to its cache only after the commit."""
    n = len(points.step)
    if n == 0:
        return 0, {}
    keys = set(zip(points.quantity, points.target, points.rank, strict=True))
    new_ids = resolve_series(session=session, run_id=run_id, keys=keys, known=known)
    ids = {**known, **new_ids} if new_ids else known
    series_ids = [ids[k] for k in zip(points.quantity, points.target, points.rank, strict=True)]
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        # One statement, four array parameters: one round trip whatever the batch size.
        result = conn.exec_driver_sql(
            "INSERT INTO points (series_id, step, wall_time, value) "
            "SELECT * FROM unnest(%s::integer[], %s::bigint[], %s::float8[], %s::float8[]) "
            "ON CONFLICT DO NOTHING",
            (series_ids, points.step, points.wall_time, points.value),
        )
    else:
        values = [None if v != v else v for v in points.value]  # NaN -> NULL (see db.py)
        result = conn.exec_driver_sql(
            "INSERT INTO points (series_id, step, wall_time, value) VALUES (?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            list(zip(series_ids, points.step, points.wall_time, values, strict=True)),
        )
    inserted = max(int(result.rowcount), 0)
    if inserted == n:
        # The common case: every row was new, so the batch itself is the rollup delta.
        _merge_blocks(conn, _fold(zip(series_ids, points.step, points.value, strict=True)))
    elif inserted:
        # A partial replay (or duplicates inside the batch): which rows were new is unknown,
        # so rebuild the touched blocks from the stored points (rare, bounded by the batch).
        _rebuild_blocks(conn, series_ids, points.step)
    top = max(points.step)
    session.execute(
        update(Run)
        .where(Run.id == run_id, (Run.last_step.is_(None)) | (Run.last_step < top))
        .values(last_step=top)
    )
    return inserted, new_ids


Block = list[Any]  # [n, min_step, min_value, max_step, max_value, nan_step]


def _fold(rows: Iterable[tuple[int, int, float | None]]) -> dict[tuple[int, int], Block]:
    """Aggregate (series_id, step, value) rows per (series_id, block)."""
    blocks: dict[tuple[int, int], Block] = {}
    for sid, step, value in rows:
        key = (sid, step // BLOCK)
        agg = blocks.get(key)
        if agg is None:
            agg = blocks[key] = [0, None, None, None, None, None]
        agg[0] += 1
        if value is None or value != value:  # NaN (NULL on SQLite)
            if agg[5] is None or step < agg[5]:
                agg[5] = step
            continue
        if agg[2] is None or value < agg[2] or (value == agg[2] and step < agg[1]):
            agg[1], agg[2] = step, value
        if agg[4] is None or value > agg[4] or (value == agg[4] and step < agg[3]):
            agg[3], agg[4] = step, value
    return blocks


def _merge_blocks(
    conn: Connection, blocks: dict[tuple[int, int], Block], *, replace: bool = False
) -> None:
    """Upsert block aggregates (driver-level executemany: no per-row SQLAlchemy work)."""
    if not blocks:
        return
    mark = "%s" if conn.dialect.name == "postgresql" else "?"
    sql = (_REPLACE_BLOCKS if replace else _MERGE_BLOCKS).replace("?", mark)
    conn.exec_driver_sql(sql, [(sid, blk, *agg) for (sid, blk), agg in blocks.items()])


def _rebuild_blocks(conn: Connection, series_ids: list[int], steps: list[int]) -> None:
    touched = set(zip(series_ids, (s // BLOCK for s in steps), strict=True))
    lo = min(b for _, b in touched) * BLOCK
    hi = (max(b for _, b in touched) + 1) * BLOCK
    rows = conn.execute(
        text(
            "SELECT series_id, step, value FROM points WHERE series_id IN :sids "
            "AND step >= :lo AND step < :hi"
        ).bindparams(bindparam("sids", expanding=True)),
        {"sids": sorted({sid for sid, _ in touched}), "lo": lo, "hi": hi},
    )
    blocks = _fold((r[0], r[1], r[2]) for r in rows)
    _merge_blocks(conn, {k: v for k, v in blocks.items() if k in touched}, replace=True)


# excluded.* is the incoming block; a side whose value is NULL has no finite point.
_NEW_MIN = (
    "(point_blocks.min_value IS NULL OR excluded.min_value < point_blocks.min_value OR "
    "(excluded.min_value = point_blocks.min_value AND excluded.min_step < point_blocks.min_step))"
    " AND excluded.min_value IS NOT NULL"
)
_NEW_MAX = (
    "(point_blocks.max_value IS NULL OR excluded.max_value > point_blocks.max_value OR "
    "(excluded.max_value = point_blocks.max_value AND excluded.max_step < point_blocks.max_step))"
    " AND excluded.max_value IS NOT NULL"
)
_MERGE_BLOCKS = f"""
INSERT INTO point_blocks (series_id, block, n, min_step, min_value, max_step, max_value, nan_step)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (series_id, block) DO UPDATE SET
    n = point_blocks.n + excluded.n,
    min_step = CASE WHEN {_NEW_MIN} THEN excluded.min_step ELSE point_blocks.min_step END,
    min_value = CASE WHEN {_NEW_MIN} THEN excluded.min_value ELSE point_blocks.min_value END,
    max_step = CASE WHEN {_NEW_MAX} THEN excluded.max_step ELSE point_blocks.max_step END,
    max_value = CASE WHEN {_NEW_MAX} THEN excluded.max_value ELSE point_blocks.max_value END,
    nan_step = CASE WHEN point_blocks.nan_step IS NULL OR excluded.nan_step < point_blocks.nan_step
                    THEN COALESCE(excluded.nan_step, point_blocks.nan_step)
                    ELSE point_blocks.nan_step END
"""
_REPLACE_BLOCKS = """
INSERT INTO point_blocks (series_id, block, n, min_step, min_value, max_step, max_value, nan_step)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (series_id, block) DO UPDATE SET
    n = excluded.n, min_step = excluded.min_step, min_value = excluded.min_value,
    max_step = excluded.max_step, max_value = excluded.max_value, nan_step = excluded.nan_step
"""


# --- a run's series ---------------------------------------------------------------------


def series_index(*, session: Session, run_id: str) -> list[dict[str, Any]]:
    """Every series of a run with its point count and step range (histogram series too)."""
    # Counts from the rollups; first/last step are one index seek each on the points' PK.
    count = (
        select(func.coalesce(func.sum(PointBlock.n), 0))
        .where(PointBlock.series_id == Series.id)
        .scalar_subquery()
    )
    first = select(func.min(Point.step)).where(Point.series_id == Series.id).scalar_subquery()
    last = select(func.max(Point.step)).where(Point.series_id == Series.id).scalar_subquery()
    rows = session.execute(
        select(Series.quantity, Series.target, Series.rank, count, first, last)
        .where(Series.run_id == run_id)
        .order_by(Series.quantity, Series.target, Series.rank)
    )
    return [
        {
            "quantity": q,
            "target": t,
            "rank": r,
            "count": c,
            "first_step": f,
            "last_step": la,
        }
        for q, t, r, c, f, la in rows
    ]


def match_series(
    *,
    session: Session,
    run_id: str,
    quantity: str | None,
    target: str | None,
    rank: int | None = None,
) -> list[Series]:
    """Series of a run whose quantity and target match the fnmatch globs (None: any).
    The series table is small (targets x quantities), so globbing it in Python is cheap and
    keeps fnmatch's exact semantics ([...] classes included) on every backend."""
    rows = session.scalars(
        select(Series)
        .where(Series.run_id == run_id)
        .order_by(Series.quantity, Series.target, Series.rank)
    )
    return [
        s
        for s in rows
        if (quantity is None or fnmatch.fnmatchcase(s.quantity, quantity))
        and (target is None or fnmatch.fnmatchcase(s.target, target))
        and (rank is None or s.rank == rank)
    ]


@dataclass(frozen=True)
class SeriesRow:
    id: int
    quantity: str
    target: str
    rank: int


def run_series(session: Session, run_id: str) -> list[SeriesRow]:
    """Every series of the run, in one core query (a large model has thousands; ORM objects
    would cost more than the read they select)."""
    rows = session.execute(
        select(Series.id, Series.quantity, Series.target, Series.rank).where(
            Series.run_id == run_id
        )
    )
    return [SeriesRow(int(i), q, t, int(r)) for i, q, t, r in rows]


def series_targets(session: Session, run_id: str, quantity: str) -> set[str]:
    """The distinct targets of a run's ``quantity``."""
    names = session.scalars(
        select(Series.target).where(Series.run_id == run_id, Series.quantity == quantity).distinct()
    )
    return set(names)


def series_peaks(session: Session, series: Sequence[SeriesRow]) -> dict[int, float]:
    """The largest value of each series with points (+Inf when it holds a NaN anywhere):
    one aggregate per chunk over the ``point_blocks`` rollup (1/BLOCK of the points)."""
    peak: dict[int, float] = {}
    conn = session.connection()
    for chunk in chunks([s.id for s in series]):
        rows = conn.exec_driver_sql(
            "SELECT series_id, MAX(max_value), "
            "MAX(CASE WHEN nan_step IS NULL THEN 0 ELSE 1 END) "
            f"FROM point_blocks WHERE series_id IN ({id_list(chunk)}) GROUP BY series_id"
        )
        for sid, mx, has_nan in rows:
            peak[int(sid)] = math.inf if has_nan or mx is None else float(mx)
    return peak


# --- latest values ----------------------------------------------------------------------


def last_values(
    session: Session, run_ids: Sequence[str], quantity: str = "loss"
) -> dict[str, float]:
    """The latest ``quantity`` value (target ``global``, rank 0) of each run."""
    if not run_ids:
        return {}
    rows = session.execute(
        text(
            "SELECT s.run_id, p.value FROM series s JOIN points p ON p.series_id = s.id "
            "WHERE s.quantity = :q AND s.target = 'global' AND s.rank = 0 "
            "AND s.run_id IN (" + ",".join(f":r{i}" for i in range(len(run_ids))) + ") "
            "AND p.step = (SELECT MAX(step) FROM points WHERE series_id = s.id)"
        ),
        {"q": quantity, **{f"r{i}": r for i, r in enumerate(run_ids)}},
    )
    return {rid: math.nan if v is None else float(v) for rid, v in rows}


# Latest point of every series of the running runs: one PK seek per series.
_LATEST_SQL = """
SELECT r.id, p.name, r.last_step, s.quantity, s.target,
       (SELECT pt.value FROM points pt WHERE pt.series_id = s.id
        ORDER BY pt.step DESC LIMIT 1) AS value,
       (SELECT MAX(pt.step) FROM points pt WHERE pt.series_id = s.id) AS step
FROM runs r
JOIN projects p ON p.id = r.project_id
LEFT JOIN series s ON s.run_id = r.id
WHERE r.status = :running
ORDER BY r.id
"""


def latest_samples(session: Session) -> list[Any]:
    """Per series of every running run: (run id, project name, run's last step, quantity,
    target, latest value, its step). A run without series gives one row of NULLs after its
    last step; a histogram-only series a NULL value and step. Values are NaN-as-NULL on
    SQLite, as stored."""
    return list(
        session.connection().execute(text(_LATEST_SQL), {"running": RunStatus.RUNNING.value}).all()
    )
