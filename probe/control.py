"""Remote commands: a closed, validated set, applied only at a step boundary.

The server queues commands; the transport's thread drops them into a local inbox; at the
next ``probe.step()`` (after ``optimizer.step()``) the probe hands each to
:meth:`CommandRunner.apply`, which validates it, applies it in place under ``no_grad`` and
returns the acknowledgement to send back. Under DDP the probe first broadcasts rank 0's
commands so that every rank applies the same ones at the same step.

Kinds (docs/contract.md):

- ``msign``: ``{"targets": "attention" | "all_2d" | [globs],
  "engine": "svd" | "newton_schulz" | null, "snapshot": true}``
- ``pss``: ``{"targets": ..., "variant": "clip" | "conv" | "softmax", "k": int | null,
  "scale": 1.0, "temperature": 0.25, "snapshot": true}``
- ``undo``: ``{}`` — restores the snapshot taken by the last msign/pss
- ``set_probe``: ``{"every": int | null, "enable": [quantity], "disable": [quantity]}``
- ``scale_lr``: ``{"factor": number > 0}`` — a backoff (< 1) multiplies every parameter
  group's learning rate by ``factor`` on top of the user's schedule and caps it there while
  the schedule rises, then recovers after a healthy period; a lift (> 1) undoes it, never
  above the schedule (:class:`~rankguard.probe.interventions.LearningRateScale`; needs the
  probe's optimizer)
- ``rollback``: ``{"before_step": int | null, "lr_factor": number in (0, 1] | null,
  "incident": str | null}`` — restores the newest known-good snapshot older than
  ``before_step`` (the incident's first sign), skips the batches after it, backs off the LR;
  capped per incident (:mod:`rankguard.probe.recovery`; needs the probe's recovery on)
- ``qk_clip``: ``{"tau": number > 0}`` — rescales W_q/W_k of every attention head whose max
  logit at the latest sample exceeded ``tau`` (:mod:`~rankguard.probe.interventions.qk_clip`)

A command is applied at most once per id: a repeated id is acknowledged again with the first
result and not re-applied. An invalid command is acknowledged ``failed`` with an error that
names the field, and nothing is applied.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

import torch

from .exceptions import CommandError, ConfigError
from .interventions import (
    Engine,
    LearningRateScale,
    PSSVariant,
    Snapshot,
    apply_msign,
    apply_pss,
)
from .interventions.qk_clip import QKHeads, apply_qk_clip
from .targets import WeightTarget, select

__all__ = [
    "Command",
    "CommandKind",
    "CommandRunner",
    "MSignCommand",
    "PSSCommand",
    "QKClipCommand",
    "RollbackCommand",
    "ScaleLRCommand",
    "SetProbeCommand",
    "UndoCommand",
    "parse_command",
]


class CommandKind(str, Enum):
    MSIGN = "msign"
    PSS = "pss"
    UNDO = "undo"
    SET_PROBE = "set_probe"
    SCALE_LR = "scale_lr"
    ROLLBACK = "rollback"
    QK_CLIP = "qk_clip"


Selector = str | tuple[str, ...]
_Choice = TypeVar("_Choice", Engine, PSSVariant)


@dataclass(frozen=True)
class MSignCommand:
    id: str
    targets: Selector = "attention"
    engine: Engine | None = None
    snapshot: bool = True


@dataclass(frozen=True)
class PSSCommand:
    id: str
    targets: Selector = "all_2d"
    variant: PSSVariant = PSSVariant.CLIP
    k: int | None = None
    scale: float = 1.0
    temperature: float = 0.25
    snapshot: bool = True


@dataclass(frozen=True)
class UndoCommand:
    id: str


@dataclass(frozen=True)
class SetProbeCommand:
    id: str
    every: int | None = None
    enable: tuple[str, ...] = ()
    disable: tuple[str, ...] = ()


@dataclass(frozen=True)
class ScaleLRCommand:
    id: str
    factor: float


@dataclass(frozen=True)
class RollbackCommand:
    id: str
    before_step: int | None = None
    lr_factor: float | None = None
    incident: str | None = None
    reason: str = "ordered"
    loss: float | None = None


@dataclass(frozen=True)
class QKClipCommand:
    id: str
    tau: float = 100.0
    # per-head max logits by site; filled in by rank 0 from its latest sample when absent
    logit_max: dict[str, tuple[float, ...]] | None = None


Command = (
    MSignCommand
    | PSSCommand
    | UndoCommand
    | SetProbeCommand
    | ScaleLRCommand
    | RollbackCommand
    | QKClipCommand
)


def parse_command(raw: Mapping[str, Any]) -> Command:
    """Validates a command as the server sends it (``id``, ``kind``, ``args``)."""
    command_id = raw.get("id")
    if not isinstance(command_id, (str, int)) or isinstance(command_id, bool):
        raise CommandError(f"id: expected a string, got {command_id!r}")
    command_id = str(command_id)
    kind = raw.get("kind")
    args = raw.get("args") or {}
    if not isinstance(args, Mapping):
        raise CommandError(f"args: expected an object, got {type(args).__name__}")
    known = {k.value for k in CommandKind}
    if kind not in known:
        raise CommandError(f"kind: unknown command {kind!r}; valid kinds: {sorted(known)}")
    fields = _FIELDS[CommandKind(kind)]
    unknown = sorted(set(args) - fields)
    if unknown:
        raise CommandError(f"args.{unknown[0]}: not an argument of {kind}; valid: {sorted(fields)}")

    if kind == CommandKind.MSIGN:
        engine = args.get("engine")
        return MSignCommand(
            id=command_id,
            targets=_selector(args.get("targets", "attention")),
            engine=None if engine is None else _member(Engine, "engine", engine, " or null"),
            snapshot=_bool(args, "snapshot", True),
        )
    if kind == CommandKind.PSS:
        variant = _member(PSSVariant, "variant", args.get("variant", "clip"))
        k = args.get("k")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise CommandError(f"args.k: expected an integer >= 1 or null, got {k!r}")
        return PSSCommand(
            id=command_id,
            targets=_selector(args.get("targets", "all_2d")),
            variant=variant,
            k=k,
            scale=_positive(args, "scale", 1.0),
            temperature=_positive(args, "temperature", 0.25),
            snapshot=_bool(args, "snapshot", True),
        )
    if kind == CommandKind.UNDO:
        return UndoCommand(id=command_id)
    if kind == CommandKind.SCALE_LR:
        if "factor" not in args:
            raise CommandError("args.factor: required (the learning-rate multiplier, > 0)")
        return ScaleLRCommand(id=command_id, factor=_positive(args, "factor", 1.0))
    if kind == CommandKind.ROLLBACK:
        return _rollback(command_id, args)
    if kind == CommandKind.QK_CLIP:
        return QKClipCommand(
            id=command_id, tau=_positive(args, "tau", 100.0), logit_max=_logits(args)
        )
    every = args.get("every")
    if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
        raise CommandError(f"args.every: expected an integer >= 1 or null, got {every!r}")
    return SetProbeCommand(
        id=command_id,
        every=every,
        enable=_names(args, "enable"),
        disable=_names(args, "disable"),
    )


_FIELDS: dict[CommandKind, set[str]] = {
    CommandKind.MSIGN: {"targets", "engine", "snapshot"},
    CommandKind.PSS: {"targets", "variant", "k", "scale", "temperature", "snapshot"},
    CommandKind.UNDO: set(),
    CommandKind.SET_PROBE: {"every", "enable", "disable"},
    CommandKind.SCALE_LR: {"factor"},
    CommandKind.ROLLBACK: {"before_step", "lr_factor", "incident", "reason", "loss"},
    CommandKind.QK_CLIP: {"tau", "logit_max"},
}


def _rollback(command_id: str, args: Mapping[str, Any]) -> RollbackCommand:
    before = args.get("before_step")
    if before is not None and (
        not isinstance(before, int) or isinstance(before, bool) or before < 0
    ):
        raise CommandError(f"args.before_step: expected an integer >= 0 or null, got {before!r}")
    factor = args.get("lr_factor")
    if factor is not None:
        factor = _positive(args, "lr_factor", 0.5)
        if factor > 1.0:
            raise CommandError(
                f"args.lr_factor: expected a number in (0, 1] or null, got {factor!r}"
            )
    for name in ("incident", "reason"):
        value = args.get(name)
        if value is not None and (not isinstance(value, str) or len(value) > 200):
            raise CommandError(f"args.{name}: expected a string (<= 200 characters), got {value!r}")
    loss = args.get("loss")
    if loss is not None and (isinstance(loss, bool) or not isinstance(loss, int | float)):
        raise CommandError(f"args.loss: expected a number or null, got {loss!r}")
    return RollbackCommand(
        id=command_id,
        before_step=before,
        lr_factor=factor,
        incident=args.get("incident"),
        reason=args.get("reason") or "ordered",
        loss=None if loss is None else float(loss),
    )


def _logits(args: Mapping[str, Any]) -> dict[str, tuple[float, ...]] | None:
    value = args.get("logit_max")
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(
        isinstance(site, str)
        and isinstance(heads, Sequence)
        and not isinstance(heads, str)
        and all(isinstance(h, int | float) and not isinstance(h, bool) for h in heads)
        for site, heads in value.items()
    ):
        raise CommandError(
            f"args.logit_max: expected {{site: [per-head max logit, ...]}}, got {value!r}"
        )
    return {site: tuple(float(h) for h in heads) for site, heads in value.items()}


def _member(kind: type[_Choice], name: str, value: Any, alternative: str = "") -> _Choice:
    """The member of an argument's closed set (the intervention's own enum)."""
    try:
        return kind(value)
    except (ValueError, TypeError):
        valid = [member.value for member in kind]
        raise CommandError(f"args.{name}: {value!r} is not one of {valid}{alternative}") from None


def _selector(value: Any) -> Selector:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, Sequence) and value and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise CommandError(
        f"args.targets: expected 'attention', 'all_2d' or a non-empty list of globs, got {value!r}"
    )


def _bool(args: Mapping[str, Any], name: str, default: bool) -> bool:
    value = args.get(name, default)
    if not isinstance(value, bool):
        raise CommandError(f"args.{name}: expected true or false, got {value!r}")
    return value


def _positive(args: Mapping[str, Any], name: str, default: float) -> float:
    value = args.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise CommandError(f"args.{name}: expected a number > 0, got {value!r}")
    return float(value)


def _names(args: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = args.get(name, [])
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise CommandError(f"args.{name}: expected a list of quantity names, got {value!r}")
    if not all(isinstance(v, str) for v in value):
        raise CommandError(f"args.{name}: every entry must be a quantity name, got {value!r}")
    return tuple(value)


Reconfigure = Callable[[SetProbeCommand], dict[str, Any]]


@dataclass
class CommandRunner:
    """Applies commands to the probe's targets; remembers what it applied, by id.

    Args:
        targets: Every weight target the probe found (selectors choose among them; the
            embedding and head are only there if the probe was asked for them).
        reconfigure: Applies a ``set_probe`` command to the probe and returns what changed;
            raises :class:`~rankguard.probe.exceptions.ConfigError` for a bad value.
        lr_scale: The learning-rate multiplier of the probe's optimizer (None: the probe
            was given no optimizer, and ``scale_lr`` fails with an error saying so).
        rollback: Executes a ``rollback`` at a step (the probe's recovery; None: recovery is
            off, and ``rollback`` fails saying so).
        qk_heads: The per-head query/key rows of the model's attention sites (``qk_clip``).
    """

    targets: Sequence[WeightTarget]
    reconfigure: Reconfigure
    lr_scale: LearningRateScale | None = None
    rollback: Callable[[RollbackCommand, int], dict[str, Any]] | None = None
    qk_heads: Sequence[QKHeads] = ()
    _acks: dict[str, dict[str, Any]] = field(default_factory=dict)
    _snapshot: Snapshot | None = None

    @property
    def acks(self) -> dict[str, dict[str, Any]]:
        """The acknowledgement of every command handled so far, by id."""
        return dict(self._acks)

    def apply(self, raw: Mapping[str, Any], step: int) -> dict[str, Any]:
        """Validates and applies one command; returns its acknowledgement.

        Called at a step boundary, after ``optimizer.step()``.
        """
        command_id = str(raw.get("id", ""))
        if command_id in self._acks:
            return self._acks[command_id]
        started = time.perf_counter()
        try:
            command = parse_command(raw)
            result = self._run(command, step)
            result.setdefault("seconds", time.perf_counter() - started)
            ack: dict[str, Any] = {"state": "applied", "step": step, "result": result}
        except ConfigError as exc:  # invalid command or target: nothing was applied
            ack = {"state": "failed", "step": step, "error": str(exc)}
        except Exception as exc:  # a numerical failure must not take training down
            ack = {"state": "failed", "step": step, "error": f"{type(exc).__name__}: {exc}"}
        if command_id:
            self._acks[command_id] = ack
        return ack

    def _run(self, command: Command, step: int) -> dict[str, Any]:
        if isinstance(command, UndoCommand):
            if self._snapshot is None:
                raise CommandError("undo: there is no snapshot to restore (none was taken)")
            self._snapshot.restore()
            self._snapshot = None
            return {"restored": True}
        if isinstance(command, SetProbeCommand):
            return self.reconfigure(command)
        if isinstance(command, ScaleLRCommand):
            if self.lr_scale is None:
                raise CommandError(
                    "scale_lr: the probe was given no optimizer; pass it as "
                    "Probe(model, optimizer, ...)"
                )
            return self.lr_scale.multiply(command.factor, step=step)
        if isinstance(command, RollbackCommand):
            if self.rollback is None:
                raise CommandError(
                    "rollback: the probe keeps no snapshots; turn recovery on "
                    "(Probe(..., auto_recover=True) or recovery=RecoveryConfig())"
                )
            return self.rollback(command, step)
        if isinstance(command, QKClipCommand):
            return self._qk_clip(command)
        chosen = self._select(command.targets)
        snapshot = Snapshot.take(chosen) if command.snapshot else None
        if isinstance(command, MSignCommand):
            outcome = apply_msign(chosen, engine=command.engine)
        else:
            outcome = apply_pss(
                chosen,
                variant=command.variant,
                k=command.k,
                scale=command.scale,
                temperature=command.temperature,
            )
        if snapshot is not None:
            self._snapshot = snapshot
        return outcome.to_dict()

    def _qk_clip(self, command: QKClipCommand) -> dict[str, Any]:
        if not self.qk_heads:
            raise CommandError(
                "qk_clip: the model has no attention site whose heads the probe can tell apart"
            )
        if not command.logit_max:
            raise CommandError(
                "qk_clip: no attention logits measured yet (they are taken at the probe's "
                "sample steps, with attention_logit_max enabled)"
            )
        logits = {site: torch.tensor(v) for site, v in command.logit_max.items()}
        return apply_qk_clip(self.qk_heads, logits, command.tau).to_dict()

    def _select(self, selector: Selector) -> list[WeightTarget]:
        # select() raises a SelectorError (a ConfigError) naming the selector that matched nothing.
        return select(self.targets, selector if isinstance(selector, str) else list(selector))
