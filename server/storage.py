"""Data functions, keyword-only, over a ``Session`` the caller owns (and commits).

The hot path is ``insert_points``: one statement per request, driver-level executemany on
SQLite and one ``unnest`` insert on PostgreSQL, ``ON CONFLICT DO NOTHING`` on both so a
replayed batch changes nothing. Series ids are resolved in bulk and cached by the caller.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import math
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Connection, CursorResult, bindparam, func, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rankguard.server import auth
from rankguard.server.alerts.store import install_run_rules
from rankguard.server.db import utcnow
from rankguard.server.models import (
    BLOCK,
    Command,
    Event,
    Histogram,
    Point,
    PointBlock,
    Project,
    Run,
    Scope,
    Series,
    Token,
)
from rankguard.server.vocab import CommandState, RunStatus

SeriesKey = tuple[str, str, int]  # (quantity, target, rank)


class ConflictError(ValueError):
    """The request contradicts what is stored (-> 409)."""


# --- projects and tokens ----------------------------------------------------------------


def get_project(*, session: Session, name: str) -> Project | None:
    return session.scalars(select(Project).where(Project.name == name)).one_or_none()


def ensure_project(*, session: Session, name: str) -> Project:
    project = get_project(session=session, name=name)
    if project is None:
        project = Project(name=name)
        session.add(project)
        session.flush()
    return project


def list_projects(*, session: Session) -> list[Project]:
    return list(session.scalars(select(Project).order_by(Project.id)))


def create_token(
    *, session: Session, project: Project | None, name: str, scopes: Sequence[Scope]
) -> tuple[Token, str]:
    """A new token; returns it and its secret (the only time the secret exists)."""
    secret = auth.generate_token()
    token = Token(
        project_id=None if project is None else project.id,
        name=name,
        prefix=auth.token_prefix(secret),
        token_hash=auth.hash_token(secret),
        scopes=sorted({Scope(s).value for s in scopes}),
    )
    session.add(token)
    session.flush()
    return token, secret


def find_token(*, session: Session, secret: str) -> Token | None:
    token = session.scalars(
        select(Token).where(Token.token_hash == auth.hash_token(secret))
    ).one_or_none()
    if token is None or token.revoked_at is not None:
        return None
    return token


def list_tokens(*, session: Session) -> list[tuple[Token, str | None]]:
    rows = session.execute(
        select(Token, Project.name)
        .outerjoin(Project, Token.project_id == Project.id)
        .order_by(Token.id)
    )
    return [(tok, pname) for tok, pname in rows]


def revoke_token(*, session: Session, token_id: int) -> Token | None:
    token = session.get(Token, token_id)
    if token is not None and token.revoked_at is None:
        token.revoked_at = utcnow()
    return token


def ensure_admin_token(*, session: Session, secret: str | None) -> str | None:
    """Make sure an admin token exists. With ``secret`` (from RANKGUARD_ADMIN_TOKEN) that one
    is stored if missing; without, one is generated on the first start only and returned so
    the caller can print it once. Returns the generated secret or None."""
    if secret is not None:
        known = session.scalars(
            select(Token.id).where(Token.token_hash == auth.hash_token(secret))
        ).first()
        # A revoked RANKGUARD_ADMIN_TOKEN stays revoked: restarting must not revive it.
        if known is None:
            session.add(
                Token(
                    project_id=None,
                    name="admin (RANKGUARD_ADMIN_TOKEN)",
                    prefix=auth.token_prefix(secret),
                    token_hash=auth.hash_token(secret),
                    scopes=[Scope.ADMIN.value],
                )
            )
            session.flush()
        return None
    has_admin = session.scalars(
        select(Token.id).where(Token.project_id.is_(None), Token.revoked_at.is_(None)).limit(1)
    ).first()
    if has_admin is not None:
        return None
    _, generated = create_token(session=session, project=None, name="admin", scopes=[Scope.ADMIN])
    return generated


# --- runs -------------------------------------------------------------------------------


def register_run(
    *,
    session: Session,
    project: Project,
    run_id: uuid.UUID | None,
    name: str,
    config: dict[str, Any],
    world_size: int,
    parameters: list[dict[str, Any]],
) -> tuple[Run, bool]:
    """Create a run, or return the existing one when the client's ``run_id`` is known.
    Returns (run, created). Safe when several ranks of one job register it at once."""

    def known() -> Run | None:
        existing = session.get(Run, str(run_id)) if run_id is not None else None
        if existing is not None and existing.project_id != project.id:
            raise ConflictError(f"run id {run_id} is already registered in another project")
        return existing

    existing = known()
    if existing is not None:
        return existing, False
    run = Run(
        id=str(run_id or uuid.uuid4()),
        project_id=project.id,
        name=name,
        config=config,
        world_size=world_size,
        parameters=parameters,
        status=RunStatus.RUNNING.value,
    )
    try:
        with session.begin_nested():  # a concurrent registration of the same id wins the race
            session.add(run)
            session.flush()
            install_run_rules(session=session, run=run)
    except IntegrityError:
        existing = known()
        if existing is None:
            raise
        return existing, False
    return run, True


def get_run(*, session: Session, run_id: str, project_id: int | None) -> Run | None:
    """The run, or None when it does not exist or belongs to a project the caller can't see."""
    run = session.get(Run, run_id)
    if run is None or (project_id is not None and run.project_id != project_id):
        return None
    return run


