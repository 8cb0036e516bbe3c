"""Shared pieces of the figure builders: value normalisation, natural ordering,
the common step grid, the empty figure and JSON serialisation.

Builders take plain Python data shaped like the series API response (docs/contract.md):
``{"quantity", "target", "rank", "steps": [...], "values": [...]}``. Values may be floats,
``None``, non-finite floats or the wire strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import plotly.graph_objects as go
import plotly.io as pio

# The series API downsamples to max_points=2000 by default; one column per returned point.
DEFAULT_MAX_COLUMNS = 2000
NO_DATA_TEXT = "no data yet"
# Spans up to this many steps find distinct steps with a boolean mask (16 MiB at most).
_MASK_SPAN_LIMIT = 1 << 24
TEMPLATE = "plotly_white"


def to_float_array(values: Iterable[Any], *, field: str = "values") -> npt.NDArray[np.float64]:
    """Normalises wire values to float64: ``None`` and ``"NaN"`` -> NaN, ``"Infinity"`` -> inf.

    Raises ValueError naming `field` and the offending value when a value is not a number.
    """
    seq = values if isinstance(values, (list, tuple, np.ndarray)) else list(values)
    try:
        # numpy parses the wire strings itself (float("Infinity") == inf), in C.
        return np.asarray(seq, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        pass
    for value in seq:
        try:
            float(value if value is not None else math.nan)
        except (TypeError, ValueError):
            raise ValueError(
                f"{field}: {value!r} is not a number; valid values are numbers, null, "
                '"NaN", "Infinity" or "-Infinity"'
            ) from None
    raise ValueError(f"{field}: cannot be read as a flat list of numbers")


_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders embedded numbers numerically: ``h.2`` < ``h.10`` (model order)."""
    # (kind, value) pairs keep ints and strs comparable: digits sort before text at a position.
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in _DIGITS.split(name) if part
    )


@dataclass(frozen=True)
class SeriesArrays:
    """One series, normalised: int64 steps and float64 values of equal length."""

    target: str
    rank: int
    steps: npt.NDArray[np.int64]
    values: npt.NDArray[np.float64]


def series_arrays(series: Sequence[Mapping[str, Any]], quantity: str | None) -> list[SeriesArrays]:
    """Normalises and validates series (keeping those of `quantity` if given), in model order."""
    out: list[SeriesArrays] = []
    for index, item in enumerate(series):
        if quantity is not None and item.get("quantity", quantity) != quantity:
            continue
        target = str(item.get("target", "global"))
        steps_raw = item.get("steps", ())
        values = to_float_array(item.get("values", ()), field=f"series[{index}].values")
        try:
            steps = np.asarray(steps_raw, dtype=np.int64).reshape(-1)
        except (TypeError, ValueError):
            raise ValueError(
                f"series[{index}].steps: {list(steps_raw)[:5]!r}... must be integers"
            ) from None
        if steps.shape != values.shape:
            raise ValueError(
                f"series[{index}] ({target!r}): {steps.size} steps but {values.size} values; "
                "they must be the same length"
            )
        out.append(SeriesArrays(target, int(item.get("rank", 0) or 0), steps, values))
    out.sort(key=lambda s: (natural_key(s.target), s.rank))
    return out


def row_labels(items: Sequence[SeriesArrays]) -> list[str]:
    """One label per series: the target, with its rank when several ranks are present."""
    ranks = {s.rank for s in items}
    if len(ranks) <= 1:
        return [s.target for s in items]
    return [f"{s.target} (rank {s.rank})" for s in items]


