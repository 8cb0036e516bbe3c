"""FSDP2-style DTensor parameters: MSign gathers one matrix, rewrites it and keeps the shard.

Runs a one-process gloo group on CPU (world size 1, a real DTensor with Shard(0)); a
multi-rank check needs torchrun and is left to the distributed suite.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from intervention_helpers import as_target, make_matrix
from torch import nn

from rankguard.probe.interventions import Snapshot, apply_msign, msign_svd
from rankguard.probe.targets import WeightTarget

pytest.importorskip("torch.distributed.tensor")
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    store = tmp_path_factory.mktemp("dist") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _dtensor_target(w: torch.Tensor, mesh, *, transposed: bool = False, rows=None):  # type: ignore[no-untyped-def]
    param = nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)]))
    return WeightTarget(
        name="sharded",
        module_name="m",
        parameter=param,
        rows=rows,
        transposed=transposed,
        groups=frozenset(),
    )


@pytest.mark.parametrize("engine", ["svd", "newton_schulz"])
def test_dtensor_parameter_gets_the_same_result(mesh, engine: str) -> None:  # type: ignore[no-untyped-def]
    w = make_matrix(24, 40, cond=100.0)
    sharded = _dtensor_target(w, mesh)
    plain = as_target(w)
    rec = apply_msign([sharded], engine=engine).matrices[0]
    apply_msign([plain], engine=engine)
    torch.testing.assert_close(sharded.parameter.full_tensor(), plain.parameter.detach())
    assert rec.stable_rank_after == pytest.approx(24, rel=1e-3)


def test_dtensor_fused_rows_and_transposed_view(mesh) -> None:  # type: ignore[no-untyped-def]
    w = make_matrix(16, 48, cond=10.0)  # stored (in, out) like Conv1D, fused 3 × 16 outputs
    t = _dtensor_target(w, mesh, transposed=True, rows=slice(16, 32))
    snap = Snapshot.take([t])
    apply_msign([t], engine="svd")
    full = t.parameter.full_tensor()
    torch.testing.assert_close(full.t()[16:32], msign_svd(w.t()[16:32]).matrix)
    assert torch.equal(full.t()[:16], w.t()[:16]) and torch.equal(full.t()[32:], w.t()[32:])
    snap.restore()
    assert torch.equal(t.parameter.full_tensor(), w)
