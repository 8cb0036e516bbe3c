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
- ``undo``: ``{}`` — restores the snapshot taken by the last msign/pss/qk_clip that kept one
- ``set_probe``: ``{"every": int in [1, 1e6] | null, "enable": [quantity], "disable": [quantity]}``
- ``scale_lr``: ``{"factor": finite number in [1e-4, 1e4]}`` — a backoff (< 1) multiplies
  every parameter group's learning rate by ``factor`` on top of the user's schedule and caps it
  there while the schedule rises, then recovers after a healthy period; a lift (> 1) undoes
  it, never above the schedule (:class:`~rankguard.probe.interventions.LearningRateScale`;
  needs the probe's optimizer)
- ``rollback``: ``{"before_step": int >= 0 | null, "lr_factor": number in (0, 1] | null,
  "incident": str | null}`` — restores the newest known-good snapshot older than
  ``before_step`` (the incident's first sign), skips the batches after it, backs off the LR;
  capped per incident (:mod:`rankguard.probe.recovery`; needs the probe's recovery on)
- ``qk_clip``: ``{"tau": number in (0, 1e6]}`` — rescales W_q/W_k of every attention head
  whose max logit at the latest sample exceeded ``tau``
  (:mod:`~rankguard.probe.interventions.qk_clip`)

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

import torch

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
from .interventions.qk_clip import QKHeads, apply_qk_clip
from .targets import WeightTarget, select

__all__ = [
    "MAX_COMMAND_INT",
    "PSS_SCALE_MAX",
    "PSS_TEMPERATURE_MAX",
    "QK_CLIP_TAU_MAX",
    "SCALE_LR_FACTOR_MAX",
    "SCALE_LR_FACTOR_MIN",
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
QK_CLIP_TAU_MAX = 1e6
"""``qk_clip`` ``tau`` is a finite number in (0, QK_CLIP_TAU_MAX]."""


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
    if kind == CommandKind.ROLLBACK:
        return _rollback(key, args)
    if kind == CommandKind.QK_CLIP:
        tau = _number(args, "tau", 100.0, high=QK_CLIP_TAU_MAX)
        return QKClipCommand(id=key, tau=tau, logit_max=_logits(args))
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
    CommandKind.ROLLBACK: {"before_step", "lr_factor", "incident", "reason", "loss"},
    CommandKind.QK_CLIP: {"tau", "logit_max"},
}


def _rollback(key: str, args: Mapping[str, Any]) -> RollbackCommand:
    before = args.get("before_step")
    if before is not None and (
        not isinstance(before, int) or isinstance(before, bool) or not 0 <= before < 10**15
    ):
        raise CommandError(
            f"args.before_step: expected an integer >= 0 or null, got {_shown(before)}"
        )
    factor = None
    if args.get("lr_factor") is not None:
        factor = _number(args, "lr_factor", 0.5, high=1.0)
    for name in ("incident", "reason"):
        value = args.get(name)
        if value is not None and (not isinstance(value, str) or len(value) > 200):
            raise CommandError(
                f"args.{name}: expected a string (<= 200 characters), got {_shown(value)}"
            )
    loss = args.get("loss")
    if loss is not None and (isinstance(loss, bool) or not isinstance(loss, int | float)):
        raise CommandError(f"args.loss: expected a number or null, got {_shown(loss)}")
    return RollbackCommand(
        id=key,
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
    if (
        not isinstance(value, Mapping)
        or len(value) > 1024
        or not all(
            isinstance(site, str)
            and isinstance(heads, Sequence)
            and not isinstance(heads, str)
            and len(heads) <= 4096
            and all(isinstance(h, int | float) and not isinstance(h, bool) for h in heads)
            for site, heads in value.items()
        )
    ):
        raise CommandError(
            f"args.logit_max: expected {{site: [per-head max logit, ...]}}, got {_shown(value)}"
        )
    return {site: tuple(float(h) for h in heads) for site, heads in value.items()}


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
        if not isinstance(raw, Mapping):
            return {"state": "failed", "step": step, "error": "a command must be an object"}
        key = command_id(raw)
        if key in self._acks:
            return self._acks[key]
        started = time.perf_counter()
        try:
            command = parse_command(raw)
            result = self._run(command, step)
            result.setdefault("seconds", time.perf_counter() - started)
            ack: dict[str, Any] = {"state": "applied", "step": step, "result": result}
        except (ConfigError, RewriteError) as exc:  # invalid, or rolled back: say why
            ack = {"state": "failed", "step": step, "error": str(exc)}
        except Exception as exc:  # a numerical failure must not take training down
            ack = {"state": "failed", "step": step, "error": f"{type(exc).__name__}: {exc}"}
        if key:
            self._acks[key] = ack
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
        # Like every rewrite, undoable: a tau far under the logits shrinks attention to
        # nothing, and ``undo`` must give it back bit-identically.
        snapshot = Snapshot.take(_qk_parameters(self.qk_heads))
        result = apply_qk_clip(self.qk_heads, logits, command.tau)
        self._snapshot = snapshot
        return result.to_dict()

    def _select(self, selector: Selector) -> list[WeightTarget]:
        # select() raises a SelectorError (a ConfigError) naming the selector that matched nothing.
        return select(self.targets, selector if isinstance(selector, str) else list(selector))


def _qk_parameters(heads: Sequence[QKHeads]) -> list[WeightTarget]:
    """The query/key weights and biases QK-Clip may scale, each once (a fused projection
    holds both), as whole-parameter targets for a snapshot."""
    seen: dict[int, WeightTarget] = {}
    for h in heads:
        for name, param in (
            ("q_weight", h.q_weight),
            ("k_weight", h.k_weight),
            ("q_bias", h.q_bias),
            ("k_bias", h.k_bias),
        ):
            if param is not None and id(param) not in seen:
                seen[id(param)] = WeightTarget(
                    f"{h.site}.{name}", h.site, param, None, False, frozenset()
                )
    return list(seen.values())
