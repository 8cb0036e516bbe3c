"""The Hugging Face Trainer with RankguardCallback: one probe step per optimizer step, the
Trainer's logged loss and numbering, the real optimizer, scale_lr that halves the LR the
optimizer applies, the probe closed at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.applied_lr import AppliedLR
from helpers.zoo import ENTRIES
from transformers import Trainer, TrainerCallback, TrainingArguments

from rankguard.probe.integrations.huggingface import RankguardCallback
from rankguard.probe.transport import MemoryTransport
from rankguard.probe.wire import iter_points

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (n, 8), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Recorder(TrainerCallback):
    """Reads the LR the real optimizer applies, from the first step on."""

    def __init__(self, rankguard: RankguardCallback) -> None:
        self.rankguard = rankguard
        self.lr: AppliedLR | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        assert self.rankguard.probe is not None
        self.lr = AppliedLR(self.rankguard.probe.optimizer)  # type: ignore[arg-type]


def train(tmp_path: Path, *, accumulation: int, transport: MemoryTransport, **options: Any):
    torch.manual_seed(0)
    model = ENTRIES["gpt2"].build()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=accumulation,
        max_steps=6,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    rankguard = RankguardCallback(
        run="hf", transport=transport, every=2, jacobian_every=4, **options
    )
    recorder = Recorder(rankguard)
    trainer = Trainer(
        model=model, args=args, train_dataset=Tokens(), callbacks=[rankguard, recorder]
    )
    trainer.train()
    return trainer, rankguard, recorder


@pytest.mark.parametrize("accumulation", [1, 3])
def test_one_step_per_optimizer_step_with_the_trainers_loss(
    tmp_path: Path, accumulation: int
) -> None:
    transport = MemoryTransport()
    trainer, rankguard, _ = train(tmp_path, accumulation=accumulation, transport=transport)
    points = list(iter_points(transport.batches))
    losses = {p.step: p.value for p in points if p.quantity == "loss"}
    logged = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    assert sorted(losses) == sorted(logged) == [1, 2, 3, 4, 5, 6]  # the Trainer's numbering
    for step, value in logged.items():
        assert losses[step] == pytest.approx(value, rel=1e-5)
    sampled = {p.step for p in points if p.quantity == "stable_rank"}
    assert sampled == {2, 4, 6}
    assert {p.step for p in points if p.quantity == "jacobian_alignment"} == {4}
    assert type(rankguard.probe.optimizer) is torch.optim.SGD  # not accelerate's wrapper
    assert rankguard.probe.close().delivered_all  # already closed by on_train_end: idempotent
    assert "training_step" not in vars(trainer)  # the Trainer's own method again


def test_scale_lr_halves_the_lr_the_optimizer_applies(tmp_path: Path) -> None:
    transport = MemoryTransport()
    transport.push_command({"id": "c1", "kind": "scale_lr", "args": {"factor": 0.5}})
    _, _, recorder = train(tmp_path, accumulation=1, transport=transport)
    assert transport.acks[0][1]["state"] == "applied" and transport.acks[0][1]["step"] == 1
    assert recorder.lr is not None
    assert recorder.lr.scheduled == pytest.approx([0.05] * 6)
    assert recorder.lr.applied == pytest.approx([0.05] + [0.025] * 5, rel=1e-4)
