"""MSign engines against torch.linalg references; in-place writes through WeightTarget views."""

from __future__ import annotations

import json
import math

import pytest
import torch
from intervention_helpers import TinyModel, as_target, make_matrix

from rankguard.probe.exceptions import ConfigError
from rankguard.probe.interventions import (
    Engine,
    apply_msign,
    default_engine,
    msign_svd,
    spectral_norm_estimate,
)
from rankguard.probe.targets import find_targets, select

# (m, n, cond, rank): random, ill-conditioned, tall, wide, low-rank
FAMILIES = [
    pytest.param(64, 64, 3.0, None, id="random"),
    pytest.param(96, 96, 1e3, None, id="cond1e3"),
    pytest.param(96, 96, 1e4, None, id="cond1e4"),
    pytest.param(160, 48, 1e4, None, id="tall"),
    pytest.param(48, 160, 1e3, None, id="wide"),
    pytest.param(80, 120, 10.0, 12, id="lowrank"),
]


def _svals(w: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(w.detach().double())


def _stable_rank(w: torch.Tensor) -> float:
    s = _svals(w)
    return float((s**2).sum() / s[0] ** 2)


@pytest.mark.parametrize(("m", "n", "cond", "rank"), FAMILIES)
def test_svd_engine_is_exact(m: int, n: int, cond: float, rank: int | None) -> None:
    w = make_matrix(m, n, cond=cond, rank=rank, seed=m * n)
    t = as_target(w)
    result = apply_msign([t], engine="svd")
    r = min(m, n) if rank is None else rank
    assert result.matrices[0].rank == r
    out = t.parameter.detach()
    s = _svals(out)
    target_value = float(torch.linalg.matrix_norm(w.double())) / math.sqrt(r)
    torch.testing.assert_close(
        s[:r], torch.full((r,), target_value, dtype=torch.float64), rtol=1e-5, atol=0
    )
    if r < s.numel():
        assert float(s[r:].max()) < 1e-5 * target_value
    fro_w = float(torch.linalg.matrix_norm(w.double()))
    assert abs(float(torch.linalg.matrix_norm(out.double())) - fro_w) < 1e-5 * fro_w
    assert _stable_rank(out) == pytest.approx(r, rel=1e-4)


@pytest.mark.parametrize(("m", "n", "cond", "rank"), FAMILIES)
def test_newton_schulz_engine_matches_svd_engine(
    m: int, n: int, cond: float, rank: int | None
) -> None:
    w = make_matrix(m, n, cond=cond, rank=rank, seed=m * n)
    exact, approx = as_target(w), as_target(w)
    apply_msign([exact], engine="svd")
    apply_msign([approx], engine="newton_schulz")
    r = min(m, n) if rank is None else rank
    s_exact = _svals(exact.parameter)[:r]
    s_ns = _svals(approx.parameter)
    assert float(((s_ns[:r] - s_exact) / s_exact).abs().max()) < 0.01
    assert _stable_rank(approx.parameter) >= 0.99 * r
    # Frobenius norm is preserved by construction
    fro_w = float(torch.linalg.matrix_norm(w.double()))
    assert float(torch.linalg.matrix_norm(approx.parameter.detach().double())) == pytest.approx(
        fro_w, rel=1e-5
    )
    if rank is not None:
        # round-off "zeros" are lifted only a little (documented in msign.py)
        assert float(s_ns[r:].max()) < 0.01 * float(s_exact[0])


def test_newton_schulz_keeps_exact_zeros() -> None:
    w = make_matrix(48, 48, cond=10.0)
    w[:, 30:] = 0.0  # exact rank 30
    t = as_target(w)
    apply_msign([t], engine="newton_schulz")
    s = _svals(t.parameter)
    assert float(s[30:].max()) < 1e-6 * float(s[0])
    assert float((s[:30] / s[0] - 1).abs().max()) < 1e-3


@pytest.mark.parametrize("engine", ["svd", "newton_schulz"])
def test_bf16_parameter_math_in_fp32(engine: str) -> None:
    w = make_matrix(64, 96, cond=100.0).to(torch.bfloat16)
    t = as_target(w)
    ptr = t.parameter.data_ptr()
    apply_msign([t], engine=engine)
    assert t.parameter.dtype == torch.bfloat16 and t.parameter.data_ptr() == ptr
    # the fp32 result, rounded once to bf16
    ref = msign_svd(w.float()).matrix.to(torch.bfloat16)
    diff = (t.parameter.detach().float() - ref.float()).abs().max()
    assert float(diff) <= (2 if engine == "newton_schulz" else 1) * 2**-8 * float(ref.abs().max())
    assert _stable_rank(t.parameter) >= 0.98 * 64


def test_in_place_through_fused_and_transposed_views(tiny_model: TinyModel) -> None:
    targets = find_targets(tiny_model)
    q = select(targets, ["h.0.attn.c_attn.weight[q]"])[0]
    proj = select(targets, ["h.0.attn.c_proj.weight"])[0]
    fused = q.parameter
    before_fused = fused.detach().clone()
    before_proj = proj.parameter.detach().clone()
    fused_ptr, proj_ptr = fused.data_ptr(), proj.parameter.data_ptr()
    apply_msign([q, proj], engine="svd")
    d = fused.shape[1]
    # the q rows hold MSign of the old q rows; k and v rows are untouched bit-for-bit
    torch.testing.assert_close(
        fused.detach()[:d], msign_svd(before_fused[:d]).matrix, rtol=1e-5, atol=1e-6
    )
    assert torch.equal(fused.detach()[d:], before_fused[d:])
    # Conv1D stores (in, out): the parameter holds the transpose of MSign of the (out, in) view
    torch.testing.assert_close(
        proj.parameter.detach(), msign_svd(before_proj.t()).matrix.t(), rtol=1e-5, atol=1e-6
    )
    assert fused.data_ptr() == fused_ptr and proj.parameter.data_ptr() == proj_ptr
    assert fused.requires_grad and fused.grad is None


def test_result_records_are_exact_and_json_ready() -> None:
    w = make_matrix(40, 64, cond=50.0)
    t = as_target(w, "layer.weight")
    result = apply_msign([t], engine="svd")
    rec = result.matrices[0]
    s_before = _svals(w)
    assert rec.name == "layer.weight" and rec.shape == (40, 64) and rec.exact_stats
    assert rec.spectral_norm_before == pytest.approx(float(s_before[0]), rel=1e-5)
    assert rec.frobenius_before == pytest.approx(float(s_before.norm()), rel=1e-5)
    assert rec.stable_rank_before == pytest.approx(_stable_rank(w), rel=1e-4)
    assert rec.stable_rank_after == pytest.approx(40, rel=1e-4)
    assert rec.frobenius_after == pytest.approx(rec.frobenius_before, rel=1e-5)
    assert rec.spectral_norm_after == pytest.approx(float(_svals(t.parameter)[0]), rel=1e-5)
    assert result.kind == "msign" and result.options["engine"] == "svd"
    assert result.seconds > 0
    d = result.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["matrices"][0]["stable_rank_after"] == rec.stable_rank_after
    assert d["matrices"][0]["shape"] == [40, 64]


def test_newton_schulz_records_use_the_power_estimate() -> None:
    w = make_matrix(40, 64, cond=1e4)  # σ₂/σ₁ ≈ 0.79: a spectral gap at the top
    t = as_target(w)
    rec = apply_msign([t], engine="newton_schulz").matrices[0]
    assert not rec.exact_stats
    assert rec.spectral_norm_before == pytest.approx(float(_svals(w)[0]), rel=1e-3)
    assert rec.stable_rank_after == pytest.approx(40, rel=1e-3)
    exact = apply_msign([as_target(w)], engine="newton_schulz", stats="exact").matrices[0]
    assert exact.exact_stats
    assert exact.spectral_norm_after == pytest.approx(rec.spectral_norm_after, rel=1e-3)
    assert apply_msign([as_target(w)], engine="svd", stats="none").matrices == ()


def test_spectral_norm_estimate_against_exact() -> None:
    w = make_matrix(30, 50, cond=20.0, seed=3)
    assert float(spectral_norm_estimate(w)) == pytest.approx(float(_svals(w)[0]), rel=1e-4)


def test_zero_matrix_is_left_alone() -> None:
    for engine in ("svd", "newton_schulz"):
        t = as_target(torch.zeros(8, 12))
        rec = apply_msign([t], engine=engine).matrices[0]
        assert torch.equal(t.parameter.detach(), torch.zeros(8, 12))
        assert rec.stable_rank_after == 0.0


def test_rank_tol_sets_the_exact_rank() -> None:
    w = make_matrix(32, 32, cond=1e3)  # singular values 1 .. 1e-3, log-spaced
    t = as_target(w)
    rec = apply_msign([t], engine="svd", rank_tol=0.05).matrices[0]
    expected = int((_svals(w) > 0.05 * _svals(w)[0]).sum())
    assert rec.rank == expected < 32
    assert _stable_rank(t.parameter) == pytest.approx(expected, rel=1e-4)


def test_default_engine_per_device() -> None:
    assert default_engine("cpu") is Engine.SVD
    assert default_engine(torch.device("cuda")) is Engine.NEWTON_SCHULZ
    t = as_target(make_matrix(8, 8))
    assert apply_msign([t]).options["engine"] == "svd"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"engine": "qr"}, "engine: 'qr'"),
        ({"steps": 0}, "steps: 0"),
        ({"rank_tol": 1.5}, "rank_tol: 1.5"),
        ({"stats": "fast"}, "stats: 'fast'"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, object], match: str) -> None:
    t = as_target(make_matrix(8, 8))
    before = t.parameter.detach().clone()
    with pytest.raises(ConfigError, match=match):
        apply_msign([t], **kwargs)  # type: ignore[arg-type]
    assert torch.equal(t.parameter.detach(), before)


