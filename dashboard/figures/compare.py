"""Runs overlaid on one step axis: one line per run in the run's colour, and each run's
alerts and commands as vertical lines in that colour (dash by kind) with a hover marker that
names the run. Pure: data in, figure out.

``runs`` items: ``{"label", "colour", "series": {"steps", "values"} | None, "events":
[{"step", "kind", "label"}]}`` (events as ``events.marker_events`` gives them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go

from rankguard.dashboard.figures.common import (
    SeriesArrays,
    add_overlay_yaxis,
    base_layout,
    empty_figure,
    series_arrays,
)
from rankguard.dashboard.figures.lines import add_line_traces, add_nonfinite_markers
from rankguard.dashboard.figures.markers import MARKER_HEIGHT, normalise_events

# kind -> (line dash, marker symbol); other kinds are dotted circles.
_KIND_STYLE = {
    "alert": ("dash", "triangle-down"),
    "alert-resolved": ("dashdot", "triangle-up"),
    "intervention": ("solid", "diamond"),
}
_OTHER = ("dot", "circle")


def overlay_figure(
    runs: Sequence[Mapping[str, Any]],
    *,
    figure_id: str,
    title: str,
    y_title: str,
    log_y: bool = False,
) -> go.Figure:
    """One trace per run that has data, plus every run's event markers."""
    items: list[SeriesArrays] = []
    colours: list[str] = []
    for run in runs:
        series = run.get("series")
        if not series:
            continue
        [arrays] = series_arrays([{**series, "target": run["label"]}], None)
        if arrays.steps.size:
            items.append(arrays)
            colours.append(str(run["colour"]))
    if not items:
        return empty_figure(figure_id, title, y_title=y_title, message="no data for these runs")
    layout = base_layout(figure_id, title, x_title="step", y_title=y_title)
    if log_y:
        layout["yaxis"]["type"] = "log"
    layout["hovermode"] = "closest"
    layout["legend"] = {"orientation": "h", "y": -0.2}
    figure = go.Figure(layout=layout)
    add_nonfinite_markers(figure, add_line_traces(figure, items, colours=colours))
    _add_run_events(figure, runs)
    return figure


def _add_run_events(figure: go.Figure, runs: Sequence[Mapping[str, Any]]) -> None:
    """Each run's events: a line in its colour (dash by kind) and a hover marker naming it."""
    shapes = list(figure.layout.shapes or ())
    hover: list[tuple[str, list[tuple[int, str, str]]]] = []
    for run in runs:
        parsed = normalise_events(run.get("events") or ())
        if not parsed:
            continue
        colour = str(run["colour"])
        for step, kind, _ in parsed:
            dash, _symbol = _KIND_STYLE.get(kind, _OTHER)
            shapes.append(
                {
                    "type": "line", "name": f"event-{kind}", "xref": "x", "yref": "paper",
                    "x0": step, "x1": step, "y0": 0, "y1": 1, "layer": "above",
                    "line": {"color": colour, "width": 1.5, "dash": dash},
                }
            )  # fmt: skip
        hover.append(
            (
                colour,
                [
                    (s, k, f"{run['label']}: {k} at step {s}" + (f": {lab}" if lab else ""))
                    for s, k, lab in parsed
                ],
            )
        )
    if not hover:
        return
    figure.update_layout(shapes=shapes)
    yref = add_overlay_yaxis(figure)
    for colour, points in hover:
        figure.add_trace(
            go.Scatter(
                x=[s for s, _, _ in points],
                y=[MARKER_HEIGHT] * len(points),
                yaxis=yref,
                mode="markers",
                name="events",
                marker={
                    "symbol": [_KIND_STYLE.get(k, _OTHER)[1] for _, k, _ in points],
                    "size": 10,
                    "color": colour,
                },
                text=[t for _, _, t in points],
                hovertemplate="%{text}<extra></extra>",
                showlegend=False,
            )
        )
