"""One rank of the FSDP2 recovery test (run by torchrun; not collected by pytest).

usage: recovery_fsdp_worker.py OUT_DIR

A tiny GPT sharded by FSDP2 (``fully_shard`` per block, gloo, CPU) with recovery on, a
snapshot every 2 steps. Each rank saves its own shards (parameters and AdamW state, local
tensors) after every step; at step 7 rank 0 orders a rollback, applied on every rank at that
step's boundary. Exit code 75: FSDP2 could not be initialised on this build.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers.models import TinyGPT
from torch import Tensor

from rankguard.probe import Probe, RecoveryConfig
from rankguard.probe.transport import MemoryTransport

VOCAB = 32
CANNOT_SHARD = 75


def local(t: Tensor) -> Tensor:
    return t.to_local().clone() if hasattr(t, "to_local") else t.clone()  # type: ignore[no-untyped-call]


def main() -> None:
    out_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    except Exception as exc:
        print(f"FSDP2 unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
        dist.destroy_process_group()
        sys.exit(CANNOT_SHARD)
    torch.manual_seed(0)
    model = TinyGPT(d=16, n_head=2)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    transport = MemoryTransport()
    probe = Probe(
        model,
        optimizer,
        run="fsdp-recovery",
        every=1,
        command_every=1,
        transport=transport,
        recovery=RecoveryConfig(snapshot_every=2, confirm_steps=1, warmup=2, window=4),
    )
    generator = torch.Generator().manual_seed(100 + rank)
    saved: dict[str, dict[str, Tensor]] = {}
    for step in range(10):
        idx = torch.randint(0, VOCAB, (2, 8), generator=generator)
        loss = F.cross_entropy(model(idx)[:, :-1].reshape(-1, VOCAB), idx[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 7 and rank == 0:
            transport.push_command({"id": "r", "kind": "rollback", "args": {"before_step": 7}})
        probe.step(loss)
        state = {f"param:{n}": local(p.detach()) for n, p in model.named_parameters()}
        for i, s in enumerate(optimizer.state.values()):
            for k, v in s.items():
                if isinstance(v, Tensor):
                    state[f"optim:{i}:{k}"] = local(v)
        saved[f"after{step}"] = state
    torch.save(
        {"saved": saved, "windows": probe.skip_windows, "commands": probe.command_log()},
        out_dir / f"rank{rank}.pt",
    )
    probe.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
