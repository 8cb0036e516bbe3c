"""One rank of the DDP test (run by torchrun; not collected by pytest).

usage: ddp_worker.py OUT_DIR SERVER_URL INGEST_TOKEN OPERATE_TOKEN STEPS

Trains a tiny GPT under DistributedDataParallel (gloo) with the probe attached
(``activations_per_rank``: rank 1 ships its activation quantities too). When an operate token
is given, rank 0 plays the operator and orders MSign over the API at step 5.
Each rank saves its final weights and its command log for the test to compare.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers.models import TinyGPT
from torch.nn.parallel import DistributedDataParallel

from rankguard.probe import Probe

VOCAB = 32


def main() -> None:
    out_dir, server, ingest_token, operate_token, steps = sys.argv[1:6]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # identical initial weights on every rank
    model = TinyGPT()
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    probe = Probe(
        model,
        optimizer,
        run="ddp",
        server=server,
        token=ingest_token,
        every=2,
        command_every=2,
        log_dir=Path(out_dir) / f"logs{rank}",
        activations_per_rank=True,  # rank 1 ships its own batch's activation quantities
    )
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    for step in range(int(steps)):
        idx = torch.randint(0, VOCAB, (4, 8), generator=generator)
        logits = ddp(idx)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), idx[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        probe.step(loss)
        if step == 5 and rank == 0 and operate_token != "-":
            for command in (
                {"kind": "msign", "args": {"targets": "attention", "engine": "svd"}},
                {"kind": "scale_lr", "args": {"factor": 0.25}},
            ):
                httpx.post(
                    f"{server}/api/v1/runs/{probe.run_id}/commands",
                    json=command,
                    headers={"Authorization": f"Bearer {operate_token}"},
                    timeout=10,
                ).raise_for_status()
        time.sleep(0.02)
    pending_losses = len(probe._losses)  # what close() would still have to ship
    lr_scale = probe.state_dict()["lr_scale"]
    report = probe.close(timeout=20)
    torch.save(model.state_dict(), Path(out_dir) / f"rank{rank}.pt")
    log = {
        "run_id": probe.run_id,
        "commands": probe.command_log(),
        "delivered": report.delivered_all,
        "pending_losses": pending_losses,
        "lr_scale": lr_scale,
    }
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(log))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
