"""The probe applies commands from its transport at the step boundary and acks them."""

from __future__ import annotations

import torch

from rankguard.probe import Probe
from rankguard.probe.schedules import Every
from rankguard.probe.transport import MemoryTransport


def test_msign_command_is_applied_after_the_step_it_arrives_at(tiny_gpt, tmp_path, train) -> None:
    transport = MemoryTransport()
    probe = Probe(tiny_gpt, run="cmd", every=5, transport=transport, log_dir=tmp_path)
    train(tiny_gpt, probe, 3)
    transport.push_command(
        {"id": "m1", "kind": "msign", "args": {"targets": "attention", "engine": "svd"}}
    )
    qkv = tiny_gpt.transformer.h[0].attn.c_attn.weight
    train(tiny_gpt, probe, 1, seed=1)
    probe.close()

    ((command_id, ack),) = transport.acks
    assert command_id == "m1"
    assert ack["state"] == "applied"
    assert ack["step"] == 3
    # After the step: the weights no longer moved (close() trains nothing), so the q part is
    # exactly MSign's result: every singular value equal.
    singular_values = torch.linalg.svdvals(qkv.detach()[:16].double())
    torch.testing.assert_close(
        singular_values, singular_values[:1].expand_as(singular_values), rtol=1e-5, atol=0
    )
    before_after = {m["name"]: m for m in ack["result"]["matrices"]}
    q = before_after["transformer.h.0.attn.c_attn.weight[q]"]
    assert abs(q["stable_rank_after"] - 16) < 1e-3
    assert abs(q["frobenius_after"] / q["frobenius_before"] - 1) < 1e-5


def test_set_probe_changes_the_cadence(tiny_gpt, tmp_path, train) -> None:
    transport = MemoryTransport()
    probe = Probe(tiny_gpt, run="cadence", every=50, transport=transport, log_dir=tmp_path)
    train(tiny_gpt, probe, 1)  # step 0 is sampled
    transport.push_command({"id": "s", "kind": "set_probe", "args": {"every": 2}})
    sampled_before = len(transport.batches)
    train(tiny_gpt, probe, 5, seed=1)
    probe.close()
    assert transport.acks[0][1]["state"] == "applied"
    sampled_steps = sorted(
        {
            step
            for batch in transport.batches[sampled_before:]
            for quantity, step in zip(
                batch["points"]["quantity"], batch["points"]["step"], strict=True
            )
            if quantity == "stable_rank"
        }
    )
    assert sampled_steps == [2, 4]


def test_a_bad_command_is_acked_failed_and_training_goes_on(tiny_gpt, tmp_path, train) -> None:
    transport = MemoryTransport()
    probe = Probe(tiny_gpt, run="bad", every=5, transport=transport, log_dir=tmp_path)
    before = {n: p.detach().clone() for n, p in tiny_gpt.named_parameters()}
    transport.push_command({"id": "b", "kind": "msign", "args": {"targets": ["nothing*"]}})
    probe.step()
    ack = transport.acks[0][1]
    assert ack["state"] == "failed"
    assert "nothing*" in ack["error"]
    assert all(torch.equal(p, before[n]) for n, p in tiny_gpt.named_parameters())
    train(tiny_gpt, probe, 2)
    probe.close()


def test_scale_lr_backs_off_every_step_until_close(tiny_gpt, tmp_path) -> None:
    transport = MemoryTransport()
    opt = torch.optim.SGD(tiny_gpt.parameters(), lr=0.1)
    probe = Probe(tiny_gpt, opt, run="lr", every=5, transport=transport, log_dir=tmp_path)
    w = tiny_gpt.transformer.h[0].mlp.c_fc.weight

    def sgd_step() -> torch.Tensor:
        before = w.detach().clone()
        for p in tiny_gpt.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        probe.step()
        return w.detach() - before

    torch.testing.assert_close(sgd_step(), torch.full_like(w, -0.1))
    transport.push_command({"id": "lr1", "kind": "scale_lr", "args": {"factor": 0.5}})
    sgd_step()  # applied at this step's boundary, after its optimizer step
    ack = dict(transport.acks)["lr1"]
    assert ack["state"] == "applied" and ack["result"]["scale"] == 0.5
    for _ in range(2):
        torch.testing.assert_close(sgd_step(), torch.full_like(w, -0.05))
    assert probe.state_dict()["lr_scale"] == {"scale": 0.5, "ceilings": [0.05], "held_until": 101}
    probe.close()
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert opt.param_groups[0]["lr"] == 0.1


def test_set_probe_brings_a_quantity_back_as_configured(tiny_gpt, tmp_path) -> None:
    # set_probe once re-enabled a quantity at `every`, ignoring jacobian_every, schedules and
    # the Jacobian's iteration counts: enabling now builds it exactly as construction does
    transport = MemoryTransport()
    probe = Probe(
        tiny_gpt,
        run="enable",
        every=2,
        jacobian_every=6,
        schedules={"stable_rank": 3},
        jacobian_iterations=2,
        transport=transport,
        log_dir=tmp_path,
    )
    configured = {q.name: q.schedule for q in probe.quantities}
    heavy = ["jacobian_alignment", "stable_rank"]
    transport.push_command({"id": "off", "kind": "set_probe", "args": {"disable": heavy}})
    probe.step()
    assert not set(heavy) & {q.name for q in probe.quantities}
    transport.push_command({"id": "on", "kind": "set_probe", "args": {"enable": heavy}})
    probe.step()
    assert dict(transport.acks)["on"]["state"] == "applied"
    restored = {q.name: q.schedule for q in probe.quantities}
    assert restored == configured
    assert (restored["jacobian_alignment"], restored["stable_rank"]) == (Every(6), Every(3))
    jacobian = next(q for q in probe.quantities if q.name == "jacobian_alignment")
    assert jacobian.iterations == 2  # type: ignore[attr-defined]
    probe.close()


def test_set_probe_cadence_keeps_own_schedules_and_the_jacobian(tiny_gpt, tmp_path) -> None:
    transport = MemoryTransport()
    probe = Probe(tiny_gpt, run="every", every=2, schedules={"stable_rank": 3}, transport=transport)
    transport.push_command({"id": "e", "kind": "set_probe", "args": {"every": 5}})
    probe.step()
    schedules = {q.name: q.schedule for q in probe.quantities}
    assert schedules.pop("stable_rank") == Every(3)
    assert schedules.pop("jacobian_alignment") == Every(20)  # 10 x the configured every
    assert set(schedules.values()) == {Every(5)}
    assert probe.config.every == 5 and probe.config.command_every == 2
    probe.close()
