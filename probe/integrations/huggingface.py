"""The Hugging Face ``Trainer`` with the probe, in two lines::

    from rankguard.probe.integrations.huggingface import RankguardCallback

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[RankguardCallback(run="llama-ft", server=URL, token=TOKEN)])

- One ``probe.step`` per optimizer step (``on_step_end``), numbered as the Trainer numbers
  its steps (``state.global_step``: 1 for the first), whatever ``gradient_accumulation_steps``.
- The loss of that step as the Trainer logs it: the sum over its micro-batches of what
  ``training_step`` returns (each already divided by the accumulation steps unless the model
  normalised it by the batch's token count), so it is the step's mean loss, unscaled by
  accumulation. Callbacks are not given the loss; the callback reads it by wrapping the
  ``training_step`` of the Trainer that calls it, for the length of the training.
  NaN and Inf are kept (the Trainer's own log smooths them over).
- The probe gets the model the Trainer trains and its real optimizer (accelerate's
  ``AcceleratedOptimizer`` unwrapped), ``compiled=True`` when ``args.torch_compile``, and is
  closed at the end of training. Under the Trainer's DDP every rank runs a probe; rank 0
  ships (the loss is rank 0's, where the Trainer logs the mean over ranks).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..config import ProbeConfig
from .attach import ProbeAttachment

__all__ = ["RankguardCallback"]

logger = logging.getLogger("rankguard.probe")


class RankguardCallback(ProbeAttachment, TrainerCallback):
    """Attaches a :class:`~rankguard.probe.Probe` to the Trainer's model and optimizer.

    Args:
        run: the run's name (default: ``args.run_name``, else the output directory's).
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
        self._trainer: Trainer | None = None

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            return
        self._attach(
            model,
            optimizer,
            run=args.run_name or str(args.output_dir).rstrip("/").rsplit("/", 1)[-1],
            start_step=state.global_step + 1,  # the Trainer counts optimizer steps from 1
            compiled=bool(getattr(args, "torch_compile", False)),
            # what a rollback (recovery) restores beside the model and the optimizer
            lr_scheduler=kwargs.get("lr_scheduler"),
        )
        self._trainer = _calling_trainer()
        if self._trainer is None:
            logger.warning(
                "rankguard: no Trainer found calling the callback; the probe records no loss"
            )
        else:
            self._wrap_training_step(self._trainer)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.probe is None:
            return
        losses = self._take_losses()
        self.probe.step(None if losses is None else losses.sum(), step=state.global_step)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._trainer is not None and "training_step" in vars(self._trainer):
            del self._trainer.training_step  # the class's own method again
        self._trainer = None
        if self.probe is not None:
            self.probe.close()

    def _wrap_training_step(self, trainer: Trainer) -> None:
        original = trainer.training_step

        def training_step(*args: Any, **kwargs: Any) -> Any:
            loss = original(*args, **kwargs)
            self._keep_loss(loss)
            return loss

        trainer.training_step = training_step  # type: ignore[method-assign]


def _calling_trainer() -> Trainer | None:
    """The Trainer whose ``train`` is running the callbacks (found on the call stack once,
    at the start of training: callbacks are not handed the Trainer)."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, Trainer):
            return owner
        frame = frame.f_back  # type: ignore[assignment]
    return None
