"""Page data: a run's series, histograms and events, read in bulk and turned into figures.

Shared by the dashboard's JSON endpoints (``dashboard.routes``) and the offline report
(``dashboard.report``). Reads go through ``server.storage`` and its downsampler, with one fast
path: series short enough to need no downsampling (the common case: a few thousand sampled
steps) are read for a whole quantity in one SQLite statement that concatenates each series in
C (``group_concat``) and are parsed by numpy, instead of one query and one Python tuple per
point. A 1,000-target × 2,000-step heatmap is 2M points; per-row fetching alone would cost
seconds.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import plotly.graph_objects as go
from sqlalchemy import Connection, func, select, text
from sqlalchemy.orm import Session

from rankguard.dashboard.figures import (
    attention_logit_max,
    grad_norm,
    jacobian_alignment,
    loss,
    sa_cosine,
    sa_sign_diversity,
    stable_rank,
)
from rankguard.dashboard.figures.common import figure_json, natural_key
from rankguard.dashboard.figures.heatmap import label_bins
from rankguard.server import storage
from rankguard.server.models import BLOCK, Event, Histogram, Run, Series
from rankguard.server.storage.downsample import downsample

# Per-series cap of the line charts' downsampler (min/max buckets keep spikes): ~2 points
# per pixel of a plot's width; drawing more costs the browser time and shows nothing more.
MAX_POINTS = 1000
# Series of up to this many points are read whole (in batches) and downsampled with numpy;
# longer ones through storage.read_points, which scans the rollup instead of the points.
WHOLE_SERIES_POINTS = 20_000
# Heatmap columns: more than a plot's width in pixels buys nothing but payload.
HEATMAP_COLUMNS = 500
# Heatmaps of up to this many points (per quantity) are binned from the points themselves;
# larger ones from the point_blocks rollup (columns of whole BLOCKs: reading and binning
# millions of points costs ~1 µs each on SQLite, seconds for a large model).
HEATMAP_RAW_LIMIT = 250_000
# Line charts with more series than this keep the ones with the largest values (the
# interesting direction for gradient norms, logit maxima and a·M); the title says so.
MAX_LINES = 24
# sa_cosine histograms: at most this many distinct steps are read (evenly spaced).
MAX_HISTOGRAM_STEPS = 400
# SQLite's default limit on host parameters is 32766; stay well below it per statement.
_IN_CHUNK = 900

FIGURE_IDS: tuple[str, ...] = (
    loss.FIGURE_ID,
    grad_norm.FIGURE_ID,
    stable_rank.FIGURE_ID,
    sa_sign_diversity.FIGURE_ID,
    sa_cosine.FIGURE_ID,
    jacobian_alignment.FIGURE_ID,
    attention_logit_max.FIGURE_ID,
)

SeriesDict = dict[str, Any]


# --- series -----------------------------------------------------------------------------


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


def _chunks(items: Sequence[Any], size: int = _IN_CHUNK) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _id_list(ids: Sequence[int]) -> str:
    return ",".join(str(int(i)) for i in ids)  # ints only: nothing to inject


def _fetch_tuples(conn: Connection, sql: str) -> list[tuple[Any, ...]]:
    """Rows as plain DBAPI tuples: numpy reads these in C, while SQLAlchemy Rows cost it a
    failed attribute lookup each (seconds for 100k rows)."""
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(sql)
        return list(cursor.fetchall())
    finally:
        cursor.close()


def _as_dict(s: SeriesRow, steps: np.ndarray, values: np.ndarray) -> SeriesDict:
    return {"quantity": s.quantity, "target": s.target, "rank": s.rank, "steps": steps,
            "values": values}  # fmt: skip


def read_lines(
    session: Session, series: Sequence[SeriesRow], *, max_points: int = MAX_POINTS
) -> list[SeriesDict]:
    """Each series downsampled to ~``max_points`` (min/max buckets: spikes survive, as in the
    API's ``storage.read_points``); series without points (histogram-only) are left out.

    Series of up to WHOLE_SERIES_POINTS points are read together, a chunk of series per
    statement, as plain tuples that numpy converts in C, and downsampled by ``downsample``:
    one statement instead of ~5 per series. Their counts come from the rollup."""
    if not series:
        return []
    conn = session.connection()
    counts: dict[int, int] = {}
    for chunk in _chunks([s.id for s in series]):
        for sid, n in _fetch_tuples(
            conn,
            "SELECT series_id, SUM(n) FROM point_blocks "
            f"WHERE series_id IN ({_id_list(chunk)}) GROUP BY series_id",
        ):
            counts[int(sid)] = int(n)
    whole = [s.id for s in series if 0 < counts.get(s.id, 0) <= WHOLE_SERIES_POINTS]
    read: dict[int, SeriesDict] = {}
    by_id = {s.id: s for s in series}
    # Chunks of whole series keep each statement's rows (and memory) bounded.
    per_statement = max(1, 200_000 // WHOLE_SERIES_POINTS)
    for chunk in _chunks(whole, per_statement):
        rows = _fetch_tuples(
            conn,
            "SELECT series_id, step, value FROM points "
            f"WHERE series_id IN ({_id_list(chunk)}) ORDER BY series_id, step",
        )
        if not rows:
            continue
        table = np.array(rows, dtype=np.float64)  # (rows, 3); NULL (SQLite's NaN) -> nan
        sids = table[:, 0].astype(np.int64)
        starts = np.flatnonzero(np.r_[True, sids[1:] != sids[:-1]])
        for a, b in zip(starts.tolist(), [*starts[1:].tolist(), sids.size], strict=True):
            sid = int(sids[a])
            steps, values = downsample(table[a:b, 1].astype(np.int64), table[a:b, 2], max_points)
            read[sid] = _as_dict(by_id[sid], steps, values)
    out = []
    for s in series:
        if s.id in read:
            out.append(read[s.id])
        elif counts.get(s.id, 0) > WHOLE_SERIES_POINTS:
            step_list, value_list, _, total, _ = storage.read_points(
                session=session, series_id=s.id, step_min=None, step_max=None,
                max_points=max_points,
            )  # fmt: skip
            if total:
                out.append(
                    _as_dict(s, np.asarray(step_list, np.int64), np.asarray(value_list, np.float64))
                )
    return out


def pick_lines(
    session: Session, series: Sequence[SeriesRow], limit: int = MAX_LINES
) -> list[SeriesRow]:
    """At most ``limit`` series: ``global`` first, then those with the largest value (a NaN
    or +Inf anywhere ranks first). The maxima are one aggregate per chunk over the
    ``point_blocks`` rollup (1/BLOCK of the points)."""
    if len(series) <= limit:
        return list(series)
    peak: dict[int, float] = {}
    conn = session.connection()
    for chunk in _chunks([s.id for s in series]):
        rows = conn.exec_driver_sql(
            "SELECT series_id, MAX(max_value), "
            "MAX(CASE WHEN nan_step IS NULL THEN 0 ELSE 1 END) "
            f"FROM point_blocks WHERE series_id IN ({_id_list(chunk)}) GROUP BY series_id"
        )
        for sid, mx, has_nan in rows:
            peak[int(sid)] = math.inf if has_nan or mx is None else float(mx)
    ranked = sorted(
        (s for s in series if s.id in peak),
        key=lambda s: (s.target != "global", -peak[s.id], natural_key(s.target)),
    )
    return ranked[:limit]


@dataclass(frozen=True)
class HeatmapRows:
    """Series ready for a heatmap builder: each holds at most one finite point per column
    (at the column's first step) plus NaN/+Inf points that flag its column. ``width`` is the
    column width in steps (1: one column per step)."""

    series: list[SeriesDict]
    width: int


def read_heatmap(
    session: Session,
    series: Sequence[SeriesRow],
    *,
    last_step: int | None,
    columns: int = HEATMAP_COLUMNS,
    raw_limit: int = HEATMAP_RAW_LIMIT,
) -> list[SeriesDict]:
    """``heatmap_rows(...).series`` (the builders bin nothing further)."""
    return heatmap_rows(
        session, series, last_step=last_step, columns=columns, raw_limit=raw_limit
    ).series


def heatmap_rows(
    session: Session,
    series: Sequence[SeriesRow],
    *,
    last_step: int | None,
    columns: int = HEATMAP_COLUMNS,
    raw_limit: int = HEATMAP_RAW_LIMIT,
) -> HeatmapRows:
    """Every series binned to at most ``columns`` equal step buckets, each keeping its
    minimum (both heatmaps' danger direction is low; the builders reduce cells by min).

    Up to ``raw_limit`` points in all, the points themselves are binned (full resolution);
    beyond that the ``point_blocks`` rollup is read instead: its per-block minimum is exactly
    a min-binned column, and it is 1/BLOCK of the rows (a 1,000 × 2,000 heatmap: 32k rows
    instead of 2M, ~50 ms instead of seconds). Columns are then whole blocks, merged in
    powers of two (so they stay put while the run grows), and are never narrower than BLOCK
    steps: resolution traded for a page that opens in time on a large model."""
    if not series:
        return HeatmapRows([], 1)
    ids = [s.id for s in series]
    total, block_lo, block_hi = 0, None, None
    conn = session.connection()
    for chunk in _chunks(ids):
        n, b0, b1 = conn.exec_driver_sql(
            "SELECT COALESCE(SUM(n), 0), MIN(block), MAX(block) FROM point_blocks "
            f"WHERE series_id IN ({_id_list(chunk)})"
        ).one()
        total += int(n)
        if b0 is not None:
            block_lo = int(b0) if block_lo is None else min(block_lo, int(b0))
            block_hi = int(b1) if block_hi is None else max(block_hi, int(b1))
    if block_lo is None or block_hi is None:
        return HeatmapRows([], 1)
    if total <= raw_limit:
        if conn.dialect.name == "sqlite":
            return _heatmap_from_points(session, series, last_step=last_step, columns=columns)
        return HeatmapRows(read_lines(session, series, max_points=2 * columns), 1)
    return _heatmap_from_blocks(session, series, block_lo, block_hi, columns=columns)


def _heatmap_from_blocks(
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
    out: list[SeriesDict] = []
    for chunk in _chunks([s.id for s in series]):
        if k == 1:
            sql = (
                "SELECT series_id, block, min_value, max_value, nan_step FROM point_blocks "
                f"WHERE series_id IN ({_id_list(chunk)}) ORDER BY series_id, block"
            )
        else:
            sql = (
                f"SELECT series_id, block / {k} AS c, MIN(min_value), MAX(max_value), "
                "MIN(nan_step) FROM point_blocks "
                f"WHERE series_id IN ({_id_list(chunk)}) GROUP BY series_id, c "
                "ORDER BY series_id, c"
            )
        rows = _fetch_tuples(conn, sql)
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
            out.append(_as_dict(by_id[int(sids[a])], steps, values))
    return HeatmapRows(out, width)


def _heatmap_from_points(
    session: Session, series: Sequence[SeriesRow], *, last_step: int | None, columns: int
) -> HeatmapRows:
    """SQLite, few points: one statement per chunk of series; the bucketing runs in SQL and
    each series comes back as comma-joined strings that numpy parses, instead of a Python
    tuple per point. A bucket that held a NaN also returns a NaN point, so the builder still
    flags it. Width 1 (no more steps than columns) returns every point as it is."""
    conn = session.connection()
    probe_ids = _id_list([series[0].id, series[-1].id])
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
    out: list[SeriesDict] = []
    for chunk in _chunks([s.id for s in series]):
        buckets_by_series = conn.exec_driver_sql(
            "SELECT series_id, group_concat(b), group_concat(COALESCE(m, 'nan')), "
            "group_concat(n) FROM ("
            f"  SELECT series_id, (step - {lo}) / {width} AS b, MIN(value) AS m, "
            "   SUM(value IS NULL) AS n"
            f"  FROM points WHERE series_id IN ({_id_list(chunk)}) GROUP BY series_id, b"
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
            out.append(_as_dict(by_id[int(sid)], steps, values))
    return HeatmapRows(out, width)


# --- histograms -------------------------------------------------------------------------


def read_histograms(
    session: Session,
    matched: Sequence[SeriesRow],
    *,
    max_steps: int = MAX_HISTOGRAM_STEPS,
) -> list[dict[str, Any]]:
    """Histograms of the series at no more than ``max_steps`` evenly spaced distinct steps."""
    if not matched:
        return []
    by_id = {s.id: s for s in matched}
    steps = sorted(
        session.scalars(
            select(Histogram.step).where(Histogram.series_id.in_(list(by_id))).distinct()
        )
    )
    if not steps:
        return []
    if len(steps) > max_steps:
        picks = np.unique(np.linspace(0, len(steps) - 1, max_steps).round().astype(int))
        steps = [steps[i] for i in picks]
    out: list[dict[str, Any]] = []
    for chunk in _chunks(steps):
        rows = session.scalars(
            select(Histogram)
            .where(Histogram.series_id.in_(list(by_id)), Histogram.step.in_(list(chunk)))
            .order_by(Histogram.series_id, Histogram.step)
        )
        for h in rows:
            s = by_id[h.series_id]
            out.append(
                {
                    "quantity": s.quantity,
                    "target": s.target,
                    "rank": s.rank,
                    "step": h.step,
                    "edges": h.edges,
                    "counts": h.counts,
                }
            )
    return out


# --- events -----------------------------------------------------------------------------


def _summary(kind: str, payload: Mapping[str, Any]) -> str:
    if kind == "alert":
        rule = payload.get("rule")
        message = payload.get("message") or payload.get("label") or ""
        head = f"{rule}: " if rule else ""
        return f"{head}{message}".strip() or "alert"
    if kind.startswith("command_") or kind == "intervention":
        what = payload.get("kind") or payload.get("command") or kind
        args = payload.get("args")
        parts = [str(what)]
        if isinstance(args, Mapping):
            parts += [f"{k}={v}" for k, v in args.items()]
        if payload.get("error"):
            parts.append(f"error: {payload['error']}")
        return " ".join(parts)
    return str(payload.get("message") or payload.get("label") or kind)


def marker_kind(event: Event) -> str | None:
    """How an event is drawn on the figures: 'alert', 'intervention', another kind, or None
    (events without a step, e.g. a command being queued, are only in the timeline)."""
    if event.step is None or event.kind == "command_queued":
        return None
    if event.kind == "alert":
        return "alert-resolved" if event.payload.get("kind") == "resolved" else "alert"
    if event.kind in ("intervention", "command_applied"):
        return "intervention"
    return event.kind


def marker_events(events: Sequence[Event]) -> list[dict[str, Any]]:
    out = []
    for e in events:
        kind = marker_kind(e)
        if kind is not None:
            out.append(
                {"step": int(e.step or 0), "kind": kind, "label": _summary(e.kind, e.payload)}
            )
    return out


def alert_rows(events: Sequence[Event], run_id: str) -> list[dict[str, Any]]:
    """One row per alert event, newest first, with what tripped and the suggested action.
    The payload follows ``alert_engine.Transition.to_dict`` where the server writes one."""
    rows = []
    for e in events:
        if e.kind != "alert":
            continue
        p = e.payload
        targets = p.get("targets") or []
        names = [t.get("target", "") if isinstance(t, Mapping) else str(t) for t in targets]
        action = str(p.get("suggested_action") or "").replace("{run_id}", run_id)
        rows.append(
            {
                "id": e.id,
                "step": e.step,
                "state": "resolved" if p.get("kind") == "resolved" else "firing",
                "rule": p.get("rule") or "",
                "severity": p.get("severity") or "",
                "message": p.get("message") or p.get("label") or "",
                "targets": [n for n in names if n],
                "suggested_action": action,
                "created_at": e.created_at.isoformat(),
            }
        )
    rows.reverse()
    return rows


def firing_alerts(events: Sequence[Event]) -> int:
    """Alerts whose latest transition (per rule and episode) is not 'resolved'."""
    latest: dict[tuple[str, Any], str] = {}
    for e in events:
        if e.kind == "alert":
            key = (str(e.payload.get("rule") or e.id), e.payload.get("episode"))
            latest[key] = str(e.payload.get("kind") or "firing")
    return sum(1 for state in latest.values() if state != "resolved")


def timeline_rows(events: Sequence[Event]) -> list[dict[str, Any]]:
    """Every event in step order (stepless ones by time), for the alert/intervention table."""
    rows = [
        {
            "id": e.id,
            "step": e.step,
            "kind": e.kind,
            "marker": marker_kind(e) or "",
            "summary": _summary(e.kind, e.payload),
            "suggested_action": str(e.payload.get("suggested_action") or ""),
            "created_at": e.created_at.isoformat(),
        }
        for e in events
    ]
    return rows


# --- figures ----------------------------------------------------------------------------


@dataclass
class PageData:
    run: Run
    figures: list[go.Figure]
    events: list[Event]
    markers: list[dict[str, Any]] = field(default_factory=list)


def _with_note(fig: go.Figure, kept: int, total: int) -> go.Figure:
    if total > kept:
        fig.layout.title.text = f"{fig.layout.title.text} (top {kept} of {total})"
    return fig


def build_figures(
    session: Session,
    run: Run,
    events: Sequence[Event],
    *,
    cosine_target: str | None = None,
) -> list[go.Figure]:
    """Every figure of the run page, in page order (``FIGURE_IDS``)."""
    markers = marker_events(events)
    by_quantity: dict[str, list[SeriesRow]] = {}
    for row in run_series(session, run.id):
        by_quantity.setdefault(row.quantity, []).append(row)

    def lines(quantity: str, build: Callable[..., go.Figure]) -> go.Figure:
        every = by_quantity.get(quantity, [])
        kept = pick_lines(session, every)
        return _with_note(build(read_lines(session, kept), markers), len(kept), len(every))

    def heatmap(quantity: str, build: Callable[..., go.Figure]) -> go.Figure:
        read = heatmap_rows(session, by_quantity.get(quantity, []), last_step=run.last_step)
        return label_bins(build(read.series, markers, max_columns=HEATMAP_COLUMNS), read.width)

    # Jacobian panels: the block pairs with the largest a·M (else a), the same pairs in both.
    gain_all = by_quantity.get(jacobian_alignment.GAIN_QUANTITY, [])
    align_all = by_quantity.get(jacobian_alignment.QUANTITY, [])
    chosen = pick_lines(session, gain_all or align_all)
    pairs = {s.target for s in chosen}
    jac_rows = [s for s in [*align_all, *gain_all] if s.target in pairs]
    n_pairs = len({s.target for s in [*align_all, *gain_all]})
    cosine = [
        s
        for s in by_quantity.get(sa_cosine.QUANTITY, [])
        if cosine_target is None or s.target == cosine_target
    ]
    return [
        lines(loss.QUANTITY, loss.figure),
        lines(grad_norm.QUANTITY, grad_norm.figure),
        heatmap(stable_rank.QUANTITY, stable_rank.figure),
        heatmap(sa_sign_diversity.QUANTITY, sa_sign_diversity.figure),
        sa_cosine.figure(read_histograms(session, cosine), markers, target=cosine_target),
        _with_note(
            jacobian_alignment.figure(read_lines(session, jac_rows), markers),
            len(pairs),
            n_pairs,
        ),
        lines(attention_logit_max.QUANTITY, attention_logit_max.figure),
    ]


def figure_payload(figures: Sequence[go.Figure]) -> str:
    """``[{"id": ..., "rev": ..., "figure": {...}}, ...]`` as JSON text, without re-parsing
    each figure's JSON (the heatmaps' typed arrays make those strings long). ``rev`` is a
    digest of the figure's JSON: a refreshing page redraws only the figures whose rev moved."""
    parts = []
    for fig in figures:
        text = figure_json(fig)
        rev = hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
        fid = json.dumps(fig.layout.meta["figure_id"])
        parts.append(f'{{"id":{fid},"rev":"{rev}","figure":{text}}}')
    return "[" + ",".join(parts) + "]"


def cosine_targets(session: Session, run_id: str) -> list[str]:
    names = session.scalars(
        select(Series.target)
        .where(Series.run_id == run_id, Series.quantity == sa_cosine.QUANTITY)
        .distinct()
    )
    return sorted(set(names), key=natural_key)


def fingerprint(session: Session, run: Run) -> str:
    """Changes whenever anything the run page shows may have changed (new points move
    ``last_step``; alerts and acknowledged commands add events; histograms have their own
    step). Cheap: indexed aggregates only."""
    max_event = session.scalar(select(func.max(Event.id)).where(Event.run_id == run.id))
    series_ids = select(Series.id).where(Series.run_id == run.id).scalar_subquery()
    n_series = session.scalar(select(func.count()).where(Series.run_id == run.id))
    max_hist = session.scalar(
        select(func.max(Histogram.step)).where(Histogram.series_id.in_(series_ids))
    )
    key = f"{run.id}|{run.status}|{run.last_step}|{max_event}|{n_series}|{max_hist}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


# --- runs list --------------------------------------------------------------------------


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


def alert_events_by_run(session: Session, run_ids: Sequence[str]) -> dict[str, list[Event]]:
    out: dict[str, list[Event]] = {r: [] for r in run_ids}
    if not run_ids:
        return out
    rows = session.scalars(
        select(Event)
        .where(Event.run_id.in_(list(run_ids)), Event.kind == "alert")
        .order_by(Event.id)
    )
    for e in rows:
        out[e.run_id].append(e)
    return out


def run_summaries(
    session: Session, runs: Sequence[Run], project_names: Mapping[int, str]
) -> list[dict[str, Any]]:
    """What the runs list shows per run."""
    ids = [r.id for r in runs]
    losses = last_values(session, ids)
    alerts = alert_events_by_run(session, ids)
    return [
        {
            "id": r.id,
            "name": r.name,
            "project": project_names.get(r.project_id, ""),
            "status": r.status,
            "last_step": r.last_step,
            "last_loss": losses.get(r.id),
            "alerts_firing": firing_alerts(alerts[r.id]),
            "created_at": r.created_at.isoformat(),
        }
        for r in runs
    ]
