"""Rollback through the probe: in-process on a non-finite loss, ordered by a command, capped
per incident; skip-step drops a bad update exactly; the skipped batches are recorded and a
replayed loader leaves them out; every action is an event."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers.models import TinyGPT

from rankguard.probe import Probe, RecoveryConfig, SkipWindowSampler, skip_windows
from rankguard.probe.transport import MemoryTransport

torch.set_num_threads(1)

FAST = {"snapshot_every": 5, "confirm_steps": 2, "warmup": 4, "window": 8}


class Run:
    """A tiny GPT under AdamW + a schedule, with a probe on a memory transport."""

    def __init__(self, recovery: RecoveryConfig | None, tmp_path: Any, **options: Any) -> None:
        options.setdefault("every", 5)
        torch.manual_seed(0)
        self.model = TinyGPT()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0 / (1 + 0.01 * s))
        self.transport = MemoryTransport()
        self.probe = Probe(
            self.model,
            self.opt,
            run="rollback",
            transport=self.transport,
            log_dir=tmp_path,
            recovery=recovery,
            lr_scheduler=self.sched,
            **options,
        )
        self.gen = torch.Generator().manual_seed(1)
        self.saved: dict[int, dict[str, Any]] = {}

    def step(self, corrupt: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
        idx = torch.randint(0, 32, (4, 8), generator=self.gen)
        loss = F.cross_entropy(self.model(idx)[:, :-1].reshape(-1, 32), idx[:, 1:].reshape(-1))
        if corrupt is not None:
            loss = corrupt(loss)
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.probe.step(loss)
        self.saved[self.probe.step_count - 1] = self.state()
        return float(loss.detach())

    def state(self) -> dict[str, Any]:
        return {
            "model": {k: v.clone() for k, v in self.model.state_dict().items()},
            "optimizer": {
                i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                for i, s in self.opt.state_dict()["state"].items()
            },
            "lr": [g["lr"] for g in self.opt.param_groups],
            "scheduler": self.sched.last_epoch,
        }

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        found = [e for b in self.transport.batches for e in b.get("events", [])]
        return [e for e in found if kind is None or e["kind"] == kind]


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["optimizer"].keys() == b["optimizer"].keys()
    for i in a["optimizer"]:
        for k, v in a["optimizer"][i].items():
            w = b["optimizer"][i][k]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w
    assert a["lr"] == b["lr"] and a["scheduler"] == b["scheduler"]


def nan(loss: torch.Tensor) -> torch.Tensor:
    return loss * math.nan


def test_a_rollback_command_restores_the_snapshot_bit_for_bit(tmp_path) -> None:
    run = Run(RecoveryConfig(**FAST), tmp_path)
    for _ in range(14):
        run.step()
    run.transport.push_command({"id": "r1", "kind": "rollback", "args": {"before_step": 14}})
    run.step()  # step 14: the command is applied at its boundary
    ack = dict(run.transport.acks)["r1"]
    assert ack["state"] == "applied", ack
    assert ack["result"]["restored_step"] == 10 and ack["result"]["skipped"] == [11, 14]
    assert_same_state(run.state(), run.saved[10])
    assert run.probe.train_step == 11 and run.probe.step_count == 15
    assert run.probe.skip_windows == [(11, 14)]
    run.step()  # the event waits for the first loss after the rollback
    (event,) = run.events("rollback")
    payload = event["payload"]
    assert event["step"] == 14
    assert {"restored_step", "skipped", "lr_factor", "loss_before", "loss_after"} <= set(payload)
    assert payload["skipped"] == [11, 14] and isinstance(payload["loss_after"], float)
    run.probe.close()


def test_a_non_finite_loss_rolls_back_in_process(tmp_path) -> None:
    run = Run(RecoveryConfig(**FAST), tmp_path)
    for _ in range(23):
        run.step()
    run.step(corrupt=nan)  # step 23: NaN loss, NaN gradients reach AdamW
    # the newest snapshot older than the state the NaN loss came from (after step 22)
    assert_same_state(run.state(), run.saved[20])
    (window,) = run.probe.skip_windows
    assert window == (21, 23)
    losses = [run.step() for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)
    (event,) = run.events("rollback")
    assert event["payload"]["reason"] == "loss_non_finite"
    assert event["payload"]["lr_factor"] == 0.5
    # the backoff holds: the optimizer steps with half the schedule's LR
    assert run.probe.state_dict()["lr_scale"]["scale"] == 0.5
    run.probe.close()


def test_retries_are_capped_per_incident_then_escalated(tmp_path) -> None:
    config = RecoveryConfig(**FAST, max_retries=3, stop_on_exhausted=True)
    run = Run(config, tmp_path)
    for _ in range(20):
        run.step()
    for _ in range(8):  # the fault persists: every loss is NaN
        run.step(corrupt=nan)
    assert len(run.probe.skip_windows) == 3
    (exhausted,) = run.events("rollback_exhausted")
    assert exhausted["payload"]["rollbacks"] == 3
    assert run.probe.should_stop
    assert run.probe.recovery_summary()["rollback"] == 3
    run.probe.close()
    assert len(run.events("rollback")) == 3


def test_after_restoring_an_early_state_the_guard_judges_against_that_states_history(
    tmp_path,
) -> None:
    # An early state has a higher loss than the trajectory it replaces: judged against the
    # undone trajectory's median it is a "spike" and each restore would order the next one
    # (seen on SGD: three rollbacks to step 0 in four steps). The guard's running histories
    # rewind with the snapshot, so only the first rollback happens.
    run = Run(RecoveryConfig(**FAST, keep=4), tmp_path)

    def early_is_high(loss: torch.Tensor) -> torch.Tensor:
        return loss * (3.0 if run.probe.train_step < 6 else 1.0)

    for _ in range(14):
        run.step(corrupt=early_is_high)
    run.transport.push_command({"id": "r0", "kind": "rollback", "args": {"before_step": 1}})
    run.step(corrupt=early_is_high)
    assert dict(run.transport.acks)["r0"]["result"]["restored_step"] == 0
    for _ in range(15):
        run.step(corrupt=early_is_high)
    assert len(run.events("rollback")) == 1, [e["payload"] for e in run.events("rollback")]
    run.probe.close()


def test_skip_step_drops_a_non_finite_update_exactly(tmp_path) -> None:
    run = Run(RecoveryConfig(**FAST, skip_step=True), tmp_path)
    for _ in range(12):
        run.step()
    before = run.state()

    def nan_grads(loss: torch.Tensor) -> torch.Tensor:
        loss.register_hook(lambda g: g * math.nan)
        return loss

    run.step(corrupt=nan_grads)  # the loss is finite, its gradients are not
    after = run.state()
    assert_same_state({**after, "lr": before["lr"], "scheduler": before["scheduler"]}, before)
    assert run.probe.skip_windows == []  # dropped, nothing to roll back
    (event,) = run.events("skip_step")
    assert event["step"] == 12 and event["payload"]["non_finite_grads"] > 0
    assert run.probe.recovery_summary()["skipped_updates"] == 1
    run.probe.close()


def test_with_skip_step_one_bad_batch_is_skipped_and_a_second_rolls_back(tmp_path) -> None:
    run = Run(RecoveryConfig(**FAST, skip_step=True), tmp_path)
    for _ in range(23):
        run.step()
    run.step(corrupt=nan)  # step 23: its update is dropped, the weights stay good
    run.step()
    assert run.probe.skip_windows == [] and len(run.events("skip_step")) == 1
    run.step(corrupt=nan)  # step 25: dropped too, but alone
    run.step(corrupt=nan)  # step 26: a second bad step in a row: roll back
    assert run.probe.skip_windows == [(21, 26)]
    assert_same_state(run.state(), run.saved[20])
    run.probe.close()


def test_a_rule_order_for_an_incident_already_handled_is_a_no_op(tmp_path) -> None:
    run = Run(RecoveryConfig(**FAST), tmp_path)
    for _ in range(23):
        run.step()
    run.step(corrupt=nan)  # rolled back in-process at step 23
    for _ in range(2):
        run.step()
    # the server's rule saw the NaN at step 23 and orders a rollback a few steps later
    run.transport.push_command(
        {"id": "late", "kind": "rollback", "args": {"before_step": 23, "incident": "rule:1"}}
    )
    state = run.state()
    run.step()
    ack = dict(run.transport.acks)["late"]
    assert ack["state"] == "applied" and not ack["result"]["rolled_back"]
    assert "already rolled back" in ack["result"]["skipped"]
    assert len(run.probe.skip_windows) == 1
    assert not torch.equal(run.state()["model"]["lm_head.weight"], state["model"]["lm_head.weight"])
    run.probe.close()


def test_rollback_without_recovery_fails_and_says_how_to_turn_it_on(tmp_path) -> None:
    run = Run(None, tmp_path)
    run.step()
    run.transport.push_command({"id": "r", "kind": "rollback", "args": {}})
    run.step()
    ack = dict(run.transport.acks)["r"]
    assert ack["state"] == "failed" and "auto_recover" in ack["error"]
    run.transport.push_command({"id": "bad", "kind": "rollback", "args": {"lr_factor": 2}})
    run.step()
    assert "args.lr_factor" in dict(run.transport.acks)["bad"]["error"]
    run.probe.close()


def test_no_snapshot_old_enough_is_a_failed_ack_and_an_event(tmp_path) -> None:
    run = Run(RecoveryConfig(**FAST), tmp_path)
    run.step()
    run.transport.push_command({"id": "r", "kind": "rollback", "args": {"before_step": 0}})
    run.step()
    ack = dict(run.transport.acks)["r"]
    assert ack["state"] == "failed" and "no known-good snapshot" in ack["error"]
    assert run.events("rollback_unavailable")
    run.probe.close()


def test_the_skipped_batches_are_left_out_of_a_replay(tmp_path) -> None:
    run = Run(RecoveryConfig(**FAST), tmp_path)
    for _ in range(23):
        run.step()
    run.step(corrupt=nan)
    windows = run.probe.skip_windows
    assert windows == [(21, 23)]
    replay = list(SkipWindowSampler(range(30), run.probe))
    assert replay == [*range(21), *range(24, 30)]
    # positions count across epochs, and a resumed run starts at its step
    sampler = SkipWindowSampler(range(10), [(12, 13)])
    assert list(sampler) + list(sampler) == [*range(10), 0, 1, *range(4, 10)]
    assert list(skip_windows(iter("abcdef"), [(1, 2)], start=0)) == ["a", "d", "e", "f"]
    run.probe.close()


@pytest.mark.parametrize("every", [1, 7])
def test_healthy_training_never_acts(tmp_path, every: int) -> None:
    run = Run(RecoveryConfig.auto_recover(**FAST), tmp_path, every=every)
    for _ in range(30):
        run.step()
    summary = run.probe.recovery_summary()
    assert run.probe.skip_windows == [] and summary["skipped_updates"] == 0
    assert not [e for e in run.events() if e["kind"] != "lr_backoff"]
    assert summary["snapshots"]  # known-good states were kept
    run.probe.close()
    assert not run.opt._optimizer_step_pre_hooks and not run.opt._optimizer_step_post_hooks
