"""Histograms (e.g. ``sa_cosine``): idempotent insert on (series, step), and two reads with one
row shape: the API's (a step range, a row limit) and the dashboard's (evenly spaced steps).

Edges and counts are JSON columns, which cannot hold NaN/Inf literals: non-finite values are
stored in the wire's string form (``wire_floats``) and read back as floats by the API."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from rankguard.server.models import Histogram
from rankguard.server.storage._sql import chunks, dialect_insert
from rankguard.server.storage.points import SeriesKey, resolve_series
from rankguard.server.wire import wire_floats


class _SeriesLike(Protocol):
    @property
    def id(self) -> int: ...
    @property
    def quantity(self) -> str: ...
    @property
    def target(self) -> str: ...
    @property
    def rank(self) -> int: ...


def insert_histograms(
    *,
    session: Session,
    run_id: str,
    histograms: Sequence[Any],
    known: dict[SeriesKey, int],
) -> tuple[int, dict[SeriesKey, int]]:
    """Insert histograms (objects with quantity, target, rank, step, wall_time, edges,
    counts) idempotently. Returns (rows inserted, new series ids), as ``insert_points``."""
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
            "edges": wire_floats(list(h.edges)),
            "counts": wire_floats(list(h.counts)),
        }
        for h in histograms
    ]
    insert = dialect_insert(session)
    # RETURNING counts the rows that were new (executemany rowcounts differ by driver).
    table = Histogram.__table__
    result = session.connection().execute(
        insert(table)
        .on_conflict_do_nothing(index_elements=["series_id", "step"])
        .returning(table.c.step),
        rows,
    )
    return len(result.all()), new_ids


def _row(s: _SeriesLike, h: Histogram, edges: list[Any], counts: list[Any]) -> dict[str, Any]:
    return {
        "quantity": s.quantity,
        "target": s.target,
        "rank": s.rank,
        "step": h.step,
        "wall_time": h.wall_time,
        "edges": edges,
        "counts": counts,
    }


def read_histograms(
    *,
    session: Session,
    series: Sequence[_SeriesLike],
    step_min: int | None,
    step_max: int | None,
    limit: int,
) -> list[dict[str, Any]]:
    """The histograms of ``series`` in [step_min, step_max] (at most ``limit`` rows), by
    series then step, edges and counts as floats."""
    by_id = {s.id: s for s in series}
    if not by_id:
        return []
    query = select(Histogram).where(Histogram.series_id.in_(by_id))
    if step_min is not None:
        query = query.where(Histogram.step >= step_min)
    if step_max is not None:
        query = query.where(Histogram.step <= step_max)
    return [
        _row(by_id[h.series_id], h, [float(x) for x in h.edges], [float(x) for x in h.counts])
        for h in session.scalars(query.order_by(Histogram.series_id, Histogram.step).limit(limit))
    ]


def sample_histograms(
    session: Session, series: Sequence[_SeriesLike], *, max_steps: int
) -> list[dict[str, Any]]:
    """The histograms of ``series`` at no more than ``max_steps`` evenly spaced distinct
    steps, edges and counts as stored (the figure builders read the wire's strings)."""
    if not series:
        return []
    by_id = {s.id: s for s in series}
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
    for chunk in chunks(steps):
        rows = session.scalars(
            select(Histogram)
            .where(Histogram.series_id.in_(list(by_id)), Histogram.step.in_(list(chunk)))
            .order_by(Histogram.series_id, Histogram.step)
        )
        out.extend(_row(by_id[h.series_id], h, h.edges, h.counts) for h in rows)
    return out
