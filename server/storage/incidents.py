"""Reads for one alert episode (the incident page): the series involved at full step
resolution over a window of steps, each series' values just before and just after a step
(what a command changed), and the commands that followed the alert.

Full resolution is affordable because the window is bounded (the caller caps its span and the
number of series): one statement reads every series' points in the window. The probe's
flight recorder ships the steps around an incident as ordinary points, so reading the points
is enough to show them.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from rankguard.server.models import Command, Series
from rankguard.server.storage._arrays import series_slices
from rankguard.server.storage._sql import fetch_tuples, id_list
from rankguard.server.storage.downsample import series_dict
from rankguard.server.storage.points import SeriesRow


def series_rows(
    session: Session, run_id: str, quantity: str, targets: Sequence[str] | None = None
) -> list[SeriesRow]:
    """The rank-0 series of a run's ``quantity`` (only ``targets``, when given), in the
    order of ``targets``."""
    query = select(Series.id, Series.target).where(
        Series.run_id == run_id, Series.quantity == quantity, Series.rank == 0
    )
    if targets is not None:
        query = query.where(Series.target.in_(list(targets)))
    found = {t: int(i) for i, t in session.execute(query)}
    order = list(targets) if targets is not None else sorted(found)
    return [SeriesRow(found[t], quantity, t, 0) for t in order if t in found]


def window_points(
    session: Session, series: Sequence[SeriesRow], lo: int, hi: int
) -> list[dict[str, Any]]:
    """Every point of each series in steps [lo, hi] (series without any left out), in the
    order given, as ``{quantity, target, rank, steps, values}``: one statement."""
    if not series:
        return []
    rows = fetch_tuples(
        session.connection(),
        "SELECT series_id, step, value FROM points "
        f"WHERE series_id IN ({id_list([s.id for s in series])}) "
        f"AND step >= {int(lo)} AND step <= {int(hi)} ORDER BY series_id, step",
    )
    table = np.array(rows, dtype=np.float64).reshape(-1, 3)  # NULL (SQLite's NaN) -> nan
    by_id = {
        sid: (table[a:b, 1].astype(np.int64), table[a:b, 2])
        for sid, a, b in series_slices(table[:, 0].astype(np.int64))
    }
    return [series_dict(s, *by_id[s.id]) for s in series if s.id in by_id]


Sample = tuple[int, float]  # (step, value)


def around(
    session: Session, series: Sequence[SeriesRow], step: int
) -> dict[int, tuple[Sample | None, Sample | None]]:
    """Per series id: its last point at or before ``step`` and its first point after it
    (two statements; an index seek per series each)."""
    out: dict[int, tuple[Sample | None, Sample | None]] = {s.id: (None, None) for s in series}
    if not series:
        return out
    conn = session.connection()
    ids = id_list([s.id for s in series])
    for side, pick, cmp in ((0, "MAX", "<="), (1, "MIN", ">")):
        rows = fetch_tuples(
            conn,
            f"SELECT p.series_id, p.step, p.value FROM points p WHERE p.series_id IN ({ids}) "
            f"AND p.step = (SELECT {pick}(q.step) FROM points q "
            f"WHERE q.series_id = p.series_id AND q.step {cmp} {int(step)})",
        )
        for sid, at, value in rows:
            sample = (int(at), math.nan if value is None else float(value))
            before, after = out[int(sid)]
            out[int(sid)] = (sample, after) if side == 0 else (before, sample)
    return out


def following_commands(
    session: Session, run_id: str, alert_id: str, since: dt.datetime, until: dt.datetime | None
) -> list[Command]:
    """The commands the alert ordered, and every other command of the run queued while it
    fired (``until`` None: still firing), in the order they were queued."""
    during = Command.created_at >= since
    if until is not None:
        during = during & (Command.created_at <= until)
    return list(
        session.scalars(
            select(Command)
            .where(
                Command.run_id == run_id,
                or_(Command.created_by == f"alert:{alert_id}", during),
            )
            .order_by(Command.created_at, Command.id)
            .limit(200)
        )
    )
