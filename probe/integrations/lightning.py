"""Lightning with the probe, in two lines::

    from rankguard.probe.integrations.lightning import RankguardCallback

    trainer = L.Trainer(..., callbacks=[RankguardCallback(run="gpt-lightning", server=URL)])

- One ``probe.step`` per optimizer step: batch-end hooks run once per micro-batch, so the
  callback steps the probe only on a batch after which ``trainer.global_step`` moved (an
  optimizer step happened), whatever ``accumulate_grad_batches``.
- Steps are numbered as Lightning logs them: a metric ``self.log``-ged while computing the
  k-th optimizer step (counting from 0) is logged at step k, and so is the probe's point.
- The loss of that step, unscaled: the mean over its micro-batches of the loss
  ``training_step`` returned (Lightning hands batch-end hooks the loss divided by
  ``accumulate_grad_batches``; the callback sums those). Manual optimization: the mean of
  what ``training_step`` returned since the last optimizer step.
- The probe gets the LightningModule (its blocks are found where they are called, inside
  it), the real optimizer (``trainer.optimizers[0]``, never the ``LightningOptimizer``
  wrapper) and ``compiled=True`` for a module given to ``fit`` compiled; it is closed when
  training ends or fails. Under Lightning's DDP every rank runs a probe; rank 0 ships.
"""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from ..config import ProbeConfig
from .attach import ProbeAttachment

__all__ = ["RankguardCallback"]

logger = logging.getLogger("rankguard.probe")


class RankguardCallback(ProbeAttachment, Callback):
    """Attaches a :class:`~rankguard.probe.Probe` to the LightningModule and its optimizer.

    Args:
        run: the run's name (default: the LightningModule's class name).
        server, token, config, **options: as for :class:`~rankguard.probe.Probe`.
    """

    def __init__(
        self,
        run: str | None = None,
        *,
        server: str | None = None,
        token: str | None = None,
        config: ProbeConfig | None = None,
        **options: Any,
    ) -> None:
        super().__init__(run, server=server, token=token, config=config, **options)
        self._last_step = 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        optimizers = list(trainer.optimizers)
        if len(optimizers) > 1:
            logger.warning("rankguard: %d optimizers; scale_lr acts on the first", len(optimizers))
        self._attach(
            pl_module,
            optimizers[0] if optimizers else None,
            run=type(pl_module).__name__,
            start_step=trainer.global_step,
            compiled=bool(getattr(pl_module, "_compiler_ctx", None)),  # fit() got a compiled one
        )
        self._last_step = trainer.global_step

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.probe is None:
            return
        self._keep_loss(outputs.get("loss") if isinstance(outputs, dict) else outputs)
        if trainer.global_step == self._last_step:
            return  # a micro-batch: the optimizer has not stepped yet
        self._last_step = trainer.global_step
        stacked = self._take_losses()
        step_loss = None
        if stacked is not None:
            # automatic optimization hands over loss / accumulate_grad_batches: their sum is
            # the mean loss of the step; a manual loop's own losses are averaged
            step_loss = stacked.sum() if pl_module.automatic_optimization else stacked.mean()
        self.probe.step(step_loss, step=trainer.global_step - 1)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close()

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        self._close()

    def _close(self) -> None:
        if self.probe is not None:
            self.probe.close()
