"""The compare view: up to ``MAX_RUNS`` runs overlaid on one step axis, one quantity (for one
target, or aggregated over the quantity's targets) and the loss, each run's alerts and
commands marked in its colour. Reads go through ``server.storage`` (``overlay`` for the
aggregates, ``downsample`` for single series); a plot's width bounds every line's points.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from plotly.colors import qualitative
from sqlalchemy.orm import Session

from rankguard.dashboard.events import marker_events
from rankguard.dashboard.figures.common import figure_json, natural_key
from rankguard.dashboard.figures.compare import overlay_figure
from rankguard.dashboard.page import MAX_POINTS
from rankguard.server.exposition import LOW_IS_WORSE
from rankguard.server.models import Run
from rankguard.server.storage.downsample import read_lines
from rankguard.server.storage.events import list_events
from rankguard.server.storage.overlay import (
    layer_aggregate,
    quantity_targets,
    run_quantities,
    series_row,
)
from rankguard.server.storage.runs import project_names

MAX_RUNS = 6
DEFAULT_QUANTITY = "stable_rank"
# Aggregate columns: about a plot's width in pixels.
COLUMNS = 500
# The picker lists at most this many targets (a large model has thousands).
MAX_TARGETS = 2000
FIGURE_ID = "fig-compare"
LOSS_FIGURE_ID = "fig-compare-loss"
PALETTE = qualitative.D3


def default_aggregate(quantity: str) -> str:
    """The danger direction: the lowest layer for stable rank and the like, else the highest."""
    return "min" if quantity in LOW_IS_WORSE else "max"


def _labels(runs: Sequence[Run]) -> list[str]:
    """Run names, with an id prefix where two runs share a name."""
    names = [r.name for r in runs]
    return [f"{r.name} ({r.id[:8]})" if names.count(r.name) > 1 else r.name for r in runs]


def _line(session: Session, run_id: str, quantity: str, target: str) -> dict[str, Any] | None:
    """One target's series of a run (rank 0), downsampled to the plot's width."""
    row = series_row(session, run_id, quantity, target)
    read = read_lines(session, [row], max_points=MAX_POINTS) if row is not None else []
    return read[0] if read else None


def _aggregate(
    session: Session, run_id: str, quantity: str, agg: str, label: str, notes: list[str]
) -> dict[str, Any] | None:
    found = layer_aggregate(session, run_id, quantity, agg, columns=COLUMNS)
    if found is None:
        return None
    if found.source == "rollup":
        notes.append(f"{label}: {agg} over {found.targets} targets per {found.width} steps")
    elif found.source != "points":
        notes.append(f"{label}: {agg} over {found.targets} targets at {found.source}")
    elif found.width > 1:
        notes.append(f"{label}: {agg} over {found.targets} targets and {found.width} steps")
    return {"steps": found.steps, "values": found.values}


def payload(
    session: Session,
    runs: Sequence[Run],
    *,
    quantity: str,
    target: str | None,
    agg: str | None,
) -> dict[str, Any]:
    """Everything the compare page draws for ``runs`` (in the caller's order)."""
    ids = [r.id for r in runs]
    agg = agg or default_aggregate(quantity)
    names = project_names(session=session, ids={r.project_id for r in runs})
    panel: list[dict[str, Any]] = []
    loss: list[dict[str, Any]] = []
    meta: list[dict[str, Any]] = []
    notes: list[str] = []
    for i, (run, label) in enumerate(zip(runs, _labels(runs), strict=True)):
        colour = PALETTE[i % len(PALETTE)]
        events = marker_events(list_events(session=session, run_id=run.id, limit=10_000))
        if target:
            series = _line(session, run.id, quantity, target)
        else:
            series = _aggregate(session, run.id, quantity, agg, label, notes)
        panel.append({"label": label, "colour": colour, "series": series, "events": events})
        loss.append(
            {"label": label, "colour": colour, "events": events,
             "series": _line(session, run.id, "loss", "global")}
        )  # fmt: skip
        meta.append(
            {
                "id": run.id, "name": run.name, "label": label, "colour": colour,
                "project": names.get(run.project_id, ""), "status": run.status,
                "last_step": run.last_step, "has_data": series is not None,
            }
        )  # fmt: skip
    what = f"{quantity} · {target}" if target else f"{quantity} · {agg} over targets"
    figures = [
        overlay_figure(panel, figure_id=FIGURE_ID, title=what, y_title=quantity),
        overlay_figure(loss, figure_id=LOSS_FIGURE_ID, title="loss", y_title="loss"),
    ]
    targets = sorted(quantity_targets(session, ids, quantity), key=natural_key)
    return {
        "runs": meta,
        "quantity": quantity,
        "target": target,
        "agg": agg,
        "quantities": run_quantities(session, ids),
        "targets": targets[:MAX_TARGETS],
        "targets_total": len(targets),
        "notes": notes,
        # Small (a few lines of <= MAX_POINTS points): parsed back rather than spliced.
        "figures": [
            {"id": f.layout.meta["figure_id"], "figure": json.loads(figure_json(f))}
            for f in figures
        ],
    }
