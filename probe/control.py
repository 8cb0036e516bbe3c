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
- ``scale_lr``: ``{"factor": number > 0}`` — multiplies every parameter group's learning rate
  by ``factor`` on top of the user's schedule, cumulatively, never above the schedule
  (:class:`~rankguard.probe.interventions.LearningRateScale`; needs the probe's optimizer)

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

from .exceptions import CommandError, ConfigError
from .interventions import (
    Engine,
    LearningRateScale,
    PSSVariant,
    Snapshot,
    apply_msign,
    apply_pss,
)
from .targets import WeightTarget, select

__all__ = [
    "Command",
    "CommandKind",
    "CommandRunner",
    "MSignCommand",
    "PSSCommand",
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


Command = MSignCommand | PSSCommand | UndoCommand | SetProbeCommand | ScaleLRCommand


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
}


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
    """

    targets: Sequence[WeightTarget]
    reconfigure: Reconfigure
    lr_scale: LearningRateScale | None = None
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
            result = self._run(command)
            result.setdefault("seconds", time.perf_counter() - started)
            ack: dict[str, Any] = {"state": "applied", "step": step, "result": result}
        except ConfigError as exc:  # invalid command or target: nothing was applied
            ack = {"state": "failed", "step": step, "error": str(exc)}
        except Exception as exc:  # a numerical failure must not take training down
            ack = {"state": "failed", "step": step, "error": f"{type(exc).__name__}: {exc}"}
        if command_id:
            self._acks[command_id] = ack
        return ack

    def _run(self, command: Command) -> dict[str, Any]:
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
            return self.lr_scale.multiply(command.factor)
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

    def _select(self, selector: Selector) -> list[WeightTarget]:
        # select() raises a SelectorError (a ConfigError) naming the selector that matched nothing.
        return select(self.targets, selector if isinstance(selector, str) else list(selector))
