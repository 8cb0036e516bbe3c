"""Attention sites found by what a module does, and the logit math against brute force."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.functional import scaled_dot_product_attention as sdpa

from rankguard.probe import Probe
from rankguard.probe.attention import (
    LogitRecorder,
    find_attention_sites,
    head_logit_max,
    projection_bound,
    scores_head_max,
)
from rankguard.probe.transport import MemoryTransport
from rankguard.probe.wire import iter_points


def brute(q: Tensor, k: Tensor, allowed: Tensor, scale: float) -> Tensor:
    """(b, h, T, d) x (b, h, S, d), allowed (T, S) or broadcastable -> (h,) by loops."""
    b, h, t, _ = q.shape
    out = torch.zeros(h, dtype=torch.float64)
    allowed = allowed.expand(b, h, t, k.shape[2])
    for i in range(b):
        for j in range(h):
            for m in range(t):
                for n in range(k.shape[2]):
                    if allowed[i, j, m, n]:
                        value = abs(float(q[i, j, m].double() @ k[i, j, n].double())) * scale
                        out[j] = max(out[j], value)
    return out


@pytest.fixture
def qk() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 5, 3, generator=g), torch.randn(2, 4, 5, 3, generator=g)


def test_head_logit_max_causal_and_scale(qk) -> None:
    q, k = qk
    expected = brute(q, k, torch.ones(5, 5, dtype=torch.bool).tril(), 0.7)
    got = head_logit_max(q, k, scale=0.7, is_causal=True)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


def test_head_logit_max_masks(qk) -> None:
    q, k = qk
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(2, 1, 5, 5, generator=g) > 0.4
    keep[..., 0] = True  # every row keeps a key
    additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    expected = brute(q, k, keep, 1 / math.sqrt(3))
    torch.testing.assert_close(
        head_logit_max(q, k, mask=keep).double(), expected, rtol=1e-6, atol=1e-6
    )
    torch.testing.assert_close(
        head_logit_max(q, k, mask=additive).double(), expected, rtol=1e-6, atol=1e-6
    )


def test_head_logit_max_sliding_window_and_gqa(qk) -> None:
    q, k = qk
    k_kv = k[:, :2]  # 2 kv heads serving 4 query heads: kv head g serves 2g, 2g+1
    window = (torch.arange(5)[:, None] - torch.arange(5)[None, :] < 2) & torch.ones(
        5, 5, dtype=torch.bool
    ).tril()
    expected = brute(q, k_kv.repeat_interleave(2, dim=1), window, 1 / math.sqrt(3))
    got = head_logit_max(q, k_kv, is_causal=True, sliding_window=2)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


def test_scores_head_max_leaves_masked_entries_out() -> None:
    scores = torch.tensor(
        [
            [
                [[1.0, -3.0], [float("-inf"), 2.0]],
                [[-5.0, torch.finfo(torch.float32).min], [0.5, 0.1]],
            ]
        ]
    )
    torch.testing.assert_close(scores_head_max(scores), torch.tensor([3.0, 5.0]))
    overflow = scores.clone()
    overflow[0, 0, 0, 0] = float("inf")  # an fp16-style overflow is reported, not masked
    assert scores_head_max(overflow)[0] == float("inf")


def test_projection_bound_bounds_rotated_logits() -> None:
    g = torch.Generator().manual_seed(2)
    b, t, h, d = 2, 6, 2, 4
    q, k = torch.randn(b, t, h * d, generator=g), torch.randn(b, t, h * d, generator=g)
    bound = projection_bound(q, k, h)
    qh, kh = (x.reshape(b, t, h, d).transpose(1, 2) for x in (q, k))
    expected = torch.stack(
        [
            qh[:, j].norm(dim=-1).amax() * kh[:, j].norm(dim=-1).amax() / math.sqrt(d)
            for j in range(h)
        ]
    )
    torch.testing.assert_close(bound, expected)
    angle = torch.arange(t)[:, None] * torch.tensor([0.3, 1.1])[None, :]  # rotary: pairs rotate
    cos, sin = angle.cos().repeat_interleave(2, -1), angle.sin().repeat_interleave(2, -1)

    def rotate(x: Tensor) -> Tensor:
        pairs = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)
        return x * cos + pairs * sin

    logits = brute(rotate(qh), rotate(kh), torch.ones(t, t, dtype=torch.bool), 1 / math.sqrt(d))
    assert (logits <= bound.double() + 1e-6).all()


class SoftmaxAttention(nn.Module):
    """Hand-written attention with names no heuristic knows."""

    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.h = heads

    def forward(self, x: Tensor) -> Tensor:
        bsz, t, d = x.shape
        q, k, v = (m(x).view(bsz, t, self.h, -1).transpose(1, 2) for m in (self.a, self.b, self.c))
        att = (q @ k.transpose(-2, -1)) * (d // self.h) ** -0.5
        att = att.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
        return (F.softmax(att, dim=-1) @ v).transpose(1, 2).reshape(bsz, t, d)


class AliasedSdpa(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.proj = nn.Linear(d, 3 * d)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.proj(x).unsqueeze(1).chunk(3, dim=-1)
        return sdpa(q, k, v, is_causal=True).squeeze(1)


class ExpAttention(nn.Module):
    """Attention normalised by hand (no softmax, no SDPA): only its projections are seen."""

    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.left, self.right, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:
        bsz, t, d = x.shape
        q, k, v = (
            m(x).view(bsz, t, self.heads, -1).transpose(1, 2)
            for m in (self.left, self.right, self.value)
        )
        w = torch.exp(q @ k.transpose(-2, -1) / 2.0)
        return ((w / w.sum(-1, keepdim=True)) @ v).transpose(1, 2).reshape(bsz, t, d)


class Stack(nn.Module):
    def __init__(self, make: type[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(make() for _ in range(2))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


def test_sites_found_by_what_they_do() -> None:
    search = find_attention_sites(Stack(SoftmaxAttention))
    assert [(s.name, s.replay) for s in search.sites] == [("layers.0", True), ("layers.1", True)]
    aliased = find_attention_sites(Stack(AliasedSdpa))
    assert [s.name for s in aliased.sites if s.replay] == ["layers.0", "layers.1"]


def test_recorder_reads_the_softmax_input() -> None:
    torch.manual_seed(0)
    module = SoftmaxAttention()
    x = torch.randn(1, 5, 8)
    q, k = (m(x).view(1, 5, 2, 4).transpose(1, 2) for m in (module.a, module.b))
    expected = brute(q.detach(), k.detach(), torch.ones(5, 5, dtype=torch.bool).tril(), 0.5)
    got = LogitRecorder().replay(module, (x,), {})
    assert got is not None
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def train(model: nn.Module, probe: Probe, steps: int = 2) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(steps):
        loss = model(torch.randn(2, 5, 8)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        probe.step(loss)


def test_a_hand_written_block_is_attention_and_its_projections_too() -> None:
    model = Stack(SoftmaxAttention)
    probe = Probe(model, run="hand", transport=MemoryTransport(), every=1, strict=True)
    groups = {t.name: t.groups for t in probe.targets}
    assert groups["layers.0.a.weight"] == {"attention"}  # MSign's "attention" selector sees it
    train(model, probe)
    assert {t for q, t in probe.latest() if q == "attention_logit_max"} == {"layers.0", "layers.1"}


def test_globs_and_a_head_count_always_work(caplog) -> None:
    model = Stack(ExpAttention)
    transport = MemoryTransport()
    probe = Probe(
        model,
        run="exp",
        transport=transport,
        every=1,
        strict=True,
        attention=["*.left.weight", "*.right.weight"],
        attention_heads=2,
    )
    assert [s.name for s in probe.sites] == ["layers.0", "layers.1"]
    train(model, probe)
    latest = probe.latest()
    assert {t for q, t in latest if q == "attention_logit_bound"} == {"layers.0", "layers.1"}
    assert not {t for q, t in latest if q == "attention_logit_max"}  # never mixed up


def test_no_attention_is_said_once_with_what_was_looked_for(caplog) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    transport = MemoryTransport()
    with caplog.at_level(logging.WARNING, logger="rankguard.probe"):
        probe = Probe(model, run="mlp", transport=transport, every=1)
        for _ in range(3):
            loss = model(torch.randn(4, 8)).square().mean()
            loss.backward()
            probe.step(loss)
    said = [r.getMessage() for r in caplog.records if "attention_logit_max" in r.getMessage()]
    assert (
        len(said) == 1
        and "scaled_dot_product_attention" in said[0]
        and "attention_heads" in said[0]
    )
    events = [e for b in transport.batches for e in b.get("events", [])]
    unavailable = [e for e in events if e["payload"]["quantity"] == "attention_logit_max"]
    assert len(unavailable) == 1 and unavailable[0]["kind"] == "quantity_unavailable"
    assert {p.quantity for p in iter_points(transport.batches)} >= {"stable_rank", "loss"}
