"""Tiny models shared by the probe, e2e and DDP tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Attention", "Block", "Conv1D", "TinyGPT"]


class Conv1D(nn.Module):
    """Mimics transformers' Conv1D (GPT-2): weight (nx, nf), y = x @ W + b."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight + self.bias


class Attention(nn.Module):
    def __init__(self, d: int, n_head: int, conv1d: bool = False) -> None:
        super().__init__()
        self.c_attn: nn.Module = Conv1D(3 * d, d) if conv1d else nn.Linear(d, 3 * d)
        self.c_proj: nn.Module = Conv1D(d, d) if conv1d else nn.Linear(d, d)
        self.n_head = n_head

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, d: int, n_head: int, conv1d: bool = False) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = Attention(d, n_head, conv1d)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(d, 4 * d), "c_proj": nn.Linear(4 * d, d)})

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp["c_proj"](F.gelu(self.mlp["c_fc"](self.ln_2(x))))


class TinyGPT(nn.Module):
    """nanoGPT layout: transformer.{wte, h.N.{attn.c_attn, attn.c_proj, mlp}}, tied lm_head."""

    def __init__(
        self, vocab: int = 32, d: int = 16, n_layer: int = 2, n_head: int = 2, conv1d: bool = False
    ) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(vocab, d),
                "h": nn.ModuleList([Block(d, n_head, conv1d) for _ in range(n_layer)]),
            }
        )
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def forward(self, idx: Tensor) -> Tensor:
        x = self.transformer.wte(idx)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(x)
