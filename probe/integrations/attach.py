"""What the trainer integrations share: the probe's settings kept until training starts, the
probe built from them, and the losses of one optimizer step gathered on the device."""

from __future__ import annotations

from typing import Any

import torch

from ..config import ProbeConfig
from ..probe import Probe


class ProbeAttachment:
    """A callback's probe: built at the start of training, fed one loss per optimizer step."""

    def __init__(
        self,
        run: str | None = None,
        *,
        server: str | None = None,
        token: str | None = None,
        config: ProbeConfig | None = None,
        **options: Any,
    ) -> None:
        self.run, self.server, self.token = run, server, token
        self.config, self.options = config, options
        self.probe: Probe | None = None
        self._losses: list[torch.Tensor] = []

    def _attach(
        self,
        model: torch.nn.Module,
        optimizer: Any,
        *,
        run: str,
        start_step: int,
        compiled: bool,
        **defaults: Any,
    ) -> Probe:
        """The probe, with ``run`` unless the user named one, and ``defaults`` (e.g. the
        scheduler a rollback restores) unless the user's options set them."""
        options = {**defaults, **self.options}
        if compiled:
            options.setdefault("compiled", True)
        self.probe = Probe(
            model,
            optimizer,
            run=self.run or run,
            server=self.server,
            token=self.token,
            config=self.config,
            start_step=start_step,
            **options,
        )
        self._losses = []
        return self.probe

    def _keep_loss(self, loss: Any) -> None:
        if isinstance(loss, torch.Tensor):
            self._losses.append(loss.detach().reshape(()).float())  # stays on the device

    def _take_losses(self) -> torch.Tensor | None:
        """The step's losses, stacked (None: none was seen), and a fresh list."""
        losses, self._losses = self._losses, []
        return torch.stack(losses) if losses else None
