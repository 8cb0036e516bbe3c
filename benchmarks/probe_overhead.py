"""Claim: the probe costs <= 2% of a training step at the default cadence (every=50) on CPU.

A small GPT (rankguard.probe.demo.model, nanoGPT layout) trains with and without the probe
in the same process: two identical models (same init, same batches), one of them probed,
trained in interleaved A/B blocks of whole sampling windows, so every B block carries its
share of sampled steps (and of the sparser Jacobian steps, amortised over the blocks).
Printed: the median over block pairs of t_probe/t_base and the spread (min-max), at every=50
and at every=1.
On CUDA it also checks that non-sampled steps make no host sync
(``torch.cuda.set_sync_debug_mode("error")``).

    python benchmarks/probe_overhead.py [--quick] [--device cpu|cuda] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rankguard.probe import Probe
from rankguard.probe.demo.model import GPT, ModelConfig, next_token_loss, random_batch
from rankguard.probe.sink import NullSink


def train_block(model, opt, batches, probe=None, sync_check=False, calls=None) -> float:  # type: ignore[no-untyped-def]
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for x, y in batches:
        loss = next_token_loss(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if probe is not None:
            due = [q.name for q in probe.quantities if q.should_compute(probe.step_count)]
            kind = "jacobian" if "jacobian_alignment" in due else "sample" if due else "plain"
            if sync_check and not due:
                torch.cuda.set_sync_debug_mode("error")  # raises on any host sync
            t_call = time.perf_counter()
            try:
                probe.step(loss)
            finally:
                if sync_check:
                    torch.cuda.set_sync_debug_mode(0)
            if calls is not None:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                calls.setdefault(kind, []).append(time.perf_counter() - t_call)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(
    cfg: ModelConfig, every: int, args: argparse.Namespace, log_dir: str
) -> tuple[list[float], float]:
    torch.manual_seed(0)
    base = GPT(cfg).to(args.device)
    probed = copy.deepcopy(base)
    opt_a = torch.optim.AdamW(base.parameters(), lr=1e-3)
    opt_b = torch.optim.AdamW(probed.parameters(), lr=1e-3)
    probe = Probe(
        probed, opt_b, run=f"overhead-every{every}", every=every, sink=NullSink(), log_dir=log_dir
    )
    g = torch.Generator().manual_seed(1)
    block = max(every, args.block)
    batches = [random_batch(cfg, args.batch, g, args.device) for _ in range(block)]
    # warm-up: allocator, kernels, the probe's cold start
    train_block(base, opt_a, batches[: args.warmup])
    train_block(probed, opt_b, batches[: args.warmup], probe)
    # jump the counter to a Jacobian step: the first B block carries one (over all pairs that
    # is one per pairs·block steps, at least as often as the default 10·every: conservative)
    x, y = batches[0]
    probe.step(model_loss(probed, x, y), step=probe.config.jacobian_every * 10 - 1)  # type: ignore[operator]
    calls: dict[str, list[float]] = {}
    ratios, base_steps = [], []
    for i in range(args.pairs):
        if i % 2 == 0:  # alternate the order inside a pair: drift in machine load cancels
            ta = train_block(base, opt_a, batches)
            tb = train_block(probed, opt_b, batches, probe, args.device == "cuda", calls)
        else:
            tb = train_block(probed, opt_b, batches, probe, args.device == "cuda", calls)
            ta = train_block(base, opt_a, batches)
        ratios.append(tb / ta)
        base_steps.append(ta / block)
        print(
            f"  every={every:<3} pair {i}: base {1e3 * ta / block:7.2f} ms/step, "
            f"probe {1e3 * tb / block:7.2f} ms/step, ratio {tb / ta:.4f}",
            flush=True,
        )
    probe.close()
    # the same overhead from its parts (robust to load noise): min time of each kind of
    # probe.step call, weighted by how often it occurs, over the median base step
    t_plain = min(calls.get("plain", [0.0]))
    t_sample = min(calls.get("sample", [t_plain]))
    t_jac = min(calls.get("jacobian", [t_sample]))
    jac_every = probe.config.jacobian_every or 10 * every
    per_step = t_plain + (t_sample - t_plain) / every + (t_jac - t_sample) / jac_every
    print(
        f"  every={every:<3} probe.step: plain {1e6 * t_plain:.0f} us, sampled "
        f"{1e3 * t_sample:.2f} ms, Jacobian step {1e3 * t_jac:.1f} ms (every {jac_every})"
    )
    return ratios, 1.0 + per_step / statistics.median(base_steps)


def model_loss(model, x, y):  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return next_token_loss(model, x, y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer, shorter blocks")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=None)
    ap.add_argument("--block", type=int, default=50, help="steps per block (>= every)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.pairs is None:
        args.pairs = 3 if args.quick else 8
    # --quick: a smaller model too, so the run stays short on a busy machine
    sizes = (
        {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 32}
        if args.quick
        else {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64}
    )
    cfg = ModelConfig(bias=True, attn_impl="sdpa", **sizes)
    print(
        f"torch {torch.__version__}, device {args.device}, {args.threads} threads; GPT "
        f"{cfg.n_layer}x{cfg.n_embd}, T={cfg.block_size}, batch {args.batch}; "
        f"{args.pairs} A/B pairs of {args.block}-step blocks (Jacobian every 10x)"
    )
    rows = []
    with tempfile.TemporaryDirectory() as log_dir:
        for every in (50, 1):
            r, parts = measure(cfg, every, args, log_dir)
            rows.append((every, statistics.median(r), min(r), max(r), parts))
    print()
    print(f"{'every':>6} {'A/B median ratio':>17} {'min':>8} {'max':>8} {'from parts':>11}")
    for every, med, lo, hi, parts in rows:
        print(f"{every:>6} {med:>17.4f} {lo:>8.4f} {hi:>8.4f} {parts:>11.4f}")
    med50 = rows[0][1]
    print(f"target <= 1.02 at every=50: {'MET' if med50 <= 1.02 else 'NOT MET'} ({med50:.4f})")
    if args.device == "cuda":
        print("host syncs on non-sampled steps: none (set_sync_debug_mode('error') passed)")


if __name__ == "__main__":
    main()
