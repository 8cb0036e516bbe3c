"""Largest attention logit max |q·k|/√d_h per attention module (Wortsman et al. 2023)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go

from rankguard.dashboard.figures.lines import line_figure

QUANTITY = "attention_logit_max"
FIGURE_ID = "fig-attention-logit-max"
TITLE = "Attention logit max"


def figure(
    series: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]] = (),
    *,
    log_y: bool = True,
) -> go.Figure:
    """One line per attention module, in model order."""
    return line_figure(
        series,
        events,
        quantity=QUANTITY,
        figure_id=FIGURE_ID,
        title=TITLE,
        y_title="max |q·k|/√d_h",
        log_y=log_y,
    )
