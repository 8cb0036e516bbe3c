"""Jacobian alignment per adjacent block pair: a (top) and a·M (bottom, with the a·M = 1 line).

a = |v₁(J⁽ˡ⁺¹⁾)ᵀu₁(J⁽ˡ⁾)| ∈ [0, 1]; a·M > 1 is the danger zone of MSign Thm 4.2. A block pair
keeps one colour in both panels and one legend entry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go

from rankguard.dashboard.figures.common import (
    base_layout,
    empty_figure,
    natural_key,
    series_arrays,
)
from rankguard.dashboard.figures.lines import add_line_traces, add_nonfinite_markers, colour
from rankguard.dashboard.figures.markers import add_event_markers

QUANTITY = "jacobian_alignment"
GAIN_QUANTITY = "jacobian_alignment_gain"
FIGURE_ID = "fig-jacobian-alignment"
TITLE = "Jacobian alignment per block pair"
REFERENCE_SHAPE_NAME = "reference-gain-1"


def figure(
    series: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]] = (),
    *,
    log_gain: bool = False,
) -> go.Figure:
    """`series` may hold both quantities; each panel picks its own, other quantities are ignored."""
    alignment = [s for s in series_arrays(series, QUANTITY) if s.steps.size]
    gain = [s for s in series_arrays(series, GAIN_QUANTITY) if s.steps.size]
    if not alignment and not gain:
        return empty_figure(FIGURE_ID, TITLE, y_title="a")

    layout = base_layout(FIGURE_ID, TITLE, x_title="step", y_title="a")
    layout["xaxis"]["anchor"] = "y2"
    layout["yaxis"].update({"domain": [0.55, 1.0], "range": [0, 1.05]})
    layout["yaxis2"] = {
        "domain": [0.0, 0.45],
        "anchor": "x",
        "title": {"text": "a·M"},
        "type": "log" if log_gain else "linear",
    }
    layout["hovermode"] = "closest"
    layout["height"] = 560
    layout["shapes"] = [
        {
            "type": "line",
            "name": REFERENCE_SHAPE_NAME,
            "xref": "paper",
            "yref": "y2",
            "x0": 0,
            "x1": 1,
            "y0": 1,
            "y1": 1,
            "line": {"color": "#d62728", "width": 1, "dash": "dash"},
        }
    ]
    layout["annotations"] = [
        {
            "text": "a·M = 1",
            "xref": "paper",
            "yref": "y2",
            "x": 1.0,
            "y": 1,
            "xanchor": "right",
            "yanchor": "bottom",
            "showarrow": False,
            "font": {"size": 10, "color": "#d62728"},
        }
    ]
    figure = go.Figure(layout=layout)

    # One colour per block pair across both panels, one legend entry per pair.
    pairs = sorted({s.target for s in alignment} | {s.target for s in gain}, key=natural_key)
    position = {pair: index for index, pair in enumerate(pairs)}
    panels = ((alignment, "y", "", True), (gain, "y2", " (a·M)", not alignment))
    for items, yaxis, suffix, showlegend in panels:
        if not items:
            continue
        points = add_line_traces(
            figure,
            items,
            yaxis=yaxis,
            name_suffix=suffix,
            showlegend=showlegend,
            colours=[colour(position[item.target]) for item in items],
        )
        add_nonfinite_markers(figure, points, overlaying=yaxis)
    return add_event_markers(figure, events)
