"""The layer × step heatmap shared by the per-layer quantities (stable rank, sign diversity).

Rows are targets in model order (natural sort), columns a step grid shared by every row (the
union of the steps, or equal-width bins when downsampled series disagree). Everything is done
on flat numpy arrays: one sort at most, then ``reduceat`` per cell; no per-cell Python loop.

Non-finite data: a cell whose data is all NaN is a gap; ±Inf is clipped to the colour range;
every cell that saw a non-finite value gets a marker whose hover says which (capped at
`max_flag_markers`, earliest steps first).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import plotly.graph_objects as go

from rankguard.dashboard.figures.common import (
    DEFAULT_MAX_COLUMNS,
    StepGrid,
    base_layout,
    empty_figure,
    row_labels,
    series_arrays,
)
from rankguard.dashboard.figures.markers import add_event_markers

Reduce = Literal["min", "max", "mean"]

MAX_FLAG_MARKERS = 5000
# Bits of the per-cell non-finite flags.
FLAG_NAN, FLAG_POSINF, FLAG_NEGINF = 1, 2, 4
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# Marker symbol per flag, highest priority first (a cell may have seen several kinds).
_FLAG_STYLE = (
    (FLAG_POSINF, "+Inf (clipped)", "triangle-up"),
    (FLAG_NEGINF, "-Inf (clipped)", "triangle-down"),
    (FLAG_NAN, "NaN", "x"),
)


def _reduce_cells(
    key: npt.NDArray[np.int64], values: npt.NDArray[np.float64], reduce: Reduce
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.uint8]]:
    """Groups equal `key`s (flat cell index) and reduces their finite values.

    Returns (cell index, reduced value or NaN when no finite value, OR of non-finite flags).
    """
    if key.size > 1 and bool(np.any(key[1:] < key[:-1])):
        order = np.argsort(key, kind="stable")
        key, values = key[order], values[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    finite = np.isfinite(values)
    codes = np.zeros(values.shape, dtype=np.uint8)
    codes[np.isnan(values)] = FLAG_NAN
    codes[np.isposinf(values)] = FLAG_POSINF
    codes[np.isneginf(values)] = FLAG_NEGINF
    if starts.size == key.size:
        # One point per cell (the common case: series on shared steps): nothing to reduce.
        return key, np.where(finite, values, np.nan), codes
    flags = np.bitwise_or.reduceat(codes, starts)
    if reduce == "mean":
        sums = np.add.reduceat(np.where(finite, values, 0.0), starts)
        counts = np.add.reduceat(finite.astype(np.int64), starts)
        reduced = np.divide(sums, counts, out=np.full(sums.shape, np.nan), where=counts > 0)
    else:
        # fmin/fmax skip NaN, so a cell is NaN only when it has no finite value.
        ufunc = np.fmin if reduce == "min" else np.fmax
        reduced = ufunc.reduceat(np.where(finite, values, np.nan), starts)
    return key[starts], reduced, flags


def layer_heatmap(
    series: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]] = (),
    *,
    quantity: str,
    figure_id: str,
    title: str,
    colorbar_title: str,
    reduce: Reduce = "min",
    colorscale: str = "Viridis",
    zmin: float | None = None,
    zmax: float | None = None,
    max_columns: int = DEFAULT_MAX_COLUMNS,
    max_flag_markers: int = MAX_FLAG_MARKERS,
) -> go.Figure:
    """Heatmap of `quantity` (targets × steps); several points in one cell are `reduce`d."""
    items = [s for s in series_arrays(series, quantity) if s.steps.size]
    if not items:
        return empty_figure(figure_id, title, y_title="target")

    # Series with the same label (a repeated target) share one row.
    labels: list[str] = []
    row_of: dict[str, int] = {}
    item_rows = []
    for label in row_labels(items):
        item_rows.append(row_of.setdefault(label, len(row_of)))
        if len(row_of) > len(labels):
            labels.append(label)
    sizes = [s.steps.size for s in items]
    rows = np.repeat(np.asarray(item_rows, dtype=np.int64), sizes)
    steps = np.concatenate([s.steps for s in items])
    values = np.concatenate([s.values for s in items])

    grid = StepGrid.build(steps, max_columns)
    n_rows, n_cols = len(labels), grid.size
    cells, reduced, flags = _reduce_cells(rows * n_cols + grid.columns(steps), values, reduce)

    finite_cells = np.isfinite(reduced)
    has_finite = bool(finite_cells.any())
    lo = zmin if zmin is not None else (float(reduced[finite_cells].min()) if has_finite else 0.0)
    hi = zmax if zmax is not None else (float(reduced[finite_cells].max()) if has_finite else 1.0)
    if hi <= lo:
        hi = lo + 1.0
    # Cells that saw only ±Inf are drawn at the end of the colour range they point to.
    only_inf = ~finite_cells & ((flags & (FLAG_POSINF | FLAG_NEGINF)) > 0)
    reduced[only_inf & ((flags & FLAG_NEGINF) > 0)] = lo
    reduced[only_inf & ((flags & FLAG_POSINF) > 0)] = hi

    # float32 halves the payload; values beyond its range are clipped, not turned into inf.
    z = np.full(n_rows * n_cols, np.nan, dtype=np.float32)
    z[cells] = np.clip(reduced, -_FLOAT32_MAX, _FLOAT32_MAX).astype(np.float32)
    grid_z = z.reshape(n_rows, n_cols)

    layout = base_layout(figure_id, title, x_title=grid.axis_title(), y_title="target")
    layout["yaxis"].update({"type": "category", "autorange": "reversed", "automargin": True})
    layout["height"] = int(min(900, max(320, 120 + 14 * n_rows)))
    figure = go.Figure(layout=layout)
    figure.add_trace(
        go.Heatmap(
            z=grid_z,
            x=grid.starts,
            y=labels,
            zmin=lo,
            zmax=hi,
            colorscale=colorscale,
            colorbar={"title": {"text": colorbar_title}},
            hoverongaps=False,
            hovertemplate="%{y}<br>step %{x}<br>" + colorbar_title + " %{z:.4g}<extra></extra>",
            name=quantity,
        )
    )
    _add_flag_markers(figure, cells, flags, grid, labels, n_cols, max_flag_markers)
    return add_event_markers(figure, events)


def _add_flag_markers(
    figure: go.Figure,
    cells: npt.NDArray[np.int64],
    flags: npt.NDArray[np.uint8],
    grid: StepGrid,
    labels: Sequence[str],
    n_cols: int,
    max_markers: int,
) -> None:
    """One marker per cell that saw a non-finite value (earliest steps first, capped)."""
    flagged = np.flatnonzero(flags)
    if flagged.size == 0:
        return
    rows, cols = cells[flagged] // n_cols, cells[flagged] % n_cols
    order = np.lexsort((rows, cols))[:max_markers]
    rows, cols, cell_flags = rows[order], cols[order], flags[flagged][order]
    # One trace per marker kind; the loop runs over at most `max_markers` flagged cells.
    claimed = np.zeros(cell_flags.shape, dtype=bool)
    for bit, name, symbol in _FLAG_STYLE:
        mine = ((cell_flags & bit) > 0) & ~claimed
        claimed |= mine
        if not mine.any():
            continue
        text = [
            _flag_text(labels[r], grid, int(c), int(f))
            for r, c, f in zip(rows[mine], cols[mine], cell_flags[mine], strict=True)
        ]
        figure.add_trace(
            go.Scatter(
                x=grid.starts[cols[mine]],
                y=[labels[r] for r in rows[mine]],
                mode="markers",
                name=name,
                marker={"symbol": symbol, "size": 7, "color": "#000", "line": {"width": 1}},
                text=text,
                hovertemplate="%{text}<extra></extra>",
            )
        )
    total = int(flagged.size)
    shown = min(total, max_markers)
    note = f"{total} non-finite cells" + (f" ({shown} marked)" if shown < total else "")
    figure.add_annotation(
        text=note,
        name="non-finite",
        xref="paper",
        yref="paper",
        x=1.0,
        y=1.02,
        xanchor="right",
        yanchor="bottom",
        showarrow=False,
        font={"size": 11, "color": "#b00"},
    )


def _flag_text(label: str, grid: StepGrid, col: int, flags: int) -> str:
    start = int(grid.starts[col])
    where = f"step {start}" if grid.width == 0 else f"steps {start}-{start + grid.width - 1}"
    kinds = [name for bit, name, _ in _FLAG_STYLE if flags & bit]
    return f"{label}<br>{where}: {', '.join(kinds)}"


def label_bins(figure: go.Figure, width: int) -> go.Figure:
    """Names the column width of a heatmap built from series binned beforehand (one point per
    column, at its first step; e.g. read from a rollup), in place; also returned. The builder
    sees distinct steps only and cannot know how wide a column is."""
    if width <= 1 or not figure.data:
        return figure
    figure.layout.xaxis.title.text = f"step (bins of {width})"
    for trace in figure.data:
        if trace.type == "heatmap" and trace.hovertemplate:
            trace.hovertemplate = trace.hovertemplate.replace(
                "step %{x}", f"steps %{{x}} + {width - 1}"
            )
    return figure
