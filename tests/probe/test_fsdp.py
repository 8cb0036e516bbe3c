"""Under torchrun (2 ranks, gloo, CPU) with FSDP2: the probe's weight spectra come from the
shards (no gather) and match an SVD of the gathered matrices on every rank; an MSign command
rewrites the sharded weights like a reference MSign of the gathered ones; nothing hangs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from helpers.torchrun import torchrun

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("fsdp_worker.py")
COMMAND_STEP = 3  # fsdp_worker.COMMAND_STEP
CANNOT_SHARD = 75  # fsdp_worker's exit code when FSDP2 cannot initialise
TIMEOUT_S = 120  # a deadlock (mismatched collectives) fails here instead of hanging


def _fsdp2_unavailable() -> str | None:
    if not dist.is_available() or not dist.is_gloo_available():
        return "torch.distributed with gloo is not available in this build"
    try:
        from torch.distributed.device_mesh import init_device_mesh  # noqa: F401
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as exc:
        return f"FSDP2 (torch.distributed.fsdp.fully_shard) is not available: {exc}"
    return None


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Runs the worker on 2 ranks once; each rank's saved record."""
    reason = _fsdp2_unavailable()
    if reason:
        pytest.skip(reason)
    out_dir = tmp_path_factory.mktemp("fsdp")
    try:
        proc = torchrun(WORKER, str(out_dir), timeout=TIMEOUT_S)
    except TimeoutError as exc:
        pytest.fail(str(exc))
    stdout, stderr = proc.stdout, proc.stderr
    if proc.returncode != 0 and "FSDP2 unavailable" in stderr:
        pytest.skip(stderr[stderr.index("FSDP2 unavailable") :].splitlines()[0])
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _matrix(full: torch.Tensor, target: dict[str, Any]) -> torch.Tensor:
    """The target's (out, in) matrix of its gathered parameter."""
    w = full.t() if target["transposed"] else full
    if target["rows"] is not None:
        w = w[target["rows"][0] : target["rows"][1]]
    return w.to(torch.float64)


def _reference_msign(w: torch.Tensor) -> torch.Tensor:
    """(‖W‖_F/√r)·U Vᵀ by torch.linalg.svd (every test matrix has full rank)."""
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    return u @ vh * (torch.linalg.matrix_norm(w) / math.sqrt(min(w.shape)))


def test_every_target_is_sharded_and_every_rank_computes(ranks: list[dict[str, Any]]) -> None:
    layouts = [{t["name"]: t["layout"] for t in record["targets"]} for record in ranks]
    # no target falls back to a gather: (axis, start, rows, columns) of each rank's block
    assert None not in layouts[0].values() and None not in layouts[1].values()
    # Linear c_attn (45, 15) rows [0, 23) | [23, 45): [q] only on rank 0, [k] straddles
    fused = "transformer.h.0.attn.c_attn.weight"
    assert [layouts[r][f"{fused}[q]"] for r in (0, 1)] == [(0, 0, 15, 15), (0, 0, 0, 15)]
    assert [layouts[r][f"{fused}[k]"] for r in (0, 1)] == [(0, 0, 8, 15), (0, 8, 7, 15)]
    assert [layouts[r][f"{fused}[v]"] for r in (0, 1)] == [(0, 0, 0, 15), (0, 0, 15, 15)]
    # Conv1D c_attn stored (15, 45), Shard(0): input columns [0, 8) | [8, 15)
    conv = "transformer.h.1.attn.c_attn.weight[k]"
    assert [layouts[r][conv] for r in (0, 1)] == [(1, 0, 15, 8), (1, 8, 15, 7)]
    assert ranks[0]["quantities"] == ranks[1]["quantities"]
    assert {"stable_rank", "spectral_norm"} <= set(ranks[1]["quantities"])


@pytest.mark.parametrize("step", range(COMMAND_STEP + 1))
def test_spectra_match_the_gathered_svd_on_every_rank(
    ranks: list[dict[str, Any]], step: int
) -> None:
    for record in ranks:
        latest = record["latest"][step]
        for target in record["targets"]:
            w = _matrix(record["weights"][step][target["parameter"]], target)
            s = torch.linalg.svdvals(w)
            sigma, stable_rank = float(s[0]), float(s.square().sum() / s[0] ** 2)
            name = target["name"]
            assert latest["spectral_norm"][name] == pytest.approx(sigma, rel=1e-4), name
            assert latest["stable_rank"][name] == pytest.approx(stable_rank, rel=1e-4), name
    # computed from all-reduced buffers: the same numbers on both ranks, bit for bit
    for quantity in ("spectral_norm", "stable_rank"):
        assert ranks[0]["latest"][step][quantity] == ranks[1]["latest"][step][quantity]


def test_update_ratio_of_sharded_parameters(ranks: list[dict[str, Any]]) -> None:
    record = ranks[0]
    for step in range(1, COMMAND_STEP + 1):
        ratios = record["latest"][step]["update_ratio"]
        for name, value in ratios.items():
            before, after = record["weights"][step - 1][name], record["weights"][step][name]
            expected = torch.linalg.vector_norm(after - before) / torch.linalg.vector_norm(before)
            assert value == pytest.approx(float(expected), rel=1e-4), name


def test_msign_rewrites_the_shards_like_the_gathered_reference(
    ranks: list[dict[str, Any]],
) -> None:
    acks = [record["commands"]["c1"] for record in ranks]
    assert acks[0]["state"] == acks[1]["state"] == "applied", acks
    assert acks[0]["step"] == acks[1]["step"] == COMMAND_STEP
    for record in ranks:
        before = record["weights"][COMMAND_STEP]
        after = record["weights"][COMMAND_STEP + 1]  # no training in between
        sampled = record["latest"][COMMAND_STEP + 1]["stable_rank"]
        for target in record["targets"]:
            w_after = _matrix(after[target["parameter"]], target)
            expected = _reference_msign(_matrix(before[target["parameter"]], target))
            torch.testing.assert_close(w_after, expected, rtol=1e-5, atol=1e-5)
            rank = min(w_after.shape)
            s = torch.linalg.svdvals(w_after)
            assert float(s.square().sum() / s[0] ** 2) == pytest.approx(rank, rel=1e-4)
            assert sampled[target["name"]] == pytest.approx(rank, rel=1e-4), target["name"]
    for name, w in ranks[0]["weights"][COMMAND_STEP + 1].items():
        assert torch.equal(w, ranks[1]["weights"][COMMAND_STEP + 1][name]), name
