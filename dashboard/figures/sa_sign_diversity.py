"""Sign diversity D = 2·min(p₊, 1−p₊) ∈ [0, 1] as a layer × step heatmap (0 = collapsed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go

from rankguard.dashboard.figures.common import DEFAULT_MAX_COLUMNS
from rankguard.dashboard.figures.heatmap import layer_heatmap

QUANTITY = "sa_sign_diversity"
FIGURE_ID = "fig-sa-sign-diversity"
TITLE = "Sign diversity (layer × step)"


def figure(
    series: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]] = (),
    *,
    max_columns: int = DEFAULT_MAX_COLUMNS,
) -> go.Figure:
    """Fixed colour range [0, 1], red at 0 (collapse); a binned cell shows its minimum."""
    return layer_heatmap(
        series,
        events,
        quantity=QUANTITY,
        figure_id=FIGURE_ID,
        title=TITLE,
        colorbar_title="D",
        reduce="min",
        colorscale="RdYlGn",
        zmin=0.0,
        zmax=1.0,
        max_columns=max_columns,
    )
