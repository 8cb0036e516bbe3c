"""Undo snapshots restore bit-identically, including through fused and transposed views."""

from __future__ import annotations

import pytest
import torch
from intervention_helpers import TinyModel, as_target, make_matrix

from rankguard.probe.exceptions import ConfigError
from rankguard.probe.interventions import Snapshot, apply_msign, apply_pss
from rankguard.probe.targets import find_targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_restore_is_bit_identical(dtype: torch.dtype) -> None:
    t = as_target(make_matrix(24, 40, cond=100.0).to(dtype))
    original = t.parameter.detach().clone()
    snap = Snapshot.take([t])
    assert snap.on_cpu
    apply_msign([t], engine="newton_schulz")
    assert not torch.equal(t.parameter.detach(), original)
    snap.restore()
    assert torch.equal(t.parameter.detach(), original)
    assert t.parameter.dtype == dtype
    assert snap.nbytes == 24 * 40 * original.element_size()


def test_restore_whole_model_after_msign_and_pss(tiny_model: TinyModel) -> None:
    targets = find_targets(tiny_model)
    originals = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    snap = Snapshot.take(targets)
    assert len(snap) == len(targets) and snap.names == [t.name for t in targets]
    apply_msign(targets, engine="svd")
    apply_pss(targets, variant="conv")
    snap.restore()
    for name, p in tiny_model.named_parameters():
        assert torch.equal(p.detach(), originals[name]), name


def test_snapshot_is_a_copy_not_a_view() -> None:
    t = as_target(make_matrix(8, 8))
    snap = Snapshot.take([t])
    with torch.no_grad():
        t.parameter.mul_(2.0)
    snap.restore()
    assert torch.equal(t.parameter.detach(), make_matrix(8, 8))


def test_errors() -> None:
    with pytest.raises(ConfigError, match="empty"):
        Snapshot.take([])
    t = as_target(make_matrix(8, 8))
    snap = Snapshot.take([t])
    t.parameter.data = torch.zeros(4, 4)
    with pytest.raises(ConfigError, match=r"'w' is now \(4, 4\)"):
        snap.restore()


@pytest.mark.gpu
def test_cuda_snapshot_is_pinned_host_memory() -> None:
    t = as_target(make_matrix(64, 64).cuda())
    original = t.parameter.detach().clone()
    snap = Snapshot.take([t])
    assert snap.on_cpu and snap.pinned
    apply_msign([t])
    snap.restore()
    assert torch.equal(t.parameter.detach(), original)
