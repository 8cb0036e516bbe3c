"""Jacobian alignment on a deep linear network, where each block's Jacobian is its weight."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankguard.probe.hooks import CallCapture
from rankguard.probe.quantities.jacobian_alignment import JacobianAlignment


@pytest.fixture
def linear_net(spectrum_matrix) -> nn.Sequential:
    d = 10
    net = nn.Sequential(*(nn.Linear(d, d, bias=False) for _ in range(3)))
    spectra = [[4.0, 2.0, 1.0, 0.5], [3.0, 1.0, 0.7, 0.2], [5.0, 2.5, 1.0, 0.1]]
    with torch.no_grad():
        for i, (layer, s) in enumerate(zip(net, spectra, strict=True)):
            layer.weight.copy_(spectrum_matrix(torch.tensor(s), d, d, seed=10 + i))
    return net


def compute(net: nn.Sequential, ctx_for, q: JacobianAlignment, batch: torch.Tensor) -> dict:
    ctx = ctx_for(
        net,
        blocks=[(str(i), m) for i, m in enumerate(net)],
        probe_batch=CallCapture((batch,), {}),
    )
    return {
        o.quantity: dict(zip(o.targets, o.values.tolist(), strict=True)) for o in q.compute(ctx)
    }


@pytest.mark.parametrize("n_seq", [1, 2])
def test_deep_linear_network_matches_weights(linear_net, ctx_for, n_seq: int) -> None:
    q = JacobianAlignment(iterations=5, cold_iterations=200, tolerance=1e-7)
    batch = torch.randn(n_seq, 10, generator=torch.Generator().manual_seed(0))
    out = compute(linear_net, ctx_for, q, batch)
    svd = [torch.linalg.svd(m.weight.detach().double()) for m in linear_net]
    for i in range(2):
        u_earlier = svd[i][0][:, 0]  # u₁(W_i)
        v_later = svd[i + 1][2][0]  # v₁(W_{i+1})
        expected = torch.dot(v_later, u_earlier).abs().item()
        pair = f"{i}->{i + 1}"
        assert out["jacobian_alignment"][pair] == pytest.approx(expected, abs=1e-4)
        sigma = svd[i][1][0].item()
        assert out["jacobian_alignment_gain"][pair] == pytest.approx(expected * sigma, rel=1e-4)
    for i in range(3):
        assert out["jacobian_spectral_norm"][str(i)] == pytest.approx(svd[i][1][0].item(), rel=1e-4)


def test_a_zero_jacobian_is_tracked_once_the_block_trains(
    linear_net, ctx_for, spectrum_matrix
) -> None:
    # A block whose output ignores its input (here a zero weight) has J = 0: the warm vectors
    # must not stay at 0, or σ₁ and the alignment would read 0 after the block trains.
    middle = linear_net[1].weight
    trained = middle.detach().clone()
    with torch.no_grad():
        middle.zero_()
    q = JacobianAlignment(iterations=8, cold_iterations=200, tolerance=1e-7)
    batch = torch.randn(1, 10, generator=torch.Generator().manual_seed(3))
    zero = compute(linear_net, ctx_for, q, batch)
    assert zero["jacobian_spectral_norm"]["1"] == 0.0
    assert zero["jacobian_alignment"] == {"0->1": 0.0, "1->2": 0.0}
    with torch.no_grad():
        middle.copy_(trained)
    out = compute(linear_net, ctx_for, q, batch)  # warm from what the zero block left
    svd = [torch.linalg.svd(m.weight.detach().double()) for m in linear_net]
    for i in range(2):
        expected = torch.dot(svd[i + 1][2][0], svd[i][0][:, 0]).abs().item()
        assert out["jacobian_alignment"][f"{i}->{i + 1}"] == pytest.approx(expected, abs=1e-4)
    assert out["jacobian_spectral_norm"]["1"] == pytest.approx(svd[1][1][0].item(), rel=1e-4)


def test_warm_state_round_trip(linear_net, ctx_for) -> None:
    batch = torch.randn(1, 10, generator=torch.Generator().manual_seed(1))
    a = JacobianAlignment(iterations=2, cold_iterations=200, tolerance=1e-7)
    first = compute(linear_net, ctx_for, a, batch)
    b = JacobianAlignment(iterations=2, cold_iterations=1)  # a cold start would be poor
    b.load_state_dict(a.state_dict())
    assert set(b.state_dict()["u"]) == {"0#0", "1#0", "2#0"}
    again = compute(linear_net, ctx_for, b, batch)
    for pair, value in first["jacobian_alignment"].items():
        assert again["jacobian_alignment"][pair] == pytest.approx(value, abs=1e-5)


def test_transformer_blocks_with_dropout_and_sdpa(make_gpt, ctx_for) -> None:
    model = make_gpt(n_layer=3)
    model.train()
    q = JacobianAlignment(iterations=3, cold_iterations=10)
    idx = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(2))
    blocks = [(f"transformer.h.{i}", b) for i, b in enumerate(model.transformer.h)]
    ctx = ctx_for(model, blocks=blocks, probe_batch=CallCapture((idx,), {}))
    out = {o.quantity: o for o in q.compute(ctx)}
    align = out["jacobian_alignment"]
    assert align.targets == ("transformer.h.0->transformer.h.1", "transformer.h.1->transformer.h.2")
    assert ((align.values >= 0) & (align.values <= 1 + 1e-6)).all()
    assert torch.isfinite(out["jacobian_spectral_norm"].values).all()
    assert model.training and all(m.training for m in model.modules())  # modes restored
    assert all(p.grad is None for p in model.parameters())  # no gradient leaked into .grad
