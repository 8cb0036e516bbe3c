"""One rank of the FSDP2 test (run by torchrun; not collected by pytest).

usage: fsdp_worker.py OUT_DIR

Trains a tiny GPT sharded by FSDP2 (``fully_shard`` per block, gloo, CPU) with the probe
attached to every rank: block 0 has ``nn.Linear`` layers (fused ``c_attn`` row-sharded),
block 1 HF-style ``Conv1D`` layers (stored (in, out): Shard(0) cuts the input columns).
d = 15 splits unevenly over 2 ranks and the fused [k] slice straddles the shard boundary.
Every target starts from a matrix with a spectral gap (σ₂/σ₁ = 1/3), so the warm-started
power iteration is converged to well below the test's tolerance.

Steps 0-3 train; before each ``probe.step`` the rank gathers (``full_tensor()``, here only)
every parameter the probe sampled. At step 3 rank 0 queues an ``msign`` command (applied
on every rank after that step's sample); step 4 is a sample without training, so it sees
the rewritten weights. Exit code 75: FSDP2 could not be initialised on this build.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers.models import Block, TinyGPT
from torch import Tensor

from rankguard.probe import Probe
from rankguard.probe.quantities.sharded import shard_layout
from rankguard.probe.transport import MemoryTransport

VOCAB = 32
D = 15
COMMAND_STEP = 3
CANNOT_SHARD = 75


def gapped(m: int, n: int, generator: torch.Generator) -> Tensor:
    """An (m, n) matrix with singular values 3, 1, 0.95, ... (σ₂/σ₁ = 1/3)."""
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=generator))
    s = torch.cat([torch.tensor([3.0]), torch.linspace(1.0, 0.2, k - 1)])
    return (u * s) @ v.t() * 0.3


@torch.no_grad()
def plant_spectra(model: TinyGPT, generator: torch.Generator) -> None:
    """Every probe target (each third of a fused c_attn too) gets a gapped matrix."""
    for block in model.transformer.h:
        for module in (block.attn.c_attn, block.attn.c_proj, *block.mlp.values()):
            weight = module.weight
            conv1d = not isinstance(module, torch.nn.Linear)
            out_dim = weight.shape[1] if conv1d else weight.shape[0]
            in_dim = weight.shape[0] if conv1d else weight.shape[1]
            parts = 3 if module is block.attn.c_attn else 1
            w = torch.cat([gapped(out_dim // parts, in_dim, generator) for _ in range(parts)])
            weight.copy_(w.t() if conv1d else w)


def main() -> None:
    out_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    except Exception as exc:  # this torch build has no FSDP2 on CPU/gloo
        print(f"FSDP2 unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
        dist.destroy_process_group()
        sys.exit(CANNOT_SHARD)

    torch.manual_seed(0)  # identical initial weights on every rank
    model = TinyGPT(d=D, n_head=3)
    model.transformer.h[1] = Block(D, 3, conv1d=True)
    plant_spectra(model, torch.Generator().manual_seed(1))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # parameters are DTensors from here on
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    transport = MemoryTransport()
    probe = Probe(
        model, optimizer, run="fsdp", every=1, command_every=1, transport=transport, strict=True
    )
    params = dict(model.named_parameters())
    sampled = sorted({t.parameter_name for t in probe.targets})

    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    weights: dict[int, dict[str, Tensor]] = {}
    latest: dict[int, dict[str, dict[str, float]]] = {}
    for step in range(COMMAND_STEP + 2):
        loss = None
        if step <= COMMAND_STEP:
            idx = torch.randint(0, VOCAB, (2, 8), generator=generator)
            logits = model(idx)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), idx[:, 1:].reshape(-1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        # what the probe samples at this step, gathered for the reference (a collective)
        weights[step] = {n: params[n].detach().full_tensor().clone() for n in sampled}
        if step == COMMAND_STEP and rank == 0:
            transport.push_command(
                {"id": "c1", "kind": "msign", "args": {"targets": "all_2d", "engine": "svd"}}
            )
        probe.step(loss)
        values: dict[str, dict[str, float]] = {}
        for (quantity, target), value in probe.latest().items():
            values.setdefault(quantity, {})[target] = value
        latest[step] = values
    probe.close()
    targets = []
    for t in probe.targets:
        layout = shard_layout(t)  # None: the probe would have gathered this matrix
        targets.append(
            {
                "name": t.name,
                "parameter": t.parameter_name,
                "rows": None if t.rows is None else (t.rows.start, t.rows.stop),
                "transposed": t.transposed,
                "layout": None
                if layout is None
                else (layout.axis, layout.start, *layout.block.shape),
            }
        )
    torch.save(
        {
            "targets": targets,
            "weights": weights,
            "latest": latest,
            "commands": probe.command_log(),
            "quantities": [q.name for q in probe.quantities],
        },
        out_dir / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