def project_names(*, session: Session, ids: set[int]) -> dict[int, str]:
    if not ids:
        return {}
    return dict(session.execute(select(Project.id, Project.name).where(Project.id.in_(ids))).all())


def list_runs(
    *,
    session: Session,
    project_id: int | None,
    status: RunStatus | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[Run], int]:
    query = select(Run)
    if project_id is not None:
        query = query.where(Run.project_id == project_id)
    if status is not None:
        query = query.where(Run.status == status.value)
    count = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    runs = session.scalars(
        query.order_by(Run.created_at.desc(), Run.id).limit(limit).offset(offset)
    )
    return list(runs), count


def finish_run(*, session: Session, run: Run, status: RunStatus) -> Run:
    if run.status == RunStatus.RUNNING.value:
        run.status = status.value
        run.finished_at = utcnow()
    elif run.status != status.value:
        raise ConflictError(f"run {run.id} is already {run.status}; cannot mark it {status.value}")
    return run


# --- series and points ------------------------------------------------------------------


def _dialect_insert(session: Session) -> Any:
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


def resolve_series(
    *, session: Session, run_id: str, keys: set[SeriesKey], known: dict[SeriesKey, int]
) -> dict[SeriesKey, int]:
    """Ids for ``keys``: from ``known`` (the cache), else created. Returns only new entries."""
    missing = keys - known.keys()
    if not missing:
        return {}
    insert = _dialect_insert(session)
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


def read_points(
    *,
    session: Session,
    series_id: int,
    step_min: int | None,
    step_max: int | None,
    max_points: int,
) -> tuple[list[int], list[float], list[float], int, bool]:
    """Points of one series in [step_min, step_max]. With more than ``max_points`` the range
    is cut into about max_points // 2 buckets and each keeps its minimum point, its maximum
    point (spikes survive; ±Inf are extremes) and its first NaN point.

    The work is done in SQL over the ``point_blocks`` rollups (one row per BLOCK steps), so
    a 1M-point series costs a scan of ~16k block rows; only the <= 2 blocks cut by the
    range's ends are read as raw points. Returns (steps, values, wall_times, total,
    downsampled)."""
    conn = session.connection()
    # Clamp the range to the series' own first and last step (two PK index seeks), so the
    # buckets cover data, not the empty tail of an open-ended range.
    first, last = conn.execute(
        text(
            "SELECT (SELECT MIN(step) FROM points WHERE series_id = :sid), "
            "(SELECT MAX(step) FROM points WHERE series_id = :sid)"
        ),
        {"sid": series_id},
    ).one()
    if first is None:
        return [], [], [], 0, False
    lo = max(first, step_min or 0)
    hi = min(last, step_max if step_max is not None else last)
    if lo > hi:
        return [], [], [], 0, False
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
    dialect = conn.dialect.name
    steps: set[int] = set()
    for sql in _PICK_SQL[dialect]:
        steps.update(row[0] for row in conn.execute(text(sql), p) if row[0] is not None)
    # The raw edge points form two more buckets of their own.
    for part in (
        [r for r in edges if r[0] < first_full * BLOCK],
        [r for r in edges if r[0] >= first_full * BLOCK],
    ):
        steps.update(_extreme_steps(part))
    ordered = sorted(steps)
    if dialect == "postgresql":
        # A join on an unnested array keeps the PK index lookups (= ANY / IN lists of this
        # size were planned as sequential scans).
        rows = conn.execute(
            text(
                "SELECT p.step, p.value, p.wall_time FROM unnest(CAST(:steps AS bigint[])) "
                "AS s(step) JOIN points p ON p.series_id = :sid AND p.step = s.step "
                "ORDER BY p.step"
            ),
            {"sid": series_id, "steps": ordered},
        ).all()
    else:
        rows = []
        for i in range(0, len(ordered), 5000):
            rows.extend(
                conn.execute(
                    text(
                        "SELECT step, value, wall_time FROM points WHERE series_id = :sid "
                        "AND step IN :steps ORDER BY step"
                    ).bindparams(bindparam("steps", expanding=True)),
                    {"sid": series_id, "steps": ordered[i : i + 5000]},
                ).all()
            )
    return (*_columns(rows), total, True)


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


