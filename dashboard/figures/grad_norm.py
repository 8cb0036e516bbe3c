"""Gradient norm per step: the global norm drawn bold, per-parameter norms beside it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go

from rankguard.dashboard.figures.lines import line_figure

QUANTITY = "grad_norm"
FIGURE_ID = "fig-grad-norm"
TITLE = "Gradient norm"


def figure(
    series: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]] = (),
    *,
    log_y: bool = True,
) -> go.Figure:
    """Gradient norm against step (log axis by default: it spans orders of magnitude)."""
    return line_figure(
        series,
        events,
        quantity=QUANTITY,
        figure_id=FIGURE_ID,
        title=TITLE,
        y_title="‖g‖₂",
        log_y=log_y,
        emphasise="global",
    )
