"""Sign diversity on constructed inputs, and its histogram."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rankguard.probe.hooks import Captures
from rankguard.probe.quantities.base import Histogram, Values
from rankguard.probe.quantities.sa_sign_diversity import (
    SaSignDiversity,
    cosine_histogram,
    cosines,
    histogram_edges,
    sign_diversity,
)


def top_right_vector(w: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svd(w)[2][0]


@pytest.fixture
def layer(spectrum_matrix) -> nn.Linear:
    lin = nn.Linear(16, 8, bias=False)
    with torch.no_grad():
        lin.weight.copy_(spectrum_matrix(torch.tensor([4.0, 1.0, 0.5]), 8, 16))
    return lin


def test_inputs_aligned_with_v1_give_zero(layer: nn.Linear, ctx_for) -> None:
    v1 = top_right_vector(layer.weight.detach())
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, 1, generator=g).add(0.5) * v1 + 0.01 * torch.randn(200, 16, generator=g)
    captures = Captures(inputs={"weight": x})
    out = SaSignDiversity().compute(ctx_for(layer, captures=captures))
    values = next(o for o in out if isinstance(o, Values))
    assert values.targets == ("weight",)
    assert values.values.item() == 0.0


def test_isotropic_inputs_give_about_one(layer: nn.Linear, ctx_for) -> None:
    x = torch.randn(4000, 16, generator=torch.Generator().manual_seed(1))
    out = SaSignDiversity().compute(ctx_for(layer, captures=Captures(inputs={"weight": x})))
    d = next(o for o in out if isinstance(o, Values)).values.item()
    assert d > 0.95


def test_invariant_to_flipping_v1() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 10, generator=g) + 0.3
    v = torch.nn.functional.normalize(torch.randn(10, generator=g), dim=0)
    d_plus, d_minus = sign_diversity(cosines(x, v)), sign_diversity(cosines(x, -v))
    assert 0.0 < d_plus.item() < 1.0
    torch.testing.assert_close(d_plus, d_minus)
    # the exact statistic: D = 2·min(p, 1 − p)
    p = ((x @ v) > 0).float().mean()
    torch.testing.assert_close(d_plus, 2 * torch.minimum(p, 1 - p))


def test_histogram_counts_on_fixed_edges(layer: nn.Linear, ctx_for) -> None:
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(3))
    out = SaSignDiversity().compute(ctx_for(layer, captures=Captures(inputs={"weight": x})))
    hist = next(o for o in out if isinstance(o, Histogram))
    assert hist.quantity == "sa_cosine" and hist.target == "weight"
    assert len(hist.edges) == 42 and hist.edges[0] == -1.0 and hist.edges[-1] == 1.0
    c = cosines(x, top_right_vector(layer.weight.detach()))
    ref = torch.histogram(c, bins=torch.tensor(hist.edges)).hist
    torch.testing.assert_close(hist.counts.sum(), torch.tensor(256.0))
    # identical except for values within float rounding of an edge
    assert (hist.counts - ref).abs().sum().item() <= 2


def test_histogram_edge_values() -> None:
    c = torch.tensor([-1.0, 1.0, 0.0, -0.999, 0.999])
    counts = cosine_histogram(c, 4)
    assert counts.tolist() == [2.0, 0.0, 1.0, 2.0]
    assert histogram_edges(4) == (-1.0, -0.5, 0.0, 0.5, 1.0)


def test_histogram_skips_nan_cosines(layer: nn.Linear, ctx_for) -> None:
    """Non-finite inputs (an fp16 overflow) give NaN cosines: they are not counted, and the
    quantity keeps working (an out-of-range bin index used to disable it for the run)."""
    c = torch.tensor([math.nan, -1.0, 0.25, math.nan])
    assert cosine_histogram(c, 4).tolist() == [1.0, 0.0, 1.0, 0.0]
    x = torch.randn(8, layer.in_features)
    x[3] = math.nan
    out = SaSignDiversity().compute(ctx_for(layer, captures=Captures(inputs={"weight": x})))
    (hist,) = [o for o in out if isinstance(o, Histogram)]
    assert hist.counts.sum().item() == 7.0


def test_no_inputs_no_output(layer: nn.Linear, ctx_for) -> None:
    assert SaSignDiversity().compute(ctx_for(layer)) == []