def _extreme_steps(rows: Sequence[Any]) -> set[int]:
    """Steps of the min, max and first NaN point among a few raw rows (an edge bucket)."""
    finite = [(r[1], r[0]) for r in rows if r[1] is not None and r[1] == r[1]]
    nans = [r[0] for r in rows if r[1] is None or r[1] != r[1]]
    out: set[int] = set()
    if finite:
        out.add(min(finite)[1])
        out.add(min(finite, key=lambda vs: (-vs[0], vs[1]))[1])
    if nans:
        out.add(min(nans))
    return out


def _columns(rows: Sequence[Any]) -> tuple[list[int], list[float], list[float]]:
    steps = [int(r[0]) for r in rows]
    values = [math.nan if r[1] is None else float(r[1]) for r in rows]
    walls = [float(r[2]) for r in rows]
    return steps, values, walls


# --- histograms -------------------------------------------------------------------------


def insert_histograms(
    *,
    session: Session,
    run_id: str,
    histograms: Sequence[Any],
    known: dict[SeriesKey, int],
) -> tuple[int, dict[SeriesKey, int]]:
    if not histograms:
        return 0, {}
    keys = {(h.quantity, h.target, h.rank) for h in histograms}
    new_ids = resolve_series(session=session, run_id=run_id, keys=keys, known=known)
    ids = {**known, **new_ids}
    now = time.time()
    rows = [
        {
            "series_id": ids[(h.quantity, h.target, h.rank)],
            "step": h.step,
            "wall_time": now if h.wall_time is None else h.wall_time,
            "edges": [_json_float(x) for x in h.edges],
            "counts": [_json_float(x) for x in h.counts],
        }
        for h in histograms
    ]
    insert = _dialect_insert(session)
    # RETURNING counts the rows that were new (executemany rowcounts differ by driver).
    table = Histogram.__table__
    result = session.connection().execute(
        insert(table)
        .on_conflict_do_nothing(index_elements=["series_id", "step"])
        .returning(table.c.step),
        rows,
    )
    return len(result.all()), new_ids


def _json_float(x: float) -> float | str:
    """JSON columns cannot hold NaN/Inf literals; keep them in the wire's string form."""
    if math.isfinite(x):
        return x
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


def read_histograms(
    *,
    session: Session,
    series: Sequence[Series],
    step_min: int | None,
    step_max: int | None,
    limit: int,
) -> list[dict[str, Any]]:
    by_id = {s.id: s for s in series}
    if not by_id:
        return []
    query = select(Histogram).where(Histogram.series_id.in_(by_id))
    if step_min is not None:
        query = query.where(Histogram.step >= step_min)
    if step_max is not None:
        query = query.where(Histogram.step <= step_max)
    out = []
    for h in session.scalars(query.order_by(Histogram.series_id, Histogram.step).limit(limit)):
        s = by_id[h.series_id]
        out.append(
            {
                "quantity": s.quantity,
                "target": s.target,
                "rank": s.rank,
                "step": h.step,
                "wall_time": h.wall_time,
                "edges": [float(x) for x in h.edges],
                "counts": [float(x) for x in h.counts],
            }
        )
    return out


# --- events -----------------------------------------------------------------------------


def create_event(
    *, session: Session, run_id: str, kind: str, step: int | None, payload: dict[str, Any]
) -> Event:
    event = Event(run_id=run_id, kind=kind, step=step, payload=payload)
    session.add(event)
    session.flush()
    return event


