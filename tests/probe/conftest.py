"""Small models shared by the probe tests (fixtures, so sub-folders see them too)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

torch.set_num_threads(1)


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


def train_steps(
    model: nn.Module,
    probe: object,
    steps: int,
    *,
    vocab: int = 32,
    batch: int = 4,
    seq: int = 8,
    seed: int = 0,
    loss_fn: Callable[[Tensor], Tensor] | None = None,
) -> list[float]:
    """A plain loop calling probe.step(loss) after optimizer.step(); returns the losses."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, vocab, (batch, seq), generator=g)
        logits = model(idx)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), idx[:, 1:].reshape(-1))
        if loss_fn is not None:
            loss = loss_fn(loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        probe.step(loss)  # type: ignore[attr-defined]
        losses.append(loss.item())
    return losses


@pytest.fixture
def tiny_gpt() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT()


@pytest.fixture
def make_gpt() -> Callable[..., TinyGPT]:
    def make(**kwargs: object) -> TinyGPT:
        torch.manual_seed(0)
        return TinyGPT(**kwargs)  # type: ignore[arg-type]

    return make


@pytest.fixture
def conv1d_cls() -> type[Conv1D]:
    return Conv1D


@pytest.fixture
def train() -> Callable[..., list[float]]:
    return train_steps


def make_context(model: nn.Module, **kwargs: object) -> object:
    """A StepContext over ``model`` with defaults for everything not given."""
    from rankguard.probe.config import ProbeConfig
    from rankguard.probe.hooks import Captures
    from rankguard.probe.quantities.base import StepContext
    from rankguard.probe.quantities.spectral import PowerIteration
    from rankguard.probe.targets import find_targets

    defaults: dict[str, object] = {
        "step": 0,
        "model": model,
        "targets": find_targets(model),
        "config": ProbeConfig(),
        "weights": PowerIteration(iterations=4, cold_iterations=30),
        "inputs_spectrum": PowerIteration(iterations=4, cold_iterations=30),
        "captures": Captures(),
        "params": list(model.named_parameters()),
    }
    defaults.update(kwargs)
    return StepContext(**defaults)  # type: ignore[arg-type]


@pytest.fixture
def ctx_for() -> Callable[..., object]:
    return make_context


def matrix_with_spectrum(s: Tensor, rows: int, cols: int, seed: int = 0) -> Tensor:
    """U diag(s) Vᵀ with random orthonormal U (rows, k), V (cols, k); k = len(s)."""
    g = torch.Generator().manual_seed(seed)
    k = s.numel()
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=g))
    return (u * s) @ v.t()


@pytest.fixture
def spectrum_matrix() -> Callable[..., Tensor]:
    return matrix_with_spectrum