def test_invalid_targets() -> None:
    with pytest.raises(ConfigError, match="empty"):
        apply_msign([])
    t = as_target(make_matrix(8, 8))
    with pytest.raises(ConfigError, match="duplicate"):
        apply_msign([t, t])
    with pytest.raises(ConfigError, match="WeightTarget"):
        apply_msign([t, torch.zeros(3, 3)])  # type: ignore[list-item]


def test_non_finite_weight_rewrites_nothing() -> None:
    good = as_target(make_matrix(8, 8), "good")
    bad_w = make_matrix(8, 8)
    bad_w[2, 3] = float("nan")
    bad = as_target(bad_w, "bad")
    before = good.parameter.detach().clone()
    with pytest.raises(ConfigError, match=r"\['bad'\].*NaN"):
        apply_msign([good, bad], engine="svd")
    assert torch.equal(good.parameter.detach(), before)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_default_engine_matches_cpu_svd(dtype: torch.dtype) -> None:
    w = make_matrix(256, 512, cond=1e3).to(dtype)
    gpu = as_target(w.cuda())
    result = apply_msign([gpu])
    assert result.options["engine"] == "newton_schulz"
    assert gpu.parameter.dtype == dtype and gpu.parameter.is_cuda
    cpu = as_target(w)
    apply_msign([cpu], engine="svd")
    s_gpu, s_cpu = _svals(gpu.parameter.cpu()), _svals(cpu.parameter)
    tol = 0.01 if dtype == torch.float32 else 0.03
    assert float(((s_gpu - s_cpu) / s_cpu).abs().max()) < tol
