"""Claim: with the server down, a training step costs what it costs with no server at all.

Two identical probed GPTs (rankguard.probe.demo.model) train on the same batches in
interleaved A/B blocks: A with no server configured (offline: the probe appends to its local
file), B with ``server=`` pointing at a closed port (every request fails; the background
thread spills to the same kind of file and retries). Printed: the median over block pairs of
t_B/t_A, the spread, and B's transport counters (all spilled, none dropped).

    python benchmarks/server_down.py [--quick] [--threads 2] [--every 5]
"""

from __future__ import annotations

import argparse
import copy
import socket
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.probe_overhead import train_block
from rankguard.probe import Probe
from rankguard.probe.demo.model import GPT, ModelConfig, random_batch


def closed_port() -> int:
    """A port nothing listens on (bound and released: connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer block pairs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--every", type=int, default=5, help="probe cadence (small: more traffic)")
    ap.add_argument("--block", type=int, default=50, help="steps per block")
    ap.add_argument("--pairs", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pairs = args.pairs or (4 if args.quick else 10)
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, bias=True, attn_impl="sdpa")
    torch.manual_seed(0)
    offline_model = GPT(cfg)
    down_model = copy.deepcopy(offline_model)
    opt_a = torch.optim.AdamW(offline_model.parameters(), lr=1e-3)
    opt_b = torch.optim.AdamW(down_model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    batches = [random_batch(cfg, 16, g, "cpu") for _ in range(args.block)]
    dead = f"http://127.0.0.1:{closed_port()}"
    print(
        f"torch {torch.__version__}, {args.threads} threads; GPT {cfg.n_layer}x{cfg.n_embd}; "
        f"every={args.every}; {pairs} A/B pairs of {args.block}-step blocks; dead server {dead}"
    )
    with tempfile.TemporaryDirectory() as log_dir:
        offline = Probe(offline_model, opt_a, run="offline", every=args.every, log_dir=log_dir)
        down = Probe(down_model, opt_b, run="down", server=dead, every=args.every, log_dir=log_dir)
        train_block(offline_model, opt_a, batches[:10], offline)  # warm-up both
        train_block(down_model, opt_b, batches[:10], down)
        ratios = []
        for i in range(pairs):
            if i % 2 == 0:  # alternate the order: drift in machine load cancels
                ta = train_block(offline_model, opt_a, batches, offline)
                tb = train_block(down_model, opt_b, batches, down)
            else:
                tb = train_block(down_model, opt_b, batches, down)
                ta = train_block(offline_model, opt_a, batches, offline)
            ratios.append(tb / ta)
            print(
                f"  pair {i}: no server {1e3 * ta / args.block:6.2f} ms/step, server down "
                f"{1e3 * tb / args.block:6.2f} ms/step, ratio {tb / ta:.4f}",
                flush=True,
            )
        stats = down.stats()
        offline.close()
        report = down.close(timeout=1)
    median = statistics.median(ratios)
    print()
    spread = f"min {min(ratios):.4f}, max {max(ratios):.4f}"
    print(f"server down / no server: median {median:.4f}, {spread}")
    print(
        f"server-down transport: spilled {stats.spilled_batches} batches, dropped "
        f"{stats.dropped_batches}, failed requests {stats.failed_requests}; at close: "
        f"{report.undelivered_batches} batches kept for `rankguard upload`"
    )


if __name__ == "__main__":
    main()
