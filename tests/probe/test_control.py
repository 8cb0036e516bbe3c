"""Commands: the closed set, validation that names the field, application in place,
idempotency by id, and undo."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from rankguard.probe.control import (
    CommandRunner,
    MSignCommand,
    PSSCommand,
    SetProbeCommand,
    parse_command,
)
from rankguard.probe.exceptions import CommandError
from rankguard.probe.interventions import Engine, PSSVariant
from rankguard.probe.targets import find_targets


class Attention(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.n_head = 2
        self.c_attn = nn.Linear(width, 3 * width, bias=False)
        self.c_proj = nn.Linear(width, width, bias=False)


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.attn = Attention(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )


class Tiny(nn.Module):
    def __init__(self, width: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.h = nn.ModuleList(Block(width) for _ in range(depth))


def runner_for(model: nn.Module, changes: list[SetProbeCommand] | None = None) -> CommandRunner:
    def reconfigure(command: SetProbeCommand) -> dict[str, Any]:
        if changes is not None:
            changes.append(command)
        return {"every": command.every}

    return CommandRunner(targets=find_targets(model), reconfigure=reconfigure)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"id": "a", "kind": "explode"}, "kind"),
        ({"id": "a", "kind": "msign", "args": {"engine": "qr"}}, "args.engine"),
        ({"id": "a", "kind": "msign", "args": {"targets": []}}, "args.targets"),
        ({"id": "a", "kind": "msign", "args": {"power": 2}}, "args.power"),
        ({"id": "a", "kind": "pss", "args": {"variant": "median"}}, "args.variant"),
        ({"id": "a", "kind": "pss", "args": {"k": 0}}, "args.k"),
        ({"id": "a", "kind": "pss", "args": {"scale": -1}}, "args.scale"),
        ({"id": "a", "kind": "set_probe", "args": {"every": 0}}, "args.every"),
        ({"id": "a", "kind": "set_probe", "args": {"enable": "stable_rank"}}, "args.enable"),
        ({"kind": "undo"}, "id"),
        ({"id": "a", "kind": "scale_lr"}, "args.factor"),
        ({"id": "a", "kind": "scale_lr", "args": {"factor": 0}}, "args.factor"),
        ({"id": "a", "kind": "scale_lr", "args": {"factor": "half"}}, "args.factor"),
        ({"id": "a", "kind": "scale_lr", "args": {"lr": 1e-4}}, "args.lr"),
        # the contract's bounds, checked again in the probe
        ({"id": "a", "kind": "pss", "args": {"scale": 10.000001}}, "args.scale"),
        ({"id": "a", "kind": "pss", "args": {"scale": float("nan")}}, "args.scale"),
        ({"id": "a", "kind": "pss", "args": {"temperature": float("inf")}}, "args.temperature"),
        ({"id": "a", "kind": "pss", "args": {"k": 1_000_001}}, "args.k"),
        ({"id": "a", "kind": "pss", "args": {"temperature": 100.5}}, "args.temperature"),
        ({"id": "a", "kind": "set_probe", "args": {"every": 10**30}}, "args.every"),
        ({"id": "a", "kind": "scale_lr", "args": {"factor": 0.99e-4}}, "args.factor"),
        ({"id": "a", "kind": "scale_lr", "args": {"factor": 1.01e4}}, "args.factor"),
        ({"id": "a", "kind": "scale_lr", "args": {"factor": float("inf")}}, "args.factor"),
        ({"id": "a", "kind": ["msign"]}, "kind"),  # unhashable
        ({"id": True, "kind": "undo"}, "id"),
        ({"id": 10**30, "kind": "undo"}, "id"),
    ],
)
def test_invalid_commands_name_the_field(raw: dict[str, Any], field: str) -> None:
    with pytest.raises(CommandError, match=field.replace(".", r"\.")):
        parse_command(raw)


@pytest.mark.parametrize(
    "raw",
    [
        {"id": "a", "kind": "pss", "args": {"scale": 10, "temperature": 100, "k": 1_000_000}},
        {"id": "a", "kind": "set_probe", "args": {"every": 1_000_000}},
        {"id": "a", "kind": "scale_lr", "args": {"factor": 1e-4}},
        {"id": "a", "kind": "scale_lr", "args": {"factor": 1e4}},
    ],
)
def test_the_bounds_are_inclusive(raw: dict[str, Any]) -> None:
    parse_command(raw)


def test_an_error_quotes_a_huge_argument_briefly() -> None:
    with pytest.raises(CommandError) as info:
        parse_command({"id": "a", "kind": "msign", "args": {"targets": [1] * 100_000}})
    assert len(str(info.value)) < 200


@pytest.mark.parametrize("raw", ["x", None, 7, ["a"], {"id": {"a": 1}, "kind": "undo"}])
def test_anything_that_is_no_command_is_acked_failed_not_raised(raw: Any) -> None:
    runner = runner_for(Tiny())
    ack = runner.apply(raw, step=3)
    assert ack["state"] == "failed" and ack["step"] == 3


def test_scale_lr_without_an_optimizer_fails_and_says_so() -> None:
    ack = runner_for(Tiny()).apply({"id": "s", "kind": "scale_lr", "args": {"factor": 0.5}}, 3)
    assert ack["state"] == "failed"
    assert "no optimizer" in ack["error"]


def test_parse_fills_defaults() -> None:
    assert parse_command({"id": 1, "kind": "msign"}) == MSignCommand(id="1")
    parsed = parse_command({"id": "p", "kind": "pss", "args": {"targets": ["*c_proj*"], "k": 2}})
    assert parsed == PSSCommand(id="p", targets=("*c_proj*",), k=2)


def test_msign_applies_in_place_and_acks_with_figures() -> None:
    torch.manual_seed(0)
    model = Tiny()
    runner = runner_for(model)
    mlp_before = model.h[0].mlp[0].weight.detach().clone()
    qkv = model.h[0].attn.c_attn.weight
    frob_before = qkv.detach()[:16].norm().item()

    ack = runner.apply({"id": "c1", "kind": "msign", "args": {"engine": "svd"}}, step=5)

    assert ack["state"] == "applied", ack
    assert ack["step"] == 5
    names = {m["name"] for m in ack["result"]["matrices"]}
    assert "h.0.attn.c_attn.weight[q]" in names
    assert "h.0.attn.c_proj.weight" in names
    assert not any("mlp" in name for name in names)
    q = qkv.detach()[:16]
    singular_values = torch.linalg.svdvals(q.double())
    torch.testing.assert_close(
        singular_values, torch.full_like(singular_values, frob_before / 4.0), rtol=1e-5, atol=0
    )
    assert torch.equal(model.h[0].mlp[0].weight, mlp_before)


def test_a_repeated_id_is_not_applied_twice() -> None:
    torch.manual_seed(0)
    model = Tiny()
    runner = runner_for(model)
    raw = {"id": "once", "kind": "pss", "args": {"targets": ["h.0.mlp.*"], "scale": 0.5}}
    first = runner.apply(raw, step=1)
    after_first = model.h[0].mlp[0].weight.detach().clone()
    second = runner.apply(raw, step=2)
    assert second is first
    assert torch.equal(model.h[0].mlp[0].weight, after_first)


def test_unknown_target_fails_and_changes_nothing() -> None:
    model = Tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ack = runner_for(model).apply(
        {"id": "x", "kind": "msign", "args": {"targets": ["*nonexistent*"]}}, step=3
    )
    assert ack["state"] == "failed"
    assert "nonexistent" in ack["error"]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_undo_restores_bit_identically() -> None:
    torch.manual_seed(0)
    model = Tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    runner = runner_for(model)
    assert runner.apply({"id": "m", "kind": "msign", "args": {"targets": "all_2d"}}, 1)[
        "state"
    ] == ("applied")
    assert not torch.equal(model.h[1].mlp[2].weight, before["h.1.mlp.2.weight"])
    assert runner.apply({"id": "u", "kind": "undo"}, 2)["state"] == "applied"
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    again = runner.apply({"id": "u2", "kind": "undo"}, 3)
    assert again["state"] == "failed"
    assert "no snapshot" in again["error"]


def test_a_failed_rewrite_is_rolled_back_and_the_last_undo_stays() -> None:
    torch.manual_seed(0)
    model = Tiny()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    runner = runner_for(model)
    assert runner.apply({"id": "m", "kind": "msign"}, 1)["state"] == "applied"
    with torch.no_grad():
        model.h[0].attn.c_proj.weight.mul_(1e20)  # ‖W‖_F overflows fp32: MSign gives Inf
    blown = {n: p.detach().clone() for n, p in model.named_parameters()}
    ack = runner.apply({"id": "m2", "kind": "msign"}, 2)
    assert ack["state"] == "failed" and "restored" in ack["error"]
    assert all(torch.equal(p, blown[n]) for n, p in model.named_parameters())
    assert runner.apply({"id": "u", "kind": "undo"}, 3)["state"] == "applied"
    assert torch.equal(model.h[1].attn.c_proj.weight, original["h.1.attn.c_proj.weight"])


def test_snapshot_false_keeps_the_previous_undo() -> None:
    torch.manual_seed(0)
    model = Tiny()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    runner = runner_for(model)
    runner.apply({"id": "p1", "kind": "pss", "args": {"targets": "all_2d"}}, 1)
    runner.apply({"id": "p2", "kind": "msign", "args": {"snapshot": False}}, 2)
    assert runner.apply({"id": "u", "kind": "undo"}, 3)["state"] == "applied"
    # the undo is the pss's: all_2d back to before it (attention included)
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())


def test_set_probe_goes_to_the_probe() -> None:
    changes: list[SetProbeCommand] = []
    ack = runner_for(Tiny(), changes).apply(
        {"id": "s", "kind": "set_probe", "args": {"every": 5, "disable": ["jacobian_alignment"]}},
        step=9,
    )
    assert ack["state"] == "applied"
    assert changes == [SetProbeCommand(id="s", every=5, disable=("jacobian_alignment",))]


def test_engines_and_variants_are_the_interventions_own_enums() -> None:
    msign = parse_command({"id": "a", "kind": "msign", "args": {"engine": "newton_schulz"}})
    assert isinstance(msign, MSignCommand) and msign.engine is Engine.NEWTON_SCHULZ
    for variant in PSSVariant:
        pss = parse_command({"id": "b", "kind": "pss", "args": {"variant": variant.value}})
        assert isinstance(pss, PSSCommand) and pss.variant is variant
    expected = r"args\.engine: 'qr' is not one of \['svd', 'newton_schulz'\] or null"
    with pytest.raises(CommandError, match=expected):
        parse_command({"id": "c", "kind": "msign", "args": {"engine": "qr"}})
    with pytest.raises(CommandError, match=r"args\.variant: \['clip'\] is not one of"):
        parse_command({"id": "d", "kind": "pss", "args": {"variant": ["clip"]}})