def list_events(
    *,
    session: Session,
    run_id: str,
    kind: str | None = None,
    step_min: int | None = None,
    step_max: int | None = None,
    limit: int = 1000,
) -> list[Event]:
    query = select(Event).where(Event.run_id == run_id)
    if kind is not None:
        query = query.where(Event.kind == kind)
    if step_min is not None:
        query = query.where(Event.step >= step_min)
    if step_max is not None:
        query = query.where(Event.step <= step_max)
    return list(session.scalars(query.order_by(Event.id).limit(limit)))


# --- commands ---------------------------------------------------------------------------

OPEN_STATES = (CommandState.QUEUED.value, CommandState.DELIVERED.value)


def enqueue_command(
    *,
    session: Session,
    run_id: str,
    kind: str,
    args: dict[str, Any],
    created_by: str,
    ttl_s: float,
) -> Command:
    """Queue a command for the run's probe (also the entry point for alert rules)."""
    now = utcnow()
    command = Command(
        id=str(uuid.uuid4()),
        run_id=run_id,
        kind=kind,
        args=args,
        state=CommandState.QUEUED.value,
        created_at=now,
        updated_at=now,
        expires_at=now + dt.timedelta(seconds=ttl_s),
        created_by=created_by,
    )
    session.add(command)
    session.flush()
    session.add(
        Event(
            run_id=run_id,
            kind="command_queued",
            step=None,
            payload={"command_id": command.id, "kind": kind, "created_by": created_by},
        )
    )
    return command


def expire_commands(*, session: Session, run_id: str) -> int:
    """queued/delivered commands past their ``expires_at`` become ``expired``."""
    now = utcnow()
    result = session.execute(
        update(Command)
        .where(Command.run_id == run_id, Command.state.in_(OPEN_STATES), Command.expires_at < now)
        .values(state=CommandState.EXPIRED.value, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return int(cast("CursorResult[Any]", result).rowcount or 0)


def list_commands(
    *, session: Session, run_id: str, state: CommandState | None = None, limit: int = 1000
) -> list[Command]:
    query = select(Command).where(Command.run_id == run_id)
    if state is not None:
        query = query.where(Command.state == state.value)
    return list(session.scalars(query.order_by(Command.created_at, Command.id).limit(limit)))


def get_command(*, session: Session, run_id: str, command_id: str) -> Command | None:
    command = session.get(Command, command_id)
    if command is None or command.run_id != run_id:
        return None
    return command


def claim_commands(*, session: Session, run_id: str, limit: int = 100) -> list[Command]:
    """Queued commands in creation order, now ``delivered`` (expired ones first removed)."""
    expire_commands(session=session, run_id=run_id)
    commands = list(
        session.scalars(
            select(Command)
            .where(Command.run_id == run_id, Command.state == CommandState.QUEUED.value)
            .order_by(Command.created_at, Command.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )
    now = utcnow()
    for command in commands:
        command.state = CommandState.DELIVERED.value
        command.updated_at = now
    return commands


def ack_command(
    *,
    session: Session,
    command: Command,
    state: CommandState,
    step: int | None,
    result: dict[str, Any] | None,
    error: str | None,
) -> Command:
    """Record what the probe did. Repeating the same ack is a no-op; a late ack of an
    expired command is recorded anyway, because the weights did change."""
    if command.state == state.value:
        return command
    if command.state not in (CommandState.DELIVERED.value, CommandState.EXPIRED.value):
        raise ConflictError(
            f"command {command.id} is {command.state}; only a delivered (or expired) command "
            f"can be acknowledged as {state.value}"
        )
    command.state = state.value
    command.updated_at = utcnow()
    command.applied_step = step
    command.result = result
    command.error = error
    session.add(
        Event(
            run_id=command.run_id,
            kind=f"command_{state.value}",
            step=step,
            payload={
                "command_id": command.id,
                "kind": command.kind,
                "result": result,
                "error": error,
            },
        )
    )
    return command


def cancel_command(*, session: Session, command: Command) -> Command:
    """Only a queued command can be cancelled: a delivered one may already be applied."""
    if command.state == CommandState.CANCELLED.value:
        return command
    if command.state != CommandState.QUEUED.value:
        raise ConflictError(
            f"command {command.id} is {command.state}; only a queued command can be cancelled"
        )
    command.state = CommandState.CANCELLED.value
    command.updated_at = utcnow()
    return command
