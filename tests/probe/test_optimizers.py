"""The optimizer behind a wrapper: accelerate's, Lightning's, DeepSpeed-style objects are
unwrapped at construction, and one the scale_lr command could not act on is refused there,
not when the command arrives in the middle of an incident."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from helpers.models import TinyGPT
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import nn

from rankguard.probe import ConfigError, Probe
from rankguard.probe.transport import MemoryTransport


class DeepSpeedStyle:
    """A wrapper that is not an optimizer itself and exposes the real one as ``.optimizer``."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def step(self) -> None:
        self.optimizer.step()


class NoHooks:
    """Optimizer-like (param_groups, step) but not a torch.optim.Optimizer: no step hooks."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.param_groups = [{"params": params, "lr": 0.1}]

    def step(self) -> None:
        return None


@pytest.mark.parametrize("wrap", [LightningOptimizer, DeepSpeedStyle])
def test_wrappers_are_unwrapped(tiny_gpt, wrap) -> None:
    sgd = torch.optim.SGD(tiny_gpt.parameters(), lr=0.1)
    probe = Probe(tiny_gpt, wrap(sgd), run="w", transport=MemoryTransport())
    assert probe.optimizer is sgd


def test_an_optimizer_without_step_hooks_is_refused_at_construction(tiny_gpt) -> None:
    with pytest.raises(ConfigError, match=r"optimizer: NoHooks .*scale_lr.*optimizer=None"):
        Probe(tiny_gpt, NoHooks(list(tiny_gpt.parameters())), run="w", transport=MemoryTransport())


def test_accelerate_prepared_model_and_optimizer_as_they_are() -> None:
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = TinyGPT()
    model, opt = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    transport = MemoryTransport()
    probe = Probe(model, opt, run="acc", transport=transport, every=1)
    assert probe.optimizer is opt.optimizer  # the real SGD behind AcceleratedOptimizer
    transport.push_command({"id": "c", "kind": "scale_lr", "args": {"factor": 0.5}})
    g = torch.Generator().manual_seed(0)
    applied = []
    for _ in range(6):  # 3 optimizer steps of 2 micro-batches
        idx = torch.randint(0, 32, (2, 8), generator=g)
        with accelerator.accumulate(model):
            loss = model(idx).logsumexp(-1).mean()
            accelerator.backward(loss)
            w = next(model.parameters()).detach().clone()
            grad = next(model.parameters()).grad.clone()
            opt.step()
            opt.zero_grad()
        if accelerator.sync_gradients:  # one probe.step per real optimizer step
            i = int(grad.abs().argmax())
            after = next(model.parameters()).detach().flatten()[i]
            applied.append(float((w.flatten()[i] - after) / grad.flatten()[i]))
            probe.step(loss)
    assert transport.acks[0][1]["state"] == "applied"  # never AttributeError at incident time
    assert applied == pytest.approx([0.1, 0.05, 0.05], rel=1e-4)
    probe.close()
