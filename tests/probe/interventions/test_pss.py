"""PSS smoothing variants against references written out in the test."""

from __future__ import annotations

import json

import pytest
import torch
from intervention_helpers import as_target, make_matrix

from rankguard.probe.exceptions import ConfigError
from rankguard.probe.interventions import apply_pss, smooth_singular_values


def _reference_f(s: list[float], variant: str, k: int, scale: float, tau: float) -> list[float]:
    n = len(s)
    if variant == "clip":
        out = [s[k] if i < k else s[i] for i in range(n)]
    elif variant == "conv":
        padded = [s[1], *s, s[n - 2]]  # reflect padding
        out = [(padded[i] + padded[i + 1] + padded[i + 2]) / 3 for i in range(n)]
    else:
        z = sum(pow(2.718281828459045, tau * x) for x in s)
        total = sum(s)
        out = [pow(2.718281828459045, tau * x) / z * total for x in s]
    return [scale * x for x in out]


@pytest.mark.parametrize(
    ("variant", "k", "scale", "tau"),
    [
        ("clip", None, 1.0, 0.25),
        ("clip", 7, 0.25, 0.25),
        ("conv", None, 1.0, 0.25),
        ("conv", None, 0.5, 0.25),
        ("softmax", None, 1.0, 0.25),
        ("softmax", None, 1.0, 3.0),
    ],
)
def test_variants_match_reference(variant: str, k: int | None, scale: float, tau: float) -> None:
    w = make_matrix(48, 64, cond=30.0, seed=5) * 4.0
    t = as_target(w)
    result = apply_pss([t], variant=variant, k=k, scale=scale, temperature=tau)
    U, S, Vh = torch.linalg.svd(w.double(), full_matrices=False)
    kk = 48 // 20 if k is None else k
    f = torch.tensor(_reference_f(S.tolist(), variant, kk, scale, tau), dtype=torch.float64)
    expected = (U * f) @ Vh
    torch.testing.assert_close(t.parameter.detach().double(), expected, rtol=1e-4, atol=1e-5)
    rec = result.matrices[0]
    assert rec.spectral_norm_after == pytest.approx(float(f.max()), rel=1e-4)
    assert rec.frobenius_after == pytest.approx(float(f.norm()), rel=1e-4)
    assert rec.stable_rank_before == pytest.approx(float((S**2).sum() / S[0] ** 2), rel=1e-4)
    json.dumps(result.to_dict(), allow_nan=False)
    assert result.kind == "pss" and result.options["variant"] == variant


def test_clip_raises_stable_rank_and_k_zero_is_identity() -> None:
    s = torch.linspace(10.0, 1.0, 40)
    clipped = smooth_singular_values(s, "clip")  # k = 2
    assert clipped[:3].tolist() == [s[2].item()] * 3 and torch.equal(clipped[3:], s[3:])
    assert torch.equal(smooth_singular_values(s, "clip", k=0), s)
    w = make_matrix(40, 40, cond=100.0)
    rec = apply_pss([as_target(w)], variant="clip", k=4).matrices[0]
    assert rec.stable_rank_after > rec.stable_rank_before


def test_conv_of_a_single_value_is_identity() -> None:
    s = torch.tensor([3.0])
    assert torch.equal(smooth_singular_values(s, "conv"), s)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"variant": "log"}, "variant: 'log'"),
        ({"variant": "conv", "k": 3}, "k: 3 is only meaningful"),
        ({"k": -1}, "k: -1"),
        ({"k": 8}, r"k: 8 must be smaller.*\['w'\]"),
        ({"scale": 0.0}, "scale: 0.0"),
        ({"scale": float("nan")}, "scale: nan"),
        ({"scale": True}, "scale: True"),
        ({"temperature": -1.0}, "temperature: -1.0"),
        ({"stats": "fast"}, "stats: 'fast'"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, object], match: str) -> None:
    t = as_target(make_matrix(8, 12))
    before = t.parameter.detach().clone()
    with pytest.raises(ConfigError, match=match):
        apply_pss([t], **kwargs)  # type: ignore[arg-type]
    assert torch.equal(t.parameter.detach(), before)
