"""Lightning with RankguardCallback: the LightningModule given to the probe (its blocks found
where they are called), one probe step per optimizer step, the logged loss and numbering, the
real optimizer, scale_lr that halves the LR the optimizer applies, the probe closed."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers.applied_lr import AppliedLR
from helpers.zoo import ENTRIES
from lightning.pytorch.loggers import CSVLogger

from rankguard.probe.integrations.lightning import RankguardCallback
from rankguard.probe.transport import MemoryTransport
from rankguard.probe.wire import iter_points

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning"
)


class LitLlama(pl.LightningModule):
    """A LightningModule around a tiny Llama: the probe is given this, which Lightning never
    calls itself (it calls training_step)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = ENTRIES["llama"].build()
        self.raw: list[float] = []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        loss: torch.Tensor = self.net(input_ids=ids, labels=ids).loss
        self.raw.append(loss.item())
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Recorder(pl.Callback):
    def __init__(self, rankguard: RankguardCallback) -> None:
        self.rankguard = rankguard
        self.lr: AppliedLR | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.rankguard.probe is not None
        self.lr = AppliedLR(self.rankguard.probe.optimizer)  # type: ignore[arg-type]


def fit(
    tmp_path: Path, *, accumulation: int, transport: MemoryTransport
) -> tuple[LitLlama, RankguardCallback, Recorder]:
    module = LitLlama()
    ids = torch.randint(0, 64, (32, 8), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=2)
    rankguard = RankguardCallback(run="lit", transport=transport, every=2, jacobian_every=2)
    recorder = Recorder(rankguard)
    trainer = pl.Trainer(
        max_steps=4,
        accumulate_grad_batches=accumulation,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(str(tmp_path)),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[rankguard, recorder],
    )
    trainer.fit(module, loader)
    return module, rankguard, recorder


def test_the_logged_loss_and_the_jacobian_of_a_lightning_module(tmp_path: Path) -> None:
    transport = MemoryTransport()
    module, rankguard, _ = fit(tmp_path, accumulation=1, transport=transport)
    points = list(iter_points(transport.batches))
    losses = {p.step: p.value for p in points if p.quantity == "loss"}
    with (Path(module.logger.log_dir) / "metrics.csv").open() as f:
        logged = {
            int(r["step"]): float(r["train_loss"]) for r in csv.DictReader(f) if r["train_loss"]
        }
    assert sorted(losses) == sorted(logged) == [0, 1, 2, 3]  # numbered as Lightning logs
    for step, value in logged.items():
        assert losses[step] == pytest.approx(value, rel=1e-6)
    jacobian = {p.step for p in points if p.quantity == "jacobian_alignment"}
    assert jacobian == {0, 2}  # the blocks inside the LightningModule were found and probed
    assert type(rankguard.probe.optimizer) is torch.optim.SGD
    assert rankguard.probe.close().delivered_all  # closed at the end of training


def test_accumulation_one_probe_step_per_optimizer_step(tmp_path: Path) -> None:
    transport = MemoryTransport()
    module, _, _ = fit(tmp_path, accumulation=3, transport=transport)
    losses = {p.step: p.value for p in iter_points(transport.batches) if p.quantity == "loss"}
    assert sorted(losses) == [0, 1, 2, 3]
    for step, value in losses.items():
        micro = module.raw[3 * step : 3 * step + 3]  # the step's unscaled micro-batch losses
        assert value == pytest.approx(sum(micro) / 3, rel=1e-5)


def test_scale_lr_halves_the_lr_the_optimizer_applies(tmp_path: Path) -> None:
    transport = MemoryTransport()
    transport.push_command({"id": "c1", "kind": "scale_lr", "args": {"factor": 0.5}})
    _, _, recorder = fit(tmp_path, accumulation=1, transport=transport)
    assert transport.acks[0][1]["state"] == "applied"
    assert recorder.lr is not None
    assert recorder.lr.applied == pytest.approx([0.05, 0.025, 0.025, 0.025], rel=1e-4)
