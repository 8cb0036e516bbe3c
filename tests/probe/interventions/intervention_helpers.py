"""Builders for the intervention tests: matrices with a chosen spectrum, stand-alone targets,
and a tiny model with a fused QKV Linear and a Hugging-Face-style Conv1D (weight (in, out))."""

from __future__ import annotations

import torch
from helpers.models import Conv1D
from torch import Tensor, nn

from rankguard.probe.targets import WeightTarget

torch.set_num_threads(1)


def make_matrix(
    m: int, n: int, *, cond: float = 10.0, rank: int | None = None, seed: int = 0
) -> Tensor:
    """fp32 (m, n) with log-spaced singular values from 1 down to 1/cond over its rank
    (rank < min(m, n): exact zeros in float64, round-off level once cast to fp32)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n) if rank is None else rank
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = torch.logspace(0.0, -torch.log10(torch.tensor(cond)).item(), k, dtype=torch.float64)
    return ((U * s) @ V.T).to(torch.float32)


class Attn(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.c_attn = nn.Linear(d, 3 * d)  # fused QKV, (3d, d)
        self.c_proj = Conv1D(d, d)  # transposed storage

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.c_attn(x).chunk(3, dim=-1)
        a = torch.softmax(q @ k.mT / q.shape[-1] ** 0.5, dim=-1)
        return self.c_proj(a @ v)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.attn = Attn(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln(x))
        return x + self.mlp(self.ln(x))


class TinyModel(nn.Module):
    def __init__(self, d: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.h = nn.ModuleList([Block(d) for _ in range(layers)])
        self.out = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.h:
            x = block(x)
        return self.out(x)


def as_target(w: Tensor, name: str = "w", *, requires_grad: bool = True) -> WeightTarget:
    """A stand-alone target over a fresh parameter holding ``w``."""
    param = nn.Parameter(w.clone(), requires_grad=requires_grad)
    return WeightTarget(
        name=name,
        module_name=name,
        parameter=param,
        rows=None,
        transposed=False,
        groups=frozenset(),
    )
