"""Quickstart: the probe on a small GPT, printing what it measured.

    python examples/quickstart.py

Trains a 2-layer nanoGPT-style model for 100 steps on a toy next-token task with
``Probe(every=10)`` (no server: results go to a JSON Lines file under ./rankguard_logs), then
prints the latest value of every quantity and the path of that file.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from rankguard.probe import Probe
from rankguard.probe.demo.model import GPT, ModelConfig, next_token_loss, random_batch


def main() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=128, block_size=32, n_layer=2, n_head=4, n_embd=64, bias=True, attn_impl="sdpa"
    )
    model = GPT(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    with Probe(model, optimizer, run="quickstart", server=None, every=10) as probe:
        for _ in range(100):
            x, y = random_batch(cfg, 16, gen)
            loss = next_token_loss(model, x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            probe.step(loss)  # cheap; samples every 10 steps
    elapsed = time.perf_counter() - started

    by_quantity: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for (quantity, target), value in sorted(probe.latest().items()):
        by_quantity[quantity].append((target, value))
    print(f"{'quantity':<28} {'target':<52} {'value':>12}")
    print("-" * 94)
    for quantity, rows in by_quantity.items():
        shown = rows if len(rows) <= 4 else [*rows[:3], ("...", float("nan")), rows[-1]]
        for target, value in shown:
            cell = "" if target == "..." else f"{value:12.4g}"
            print(f"{quantity:<28} {target:<52} {cell:>12}")
        if len(rows) > 4:
            print(f"{'':<28} ({len(rows)} targets)")
    print("-" * 94)
    print(f"100 steps in {elapsed:.1f} s; results written to {probe.sink_path}")


if __name__ == "__main__":
    main()
