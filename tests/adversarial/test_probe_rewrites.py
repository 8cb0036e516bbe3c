"""Issue 18, failure 3 (the probe's side): a command can destroy the weights and leave no
undo. Every weight rewrite (an msign or pss command, the periodic MSign optimizer) snapshots
its targets first, keeps its result only if it is finite, restores the snapshot otherwise,
and a failed rewrite leaves the previous undo in place. The probe also refuses arguments
outside the contract's bounds, whatever the server let through."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.hostile_server import Answer, HostileServer, Request, hostile_server
from helpers.models import TinyGPT
from helpers.probe_harness import all_finite, probe_on, unchanged, wait_for_polls, weights

from rankguard.probe import Probe
from rankguard.probe.interventions import MSign
from rankguard.probe.targets import find_targets


def order(server: HostileServer, probe: Probe, *commands: dict[str, Any]) -> list[dict[str, Any]]:
    """Serves ``commands`` to the probe's next claim (once), lets it apply them at a step
    boundary and returns their acks."""
    served = threading.Event()

    def once(request: Request) -> Answer:
        if served.is_set():
            return Answer(200, {"data": [], "count": 0})
        served.set()
        return Answer(200, {"data": list(commands), "count": len(commands)})

    server.answer("/commands/claim", once)
    wait_for_polls(server)
    probe.step(1.0)
    log = probe.command_log()
    return [log[c["id"]] for c in commands]


def blow_up(model: torch.nn.Module, name: str) -> None:
    """Weights so large that ‖W‖_F overflows fp32 (finite, but any rewrite of them is not)."""
    with torch.no_grad():
        dict(model.named_parameters())[name].mul_(1e20)


ATTENTION = "transformer.h.0.attn.c_proj.weight"


def test_a_rewrite_whose_result_is_not_finite_is_rolled_back(tmp_path: Path) -> None:
    with hostile_server() as server, probe_on(server, tmp_path) as (probe, model):
        blow_up(model, ATTENTION)
        before = weights(model)
        (ack,) = order(server, probe, {"id": "m1", "kind": "msign", "args": {"targets": "all_2d"}})
        assert ack["state"] == "failed"
        assert ATTENTION in ack["error"] and "restored" in ack["error"], ack["error"]
        assert unchanged(model, before)  # every target restored, bit for bit


def test_undo_survives_a_failed_rewrite(tmp_path: Path) -> None:
    with hostile_server() as server, probe_on(server, tmp_path) as (probe, model):
        original = weights(model)
        (good,) = order(server, probe, {"id": "m1", "kind": "msign", "args": {}})
        assert good["state"] == "applied"
        blow_up(model, ATTENTION)
        blown = weights(model)
        (bad,) = order(server, probe, {"id": "m2", "kind": "msign", "args": {}})
        assert bad["state"] == "failed"
        assert unchanged(model, blown)
        (undo,) = order(server, probe, {"id": "u1", "kind": "undo"})
        assert undo["state"] == "applied", undo
        # the snapshot of the good msign restores its targets to before it
        for name, p in model.named_parameters():
            if "attn" in name and name.endswith("weight"):
                assert torch.equal(p, original[name]), name


@pytest.mark.parametrize(
    ("command", "field"),
    [
        ({"kind": "pss", "args": {"scale": 1e39}}, "args.scale"),
        ({"kind": "pss", "args": {"scale": 10.5}}, "args.scale"),
        ({"kind": "pss", "args": {"temperature": float("inf")}}, "args.temperature"),
        ({"kind": "scale_lr", "args": {"factor": 1e-300}}, "args.factor"),
        ({"kind": "scale_lr", "args": {"factor": 1e5}}, "args.factor"),
        ({"kind": "scale_lr", "args": {"factor": float("nan")}}, "args.factor"),
    ],
)
def test_arguments_outside_the_contract_are_refused_by_the_probe(
    tmp_path: Path, command: dict[str, Any], field: str
) -> None:
    with hostile_server() as server, probe_on(server, tmp_path) as (probe, model):
        before = weights(model)
        (ack,) = order(server, probe, {"id": "c1", **command})
        assert ack["state"] == "failed"
        assert ack["error"].startswith(field), ack["error"]  # refused on the bound
        assert unchanged(model, before)
        assert all_finite(model)


def test_scale_lr_below_the_floor_never_reaches_the_optimizer(tmp_path: Path) -> None:
    with hostile_server() as server:
        torch.manual_seed(0)
        model = TinyGPT()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        probe = Probe(
            model,
            optimizer,
            run="adversarial",
            server=server.url,
            log_dir=str(tmp_path),
            command_poll_interval=0.01,
            every=1000,
        )
        try:
            acks = order(
                server,
                probe,
                {"id": "s1", "kind": "scale_lr", "args": {"factor": 1e-300}},
                {"id": "s2", "kind": "scale_lr", "args": {"factor": 1e-300}},
            )
            assert [a["state"] for a in acks] == ["failed", "failed"]
            assert probe._lr_scale is not None and probe._lr_scale.scale == 1.0
        finally:
            probe.close(timeout=1)


def test_periodic_msign_never_keeps_a_non_finite_result() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the step itself changes nothing
    wrapped = MSign(optimizer, find_targets(model), period=1)
    with torch.no_grad():
        model[1].weight.mul_(1e20)
    before = weights(model)
    model(torch.randn(2, 8)).sum().backward()
    wrapped.step()  # must not raise into the training loop
    assert unchanged(model, before)
    assert wrapped.failures == 1 and "1.weight" in str(wrapped.last_error)
    assert wrapped.applications == 0
