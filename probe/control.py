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
  "scale": 1.0 (in (0, 10]), "temperature": 0.25 (in (0, 100]), "snapshot": true}``, every
  number finite and ``k`` at most 1e6
- ``undo``: ``{}`` — restores the snapshot taken by the last msign/pss that kept one
- ``set_probe``: ``{"every": int in [1, 1e6] | null, "enable": [quantity], "disable": [quantity]}``
- ``scale_lr``: ``{"factor": finite number in [1e-4, 1e4]}`` — multiplies every parameter
  group's learning rate by ``factor`` on top of the user's schedule, cumulatively, never
  above the schedule (:class:`~rankguard.probe.interventions.LearningRateScale`; needs the
  probe's optimizer)

The bounds are the server's (it refuses a command outside them with a 422); the probe checks
them again, because what arrives over the wire is not necessarily what the server sent.

A command is applied at most once per id: a repeated id is acknowledged again with the first
result and not re-applied. An invalid command is acknowledged ``failed`` with an error that
names the field, and nothing is applied. A weight rewrite (msign, pss) always snapshots its
targets first; a result that is not finite is rolled back and acknowledged ``failed``, and
the previous snapshot stays for ``undo``. ``"snapshot": false`` only means the new snapshot
is not kept for ``undo``. Nothing a command holds can raise into training: whatever arrives,
:meth:`CommandRunner.apply` returns an acknowledgement.
"""

from __future__ import annotations

import math
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
    RewriteError,
    Snapshot,
    apply_msign,
    apply_pss,
)
from .targets import WeightTarget, select

__all__ = [
    "MAX_COMMAND_INT",
    "PSS_SCALE_MAX",
    "PSS_TEMPERATURE_MAX",
    "SCALE_LR_FACTOR_MAX",
    "SCALE_LR_FACTOR_MIN",
    "Command",
    "CommandKind",
    "CommandRunner",
    "MSignCommand",
    "PSSCommand",
    "ScaleLRCommand",
    "SetProbeCommand",
    "UndoCommand",
    "command_id",
    "parse_command",
]


PSS_SCALE_MAX = 10.0
"""``pss`` ``scale`` is a finite number in (0, PSS_SCALE_MAX] (the server's bound too)."""
SCALE_LR_FACTOR_MIN = 1e-4
SCALE_LR_FACTOR_MAX = 1e4
"""``scale_lr`` ``factor`` is a finite number in [SCALE_LR_FACTOR_MIN, SCALE_LR_FACTOR_MAX]."""
PSS_TEMPERATURE_MAX = 100.0
"""``pss`` ``temperature`` is a finite number in (0, PSS_TEMPERATURE_MAX]."""
MAX_COMMAND_INT = 1_000_000
"""The largest ``k`` (pss) or ``every`` (set_probe) a command may carry."""


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
    key = command_id(raw)
    if not key:
        raise CommandError(f"id: expected a string, got {type(raw.get('id')).__name__}")
    kind = raw.get("kind")
    args = raw.get("args") or {}
    if not isinstance(args, Mapping):
        raise CommandError(f"args: expected an object, got {type(args).__name__}")
    known = {k.value for k in CommandKind}
    if not isinstance(kind, str) or kind not in known:
        raise CommandError(f"kind: unknown command {_shown(kind)}; valid kinds: {sorted(known)}")
    fields = _FIELDS[CommandKind(kind)]
    unknown = sorted(set(args) - fields)
    if unknown:
        raise CommandError(f"args.{unknown[0]}: not an argument of {kind}; valid: {sorted(fields)}")

    if kind == CommandKind.MSIGN:
        engine = args.get("engine")
        return MSignCommand(
            id=key,
            targets=_selector(args.get("targets", "attention")),
            engine=None if engine is None else _member(Engine, "engine", engine, " or null"),
            snapshot=_bool(args, "snapshot", True),
        )
    if kind == CommandKind.PSS:
        variant = _member(PSSVariant, "variant", args.get("variant", "clip"))
        return PSSCommand(
            id=key,
            targets=_selector(args.get("targets", "all_2d")),
            variant=variant,
            k=_count(args, "k"),
            scale=_number(args, "scale", 1.0, high=PSS_SCALE_MAX),
            temperature=_number(args, "temperature", 0.25, high=PSS_TEMPERATURE_MAX),
            snapshot=_bool(args, "snapshot", True),
        )
    if kind == CommandKind.UNDO:
        return UndoCommand(id=key)
    if kind == CommandKind.SCALE_LR:
        if "factor" not in args:
            raise CommandError(
                f"args.factor: required (the learning-rate multiplier, in "
                f"[{SCALE_LR_FACTOR_MIN:g}, {SCALE_LR_FACTOR_MAX:g}])"
            )
        factor = _number(args, "factor", 1.0, low=SCALE_LR_FACTOR_MIN, high=SCALE_LR_FACTOR_MAX)
        return ScaleLRCommand(id=key, factor=factor)
    return SetProbeCommand(
        id=key,
        every=_count(args, "every"),
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


def _shown(value: object) -> str:
    """A value as an error message quotes it: its repr, cut at 80 characters (a hostile
    server's megabyte-long argument does not become a megabyte-long ack)."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**18 else "a huge integer"
    return text if len(text) <= 80 else text[:77] + "..."


def _member(kind: type[_Choice], name: str, value: Any, alternative: str = "") -> _Choice:
    """The member of an argument's closed set (the intervention's own enum)."""
    try:
        return kind(value)
    except (ValueError, TypeError):
        valid = [member.value for member in kind]
        raise CommandError(
            f"args.{name}: {_shown(value)} is not one of {valid}{alternative}"
        ) from None


def _selector(value: Any) -> Selector:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, Sequence) and value and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise CommandError(
        "args.targets: expected 'attention', 'all_2d' or a non-empty list of globs, "
        f"got {_shown(value)}"
    )


def _bool(args: Mapping[str, Any], name: str, default: bool) -> bool:
    value = args.get(name, default)
    if not isinstance(value, bool):
        raise CommandError(f"args.{name}: expected true or false, got {_shown(value)}")
    return value


def _number(
    args: Mapping[str, Any],
    name: str,
    default: float,
    *,
    low: float | None = None,
    high: float = math.inf,
) -> float:
    """A finite number in [low, high] (in (0, high] when ``low`` is None)."""
    value = args.get(name, default)
    number = (
        float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool)
        else math.nan
    )
    above = number >= low if low is not None else number > 0
    if not (math.isfinite(number) and above and number <= high):
        span = f"[{low:g}, {high:g}]" if low is not None else f"(0, {high:g}]"
        raise CommandError(f"args.{name}: expected a finite number in {span}, got {_shown(value)}")
    return number


def _count(args: Mapping[str, Any], name: str) -> int | None:
    """An integer in [1, MAX_COMMAND_INT], or None."""
    value = args.get(name)
    if value is not None and (
        not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_COMMAND_INT
    ):
        raise CommandError(
            f"args.{name}: expected an integer in [1, {MAX_COMMAND_INT}] or null, "
            f"got {_shown(value)}"
        )
    return value


def _names(args: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = args.get(name, [])
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise CommandError(f"args.{name}: expected a list of quantity names, got {_shown(value)}")
    if not all(isinstance(v, str) for v in value):
        raise CommandError(f"args.{name}: every entry must be a quantity name, got {_shown(value)}")
    return tuple(value)


def command_id(raw: object) -> str:
    """The id a command is remembered and acknowledged by: its ``id`` when that is a string
    (at most 200 characters) or an integer of at most 18 digits, else ``''`` (it cannot be
    acknowledged)."""
    value = raw.get("id") if isinstance(raw, Mapping) else None
    if isinstance(value, str) and len(value) <= 200:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 10**18:
        return str(value)
    return ""


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
        if not isinstance(raw, Mapping):
            return {"state": "failed", "step": step, "error": "a command must be an object"}
        key = command_id(raw)
        if key in self._acks:
            return self._acks[key]
        started = time.perf_counter()
        try:
            command = parse_command(raw)
            result = self._run(command)
            result.setdefault("seconds", time.perf_counter() - started)
            ack: dict[str, Any] = {"state": "applied", "step": step, "result": result}
        except (ConfigError, RewriteError) as exc:  # invalid, or rolled back: say why
            ack = {"state": "failed", "step": step, "error": str(exc)}
        except Exception as exc:  # a numerical failure must not take training down
            ack = {"state": "failed", "step": step, "error": f"{type(exc).__name__}: {exc}"}
        if key:
            self._acks[key] = ack
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
        # Taken for every rewrite: it rolls back a result that is not finite (RewriteError,
        # and self._snapshot keeps the previous one for undo), and is the next undo if kept.
        snapshot = Snapshot.take(chosen)
        if isinstance(command, MSignCommand):
            outcome = apply_msign(chosen, engine=command.engine, snapshot=snapshot)
        else:
            outcome = apply_pss(
                chosen,
                variant=command.variant,
                k=command.k,
                scale=command.scale,
                temperature=command.temperature,
                snapshot=snapshot,
            )
        if command.snapshot:
            self._snapshot = snapshot
        return outcome.to_dict()

    def _select(self, selector: Selector) -> list[WeightTarget]:
        # select() raises a SelectorError (a ConfigError) naming the selector that matched nothing.
        return select(self.targets, selector if isinstance(selector, str) else list(selector))
