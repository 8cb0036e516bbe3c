"""Stable rank ‖W‖_F²/σ₁² as a layer × step heatmap (low is the danger direction)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go

from rankguard.dashboard.figures.common import DEFAULT_MAX_COLUMNS
from rankguard.dashboard.figures.heatmap import layer_heatmap

QUANTITY = "stable_rank"
FIGURE_ID = "fig-stable-rank"
TITLE = "Stable rank (layer × step)"


def figure(
    series: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]] = (),
    *,
    max_columns: int = DEFAULT_MAX_COLUMNS,
) -> go.Figure:
    """Rows are weight targets in model order; a binned cell shows its minimum (worst) value."""
    return layer_heatmap(
        series,
        events,
        quantity=QUANTITY,
        figure_id=FIGURE_ID,
        title=TITLE,
        colorbar_title="stable rank",
        reduce="min",
        colorscale="Viridis",
        max_columns=max_columns,
    )
