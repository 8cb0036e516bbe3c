"""Training loss per step (one line per rank); NaN/Inf losses are marked, never dropped."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go

from rankguard.dashboard.figures.lines import line_figure

QUANTITY = "loss"
FIGURE_ID = "fig-loss"
TITLE = "Loss"


def figure(
    series: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]] = (),
    *,
    log_y: bool = False,
) -> go.Figure:
    """Loss against step; series of other quantities are ignored."""
    return line_figure(
        series,
        events,
        quantity=QUANTITY,
        figure_id=FIGURE_ID,
        title=TITLE,
        y_title="loss",
        log_y=log_y,
    )
