"""Small models shared by the probe tests (fixtures, so sub-folders see them too)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from helpers.models import Conv1D, TinyGPT
from torch import Tensor, nn

torch.set_num_threads(1)


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
