"""representation_stable_rank and singularity_alignment against an exact SVD of Z."""

from __future__ import annotations

import torch
from torch import nn

from rankguard.probe.hooks import Captures
from rankguard.probe.quantities.representation_stable_rank import RepresentationStableRank
from rankguard.probe.quantities.singularity_alignment import SingularityAlignment


def test_against_exact_svd(spectrum_matrix, ctx_for) -> None:
    layer = nn.Linear(12, 6, bias=False)
    with torch.no_grad():
        layer.weight.copy_(spectrum_matrix(torch.tensor([5.0, 2.0, 1.0]), 6, 12, seed=1))
    z = spectrum_matrix(torch.tensor([10.0, 3.0, 2.0, 1.0]), 200, 12, seed=2)
    z = z + 0.01 * torch.randn(200, 12, generator=torch.Generator().manual_seed(3))
    ctx = ctx_for(layer, captures=Captures(inputs={"weight": z}))
    sr = RepresentationStableRank().compute(ctx)[0]
    phi = SingularityAlignment().compute(ctx)[0]
    s = torch.linalg.svdvals(z)
    torch.testing.assert_close(sr.values[0], s.square().sum() / s[0] ** 2, rtol=1e-4, atol=0)
    v_w = torch.linalg.svd(layer.weight.detach())[2][0]
    v_z = torch.linalg.svd(z)[2][0]
    torch.testing.assert_close(phi.values[0], torch.dot(v_w, v_z).abs(), rtol=1e-4, atol=1e-6)
    assert 0.0 <= phi.values[0].item() <= 1.0


def test_aligned_inputs_give_phi_one(spectrum_matrix, ctx_for) -> None:
    layer = nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        layer.weight.copy_(spectrum_matrix(torch.tensor([3.0, 1.0]), 8, 8, seed=4))
    v1 = torch.linalg.svd(layer.weight.detach())[2][0]
    z = torch.randn(64, 1, generator=torch.Generator().manual_seed(5)) * v1  # rank one along v1
    ctx = ctx_for(layer, captures=Captures(inputs={"weight": z}))
    assert SingularityAlignment().compute(ctx)[0].values.item() > 1 - 1e-5
    assert abs(RepresentationStableRank().compute(ctx)[0].values.item() - 1.0) < 1e-4


def test_fused_parts_share_one_input_spectrum(tiny_gpt, ctx_for) -> None:
    z = torch.randn(32, 16, generator=torch.Generator().manual_seed(6))
    names = [f"transformer.h.0.attn.c_attn.weight[{p}]" for p in "qkv"]
    ctx = ctx_for(tiny_gpt, captures=Captures(inputs=dict.fromkeys(names, z)))
    out = RepresentationStableRank().compute(ctx)[0]
    assert out.targets == tuple(names)
    assert len(ctx._input_cache) == 1
    assert torch.unique(out.values).numel() == 1
