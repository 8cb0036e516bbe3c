"""The server's closed vocabularies, one definition each: severities, webhook formats, command
kinds and their MSign arguments, the states of runs, commands, alerts and deliveries, and the
kinds of event the server writes.

Standard library only: the pure alert engine (``server/alerts``) imports it as the ORM tables
(``models``), the API schemas (``schemas``) and the notifications do. The probe keeps its own
copies (it must not import the server); docs/contract.md is the table both follow.
"""

from __future__ import annotations

from enum import Enum


def values(enum: type[Enum]) -> tuple[str, ...]:
    """The wire values of a vocabulary, in definition order (for messages and checks)."""
    return tuple(str(member.value) for member in enum)


# Enums that the API schemas use carry comments, not docstrings: a docstring would become
# their description in /openapi.json.


# How bad an alert is; ordered info < warning < critical (``order``).
class AlertSeverity(str, Enum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"

    @property
    def order(self) -> int:
        return _SEVERITY_ORDER[self.value]

    @classmethod
    def order_of(cls, value: str) -> int:
        """The order of a stored severity string; one this server does not know ranks lowest."""
        return _SEVERITY_ORDER.get(value, 0)


_SEVERITY_ORDER = {severity.value: i for i, severity in enumerate(AlertSeverity)}


# The payload format of an outbound webhook (``server/notify/payloads.py``).
class WebhookFormat(str, Enum):
    JSON = "json"
    SLACK = "slack"
    ALERTMANAGER = "alertmanager"


# What a command orders the probe to do (docs/contract.md, Commands).
class CommandKind(str, Enum):
    MSIGN = "msign"
    PSS = "pss"
    UNDO = "undo"
    SET_PROBE = "set_probe"
    SCALE_LR = "scale_lr"
    ROLLBACK = "rollback"
    QK_CLIP = "qk_clip"


class MSignEngine(str, Enum):
    """How the probe computes MSign's polar factor: exact SVD, or Newton-Schulz iterations."""

    SVD = "svd"
    NEWTON_SCHULZ = "newton_schulz"


class PSSVariant(str, Enum):
    """The smoothing function PSS applies to the singular values."""

    CLIP = "clip"
    CONV = "conv"
    SOFTMAX = "softmax"


class TargetGroup(str, Enum):
    """Named sets of weights an MSign command may target (besides lists of globs)."""

    ATTENTION = "attention"
    ALL_2D = "all_2d"


class RunStatus(str, Enum):
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"


class CommandState(str, Enum):
    QUEUED = "queued"
    DELIVERED = "delivered"
    APPLIED = "applied"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


class AlertState(str, Enum):
    FIRING = "firing"
    RESOLVED = "resolved"


# Where one webhook delivery stands in the outbox (``webhook_deliveries.outcome``).
class DeliveryOutcome(str, Enum):
    PENDING = "pending"
    SENDING = "sending"
    DELIVERED = "delivered"
    FAILED = "failed"


class EventKind(str, Enum):
    """The kinds of event the server itself writes; clients may post events of other kinds.
    A command's state changes are ``command_<state>`` (:meth:`for_command`)."""

    ALERT = "alert"
    COMMAND_QUEUED = "command_queued"
    COMMAND_DELIVERED = "command_delivered"
    COMMAND_APPLIED = "command_applied"
    COMMAND_FAILED = "command_failed"
    COMMAND_EXPIRED = "command_expired"
    COMMAND_CANCELLED = "command_cancelled"

    @classmethod
    def for_command(cls, state: CommandState) -> EventKind:
        return cls(f"command_{state.value}")


class ProbeEventKind(str, Enum):
    """The kinds of event the probe's recovery posts (``probe/recovery``; docs/contract.md):
    ``rollback`` (payload: restored_step, skipped [start, end], lr_factor, loss_before,
    loss_after, ...), ``rollback_exhausted``, ``rollback_unavailable``, ``skip_step``,
    ``lr_backoff`` and ``qk_clip`` (the in-process first response's actions)."""

    ROLLBACK = "rollback"
    ROLLBACK_EXHAUSTED = "rollback_exhausted"
    ROLLBACK_UNAVAILABLE = "rollback_unavailable"
    SKIP_STEP = "skip_step"
    LR_BACKOFF = "lr_backoff"
    QK_CLIP = "qk_clip"


__all__ = [
    "AlertSeverity",
    "AlertState",
    "CommandKind",
    "CommandState",
    "DeliveryOutcome",
    "EventKind",
    "MSignEngine",
    "PSSVariant",
    "ProbeEventKind",
    "RunStatus",
    "TargetGroup",
    "WebhookFormat",
    "values",
]
