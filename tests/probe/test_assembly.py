"""How the probe is assembled: schedules, the Jacobian's blocks, the per-rank policy."""

from __future__ import annotations

import pytest

from rankguard.probe import ProbeConfig
from rankguard.probe.assembly import build_quantities, resolve_blocks, schedule_for
from rankguard.probe.distributed import computed_on_rank
from rankguard.probe.exceptions import ConfigError
from rankguard.probe.quantities import REGISTRY
from rankguard.probe.schedules import Every


def test_schedule_for_each_kind_of_quantity() -> None:
    config = ProbeConfig(every=4, jacobian_every=9, schedules={"grad_norm": 2})
    assert schedule_for(config, REGISTRY["stable_rank"]) == Every(4)
    assert schedule_for(config, REGISTRY["jacobian_alignment"]) == Every(9)
    assert schedule_for(config, REGISTRY["grad_norm"]) == Every(2)


def test_jacobian_needs_two_blocks_when_asked_for_by_name(tiny_gpt) -> None:
    one_block = resolve_blocks(tiny_gpt, ["transformer.h.0"])
    names = ["stable_rank", "jacobian_alignment"]
    with pytest.raises(ConfigError, match="blocks: jacobian_alignment needs at least 2 blocks"):
        build_quantities(ProbeConfig(), one_block, names, explicit=True)
    built = build_quantities(ProbeConfig(), one_block, names, explicit=False)
    assert [q.name for q in built] == ["stable_rank"]


@pytest.mark.parametrize(
    ("rank", "sharded", "per_rank", "expected"),
    [
        (0, False, False, "all"),
        (1, True, False, "all"),  # FSDP2: weight spectra are collectives on every rank
        (1, False, False, "none"),  # DDP: rank 0 ships
        (1, False, True, "activations"),
    ],
)
def test_which_rank_computes_what(tiny_gpt, rank, sharded, per_rank, expected) -> None:
    config = ProbeConfig(activations_per_rank=per_rank)
    built = build_quantities(config, resolve_blocks(tiny_gpt, None), REGISTRY, explicit=False)
    kept = {
        q.name
        for q in computed_on_rank(built, rank=rank, sharded=sharded, activations_per_rank=per_rank)
    }
    activations = {
        "sa_sign_diversity",
        "representation_stable_rank",
        "singularity_alignment",
        "attention_logit_max",
        "attention_logit_bound",
    }
    assert kept == {"all": set(REGISTRY), "none": set(), "activations": activations}[expected]
