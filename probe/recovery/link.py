"""The probe's side of recovery and QK-Clip: what its step loop calls, in one place.

:class:`RecoveryLink` owns the per-head attention logits of the latest sample (QK-Clip's
input, measured whenever the probe captures q and k), the first response's orders waiting
for the next command boundary, and (when recovery is on) the :class:`~.rollback.Recovery`.
Per ``probe.step``: :meth:`observe` and :meth:`sampled` at a sample; :meth:`judge` after it;
:meth:`take_orders` / :meth:`applied` around the commands; :meth:`after_step` last.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from ..attention import AttentionSite
from ..config import RecoveryConfig
from ..control import RollbackCommand
from ..interventions.lr_scale import LearningRateScale
from ..interventions.qk_clip import QKHeads, per_head_logit_max, qk_heads
from ..wire import Batch, Point, encode_batch
from .rollback import Recovery
from .snapshots import StateSource

__all__ = ["RecoveryLink"]

logger = logging.getLogger("rankguard.probe")

# the event a first-response order leaves when it was applied (a rollback has its own)
_ORDER_EVENTS = {"scale_lr": "lr_backoff", "qk_clip": "qk_clip"}


class RecoveryLink:
    """Recovery (optional) and QK-Clip's measurements for one probe."""

    def __init__(
        self,
        config: RecoveryConfig | None,
        source: StateSource,
        *,
        weights: Sequence[nn.Parameter],
        sites: Sequence[AttentionSite],
        lr_scale: LearningRateScale | None,
        send: Callable[[Batch], None],
        rank: int,
        world_size: int,
    ) -> None:
        self.config = config
        self.rank = rank
        self._send = send
        self.heads: list[QKHeads] = [h for h in map(qk_heads, sites) if h is not None]
        self.head_logits: dict[str, Tensor] = {}  # site -> (n_head,) at the latest sample
        self._site_max: dict[str, float] = {}  # site -> attention_logit_max at that sample
        self._sampled_at = -1
        self._orders: list[dict[str, Any]] = []
        self._failed = False
        self.recovery = (
            None
            if config is None
            else Recovery.build(
                config,
                source,
                weights=list(weights),
                lr_scale=lr_scale,
                emit=self.event,
                ship_points=self._ship,
                rank=rank,
                world_size=world_size,
            )
        )

    # -- what the probe exposes ---------------------------------------------------------------

    @property
    def should_stop(self) -> bool:
        return self.recovery is not None and self.recovery.should_stop

    @property
    def skip_windows(self) -> list[tuple[int, int]]:
        return [] if self.recovery is None else list(self.recovery.skip_windows)

    def train_step(self, step: int) -> int:
        return step if self.recovery is None else self.recovery.train_step(step)

    def summary(self) -> dict[str, Any]:
        return {} if self.recovery is None else self.recovery.summary()

    def rollback(self, command: RollbackCommand, step: int) -> dict[str, Any]:
        """The ``rollback`` command (the probe's CommandRunner calls it)."""
        assert self.recovery is not None
        return self.recovery.rollback(
            step,
            before_step=command.before_step,
            lr_factor=command.lr_factor,
            incident=command.incident,
            reason=command.reason,
            loss=command.loss,
        )

    # -- the step loop ------------------------------------------------------------------------

    def observe(
        self, per_head: Mapping[str, Tensor], qk: Mapping[str, tuple[Tensor, Tensor]]
    ) -> None:
        """This sample's per-head max attention logits (on the device): the
        ``attention_logit_max`` quantity's, as the model computes them, where it has them;
        from the captured projections elsewhere."""
        for h in self.heads:
            exact = per_head.get(h.site)
            if exact is not None and exact.numel() == h.n_head:
                self.head_logits[h.site] = exact
                continue
            captured = qk.get(h.site)
            if captured is None:
                continue
            try:
                self.head_logits[h.site] = per_head_logit_max(*captured, h.n_head, h.n_kv_head)
            except Exception as exc:  # a layout the interface does not know: say so once
                if not self._failed:
                    self._failed = True
                    logger.warning("rankguard: per-head attention logits failed: %s", exc)

    def sampled(self, step: int, points: Sequence[Point]) -> None:
        """This sample's host values: the site maxima (QK-Clip's trigger) and their health."""
        self._site_max = {p.target: p.value for p in points if p.quantity == "attention_logit_max"}
        self._sampled_at = step
        if self.recovery is not None:
            self.recovery.sample_health(
                all(
                    math.isfinite(p.value) and not (p.quantity == "non_finite" and p.value > 0)
                    for p in points
                )
            )

    def judge(self, step: int, loss: Any) -> None:
        """The first response's orders for this step (applied at the next boundary)."""
        if self.recovery is not None:
            self._orders.extend(self.recovery.judge(step, loss, self._logits_over(step)))

    def take_orders(self, commands: list[Any]) -> list[Any]:
        """The waiting orders, then ``commands``; on rank 0 a ``qk_clip`` gets the latest
        per-head logits (so every rank applies the same factors)."""
        orders, self._orders = self._orders, []
        out = [*orders, *commands]
        return [self._with_logits(c) for c in out] if self.rank == 0 else out

    def applied(self, raw: Any, ack: Mapping[str, Any], step: int) -> None:
        """A first-response order that was applied leaves an event."""
        kind = str(raw.get("kind")) if isinstance(raw, Mapping) else ""
        if ack.get("state") == "applied" and kind in _ORDER_EVENTS:
            self.event(_ORDER_EVENTS[kind], step, dict(ack.get("result") or {}))

    def after_step(self, step: int, *, boundary: bool) -> None:
        if self.recovery is not None:
            self.recovery.after_step(step, boundary=boundary)

    def close(self, step: int) -> None:
        if self.recovery is not None:
            self.recovery.close(step)

    def event(self, kind: str, step: int, payload: dict[str, Any]) -> None:
        """One of the probe's own events (rank 0 ships it with the points)."""
        if self.rank == 0:
            self._send(encode_batch([], events=[{"kind": kind, "step": step, "payload": payload}]))

    # -- internals ------------------------------------------------------------------------------

    def _ship(self, points: list[Point]) -> None:
        if self.rank == 0 and points:
            self._send(encode_batch(points))

    def _logits_over(self, step: int) -> dict[str, list[float]]:
        """Per-head maxima of the sites over tau at this sample (read only then: the
        sample's own host values say whether any site is over)."""
        tau = None if self.config is None else self.config.qk_clip_tau
        if tau is None or self._sampled_at != step:
            return {}
        over = [s for s in self.head_logits if self._site_max.get(s, 0.0) > tau]
        heads = {site: self.head_logits[site].tolist() for site in over}
        return {site: v for site, v in heads.items() if max(v, default=0.0) > tau}

    def _with_logits(self, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw  # the command runner acknowledges it as failed
        args = raw.get("args")
        if raw.get("kind") != "qk_clip" or (isinstance(args, dict) and "logit_max" in args):
            return raw
        logits = {site: v.tolist() for site, v in self.head_logits.items()}
        return {**raw, "args": {**(args if isinstance(args, dict) else {}), "logit_max": logits}}
