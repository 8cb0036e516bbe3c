"""The run page: which series each figure draws and how many points, the figures in page
order, their JSON payload and the ETag fingerprint of a run's data (the runs list is
``fleet``).

Shared by the dashboard's JSON endpoints (``dashboard.routes``) and the offline report
(``dashboard.report``). Every read goes through ``server.storage`` (``downsample`` for lines,
``heatmaps`` for the layer × step heatmaps, ``histograms``); this module decides what to read
and how much: a plot's width in pixels bounds every figure's points.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence

import plotly.graph_objects as go
from sqlalchemy.orm import Session

from rankguard.dashboard.events import marker_events
from rankguard.dashboard.figures import (
    attention_logit_max,
    grad_norm,
    jacobian_alignment,
    loss,
    sa_cosine,
    sa_sign_diversity,
    stable_rank,
)
from rankguard.dashboard.figures.common import figure_json, natural_key
from rankguard.dashboard.figures.heatmap import label_bins
from rankguard.server.models import Event, Run
from rankguard.server.storage.downsample import read_lines
from rankguard.server.storage.heatmaps import heatmap_rows
from rankguard.server.storage.histograms import sample_histograms
from rankguard.server.storage.points import (
    SeriesRow,
    run_series,
    series_peaks,
    series_targets,
)
from rankguard.server.storage.runs import content_marks

# Per-series cap of the line charts' downsampler (min/max buckets keep spikes): ~2 points
# per pixel of a plot's width; drawing more costs the browser time and shows nothing more.
MAX_POINTS = 1000
# Heatmap columns: more than a plot's width in pixels buys nothing but payload.
HEATMAP_COLUMNS = 500
# Line charts with more series than this keep the ones with the largest values (the
# interesting direction for gradient norms, logit maxima and a·M); the title says so.
MAX_LINES = 24
# sa_cosine histograms: at most this many distinct steps are read (evenly spaced).
MAX_HISTOGRAM_STEPS = 400

FIGURE_IDS: tuple[str, ...] = (
    loss.FIGURE_ID,
    grad_norm.FIGURE_ID,
    stable_rank.FIGURE_ID,
    sa_sign_diversity.FIGURE_ID,
    sa_cosine.FIGURE_ID,
    jacobian_alignment.FIGURE_ID,
    attention_logit_max.FIGURE_ID,
)


def pick_lines(
    session: Session, series: Sequence[SeriesRow], limit: int = MAX_LINES
) -> list[SeriesRow]:
    """At most ``limit`` series: ``global`` first, then those with the largest value (a NaN
    or +Inf anywhere ranks first)."""
    if len(series) <= limit:
        return list(series)
    peak = series_peaks(session, series)
    ranked = sorted(
        (s for s in series if s.id in peak),
        key=lambda s: (s.target != "global", -peak[s.id], natural_key(s.target)),
    )
    return ranked[:limit]


def _with_note(fig: go.Figure, kept: int, total: int) -> go.Figure:
    if total > kept:
        fig.layout.title.text = f"{fig.layout.title.text} (top {kept} of {total})"
    return fig


def build_figures(
    session: Session,
    run: Run,
    events: Sequence[Event],
    *,
    cosine_target: str | None = None,
) -> list[go.Figure]:
    """Every figure of the run page, in page order (``FIGURE_IDS``)."""
    markers = marker_events(events)
    by_quantity: dict[str, list[SeriesRow]] = {}
    for row in run_series(session, run.id):
        by_quantity.setdefault(row.quantity, []).append(row)

    def lines(quantity: str, build: Callable[..., go.Figure]) -> go.Figure:
        every = by_quantity.get(quantity, [])
        kept = pick_lines(session, every)
        read = read_lines(session, kept, max_points=MAX_POINTS)
        return _with_note(build(read, markers), len(kept), len(every))

    def heatmap(quantity: str, build: Callable[..., go.Figure]) -> go.Figure:
        read = heatmap_rows(
            session, by_quantity.get(quantity, []), last_step=run.last_step, columns=HEATMAP_COLUMNS
        )
        return label_bins(build(read.series, markers, max_columns=HEATMAP_COLUMNS), read.width)

    # Jacobian panels: the block pairs with the largest a·M (else a), the same pairs in both.
    gain_all = by_quantity.get(jacobian_alignment.GAIN_QUANTITY, [])
    align_all = by_quantity.get(jacobian_alignment.QUANTITY, [])
    chosen = pick_lines(session, gain_all or align_all)
    pairs = {s.target for s in chosen}
    jac_rows = [s for s in [*align_all, *gain_all] if s.target in pairs]
    n_pairs = len({s.target for s in [*align_all, *gain_all]})
    cosine = [
        s
        for s in by_quantity.get(sa_cosine.QUANTITY, [])
        if cosine_target is None or s.target == cosine_target
    ]
    histograms = sample_histograms(session, cosine, max_steps=MAX_HISTOGRAM_STEPS)
    return [
        lines(loss.QUANTITY, loss.figure),
        lines(grad_norm.QUANTITY, grad_norm.figure),
        heatmap(stable_rank.QUANTITY, stable_rank.figure),
        heatmap(sa_sign_diversity.QUANTITY, sa_sign_diversity.figure),
        sa_cosine.figure(histograms, markers, target=cosine_target),
        _with_note(
            jacobian_alignment.figure(
                read_lines(session, jac_rows, max_points=MAX_POINTS), markers
            ),
            len(pairs),
            n_pairs,
        ),
        lines(attention_logit_max.QUANTITY, attention_logit_max.figure),
    ]


def figure_payload(figures: Sequence[go.Figure]) -> str:
    """``[{"id": ..., "rev": ..., "figure": {...}}, ...]`` as JSON text, without re-parsing
    each figure's JSON (the heatmaps' typed arrays make those strings long). ``rev`` is a
    digest of the figure's JSON: a refreshing page redraws only the figures whose rev moved."""
    parts = []
    for fig in figures:
        text = figure_json(fig)
        rev = hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
        fid = json.dumps(fig.layout.meta["figure_id"])
        parts.append(f'{{"id":{fid},"rev":"{rev}","figure":{text}}}')
    return "[" + ",".join(parts) + "]"


def cosine_targets(session: Session, run_id: str) -> list[str]:
    """The targets with ``sa_cosine`` histograms, in natural order (the page's picker)."""
    return sorted(series_targets(session, run_id, sa_cosine.QUANTITY), key=natural_key)


def fingerprint(session: Session, run: Run) -> str:
    """Changes whenever anything the run page shows may have changed (new points move
    ``last_step``; alerts and acknowledged commands add events; histograms have their own
    step). Cheap: indexed aggregates only."""
    max_event, n_series, max_hist = content_marks(session=session, run_id=run.id)
    key = f"{run.id}|{run.status}|{run.last_step}|{max_event}|{n_series}|{max_hist}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]
