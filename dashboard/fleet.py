"""The runs page's data: a page of runs with, per run, its health badge, the rule nearest to
firing with its margin in the rule's own terms (``server.alerts.margin``), a loss sparkline
and its latest loss. Filters, sorts and paging run in SQL (``server.storage.fleet``); the
risk sort ranks every run that passes the filters by its margins, which a ``MarginCache``
keeps between requests (a run's margins change only when its data, status or rules do).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from rankguard.server.alerts.margin import Margin, health, nearest
from rankguard.server.storage.fleet import (
    RunFilter,
    RunRow,
    list_run_rows,
    rules_marks,
    run_margins,
    run_marks,
    run_rows_by_id,
    sparklines,
)
from rankguard.server.storage.points import last_values

SORTS = ("risk", "started", "name", "last_step", "status", "firing")
SPARK_POINTS = 50
# Badge order of the risk sort, worst first.
_RISK_ORDER = {"firing": 0, "tripping": 1, "near": 2, "unknown": 3, "ok": 4}


class MarginCache:
    """Margins per run with the marks they were computed at: (status, last step, number of
    rules, newest rule edit). While a run trains its last step moves with every batch, so a
    run whose only change is its last step keeps margins up to ``max_age_s`` old (the page
    polls every 10 s): a fleet of training runs costs a recompute per run per ``max_age_s`` at
    most, however many pages sort by risk. Bounded: dropped whole when full."""

    MAX_AGE_S = 10.0

    def __init__(self, max_runs: int = 50_000, *, max_age_s: float = MAX_AGE_S) -> None:
        self._items: dict[str, tuple[tuple[Any, ...], float, list[Margin]]] = {}
        self._max = max_runs
        self._max_age_s = max_age_s
        self._lock = threading.Lock()

    def _fresh(self, run_id: str, key: tuple[Any, ...], now: float) -> list[Margin] | None:
        hit = self._items.get(run_id)
        if hit is None:
            return None
        old, at, margins = hit
        if old == key:
            return margins
        # Only the last step moved (same status, same rules), recently: still good.
        same_otherwise = old[0] == key[0] and old[2:] == key[2:]
        return margins if same_otherwise and now - at < self._max_age_s else None

    def margins(
        self, session: Session, marks: dict[str, tuple[Any, ...]]
    ) -> dict[str, list[Margin]]:
        """The margins of the runs in ``marks`` (run id -> (status, last step)), computed for
        those not fresh in the cache."""
        rules = rules_marks(session, list(marks))
        keys = {run_id: (*m, *rules.get(run_id, (0, None))) for run_id, m in marks.items()}
        now = time.monotonic()
        out: dict[str, list[Margin]] = {}
        with self._lock:
            for run_id, key in keys.items():
                hit = self._fresh(run_id, key, now)
                if hit is not None:
                    out[run_id] = hit
        missing = [run_id for run_id in keys if run_id not in out]
        if missing:
            fresh = run_margins(session, missing)
            with self._lock:
                if len(self._items) + len(fresh) > self._max:
                    self._items.clear()
                for run_id, ms in fresh.items():
                    self._items[run_id] = (keys[run_id], now, ms)
                    out[run_id] = ms
        return out


@dataclass(frozen=True)
class Page:
    rows: list[dict[str, Any]]
    count: int


def risk_key(margins: Sequence[Margin], firing: int) -> tuple[int, int, float]:
    """Worst first: the badge, then more alerts firing, then the nearest relative margin."""
    near = nearest(margins)
    rel = near.relative if near is not None and near.relative is not None else math.inf
    return (_RISK_ORDER[health(margins, firing)], -firing, rel)


def runs_page(
    session: Session,
    cache: MarginCache,
    f: RunFilter,
    *,
    sort: str,
    descending: bool,
    limit: int,
    offset: int,
) -> Page:
    """One page of the runs list, rows as the page draws them."""
    if sort == "risk":
        marks = run_marks(session, f)
        count = len(marks)
        firing = {run_id: n for run_id, _, _, n in marks}
        margins = cache.margins(session, {i: (s, last) for i, s, last, _ in marks})
        ranked = sorted(
            (run_id for run_id, _, _, _ in marks),
            key=lambda i: risk_key(margins[i], firing[i]),
            reverse=descending,
        )
        rows = run_rows_by_id(session, f, ranked[offset : offset + limit])
    else:
        rows, count = list_run_rows(
            session, f, sort=sort, descending=descending, limit=limit, offset=offset
        )
        margins = cache.margins(session, {r.id: (r.status, r.last_step) for r in rows})
    ids = [r.id for r in rows]
    losses = last_values(session, ids)
    sparks = sparklines(session, ids, points=SPARK_POINTS)
    return Page([_row(r, margins.get(r.id, []), losses, sparks) for r in rows], count)


def _row(
    r: RunRow, margins: list[Margin], losses: dict[str, float], sparks: dict[str, Any]
) -> dict[str, Any]:
    near = nearest(margins)
    steps, values = sparks.get(r.id, ((), ()))
    return {
        "id": r.id,
        "name": r.name,
        "project": r.project,
        "status": r.status,
        "last_step": r.last_step,
        "last_loss": losses.get(r.id),
        "alerts_firing": r.alerts_firing,
        "created_at": r.created_at.isoformat(),
        "finished_at": r.finished_at.isoformat() if r.finished_at else None,
        "tags": list(r.tags),
        "health": health(margins, r.alerts_firing),
        "nearest": near.to_dict() if near is not None else None,
        "rules_assessed": sum(1 for m in margins if m.assessed),
        "rules_pending": sum(1 for m in margins if m.pending),
        "rules_total": len(margins),
        "sparkline": {"steps": [int(s) for s in steps], "values": [float(v) for v in values]},
    }
