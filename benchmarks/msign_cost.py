"""MSign cost: the exact SVD engine against the Newton–Schulz (Polar Express) engine.

Part 1, per matrix (fp32, Gaussian entries; square sizes and one 1024×4096): time of each
engine (median of repeats, after a warm-up), the ratio t_ns/t_svd, the worst relative
error of the Newton–Schulz result's singular values against the target ‖W‖_F/√r, the
fraction of singular values within 1% of it, and stable rank / rank of the result.

Part 2, amortised overhead of periodic MSign at P=100 on the benchmark GPT
(rankguard.probe.demo.model, all_2d targets): interleaved blocks of 100 AdamW steps without and
with MSign (one application per block, at its 100th step); the ratio is time(with)/time
(without), the median over block pairs, for each engine.

    python -m benchmarks.msign_cost --threads 2            # CPU, full run
    python -m benchmarks.msign_cost --device cuda          # on a GPU
    python -m benchmarks.msign_cost --quick                # a fast smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rankguard.probe.interventions import MSign, apply_msign, msign_newton_schulz, msign_svd
from rankguard.probe.interventions.polar import DEFAULT_STEPS
from rankguard.probe.targets import find_targets


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device, repeats: int, warmup: bool) -> float:
    if warmup:
        fn()  # kernels, workspace, LAPACK buffers
        _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matrix_table(sizes: list[tuple[int, int]], device: torch.device, steps: int) -> None:
    print(f"\n== MSign per matrix, fp32, device={device}, NS steps={steps} ==")
    header = (
        f"{'shape':>11} {'t_svd [ms]':>11} {'t_ns [ms]':>10} {'ns/svd':>7} "
        f"{'worst σ err':>11} {'≤1%':>6} {'srank/rank':>10}"
    )
    print(header)
    g = torch.Generator().manual_seed(0)
    for m, n in sizes:
        w = torch.randn(m, n, generator=g).to(device)
        # big matrices on a CPU take minutes: one untimed warm-up would double that
        small = m * n <= 1024 * 1024 or device.type != "cpu"
        repeats = (5 if m * n <= 512 * 512 else 3) if small else 1
        t_svd = _time(lambda w=w: msign_svd(w), device, repeats, warmup=small)
        t_ns = _time(lambda w=w: msign_newton_schulz(w, steps=steps), device, repeats, small)
        exact = msign_svd(w)
        out = msign_newton_schulz(w, steps=steps).matrix
        s = torch.linalg.svdvals(out)  # fp32 on the device: accurate to ~1e-6 of σ₁
        target = float(torch.linalg.matrix_norm(w)) / exact.rank**0.5
        rel = ((s[: exact.rank] - target) / target).abs()
        srank = float((s**2).sum() / s[0] ** 2)
        print(
            f"{m:>5}×{n:<5} {1e3 * t_svd:>11.1f} {1e3 * t_ns:>10.1f} {t_ns / t_svd:>7.3f} "
            f"{float(rel.max()):>11.2e} {float((rel <= 0.01).float().mean()):>6.3f} "
            f"{srank / exact.rank:>10.4f}"
        )


def _gpt(device: torch.device) -> tuple[torch.nn.Module, Callable[[], torch.Tensor]]:
    """The GPT and its loss on one fixed batch of 16 sequences."""
    from rankguard.probe.demo.model import GPT, ModelConfig, next_token_loss, random_batch

    cfg = ModelConfig(block_size=64, bias=True, attn_impl="sdpa")
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    gen = torch.Generator().manual_seed(0)
    idx, targets = random_batch(cfg, 16, gen, device)
    return model, lambda: next_token_loss(model, idx, targets)


def gpt_overhead(device: torch.device, pairs: int, period: int, engines: list[str]) -> None:
    model, loss_of_batch = _gpt(device)
    targets = find_targets(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"\n== periodic MSign overhead on rankguard.probe.demo.model "
        f"({n_params / 1e6:.2f}M params, "
        f"{len(targets)} all_2d targets, batch 16×{model.config.block_size}), P={period} =="
    )

    def block(engine: str | None) -> float:
        msign = MSign(optimizer, targets, period=period, engine=engine) if engine else None
        _sync(device)
        start = time.perf_counter()
        for _ in range(period):
            loss = loss_of_batch()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        _sync(device)
        elapsed = time.perf_counter() - start
        if msign is not None:
            assert msign.applications == 1
            msign.remove()
        return elapsed

    block(None)  # warm-up
    for engine in engines:
        block(engine)
    ratios: dict[str, list[float]] = {e: [] for e in engines}
    base_times: list[float] = []
    for _ in range(pairs):
        for engine in engines:  # interleave: base, with, base, with, ...
            base = block(None)
            with_msign = block(engine)
            base_times.append(base)
            ratios[engine].append(with_msign / base)
    step_ms = 1e3 * statistics.median(base_times) / period
    print(f"baseline step: {step_ms:.2f} ms (median over {len(base_times)} blocks)")
    # The block ratio is noisy on a shared CPU; the one-application time over P steps is the
    # same amortised overhead measured directly (median of 5 applications per engine).
    for engine in engines:
        t_apply = _time(
            lambda engine=engine: apply_msign(targets, engine=engine, stats="none"),
            device,
            5,
            warmup=True,
        )
        print(
            f"engine={engine:<14} one application {1e3 * t_apply:.1f} ms -> amortised "
            f"1 + t_apply/(P·t_step) = {1 + t_apply / (period * step_ms / 1e3):.4f}"
        )
    for engine in engines:
        r = ratios[engine]
        print(
            f"engine={engine:<14} time(with MSign)/time(without) = {statistics.median(r):.4f} "
            f"(median of {len(r)} block pairs; min {min(r):.4f}, max {max(r):.4f})"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="small sizes, few block pairs")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="Newton–Schulz steps")
    parser.add_argument("--pairs", type=int, default=None, help="GPT block pairs")
    parser.add_argument("--skip-gpt", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f", threads {torch.get_num_threads()}"
    )
    if args.quick:
        sizes = [(256, 256), (512, 512), (256, 1024)]
    else:
        sizes = [(256, 256), (512, 512), (1024, 1024), (2048, 2048), (4096, 4096), (1024, 4096)]
    matrix_table(sizes, device, args.steps)
    if not args.skip_gpt:
        pairs = args.pairs or (2 if args.quick else 4)
        gpt_overhead(device, pairs, period=100, engines=["svd", "newton_schulz"])


if __name__ == "__main__":
    main()
