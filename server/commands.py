"""The commands an operator (or an alert rule, or an inbound alert) may order a probe to
apply: a discriminated union on ``kind``, one arguments model per kind, unknown arguments
refused and every number bounded to what the intervention can take (the probe checks them
again before it touches a weight). ``validate_command`` is the check every queue path
passes (``storage.commands.enqueue_command``); docs/contract.md has the table.

Adding a kind: its ``CommandKind`` entry in vocab.py, an arguments model and a ``_Command``
subclass here, and the member in ``CommandCreate``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, Strict, StringConstraints, TypeAdapter, ValidationError

from rankguard.server.schemas import QuantityName, WireModel
from rankguard.server.vocab import CommandKind, MSignEngine, PSSVariant, TargetGroup, values

# A glob over target names (fnmatch), or the list of them a command may name.
Glob = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=r"^[^\x00]+$")]
Targets = TargetGroup | Annotated[list[Glob], Field(min_length=1, max_length=256)]
# Every number of a command is bounded: a finite value in a range the interventions can take.
Finite = Annotated[float, Strict(), Field(allow_inf_nan=False)]
QuantityNames = Annotated[list[QuantityName], Field(max_length=64)]
TtlS = Annotated[float, Strict(), Field(gt=0, le=30 * 86400, allow_inf_nan=False)]


class CommandArgs(WireModel):
    """Base of a command's arguments: unknown fields are refused (the probe does so too)."""


class MSignArgs(CommandArgs):
    targets: Targets = TargetGroup.ATTENTION
    engine: MSignEngine | None = Field(default=None, description="null: the probe's default")
    snapshot: bool = Field(default=True, description="keep the weights for a later undo")


class PSSArgs(CommandArgs):
    targets: Targets = TargetGroup.ALL_2D
    variant: PSSVariant = PSSVariant.CLIP
    k: Annotated[int, Strict()] | None = Field(
        default=None, ge=1, le=1_000_000, description="clip: top singular values; null ⌊n/20⌋"
    )
    scale: Finite = Field(default=1.0, gt=0, le=10, description="factor on the result")
    temperature: Finite = Field(default=0.25, gt=0, le=100, description="softmax variant")
    snapshot: bool = True


class UndoArgs(CommandArgs):
    pass


class SetProbeArgs(CommandArgs):
    every: Annotated[int, Strict()] | None = Field(default=None, ge=1, le=1_000_000)
    enable: QuantityNames = Field(default_factory=list)
    disable: QuantityNames = Field(default_factory=list)


class ScaleLRArgs(CommandArgs):
    factor: Finite = Field(
        ge=1e-4, le=1e4, description="multiplies the learning rate (cumulative, capped)"
    )


class RollbackArgs(CommandArgs):
    before_step: Annotated[int, Strict()] | None = Field(
        default=None,
        ge=0,
        le=2**53,
        description="restore the newest known-good snapshot older than this step (the "
        "incident's first sign); null: the newest",
    )
    lr_factor: Finite | None = Field(
        default=None, gt=0, le=1, description="learning-rate backoff; null: the probe's (0.5)"
    )
    incident: Annotated[str, StringConstraints(max_length=200)] | None = Field(
        default=None, description="rollbacks of one incident are capped together"
    )


class QKClipArgs(CommandArgs):
    tau: Finite = Field(
        default=100.0, gt=0, le=1e6, description="the largest attention logit a head keeps"
    )


class _Command(WireModel):
    ttl_s: TtlS | None = Field(default=None, description="expire if not acked; server default")


class MSignCommand(_Command):
    """MSign: each target W becomes (‖W‖_F / ‖UVᵀ‖_F)·UVᵀ."""

    kind: Literal[CommandKind.MSIGN]
    args: MSignArgs = Field(default_factory=MSignArgs)


class PSSCommand(_Command):
    """PSS singular-spectrum smoothing of the targets."""

    kind: Literal[CommandKind.PSS]
    args: PSSArgs = Field(default_factory=PSSArgs)


class UndoCommand(_Command):
    """Restore the snapshot of the last weight rewrite."""

    kind: Literal[CommandKind.UNDO]
    args: UndoArgs = Field(default_factory=UndoArgs)


class SetProbeCommand(_Command):
    """Change the probe's cadence or its quantities."""

    kind: Literal[CommandKind.SET_PROBE]
    args: SetProbeArgs = Field(default_factory=SetProbeArgs)


class ScaleLRCommand(_Command):
    """Multiply the learning rate on top of the run's own schedule."""

    kind: Literal[CommandKind.SCALE_LR]
    args: ScaleLRArgs


class RollbackCommand(_Command):
    """Restore the newest known-good training state older than the trouble, skip the batches
    after it, back the learning rate off (the probe's recovery)."""

    kind: Literal[CommandKind.ROLLBACK]
    args: RollbackArgs = Field(default_factory=RollbackArgs)


class QKClipCommand(_Command):
    """Rescale W_q/W_k of every attention head whose max logit exceeded tau (QK-Clip)."""

    kind: Literal[CommandKind.QK_CLIP]
    args: QKClipArgs = Field(default_factory=QKClipArgs)


CommandCreate = Annotated[
    MSignCommand
    | PSSCommand
    | UndoCommand
    | SetProbeCommand
    | ScaleLRCommand
    | RollbackCommand
    | QKClipCommand,
    Field(discriminator="kind"),
]
_COMMAND = TypeAdapter(CommandCreate)


class InvalidCommand(ValueError):
    """A command's kind or arguments are outside the contract; ``errors`` are pydantic's."""

    def __init__(self, errors: list[Any]) -> None:
        first = errors[0] if errors else {"loc": (), "msg": "invalid"}
        where = ".".join(str(p) for p in first["loc"])
        super().__init__(f"{where}: {first['msg']}")
        self.errors = errors


def validate_command(kind: str, args: dict[str, Any]) -> dict[str, Any]:
    """The arguments of a command as stored: validated against its kind's model (the fields
    given, numbers as numbers), or ``InvalidCommand``. Every way a command is queued (an
    operator, an inbound alert, an alert rule) passes here."""
    if kind not in values(CommandKind):
        message = f"{kind!r} is not a command kind; valid: {', '.join(values(CommandKind))}"
        raise InvalidCommand([{"loc": ("kind",), "msg": message, "type": "enum", "input": kind}])
    try:
        command = _COMMAND.validate_python({"kind": kind, "args": args})
    except ValidationError as exc:
        # The union names the member first (("scale_lr", "args", "factor")): drop it.
        errors = [{**e, "loc": e["loc"][1:]} for e in exc.errors(include_url=False)]
        raise InvalidCommand(errors) from None
    dumped: dict[str, Any] = command.args.model_dump(mode="json", exclude_unset=True)
    return dumped


__all__ = [
    "CommandArgs",
    "CommandCreate",
    "InvalidCommand",
    "MSignArgs",
    "PSSArgs",
    "QKClipArgs",
    "RollbackArgs",
    "ScaleLRArgs",
    "SetProbeArgs",
    "UndoArgs",
    "validate_command",
]
