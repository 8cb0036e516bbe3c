"""One rank of the recovery DDP test (run by torchrun; not collected by pytest).

usage: recovery_ddp_worker.py OUT_DIR

A tiny GPT under DistributedDataParallel (gloo) with recovery on. Rank 0 orders a rollback
at step 13 (applied at the next command boundary, 14); at step 21 every rank's loss is NaN,
which rank 0's in-process check turns into a rollback applied at boundary 22. Each rank
saves its state after every step and after each rollback, for the test to compare.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers.models import TinyGPT
from torch.nn.parallel import DistributedDataParallel

from rankguard.probe import Probe, RecoveryConfig
from rankguard.probe.transport import MemoryTransport, NullTransport

VOCAB = 32


def state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, object]:
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": {
            i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
            for i, s in opt.state_dict()["state"].items()
        },
    }


def main() -> None:
    out_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = TinyGPT()
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    transport = MemoryTransport() if rank == 0 else NullTransport()
    probe = Probe(
        model,
        optimizer,
        run="ddp-recovery",
        transport=transport,
        every=2,
        command_every=2,
        log_dir=out_dir / f"logs{rank}",
        recovery=RecoveryConfig(snapshot_every=4, confirm_steps=2, warmup=4, window=8),
    )
    generator = torch.Generator().manual_seed(100 + rank)
    saved: dict[str, object] = {}
    for step in range(26):
        idx = torch.randint(0, VOCAB, (4, 8), generator=generator)
        logits = ddp(idx)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), idx[:, 1:].reshape(-1))
        if step == 21:
            loss = loss * math.nan
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        windows = len(probe.skip_windows)
        probe.step(loss)
        saved[f"after{step}"] = state(model, optimizer)
        if len(probe.skip_windows) > windows:
            saved[f"rolled{step}"] = state(model, optimizer)
        if step == 13 and rank == 0:
            assert isinstance(transport, MemoryTransport)
            transport.push_command({"id": "r1", "kind": "rollback", "args": {"before_step": 13}})
    torch.save(saved, out_dir / f"states{rank}.pt")
    log = {
        "windows": probe.skip_windows,
        "commands": probe.command_log(),
        "summary": probe.recovery_summary(),
    }
    probe.close()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(log))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
