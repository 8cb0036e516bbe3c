"""Distribution of the cosines ⟨xₙ, v₁⟩/‖xₙ‖ over time: a heatmap of bins × step.

Each column is the fraction of sampled tokens per cosine bin at that step, so columns with
different sample sizes compare. A distribution that drifts to one side (all cosines of one
sign) is the collapse the sign-diversity statistic summarises.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go

from rankguard.dashboard.figures.common import (
    DEFAULT_MAX_COLUMNS,
    StepGrid,
    base_layout,
    empty_figure,
    to_float_array,
)
from rankguard.dashboard.figures.markers import add_event_markers

QUANTITY = "sa_cosine"
FIGURE_ID = "fig-sa-cosine"
TITLE = "Cosine to v₁ (distribution × step)"
# The probe's default: 41 bins on [-1, 1] (docs/contract.md).
DEFAULT_EDGES = np.linspace(-1.0, 1.0, 42)


def figure(
    histograms: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]] = (),
    *,
    target: str | None = None,
    max_columns: int = DEFAULT_MAX_COLUMNS,
) -> go.Figure:
    """Heatmap of `sa_cosine` histograms of `target` (all targets summed when None).

    Histograms with other edges than the first one are re-binned onto its edges by bin centre.
    """
    title = TITLE if target is None else f"{TITLE}: {target}"
    chosen = [
        h
        for h in histograms
        if h.get("quantity", QUANTITY) == QUANTITY and (target is None or h.get("target") == target)
    ]
    if not chosen:
        return empty_figure(FIGURE_ID, title, y_title="cosine")

    edges = to_float_array(chosen[0].get("edges", DEFAULT_EDGES), field="histograms[0].edges")
    if edges.size < 2 or not np.all(np.diff(edges) > 0):
        raise ValueError(f"histograms[0].edges: {edges.tolist()!r} must be >= 2 increasing values")
    n_bins = edges.size - 1
    steps = np.asarray([int(h.get("step", 0)) for h in chosen], dtype=np.int64)
    grid = StepGrid.build(steps, max_columns)
    columns = grid.columns(steps)

    counts = np.zeros((n_bins, grid.size), dtype=np.float64)
    # One numpy call per histogram (a column), never per cell.
    for index, (hist, col) in enumerate(zip(chosen, columns, strict=True)):
        c = np.nan_to_num(
            to_float_array(hist.get("counts", ()), field=f"histograms[{index}].counts"),
            nan=0.0,
            posinf=0.0,
            neginf=0.0,
        )
        e = to_float_array(hist.get("edges", edges), field=f"histograms[{index}].edges")
        if e.size != c.size + 1:
            raise ValueError(
                f"histograms[{index}]: {e.size} edges for {c.size} counts; need counts + 1 edges"
            )
        if e.size == edges.size and np.array_equal(e, edges):
            counts[:, col] += c
        else:
            centres = (e[:-1] + e[1:]) / 2
            rows = np.clip(np.searchsorted(edges, centres, side="right") - 1, 0, n_bins - 1)
            np.add.at(counts[:, col], rows, c)

    totals = counts.sum(axis=0)
    # Columns with no samples stay gaps (NaN), not zeros.
    fractions = np.divide(
        counts, totals, out=np.full(counts.shape, np.nan), where=totals[None, :] > 0
    )
    layout = base_layout(FIGURE_ID, title, x_title=grid.axis_title(), y_title="cosine")
    layout["height"] = 420
    fig = go.Figure(layout=layout)
    fig.add_trace(
        go.Heatmap(
            z=fractions.astype(np.float32),
            x=grid.starts,
            y=(edges[:-1] + edges[1:]) / 2,
            zmin=0.0,
            colorscale="Blues",
            colorbar={"title": {"text": "fraction"}},
            hoverongaps=False,
            hovertemplate="step %{x}<br>cosine ≈ %{y:.3f}<br>fraction %{z:.3f}<extra></extra>",
            name=QUANTITY,
        )
    )
    return add_event_markers(fig, events)
