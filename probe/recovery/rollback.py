"""Recovery in the training process: the snapshot ring, the first response, and rollback.

:class:`Recovery` is what ``Probe(..., recovery=...)`` (or ``auto_recover=True``) adds. Per
``probe.step``:

1. :meth:`Recovery.judge` reads the step's device checks (:class:`~.guard.StepGuard`; on CUDA
   those of the step before) and turns what they saw into commands the probe applies at this
   boundary, as if the server had sent them: ``rollback`` on a non-finite loss, a loss spike,
   an update-ratio spike or a non-finite update that skip-step did not drop; ``scale_lr`` (a
   backoff that holds) on a hot update ratio; ``qk_clip`` on a head whose max attention
   logit passed tau. Under DDP only rank 0 decides, and its commands reach every rank at the
   same boundary with the server's (``command_every``).
2. :meth:`Recovery.rollback` executes a ``rollback`` (in-process or ordered by a rule or an
   operator): the newest known-good snapshot older than the incident's first sign is
   restored on every rank, the learning rate is backed off (and holds), the batches that
   trained the discarded states are recorded as skipped (:attr:`skip_windows`), and the
   retries of one incident are capped (``max_retries``, then ``rollback_exhausted``).
3. :meth:`Recovery.after_step` confirms the pending snapshot once the steps after it were
   healthy, takes a new one every ``snapshot_every`` steps, and lets the backoff recover.

Step numbers are the probe's and never go back: after a rollback the probe's step keeps
counting batches (the server's series stay append-only), while :attr:`train_step` (what the
run's schedule sees) is rewound to the restored state's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import RecoveryConfig
from ..exceptions import CommandError
from ..interventions.lr_scale import LearningRateScale
from .flight import FlightRecorder
from .guard import Flag, StepGuard, StepReading
from .snapshots import SnapshotRing, StateSource, TrainingSnapshot

__all__ = ["Incident", "Recovery"]

logger = logging.getLogger("rankguard.probe")

Emit = Callable[[str, int, dict[str, Any]], None]  # (event kind, step, payload)

# a reading with one of these flags makes the state it judged unfit for a rollback target
_UNHEALTHY = Flag.LOSS_NON_FINITE | Flag.LOSS_SPIKE | Flag.UPDATE_SPIKE | Flag.GRAD_NON_FINITE
_FLIGHT_AFTER = 16  # steps after an incident shipped with the window


@dataclass
class Incident:
    """One incident: its first sign, and the rollbacks it took."""

    key: str
    first_sign: int
    rollbacks: int = 0
    last_step: int = 0
    exhausted: bool = False


@dataclass
class _Rollback:
    """A rollback whose event waits for the first loss after it."""

    payload: dict[str, Any]
    step: int


@dataclass
class Recovery:
    config: RecoveryConfig
    source: StateSource
    guard: StepGuard
    flight: FlightRecorder
    lr_scale: LearningRateScale | None
    emit: Emit
    ship_points: Callable[[list[Any]], None]
    world_size: int = 1
    rank: int = 0
    ring: SnapshotRing = field(init=False)
    skip_windows: list[tuple[int, int]] = field(default_factory=list)
    should_stop: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    _train_offset: int = 0  # probe step - training step
    _incident: Incident | None = None
    _clean_since: int | None = None  # a reading flagged nothing since this step
    _read_through: int = -1  # the latest step whose reading arrived
    _ignore_hot_before: int = 0
    _deferred: int | None = None  # a bad step whose update skip-step dropped
    _pending_event: _Rollback | None = None
    _flight_due: list[tuple[int, int]] = field(default_factory=list)  # (ship at, from)
    _stream: Any = None
    _statistics: dict[int, Any] = field(default_factory=dict)  # snapshot step -> guard's

    def __post_init__(self) -> None:
        self.ring = SnapshotRing(self.config.keep, snapshot_dir=self.config.snapshot_dir)
        if self.guard.device.type == "cuda":
            self._stream = torch.cuda.Stream(device=self.guard.device)  # type: ignore[no-untyped-call]
        optimizer = self.source.optimizer
        self._fence_handle = None
        if optimizer is not None:
            # a snapshot copying on the side stream must finish before the update writes
            self._fence_handle = optimizer.register_step_pre_hook(self._fence)

    @classmethod
    def build(
        cls,
        config: RecoveryConfig,
        source: StateSource,
        *,
        weights: list[torch.Tensor],
        lr_scale: LearningRateScale | None,
        emit: Emit,
        ship_points: Callable[[list[Any]], None],
        rank: int = 0,
        world_size: int = 1,
    ) -> Recovery:
        """The recovery of one probe: its checks on ``source``'s optimizer, its ring."""
        params = [p for p in source.model.parameters() if p.requires_grad]
        device = params[0].device if params else torch.device("cpu")
        flight = FlightRecorder(config.flight_steps, device)
        guard = StepGuard(source.optimizer, params, weights, config, flight, device)
        return cls(
            config,
            source,
            guard,
            flight,
            lr_scale,
            emit,
            ship_points,
            world_size=world_size,
            rank=rank,
        )

    def _fence(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        pending = self.ring.in_flight()
        if pending is not None:
            pending.fence()

    def train_step(self, probe_step: int) -> int:
        """The training step (the run's schedule) at probe step ``probe_step``."""
        return probe_step - self._train_offset

    # -- 1. the first response ----------------------------------------------------------------

    def judge(
        self, step: int, loss: Any, attention_over: Mapping[str, list[float]]
    ) -> list[dict[str, Any]]:
        """This step's checks -> the commands to apply at this boundary (rank 0 decides)."""
        reading = self.guard.end_step(step, loss)
        self._ship_flight(step)
        commands: list[dict[str, Any]] = []
        if reading is not None:
            self._read_through = reading.step
            if reading.flags & Flag.SKIPPED:
                self._count("skip_step")
                self.emit("skip_step", reading.step, _reading_payload(reading))
            if reading.flags & _UNHEALTHY:
                self._clean_since = None
                if self.world_size == 1 and self.ring.pending is not None:
                    self.ring.discard_after(self.ring.pending.step)  # under DDP: at a boundary
            elif self._clean_since is None:
                self._clean_since = reading.step
            if self.rank == 0:
                commands.extend(self._respond(step, reading))
        if self.rank == 0 and attention_over and self.config.qk_clip_tau is not None:
            commands.append(
                {
                    "id": f"local:qk_clip:{step}",
                    "kind": "qk_clip",
                    "args": {"tau": self.config.qk_clip_tau, "logit_max": dict(attention_over)},
                }
            )
        self._emit_pending_rollback(step, loss)
        return commands

    def _respond(self, step: int, r: StepReading) -> list[dict[str, Any]]:
        rollback_on = Flag.LOSS_NON_FINITE | Flag.LOSS_SPIKE | Flag.UPDATE_SPIKE
        skipped = bool(r.flags & Flag.SKIPPED)
        unskipped_nan = bool(r.flags & Flag.GRAD_NON_FINITE) and not skipped
        deferred = self._deferred == r.step - 1
        if skipped and r.flags & rollback_on and not r.flags & Flag.UPDATE_SPIKE and not deferred:
            # skip-step dropped this step's update: the weights are the ones before it, and a
            # bad batch alone does not need a rollback. Roll back if the next step is bad too.
            self._deferred = r.step
            return []
        if self.config.rollback and (r.flags & rollback_on or unskipped_nan):
            # the loss and the gradients of step t judge the state after step t - 1; the
            # update ratio judges the update of step t itself
            first_bad = r.step if r.flags & Flag.UPDATE_SPIKE else r.step - 1
            if deferred:
                first_bad = min(first_bad, r.step - 2)
            factor = self.config.lr_factor
            if r.flags & Flag.UPDATE_SPIKE and self.config.update_ratio_hot is not None:
                factor = min(factor, _sized(self.config.update_ratio_hot, r.update_ratio))
            reason = _reason(r.flags, unskipped_nan)
            self.flight_incident(r.step)
            return [
                {
                    "id": f"local:rollback:{step}",
                    "kind": "rollback",
                    "args": {
                        "before_step": first_bad,
                        "lr_factor": factor,
                        "reason": reason,
                        "loss": _finite_or_none(r.loss),
                    },
                }
            ]
        hot = self.config.update_ratio_hot
        if hot is not None and r.flags & Flag.UPDATE_HOT and r.step >= self._ignore_hot_before:
            self._ignore_hot_before = step + 1  # the backoff acts from the next update on
            return [
                {
                    "id": f"local:scale_lr:{step}",
                    "kind": "scale_lr",
                    "args": {"factor": min(self.config.lr_factor, _sized(hot, r.update_ratio))},
                }
            ]
        return []

    # -- 2. rollback --------------------------------------------------------------------------

    def rollback(
        self,
        step: int,
        *,
        before_step: int | None,
        lr_factor: float | None,
        incident: str | None = None,
        reason: str = "ordered",
        loss: float | None = None,
    ) -> dict[str, Any]:
        """Restores the newest known-good snapshot older than ``before_step`` (the incident's
        first sign; None: the newest), at this step boundary. Returns the result for the
        acknowledgement; raises :class:`CommandError` when nothing can be restored."""
        first_sign = step if before_step is None else before_step
        last = self._incident
        if last is not None and last.rollbacks and first_sign <= last.last_step:
            # the sign came from a trajectory a rollback already undid (a rule's order for
            # an incident the probe handled in-process arrives some steps later)
            return {
                "skipped": f"already rolled back at step {last.last_step}",
                "rolled_back": False,
            }
        current = self._current_incident(step, first_sign, incident)
        if current.rollbacks >= self.config.max_retries:
            return self._exhausted(step, current)
        snapshot = self.ring.newest_before(first_sign)
        if snapshot is None:
            self.emit("rollback_unavailable", step, {"before_step": first_sign, "reason": reason})
            raise CommandError(
                f"rollback: no known-good snapshot older than step {first_sign} "
                f"(known-good: {[s.step for s in self.ring.good]})"
            )
        factor = self.config.lr_factor if lr_factor is None else lr_factor
        lr = None
        if self.lr_scale is not None and factor < 1.0:
            lr = self.lr_scale.multiply(factor, step=step)  # the LR of the incident, capped
        snapshot.restore(self.source)  # raises before writing when it cannot fit: ring intact
        self._after_restore(step, snapshot)
        current.rollbacks += 1
        current.last_step = step
        window = (snapshot.step + 1, step)
        self.skip_windows.append(window)
        self._count("rollback")
        payload = {
            "restored_step": snapshot.step,
            "skipped": list(window),
            "lr_factor": factor,
            "lr_scale": None if self.lr_scale is None else self.lr_scale.scale,
            "loss_before": loss,
            "loss_after": None,
            "reason": reason,
            "incident": current.key,
            "retry": current.rollbacks,
            "train_step": snapshot.train_step,
        }
        self._pending_event = _Rollback(payload, step)
        result = {**payload, "rolled_back": True}
        if lr is not None:
            result["lr"] = lr["lr"]
        return result

    def _current_incident(self, step: int, first_sign: int, key: str | None) -> Incident:
        last = self._incident
        window = self.config.retry_window
        if last is not None and (
            (key is not None and key == last.key)
            or (key is None and last.rollbacks and step - last.last_step <= window)
        ):
            return last
        self._incident = Incident(key or f"step-{first_sign}", first_sign, last_step=step)
        return self._incident

    def _exhausted(self, step: int, incident: Incident) -> dict[str, Any]:
        if not incident.exhausted:
            incident.exhausted = True
            self._count("rollback_exhausted")
            self.emit(
                "rollback_exhausted",
                step,
                {
                    "incident": incident.key,
                    "rollbacks": incident.rollbacks,
                    "stop": self.config.stop_on_exhausted,
                },
            )
            logger.warning(
                "rankguard: incident %s: %d rollbacks did not hold; escalating",
                incident.key,
                incident.rollbacks,
            )
        if self.config.stop_on_exhausted:
            self.should_stop = True
        return {"exhausted": True, "rolled_back": False, "incident": incident.key}

    def _after_restore(self, step: int, snapshot: TrainingSnapshot) -> None:
        self.ring.discard_after(snapshot.step + 1)  # later ones followed the bad state
        self.guard.forget_pending()
        self.guard.rewind(self._statistics.get(snapshot.step))
        self._train_offset = (step + 1) - (snapshot.train_step + 1)
        self._clean_since = None
        self._ignore_hot_before = step + 1

    def _emit_pending_rollback(self, step: int, loss: Any) -> None:
        """A rollback's event goes out at the next step, with the first loss after it."""
        pending = self._pending_event
        if pending is None or step <= pending.step:
            return
        self._pending_event = None
        if loss is not None:
            value = (
                float(loss.detach().float().reshape(-1)[0])
                if isinstance(loss, torch.Tensor)
                else float(loss)
            )
            pending.payload["loss_after"] = _finite_or_none(value)
        self.emit("rollback", pending.step, pending.payload)

    # -- 3. snapshots -------------------------------------------------------------------------

    def after_step(self, step: int, *, boundary: bool) -> None:
        """After this step's commands: confirm, take a snapshot, let the backoff recover.
        ``boundary``: a command boundary (under DDP the ranks agree on health there, so that
        every rank's ring holds the same snapshots)."""
        if self.lr_scale is not None:
            self.lr_scale.tick(step)
        pending = self.ring.pending
        if pending is not None:
            unclean = self._clean_since is None or self._clean_since > pending.step + 1
            old = step - pending.step >= self.config.confirm_steps + (self.world_size > 1)
            if self.world_size > 1:
                if boundary:
                    unclean = self._any_rank(unclean)  # one small collective, same on all
                    if unclean:
                        self.ring.discard_after(pending.step)
                    elif old:
                        self.ring.confirm()
            elif not unclean and self._read_through >= pending.step + self.config.confirm_steps:
                self.ring.confirm()
        first = not self.ring.good and self.ring.pending is None  # the earliest state seen
        if (first or step % self.config.snapshot_every == 0) and self.ring.pending is None:
            self.ring.take(self.source, step, self.train_step(step), stream=self._stream)
            kept = {s.step for s in self.ring.good}
            self._statistics = {k: v for k, v in self._statistics.items() if k in kept}
            self._statistics[step] = self.guard.statistics()

    def _any_rank(self, flag: bool) -> bool:
        import torch.distributed as dist

        value = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def sample_health(self, finite: bool) -> None:
        """The probe's sampled values at this step: a non-finite one makes it unhealthy."""
        if not finite:
            self._clean_since = None
            if self.world_size == 1 and self.ring.pending is not None:
                self.ring.discard_after(self.ring.pending.step)  # under DDP: at a boundary

    # -- the flight recorder ------------------------------------------------------------------

    def flight_incident(self, step: int) -> None:
        """Ships the window around ``step`` once the steps after it are recorded."""
        self._flight_due.append((step + _FLIGHT_AFTER, step - self.config.flight_before))

    def _ship_flight(self, step: int, *, final: bool = False) -> None:
        due = [(at, start) for at, start in self._flight_due if final or step >= at]
        if not due:
            return
        self._flight_due = [d for d in self._flight_due if d not in due]
        start = min(s for _, s in due)
        self.ship_points(self.flight.window(max(0, start), step, rank=self.rank))

    def close(self, step: int) -> None:
        for reading in self.guard.drain():
            self._read_through = reading.step
        self._ship_flight(step, final=True)
        if self._pending_event is not None:
            self.emit("rollback", self._pending_event.step, self._pending_event.payload)
            self._pending_event = None
        self.guard.remove()
        if self._fence_handle is not None:
            self._fence_handle.remove()
        self.ring.pending = None

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def summary(self) -> dict[str, Any]:
        return {
            **self.counts,
            "skipped_updates": self.guard.skipped,
            "skip_windows": [list(w) for w in self.skip_windows],
            "snapshots": [s.step for s in self.ring.good],
            "snapshot_bytes": self.ring.nbytes,
        }


def _sized(bound: float, ratio: float) -> float:
    """A backoff factor that brings ``ratio`` (proportional to the LR) under ``bound``."""
    if not math.isfinite(ratio) or ratio <= 0:
        return 0.5
    return max(0.01, min(1.0, 0.5 * bound / ratio))


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _reason(flags: Flag, unskipped_nan: bool) -> str:
    for flag, name in (
        (Flag.LOSS_NON_FINITE, "loss_non_finite"),
        (Flag.UPDATE_SPIKE, "update_ratio_spike"),
        (Flag.LOSS_SPIKE, "loss_spike"),
    ):
        if flags & flag:
            return name
    return "grad_non_finite" if unskipped_nan else "unknown"


def _reading_payload(r: StepReading) -> dict[str, Any]:
    return {
        "grad_norm": _finite_or_none(r.grad_norm),
        "grad_norm_median": _finite_or_none(r.grad_norm_median),
        "non_finite_grads": _finite_or_none(r.non_finite),
    }
