"""Alert and intervention markers for any figure: a vertical line per event plus a hover point.

Plotly shapes carry no hover text, so each event is a line shape (spanning the plot height)
and a marker on a hidden [0, 1] overlay axis at the top of the plot, whose hover says what
happened.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go

from rankguard.dashboard.figures.common import add_overlay_yaxis

# kind -> (colour, line dash, marker symbol). Anything else is drawn as a neutral event.
STYLES: dict[str, tuple[str, str, str]] = {
    "alert": ("#d62728", "dash", "triangle-down"),
    "intervention": ("#2ca02c", "solid", "diamond"),
    "alert-resolved": ("#2ca02c", "dashdot", "triangle-up"),
    "rollback": ("#9467bd", "dashdot", "x"),
    "skip_step": ("#ff7f0e", "dot", "x-thin-open"),
    "onset": ("#8c564b", "dot", "star"),
}
OTHER_STYLE = ("#7f7f7f", "dot", "circle")
# The hover markers sit just under the top edge of the plot area.
MARKER_HEIGHT = 0.97


def normalise_events(events: Sequence[Mapping[str, Any]]) -> list[tuple[int, str, str]]:
    """(step, kind, label) per event, sorted by step; raises ValueError naming a bad field."""
    out: list[tuple[int, str, str]] = []
    for index, event in enumerate(events):
        step = event.get("step")
        try:
            step_int = int(step)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(f"events[{index}].step: {step!r} is not an integer step") from None
        out.append((step_int, str(event.get("kind") or "event"), str(event.get("label") or "")))
    out.sort(key=lambda e: e[0])
    return out


def add_event_markers(
    figure: go.Figure,
    events: Sequence[Mapping[str, Any]],
    *,
    xref: str = "x",
    overlaying: str = "y",
) -> go.Figure:
    """Draws `events` on `figure` (in place; also returned) against its step axis `xref`.

    Shapes are named ``event-<kind>``; hover traces are named ``<kind> markers``.
    """
    parsed = normalise_events(events)
    if not parsed:
        return figure
    shapes = list(figure.layout.shapes or ())
    by_kind: dict[str, list[tuple[int, str]]] = {}
    for step, kind, label in parsed:
        colour, dash, _ = STYLES.get(kind, OTHER_STYLE)
        shapes.append(
            {
                "type": "line",
                "name": f"event-{kind}",
                "xref": xref,
                "yref": "paper",
                "x0": step,
                "x1": step,
                "y0": 0,
                "y1": 1,
                "line": {"color": colour, "width": 1.5, "dash": dash},
                "layer": "above",
            }
        )
        by_kind.setdefault(kind, []).append((step, label))
    figure.update_layout(shapes=shapes)
    yref = add_overlay_yaxis(figure, overlaying=overlaying)
    for kind, items in by_kind.items():
        colour, _, symbol = STYLES.get(kind, OTHER_STYLE)
        figure.add_trace(
            go.Scatter(
                x=[step for step, _ in items],
                y=[MARKER_HEIGHT] * len(items),
                xaxis=xref,
                yaxis=yref,
                mode="markers",
                name=f"{kind} markers",
                marker={"symbol": symbol, "size": 11, "color": colour},
                text=[
                    f"{kind} at step {step}: {label}" if label else f"{kind} at step {step}"
                    for step, label in items
                ],
                hovertemplate="%{text}<extra></extra>",
                showlegend=False,
            )
        )
    return figure
