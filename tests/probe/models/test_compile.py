"""torch.compile: the probe costs one extra graph (its hooks switched on), compiled with the
first sampled step, and no recompilation after it; every sampled step has every quantity."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import pytest
import torch
from helpers.zoo import ENTRIES
from torch._dynamo.utils import counters

from rankguard.probe import Probe
from rankguard.probe.transport import MemoryTransport
from rankguard.probe.wire import iter_points

torch.set_num_threads(1)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings(
        "ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning"
    ),
]

STEPS = 9  # samples at 0, 2, 4, 6, 8; the Jacobian at 0, 4, 8


def train(
    name: str, *, probe: bool, compile_first: bool = True
) -> tuple[list[int], MemoryTransport]:
    """Unique graphs after each step, and what the probe sent."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    entry = ENTRIES[name]
    model = entry.build()
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    transport = MemoryTransport()
    attached: Any = None
    if probe:
        target = compiled if compile_first else model
        attached = Probe(target, opt, run=name, transport=transport, every=2, jacobian_every=4)
    g = torch.Generator().manual_seed(0)
    graphs = []
    for _ in range(STEPS):
        loss = entry.loss(compiled, entry.batch(g))
        loss.backward()
        opt.step()
        opt.zero_grad()
        if attached is not None:
            attached.step(loss)
        graphs.append(int(counters["stats"]["unique_graphs"]))
    if attached is not None:
        attached.close()
    return graphs, transport


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_no_recompilation_after_the_first_sampled_step(name: str) -> None:
    baseline, _ = train(name, probe=False)
    graphs, transport = train(name, probe=True)
    assert graphs[-1] == baseline[-1] + 1  # the graph with the probe's hooks switched on
    assert graphs[1:] == [graphs[1]] * (STEPS - 1)  # nothing compiled after that
    seen = Counter(p.quantity for p in iter_points(transport.batches))
    for quantity in ("sa_sign_diversity", "attention_logit_max", "grad_norm", "stable_rank"):
        assert seen[quantity] > 0 and seen[quantity] % 5 == 0, quantity  # at all 5 samples
    assert seen["jacobian_alignment"] == 3 * 2  # 3 Jacobian samples x 2 block pairs
    steps = {p.step for p in iter_points(transport.batches) if p.quantity == "sa_sign_diversity"}
    assert steps == {0, 2, 4, 6, 8}


def test_names_carry_the_compile_prefix() -> None:
    torch.manual_seed(0)
    model = ENTRIES["llama"].build()
    probe = Probe(torch.compile(model, backend="eager"), run="c", transport=MemoryTransport())
    assert probe.compiled
    assert all(t.name.startswith("_orig_mod.") for t in probe.targets)
    assert probe.blocks[0][0] == "_orig_mod.model.layers.0"


def test_compiled_after_attaching_is_said(caplog: pytest.LogCaptureFixture) -> None:
    # attached to the plain module, then compiled: hooks registered later are never called
    # by the compiled code; the probe cannot know in advance, but says so at the sample
    with caplog.at_level(logging.WARNING, logger="rankguard.probe"):
        _, transport = train("llama", probe=True, compile_first=False)
    events = [e["payload"] for b in transport.batches for e in b.get("events", [])]
    said = {e["quantity"] for e in events if "compiled=True" in e["reason"]}
    assert "sa_sign_diversity" in said
