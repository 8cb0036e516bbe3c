"""Claim (issue 19): snapshots of the training state at the defaults (every 50 steps, 2
known-good kept) cost <= 2% of the step time, and this much host memory.

Two identical GPTs (benchmarks/scenarios/model.py, the cost benchmarks' nanoGPT layout) and
AdamW train on the same batches, interleaved step by step (A, B, then B, A, ...) over blocks
of ``every`` steps: A plain, B with a :class:`~rankguard.probe.recovery.SnapshotRing` taking
a snapshot at the block's first step and confirming it, as the probe's recovery does.
Printed: the median over blocks of t_B / t_A and its spread, the time of one snapshot and
of one restore, the amortised ratio 1 + t_snapshot / (K x t_step) for several K (what picks
the default), and the host
memory the ring holds against the model + optimizer state. ``--guard`` adds a third arm:
the probe's per-step checks of the auto-recover profile (the in-process first response).

    python -m benchmarks.snapshot_cost [--quick] [--threads 1] [--device cpu|cuda]
        [--gpt2-small] [--guard]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rankguard.probe.config import RecoveryConfig
from rankguard.probe.demo.model import GPT, ModelConfig, next_token_loss, random_batch
from rankguard.probe.recovery.flight import FlightRecorder
from rankguard.probe.recovery.guard import StepGuard
from rankguard.probe.recovery.snapshots import SnapshotRing, StateSource

SIZES = {
    "quick": {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 32},
    "default": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64},
    # GPT-2 small: 12 layers, 12 heads, 768 wide (a 256-token context keeps it in memory)
    "gpt2-small": {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 256},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Arm:
    """One model + optimizer, and what runs beside it each step."""

    def __init__(self, base: GPT, every: int, kind: str) -> None:
        self.model = copy.deepcopy(base)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.kind, self.every = kind, every
        self.ring: SnapshotRing | None = None
        self.guard: StepGuard | None = None
        self.stream: Any = None
        device = next(self.model.parameters()).device
        self.device = device
        if kind in ("snapshots", "guard"):
            self.ring = SnapshotRing(keep=2)
            self.source = StateSource(self.model, self.opt)
            if device.type == "cuda":
                self.stream = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
        if kind == "guard":
            config = RecoveryConfig.auto_recover()
            params = list(self.model.parameters())
            weights = [p for p in params if p.dim() == 2]
            flight = FlightRecorder(config.flight_steps, device)
            self.guard = StepGuard(self.opt, params, weights, config, flight, device)
        self.step = 0

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One training step (and what runs beside it); its wall time."""
        _sync(self.device)
        t0 = time.perf_counter()
        pending = self.ring.in_flight() if self.ring is not None else None
        loss = next_token_loss(self.model, x, y)
        loss.backward()
        if pending is not None:
            pending.fence()  # the update waits for the side-stream copy (no host sync)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.guard is not None:
            self.guard.end_step(self.step, loss)
        if self.ring is not None and self.step % self.every == 0:
            if self.ring.pending is not None:
                self.ring.confirm()
            self.ring.take(self.source, self.step, self.step, stream=self.stream)
        self.step += 1
        _sync(self.device)
        return time.perf_counter() - t0


def interleaved_block(
    arms: dict[str, Arm], batches: list[tuple[torch.Tensor, torch.Tensor]], flip: bool
) -> dict[str, float]:
    """Every arm trains the block step by step in turn (the order reversed every step), so
    a burst of load from elsewhere hits all arms within a step of each other."""
    kinds = list(arms)
    totals = dict.fromkeys(kinds, 0.0)
    for i, (x, y) in enumerate(batches):
        order = kinds if (i % 2 == 0) != flip else kinds[::-1]
        for kind in order:
            totals[kind] += arms[kind].train_step(x, y)
    return totals


def timings(arm: Arm, batches: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> dict[str, float]:
    """Median wall time of one snapshot and of one restore (the device synchronised)."""
    assert arm.ring is not None
    snaps, restores = [], []
    for i in range(n):
        _sync(arm.device)
        t0 = time.perf_counter()
        snapshot = arm.ring.take(arm.source, 10_000 + i, 0, stream=arm.stream)
        snapshot.wait()
        snaps.append(time.perf_counter() - t0)
        arm.ring.confirm()
        t0 = time.perf_counter()
        snapshot.restore(arm.source)
        _sync(arm.device)
        restores.append(time.perf_counter() - t0)
    return {"snapshot_s": statistics.median(snaps), "restore_s": statistics.median(restores)}


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    state = sum(
        v.numel() * v.element_size()
        for s in opt.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )
    return params + buffers + state


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--gpt2-small", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=None)
    ap.add_argument("--every", type=int, default=RecoveryConfig().snapshot_every)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--guard", action="store_true", help="also time the per-step checks")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = "gpt2-small" if args.gpt2_small else "quick" if args.quick else "default"
    pairs = args.pairs or (3 if args.quick else 8)
    cfg = ModelConfig(bias=True, attn_impl="sdpa", **SIZES[size])
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = GPT(cfg).to(device)
    kinds = ["plain", "snapshots", *(["guard"] if args.guard else [])]
    arms = {kind: Arm(base, args.every, kind) for kind in kinds}
    g = torch.Generator().manual_seed(1)
    batches = [random_batch(cfg, args.batch, g, device) for _ in range(args.every)]
    print(
        f"torch {torch.__version__}, {device}, {args.threads} thread(s); GPT {cfg.n_layer}x"
        f"{cfg.n_embd}, T={cfg.block_size}, batch {args.batch}; {pairs} interleaved blocks of "
        f"{args.every} steps per arm; kinds {kinds}",
        flush=True,
    )
    interleaved_block(arms, batches[:5], False)  # warm-up; the optimizer state exists
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for i in range(pairs):
        for kind, total in interleaved_block(arms, batches, i % 2 == 1).items():
            times[kind].append(total)
        line = ", ".join(f"{k} {1e3 * times[k][-1] / args.every:.2f}" for k in kinds)
        print(f"  block {i}: ms/step {line}", flush=True)
    step_s = statistics.median(times["plain"]) / args.every
    parts = timings(arms["snapshots"], batches, 5)
    held = state_bytes(arms["plain"].model, arms["plain"].opt)
    ring = arms["snapshots"].ring
    assert ring is not None
    print()
    for kind in kinds[1:]:
        r = [b / a for a, b in zip(times["plain"], times[kind], strict=True)]
        print(
            f"{kind}: A/B median ratio {statistics.median(r):.4f} (min {min(r):.4f}, "
            f"max {max(r):.4f})"
        )
    print(
        f"one snapshot {1e3 * parts['snapshot_s']:.2f} ms, one restore "
        f"{1e3 * parts['restore_s']:.2f} ms, median step {1e3 * step_s:.2f} ms"
    )
    for k in (10, 25, 50, 100, 200):
        print(f"  amortised at every={k:<3}: {1 + parts['snapshot_s'] / (k * step_s):.4f}")
    print(
        f"host memory: ring {ring.nbytes / 2**20:.2f} MiB for model + optimizer state "
        f"{held / 2**20:.2f} MiB ({ring.nbytes / held:.2f}x: {ring.keep} known-good + 1)"
    )


if __name__ == "__main__":
    main()