@dataclass(frozen=True)
class StepGrid:
    """The shared step axis of a heatmap: one column per distinct step, or equal-width bins.

    `starts` holds each column's first step; `width` is 0 for the exact grid (columns are the
    union of the steps) and the bin width in steps otherwise.
    """

    starts: npt.NDArray[np.int64]
    width: int
    # Exact grids over a modest span: column of step s is lookup[s - starts[0]] (one gather,
    # several times faster than a binary search per step).
    lookup: npt.NDArray[np.int64] | None = None

    @classmethod
    def build(cls, steps: npt.NDArray[np.int64], max_columns: int) -> StepGrid:
        if max_columns < 1:
            raise ValueError(f"max_columns: {max_columns} must be >= 1")
        if steps.size == 0:
            return cls(np.zeros(0, dtype=np.int64), 0)
        lo, hi = int(steps.min()), int(steps.max())
        union = _distinct(steps, lo, hi)
        if union.size <= max_columns:
            lookup = None
            if hi - lo + 1 <= _MASK_SPAN_LIMIT:
                lookup = np.zeros(hi - lo + 1, dtype=np.int64)
                lookup[union - lo] = np.arange(union.size, dtype=np.int64)
            return cls(union, 0, lookup)
        # Downsampled series rarely share steps; equal-width bins align them.
        width = -(-(hi - lo + 1) // max_columns)
        count = (hi - lo) // width + 1
        return cls(lo + width * np.arange(count, dtype=np.int64), width)

    @property
    def size(self) -> int:
        return int(self.starts.size)

    def columns(self, steps: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Column index of each step (every step must lie within the grid's range)."""
        if self.width == 0:
            if self.lookup is not None:
                looked_up: npt.NDArray[np.int64] = self.lookup[steps - self.starts[0]]
                return looked_up
            return np.searchsorted(self.starts, steps).astype(np.int64)
        binned: npt.NDArray[np.int64] = (steps - self.starts[0]) // self.width
        return binned

    def axis_title(self) -> str:
        return "step" if self.width == 0 else f"step (bins of {self.width})"


def _distinct(steps: npt.NDArray[np.int64], lo: int, hi: int) -> npt.NDArray[np.int64]:
    """Sorted distinct steps. A presence mask over [lo, hi] is O(n + span) and, for millions of
    steps, several times faster than np.unique (hash or sort); huge spans fall back to a sort."""
    span = hi - lo + 1
    if span <= _MASK_SPAN_LIMIT:
        present = np.zeros(span, dtype=bool)
        present[steps - lo] = True
        return np.flatnonzero(present).astype(np.int64) + lo
    ordered = np.sort(steps)
    return ordered[np.r_[True, ordered[1:] != ordered[:-1]]]


def base_layout(figure_id: str, title: str, *, x_title: str, y_title: str) -> dict[str, Any]:
    """Layout shared by every builder; `meta.figure_id` is the stable id pages use for the div."""
    return {
        "title": {"text": title},
        "meta": {"figure_id": figure_id},
        "template": TEMPLATE,
        "xaxis": {"title": {"text": x_title}},
        "yaxis": {"title": {"text": y_title}},
        "margin": {"l": 60, "r": 20, "t": 50, "b": 50},
        # Keeps zoom across data refreshes of the same figure.
        "uirevision": figure_id,
    }


def empty_figure(
    figure_id: str,
    title: str,
    *,
    x_title: str = "step",
    y_title: str = "",
    message: str = NO_DATA_TEXT,
) -> go.Figure:
    """A figure with no traces and a centred `message` annotation (never an exception)."""
    layout = base_layout(figure_id, title, x_title=x_title, y_title=y_title)
    layout["annotations"] = [
        {
            "text": message,
            "name": "no-data",
            "xref": "paper",
            "yref": "paper",
            "x": 0.5,
            "y": 0.5,
            "showarrow": False,
            "font": {"size": 16, "color": "#777"},
        }
    ]
    layout["xaxis"]["visible"] = False
    layout["yaxis"]["visible"] = False
    return go.Figure(layout=layout)


def figure_json(figure: go.Figure) -> str:
    """Serialises a figure for the page; numpy arrays travel as base64 typed arrays (compact)."""
    return str(pio.to_json(figure, validate=False))


def add_overlay_yaxis(figure: go.Figure, *, overlaying: str = "y") -> str:
    """Adds a hidden [0, 1] y axis over `overlaying` and returns its trace reference ("y3").

    Markers that must sit at a fixed height whatever the data axis shows (event markers,
    non-finite points on a log axis) are drawn on it.
    """
    keys = figure.layout.to_plotly_json()
    used = [int(key[5:] or 1) for key in keys if re.fullmatch(r"yaxis\d*", key)]
    number = max([1, *used]) + 1
    figure.update_layout(
        {
            f"yaxis{number}": {
                "overlaying": overlaying,
                "range": [0, 1],
                "visible": False,
                "fixedrange": True,
                "showgrid": False,
            }
        }
    )
    return f"y{number}"
