"""Line charts shared by the per-step quantities (loss, gradient norm, logit max, alignment).

One trace per series, in model order. NaN and ±Inf points break the line (a gap) and are drawn
as markers on a hidden [0, 1] overlay axis (top for NaN and +Inf, bottom for -Inf), so they
show on log axes too and their hover says what the value was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative

from rankguard.dashboard.figures.common import (
    SeriesArrays,
    add_overlay_yaxis,
    base_layout,
    empty_figure,
    row_labels,
    series_arrays,
)
from rankguard.dashboard.figures.markers import add_event_markers

MAX_NONFINITE_MARKERS = 5000
PALETTE = qualitative.Plotly
# (test, name, symbol, height on the overlay axis)
_NONFINITE_STYLE = (
    (np.isnan, "NaN", "x", 0.9),
    (np.isposinf, "+Inf", "triangle-up", 0.9),
    (np.isneginf, "-Inf", "triangle-down", 0.1),
)


def colour(index: int) -> str:
    return str(PALETTE[index % len(PALETTE)])


def add_line_traces(
    figure: go.Figure,
    items: Sequence[SeriesArrays],
    *,
    xaxis: str = "x",
    yaxis: str = "y",
    showlegend: bool = True,
    emphasise: str | None = None,
    name_suffix: str = "",
    colours: Sequence[str] | None = None,
) -> list[tuple[str, int, str, str]]:
    """Adds one line per series; returns its non-finite points as (label, step, kind, colour).

    `colours` (one per item) overrides the palette, e.g. to keep a target's colour across panels.
    """
    nonfinite: list[tuple[str, int, str, str]] = []
    if colours is None:
        colours = [colour(index) for index in range(len(items))]
    for item, label, line_colour in zip(items, row_labels(items), colours, strict=True):
        finite = np.isfinite(item.values)
        y = np.where(finite, item.values, np.nan)
        width = 3.0 if emphasise is not None and item.target == emphasise else 1.5
        figure.add_trace(
            go.Scatter(
                x=item.steps,
                y=y,
                mode="lines",
                name=label + name_suffix,
                legendgroup=label,
                showlegend=showlegend,
                connectgaps=False,
                line={"color": line_colour, "width": width},
                xaxis=xaxis,
                yaxis=yaxis,
                hovertemplate=f"{label}<br>step %{{x}}<br>%{{y:.4g}}<extra></extra>",
            )
        )
        if finite.all():
            continue
        for test, kind, _, _ in _NONFINITE_STYLE:
            for step in item.steps[test(item.values)][:MAX_NONFINITE_MARKERS]:
                nonfinite.append((label, int(step), kind, line_colour))
    return nonfinite


def add_nonfinite_markers(
    figure: go.Figure,
    points: Sequence[tuple[str, int, str, str]],
    *,
    xaxis: str = "x",
    overlaying: str = "y",
) -> None:
    """Markers for non-finite points, earliest first, at most MAX_NONFINITE_MARKERS."""
    if not points:
        return
    ordered = sorted(points, key=lambda p: p[1])[:MAX_NONFINITE_MARKERS]
    yref = add_overlay_yaxis(figure, overlaying=overlaying)
    for _, kind, symbol, height in _NONFINITE_STYLE:
        mine = [p for p in ordered if p[2] == kind]
        if not mine:
            continue
        figure.add_trace(
            go.Scatter(
                x=[p[1] for p in mine],
                y=[height] * len(mine),
                xaxis=xaxis,
                yaxis=yref,
                mode="markers",
                name=f"{kind} values",
                marker={"symbol": symbol, "size": 9, "color": [p[3] for p in mine]},
                text=[f"{p[0]}: {kind} at step {p[1]}" for p in mine],
                hovertemplate="%{text}<extra></extra>",
            )
        )


def line_figure(
    series: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]] = (),
    *,
    quantity: str,
    figure_id: str,
    title: str,
    y_title: str,
    log_y: bool = False,
    emphasise: str | None = None,
) -> go.Figure:
    """Line chart of `quantity`: one trace per (target, rank), events as markers."""
    items = [s for s in series_arrays(series, quantity) if s.steps.size]
    if not items:
        return empty_figure(figure_id, title, y_title=y_title)
    layout = base_layout(figure_id, title, x_title="step", y_title=y_title)
    if log_y:
        layout["yaxis"]["type"] = "log"
    layout["hovermode"] = "closest"
    figure = go.Figure(layout=layout)
    points = add_line_traces(figure, items, emphasise=emphasise)
    add_nonfinite_markers(figure, points)
    return add_event_markers(figure, events)
