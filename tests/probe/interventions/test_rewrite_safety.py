"""Every rewrite snapshots first and keeps only a finite result (rewrite.py): a transform that
yields NaN/Inf or raises on any target leaves every target bit-identical, whatever the
dtype; a result that overflows the parameter's dtype counts as not finite; Snapshot.refresh
reuses its buffers."""

from __future__ import annotations

import pytest
import torch
from intervention_helpers import TinyModel, as_target, make_matrix
from torch import Tensor

from rankguard.probe.interventions import (
    RewriteError,
    Snapshot,
    StatsMode,
    apply_pss,
    rewrite_targets,
)
from rankguard.probe.interventions.rewrite import Transformed
from rankguard.probe.targets import find_targets


def poison_the_last(count: int, value: float) -> object:
    """A transform that doubles every matrix except the ``count``-th, which gets ``value``."""
    seen = [0]

    def transform(w: Tensor) -> Transformed:
        seen[0] += 1
        out = w * 2.0
        if seen[0] == count:
            out[0, 0] = value
        return Transformed(out, min(w.shape))

    return transform


@pytest.mark.parametrize("stats", [StatsMode.NONE, StatsMode.EXACT])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_result_anywhere_restores_every_target(
    tiny_model: TinyModel, stats: StatsMode, bad: float
) -> None:
    targets = find_targets(tiny_model)
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    # the NaN is caught by the finiteness check, or first by the exact statistics' SVD
    with pytest.raises(RewriteError, match=r"every target was restored from the snapshot") as info:
        rewrite_targets(targets, poison_the_last(len(targets), bad), stats=stats)  # type: ignore[arg-type]
    assert targets[-1].name in str(info.value)
    for name, p in tiny_model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name


def test_a_transform_that_raises_restores_what_was_already_written(
    tiny_model: TinyModel,
) -> None:
    targets = find_targets(tiny_model)
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    calls = [0]

    def transform(w: Tensor) -> Transformed:
        calls[0] += 1
        if calls[0] == 3:
            raise torch.linalg.LinAlgError("did not converge")
        return Transformed(w * 2.0, min(w.shape))

    with pytest.raises(RewriteError, match=r"LinAlgError: did not converge.*restored") as info:
        rewrite_targets(targets, transform, stats=StatsMode.NONE)
    assert targets[2].name in str(info.value)
    for name, p in tiny_model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name


def test_a_result_past_the_dtype_range_is_not_kept() -> None:
    """A finite fp32 result past 65504 is +Inf once written to an fp16 parameter."""
    t = as_target(make_matrix(8, 8).to(torch.float16) * 20_000)
    assert bool(torch.isfinite(t.parameter).all())
    before = t.parameter.detach().clone()
    with pytest.raises(RewriteError, match="NaN or Inf"):
        apply_pss([t], variant="conv", scale=100.0, stats="none")
    assert torch.equal(t.parameter.detach(), before)


def test_the_callers_snapshot_is_the_one_used_and_stays_valid() -> None:
    t = as_target(make_matrix(6, 6))
    before = t.parameter.detach().clone()
    snapshot = Snapshot.take([t])
    apply_pss([t], variant="clip", k=1, snapshot=snapshot)
    assert not torch.equal(t.parameter.detach(), before)
    snapshot.restore()  # the undo of the rewrite
    assert torch.equal(t.parameter.detach(), before)


def test_refresh_reuses_the_buffers() -> None:
    t = as_target(make_matrix(6, 6))
    snapshot = Snapshot.take([t])
    buffer = snapshot._saved[0].data
    with torch.no_grad():
        t.parameter.mul_(3.0)
    assert snapshot.refresh() is snapshot
    assert snapshot._saved[0].data is buffer
    assert torch.equal(buffer, t.parameter.detach())
    t.parameter.data = torch.zeros(3, 3)  # the shape changed: a fresh snapshot
    fresh = snapshot.refresh()
    assert fresh is not snapshot and torch.equal(fresh._saved[0].data, torch.zeros(3, 3))
