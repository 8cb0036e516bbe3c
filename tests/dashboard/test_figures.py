"""Figure builders on synthetic series: traces, matrix shapes, axes, markers, NaN/Inf, ordering."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from rankguard.dashboard.figures import (
    attention_logit_max,
    grad_norm,
    jacobian_alignment,
    loss,
    sa_cosine,
    sa_sign_diversity,
    stable_rank,
)
from rankguard.dashboard.figures.common import (
    NO_DATA_TEXT,
    StepGrid,
    figure_json,
    natural_key,
    to_float_array,
)
from rankguard.dashboard.figures.markers import add_event_markers

SERIES_BUILDERS = [loss, grad_norm, attention_logit_max, stable_rank, sa_sign_diversity]
ALL_BUILDERS = [*SERIES_BUILDERS, jacobian_alignment, sa_cosine]
EVENTS = [
    {"step": 20, "kind": "alert", "label": "stable rank collapse in h.1"},
    {"step": 30, "kind": "intervention", "label": "msign attention"},
]


def series(quantity: str, target: str, steps: list[int], values: list[Any], rank: int = 0) -> dict:
    return {"quantity": quantity, "target": target, "rank": rank, "steps": steps, "values": values}


def traces_named(fig: Any, name: str) -> list[Any]:
    return [t for t in fig.data if t.name == name]


# --- shared helpers ---------------------------------------------------------------------


def test_to_float_array_reads_wire_strings_and_none() -> None:
    out = to_float_array([1.5, "NaN", "Infinity", "-Infinity", None, float("inf")])
    assert out[0] == 1.5
    assert math.isnan(out[1]) and math.isnan(out[4])
    assert out[2] == math.inf and out[5] == math.inf and out[3] == -math.inf


def test_to_float_array_names_the_field_and_value() -> None:
    with pytest.raises(ValueError, match=r"series\[3\]\.values: 'oops' is not a number"):
        to_float_array([1.0, "oops"], field="series[3].values")


def test_natural_key_orders_numbers_numerically() -> None:
    names = ["h.10.attn", "h.2.attn", "h.1.mlp", "h.1.attn", "embed"]
    assert sorted(names, key=natural_key) == [
        "embed",
        "h.1.attn",
        "h.1.mlp",
        "h.2.attn",
        "h.10.attn",
    ]


def test_step_grid_exact_when_union_fits_and_binned_otherwise() -> None:
    steps = np.array([0, 10, 10, 30], dtype=np.int64)
    exact = StepGrid.build(steps, max_columns=10)
    assert exact.width == 0
    assert exact.starts.tolist() == [0, 10, 30]
    assert exact.columns(steps).tolist() == [0, 1, 1, 2]
    binned = StepGrid.build(np.arange(0, 100, dtype=np.int64), max_columns=10)
    assert binned.width == 10
    assert binned.size == 10
    assert binned.columns(np.array([0, 9, 10, 99])).tolist() == [0, 0, 1, 9]
    assert "bins of 10" in binned.axis_title()


def test_step_grid_over_a_huge_span_finds_columns_by_search() -> None:
    steps = np.array([5, 1 << 30, 5, 7], dtype=np.int64)
    grid = StepGrid.build(steps, max_columns=10)
    assert grid.lookup is None
    assert grid.starts.tolist() == [5, 7, 1 << 30]
    assert grid.columns(steps).tolist() == [0, 2, 0, 1]


def test_step_grid_rejects_zero_columns() -> None:
    with pytest.raises(ValueError, match="max_columns: 0"):
        StepGrid.build(np.arange(3, dtype=np.int64), max_columns=0)


# --- empty input --------------------------------------------------------------------------


@pytest.mark.parametrize("builder", ALL_BUILDERS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_empty_input_gives_no_data_annotation(builder: Any) -> None:
    fig = builder.figure([], EVENTS)
    assert len(fig.data) == 0
    assert [a.text for a in fig.layout.annotations] == [NO_DATA_TEXT]
    assert fig.layout.meta["figure_id"] == builder.FIGURE_ID


@pytest.mark.parametrize("builder", SERIES_BUILDERS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_series_of_other_quantities_or_without_points_count_as_empty(builder: Any) -> None:
    fig = builder.figure(
        [series("not_this_one", "global", [1], [1.0]), series(builder.QUANTITY, "x", [], [])]
    )
    assert len(fig.data) == 0
    assert fig.layout.annotations[0].text == NO_DATA_TEXT


def test_figure_ids_are_distinct_and_dom_friendly() -> None:
    ids = [b.FIGURE_ID for b in ALL_BUILDERS]
    assert len(set(ids)) == len(ids)
    for figure_id in ids:
        assert figure_id.startswith("fig-")
        assert all(c.isalnum() or c == "-" for c in figure_id)


# --- line figures -------------------------------------------------------------------------


def test_loss_line_with_nan_and_inf_marked_not_dropped() -> None:
    fig = loss.figure(
        [series("loss", "global", [1, 2, 3, 4, 5], [2.0, 1.5, "NaN", "Infinity", float("-inf")])],
        EVENTS,
    )
    line = traces_named(fig, "global")[0]
    assert line.type == "scatter"
    assert line.connectgaps is False
    assert list(line.x) == [1, 2, 3, 4, 5]
    y = np.asarray(line.y, dtype=float)
    assert y[:2].tolist() == [2.0, 1.5]
    # Non-finite points break the line...
    assert np.isnan(y[2:]).all()
    # ...and are drawn as markers whose hover names the value and the step.
    nan_marks = traces_named(fig, "NaN values")[0]
    assert list(nan_marks.x) == [3]
    assert nan_marks.text == ("global: NaN at step 3",)
    assert list(traces_named(fig, "+Inf values")[0].x) == [4]
    assert list(traces_named(fig, "-Inf values")[0].x) == [5]
    assert fig.layout.xaxis.title.text == "step"
    assert fig.layout.yaxis.title.text == "loss"


def test_line_figure_serialises_to_strict_json() -> None:
    fig = loss.figure([series("loss", "global", [1, 2], ["NaN", "Infinity"])], EVENTS)

    # json.loads rejects bare NaN/Infinity only with a strict parse_constant.
    def reject(name: str) -> None:
        raise AssertionError(f"non-JSON constant {name} in figure JSON")

    parsed = json.loads(figure_json(fig), parse_constant=reject)
    assert parsed["layout"]["meta"]["figure_id"] == loss.FIGURE_ID


def test_grad_norm_log_axis_global_emphasised_and_natural_order() -> None:
    fig = grad_norm.figure(
        [
            series("grad_norm", "h.10.w", [1, 2], [0.1, 0.2]),
            series("grad_norm", "global", [1, 2], [1.0, 2.0]),
            series("grad_norm", "h.2.w", [1, 2], [0.3, 0.4]),
        ]
    )
    assert fig.layout.yaxis.type == "log"
    assert [t.name for t in fig.data] == ["global", "h.2.w", "h.10.w"]
    assert fig.data[0].line.width > fig.data[1].line.width


def test_several_ranks_get_rank_in_the_label() -> None:
    fig = loss.figure(
        [series("loss", "global", [1], [1.0], rank=1), series("loss", "global", [1], [2.0])]
    )
    assert [t.name for t in fig.data] == ["global (rank 0)", "global (rank 1)"]


def test_attention_logit_max_one_line_per_module() -> None:
    fig = attention_logit_max.figure(
        [series("attention_logit_max", f"h.{i}.attn", [0, 1], [10.0, 12.0]) for i in range(3)]
    )
    assert [t.type for t in fig.data] == ["scatter"] * 3
    assert fig.layout.title.text == attention_logit_max.TITLE


def test_mismatched_steps_and_values_name_the_series() -> None:
    with pytest.raises(ValueError, match=r"series\[0\] \('global'\): 2 steps but 1 values"):
        loss.figure([series("loss", "global", [1, 2], [1.0])])


# --- markers ------------------------------------------------------------------------------


@pytest.mark.parametrize("builder", SERIES_BUILDERS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_events_become_vertical_lines_with_hover(builder: Any) -> None:
    fig = builder.figure([series(builder.QUANTITY, "h.0.w", [10, 20, 30], [1.0, 0.5, 0.7])], EVENTS)
    shapes = [s for s in fig.layout.shapes if s.name and s.name.startswith("event-")]
    assert [(s.name, s.x0, s.x1, s.yref) for s in shapes] == [
        ("event-alert", 20, 20, "paper"),
        ("event-intervention", 30, 30, "paper"),
    ]
    alert = traces_named(fig, "alert markers")[0]
    assert list(alert.x) == [20]
    assert "stable rank collapse in h.1" in alert.text[0]
    assert traces_named(fig, "intervention markers")[0].marker.symbol == "diamond"


def test_markers_work_on_any_figure_and_reject_bad_steps() -> None:
    import plotly.graph_objects as go

    fig = add_event_markers(go.Figure(), [{"step": "5", "kind": "checkpoint"}])
    assert fig.layout.shapes[0].name == "event-checkpoint"
    assert fig.data[0].text == ("checkpoint at step 5",)
    with pytest.raises(ValueError, match=r"events\[0\]\.step: 'soon'"):
        add_event_markers(go.Figure(), [{"step": "soon", "kind": "alert"}])


# --- heatmaps -----------------------------------------------------------------------------


def test_stable_rank_heatmap_rows_in_model_order_and_shared_steps() -> None:
    fig = stable_rank.figure(
        [
            series("stable_rank", "h.10.attn.w", [0, 10, 20], [3.0, 2.0, 1.0]),
            series("stable_rank", "h.2.attn.w", [0, 20], [5.0, 4.0]),
            series("stable_rank", "h.1.attn.w", [10], [6.0]),
        ]
    )
    heat = fig.data[0]
    assert heat.type == "heatmap"
    assert list(heat.y) == ["h.1.attn.w", "h.2.attn.w", "h.10.attn.w"]
    assert list(heat.x) == [0, 10, 20]
    z = np.asarray(heat.z)
    assert z.shape == (3, 3)
    np.testing.assert_array_equal(
        z, np.array([[np.nan, 6, np.nan], [5, np.nan, 4], [3, 2, 1]], dtype=np.float32)
    )
    assert fig.layout.yaxis.autorange == "reversed"
    assert fig.layout.xaxis.title.text == "step"
    assert fig.layout.yaxis.title.text == "target"
    assert (heat.zmin, heat.zmax) == (1.0, 6.0)


def test_heatmap_non_finite_cells_gap_clip_and_flag() -> None:
    fig = stable_rank.figure(
        [
            series("stable_rank", "a", [0, 1, 2], [2.0, "NaN", "Infinity"]),
            series("stable_rank", "b", [0, 1, 2], [4.0, "-Infinity", 3.0]),
        ]
    )
    z = np.asarray(fig.data[0].z)
    assert math.isnan(z[0, 1])  # NaN: a gap
    assert z[0, 2] == 4.0  # +Inf: clipped to the top of the colour range
    assert z[1, 1] == 2.0  # -Inf: clipped to the bottom
    plus = traces_named(fig, "+Inf (clipped)")[0]
    minus = traces_named(fig, "-Inf (clipped)")[0]
    nan = traces_named(fig, "NaN")[0]
    assert (list(plus.x), list(plus.y)) == ([2], ["a"])
    assert (list(minus.x), list(minus.y)) == ([1], ["b"])
    assert (list(nan.x), list(nan.y)) == ([1], ["a"])
    assert "step 2: +Inf (clipped)" in plus.text[0]
    assert fig.layout.annotations[0].text == "3 non-finite cells"


def test_heatmap_bins_misaligned_downsampled_series_to_the_worst_value() -> None:
    # Two downsampled series whose steps never coincide: 40 distinct steps, 4 columns.
    a = list(range(0, 40, 2))
    b = list(range(1, 40, 2))
    fig = stable_rank.figure(
        [
            series("stable_rank", "a", a, [5.0] * len(a)),
            series("stable_rank", "b", b, [7.0] * 5 + [1.0] + [7.0] * 14),
        ],
        max_columns=4,
    )
    heat = fig.data[0]
    assert list(heat.x) == [0, 10, 20, 30]
    z = np.asarray(heat.z)
    assert z.shape == (2, 4)
    # Step 11 (value 1.0) falls in the second bin; min keeps the dip.
    assert z[1].tolist() == [7.0, 1.0, 7.0, 7.0]
    assert fig.layout.xaxis.title.text == "step (bins of 10)"


def test_heatmap_nan_and_finite_in_one_bin_keeps_the_finite_and_flags() -> None:
    fig = stable_rank.figure(
        [series("stable_rank", "a", [0, 1, 2, 3], [1.0, "NaN", 3.0, 4.0])], max_columns=2
    )
    assert np.asarray(fig.data[0].z).tolist() == [[1.0, 3.0]]
    assert "steps 0-1: NaN" in traces_named(fig, "NaN")[0].text[0]


def test_heatmap_all_non_finite_run_still_draws() -> None:
    fig = stable_rank.figure([series("stable_rank", "a", [0, 1], ["NaN", "NaN"])])
    assert np.isnan(np.asarray(fig.data[0].z)).all()
    assert len(traces_named(fig, "NaN")[0].x) == 2


def test_heatmap_flag_markers_are_capped() -> None:
    from rankguard.dashboard.figures.heatmap import layer_heatmap

    fig = layer_heatmap(
        [series("q", "a", list(range(10)), ["NaN"] * 10)],
        quantity="q",
        figure_id="fig-q",
        title="q",
        colorbar_title="q",
        max_flag_markers=3,
    )
    assert list(traces_named(fig, "NaN")[0].x) == [0, 1, 2]
    assert fig.layout.annotations[0].text == "10 non-finite cells (3 marked)"


def test_sign_diversity_fixed_range_and_large_input_shape() -> None:
    rng = np.random.default_rng(0)
    n_targets, n_steps = 50, 300
    data = [
        series("sa_sign_diversity", f"h.{i}.w", list(range(n_steps)), rng.random(n_steps).tolist())
        for i in reversed(range(n_targets))
    ]
    fig = sa_sign_diversity.figure(data, max_columns=100)
    heat = fig.data[0]
    assert np.asarray(heat.z).shape == (n_targets, 100)
    assert (heat.zmin, heat.zmax) == (0.0, 1.0)
    assert list(heat.y)[:3] == ["h.0.w", "h.1.w", "h.2.w"]
    assert heat.y[-1] == f"h.{n_targets - 1}.w"


# --- Jacobian alignment -------------------------------------------------------------------


def test_jacobian_alignment_two_panels_with_reference_line() -> None:
    pairs = ["h.10->h.11", "h.1->h.2"]
    data = [series("jacobian_alignment", p, [0, 10], [0.2, 0.9]) for p in pairs]
    data += [series("jacobian_alignment_gain", p, [0, 10], [0.5, 1.7]) for p in pairs]
    data.append(series("jacobian_spectral_norm", "h.1", [0], [2.0]))  # ignored
    fig = jacobian_alignment.figure(data, EVENTS)
    lines = [t for t in fig.data if t.mode == "lines"]
    assert [(t.name, t.yaxis) for t in lines] == [
        ("h.1->h.2", "y"),
        ("h.10->h.11", "y"),
        ("h.1->h.2 (a·M)", "y2"),
        ("h.10->h.11 (a·M)", "y2"),
    ]
    # A pair keeps its colour across the panels.
    assert lines[0].line.color == lines[2].line.color != lines[1].line.color
    ref = [s for s in fig.layout.shapes if s.name == jacobian_alignment.REFERENCE_SHAPE_NAME]
    assert len(ref) == 1
    assert (ref[0].yref, ref[0].y0, ref[0].y1) == ("y2", 1, 1)
    assert fig.layout.yaxis.title.text == "a"
    assert fig.layout.yaxis2.title.text == "a·M"
    assert [s.name for s in fig.layout.shapes].count("event-alert") == 1


def test_jacobian_alignment_gain_only() -> None:
    fig = jacobian_alignment.figure([series("jacobian_alignment_gain", "a->b", [0], ["Infinity"])])
    assert [t.name for t in fig.data] == ["a->b (a·M)", "+Inf values"]
    assert fig.data[0].showlegend is True


# --- SA cosine distribution ---------------------------------------------------------------


def hist(step: int, counts: list[float], target: str = "h.0.w", edges: Any = None) -> dict:
    return {
        "quantity": "sa_cosine",
        "target": target,
        "rank": 0,
        "step": step,
        "edges": [-1.0, -0.5, 0.0, 0.5, 1.0] if edges is None else edges,
        "counts": counts,
    }


def test_sa_cosine_columns_are_fractions_per_step() -> None:
    fig = sa_cosine.figure(
        [hist(0, [1, 1, 1, 1]), hist(5, [0, 0, 0, 8]), hist(5, [8, 0, 0, 0], target="other")],
        EVENTS,
        target="h.0.w",
    )
    heat = fig.data[0]
    assert heat.type == "heatmap"
    z = np.asarray(heat.z)
    assert z.shape == (4, 2)  # bins × steps
    assert z[:, 0].tolist() == [0.25] * 4
    assert z[:, 1].tolist() == [0, 0, 0, 1]
    assert list(heat.y) == [-0.75, -0.25, 0.25, 0.75]
    assert fig.layout.yaxis.title.text == "cosine"
    assert fig.layout.title.text.endswith("h.0.w")
    assert traces_named(fig, "alert markers")


def test_sa_cosine_rebins_other_edges_and_sums_targets() -> None:
    fig = sa_cosine.figure(
        [hist(0, [2, 0, 0, 0]), hist(0, [0, 2], target="b", edges=[-1.0, 0.0, 1.0])]
    )
    # [-1, 0] -> centre -0.5 -> bin [-0.5, 0); [0, 1] -> 0.5 -> bin [0.5, 1].
    assert np.asarray(fig.data[0].z)[:, 0].tolist() == [0.5, 0.0, 0.0, 0.5]


def test_sa_cosine_bad_edges_name_the_histogram() -> None:
    with pytest.raises(ValueError, match=r"histograms\[0\]: 3 edges for 4 counts"):
        sa_cosine.figure([hist(0, [1, 2, 3, 4], edges=[-1, 0, 1])])


def test_label_bins_names_the_column_width_of_prebinned_series() -> None:
    from rankguard.dashboard.figures.heatmap import label_bins

    series = [{"quantity": "stable_rank", "target": "a", "steps": [0, 64], "values": [1.0, 2.0]}]
    fig = label_bins(stable_rank.figure(series), 64)
    assert fig.layout.xaxis.title.text == "step (bins of 64)"
    assert "steps %{x} + 63" in fig.data[0].hovertemplate
    plain = label_bins(stable_rank.figure(series), 1)
    assert plain.layout.xaxis.title.text == "step"
