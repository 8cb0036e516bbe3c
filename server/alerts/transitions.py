"""What the engine reports: a ``Transition`` (an alert firing, resolving, or ordering its
command again) with the targets that moved (``TargetHit``), and the texts of its message.

Transitions travel as plain dicts (``to_dict``: the ``alert`` event's payload) with
non-finite values as the contract's strings (``server/wire.py``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from rankguard.server.alerts.rules import Aggregation, Rule
from rankguard.server.vocab import AlertSeverity
from rankguard.server.wire import decode_float, encode_float


class TransitionKind(str, Enum):
    FIRING = "firing"
    RESOLVED = "resolved"
    # A firing alert orders its command again (``repeat_every``); no notification.
    REPEAT = "repeat"


@dataclass(frozen=True)
class TargetHit:
    """One target in an alert: its value at the step and when it itself started to trip."""

    target: str
    value: float
    since: int | None
    bound: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "value": encode_float(self.value),
            "since": self.since,
            "bound": encode_float(self.bound),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TargetHit:
        bound = data.get("bound")
        return cls(
            target=str(data["target"]),
            value=decode_float(data["value"]),
            since=data.get("since"),
            bound=None if bound is None else decode_float(bound),
        )


@dataclass(frozen=True)
class Transition:
    """An alert changing state: ``firing`` or ``resolved`` (or a ``repeat`` order).

    ``episode`` counts firings of this rule in this run (1, 2, ...): (rule, run, episode) keys an
    alert. ``first_step`` is when the trouble began (the earliest step at which a reported target
    started to trip), ``step`` when the rule decided. ``targets`` are ordered by how early they
    moved. ``command`` is the command this firing orders (MSign or a learning-rate backoff;
    ``None`` when the rule does not act, or ``command_suppressed`` when its rate limit held it
    back). ``suggested_action`` is the rule's own runbook, empty when it has none: the caller
    completes it (``alerts.runbook.suggested_action``: the default text, the run's id).
    """

    kind: TransitionKind
    rule: str
    quantity: str
    severity: AlertSeverity
    episode: int
    step: int
    first_step: int
    targets: tuple[TargetHit, ...]
    value: float | None
    bound: float | None
    message: str
    suggested_action: str
    notify: bool = True
    command: dict[str, Any] | None = None
    command_suppressed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "rule": self.rule,
            "quantity": self.quantity,
            "severity": self.severity.value,
            "episode": self.episode,
            "step": self.step,
            "first_step": self.first_step,
            "targets": [t.to_dict() for t in self.targets],
            "value": encode_float(self.value),
            "bound": encode_float(self.bound),
            "message": self.message,
            "suggested_action": self.suggested_action,
            "notify": self.notify,
            "command": copy.deepcopy(self.command),
            "command_suppressed": self.command_suppressed,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Transition:
        value, bound = data.get("value"), data.get("bound")
        return cls(
            kind=TransitionKind(data["kind"]),
            rule=str(data["rule"]),
            quantity=str(data["quantity"]),
            severity=AlertSeverity(data["severity"]),
            episode=int(data["episode"]),
            step=int(data["step"]),
            first_step=int(data["first_step"]),
            targets=tuple(TargetHit.from_dict(t) for t in data.get("targets", ())),
            value=None if value is None else decode_float(value),
            bound=None if bound is None else decode_float(bound),
            message=str(data["message"]),
            suggested_action=str(data["suggested_action"]),
            notify=bool(data.get("notify", True)),
            command=copy.deepcopy(data.get("command")),
            command_suppressed=bool(data.get("command_suppressed", False)),
        )


# -- messages ------------------------------------------------------------------------------
# Built only on a transition; numbers as {:.4g}, like the checks' own texts.

_SHOWN = 5  # targets named in a message


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _since(hit: TargetHit, template: str) -> str:
    """``template`` filled with when the target started to trip; empty if it has not."""
    return "" if hit.since is None else template.format(hit.since)


def _scope(rule: Rule) -> str:
    if rule.aggregation is Aggregation.ANY:
        scope = "any target"
    elif rule.aggregation is Aggregation.ALL:
        scope = "all targets"
    elif rule.aggregation is Aggregation.AT_LEAST_K:
        scope = f"at least {rule.k} targets"
    else:
        scope = f"{rule.aggregation.value} over targets"
    times = f" for {rule.consecutive} consecutive samples" if rule.consecutive > 1 else ""
    return f"{scope}{times}"


def aggregate_firing(
    rule: Rule, step: int, members: int, verdict: str, hits: Sequence[TargetHit]
) -> str:
    """A value aggregation fired: its verdict, then the layers that moved first."""
    moved = ", ".join(
        f"{h.target} = {_fmt(h.value)}" + _since(h, " (since step {})") for h in hits[:_SHOWN]
    )
    what = f"{rule.aggregation.value}({rule.quantity}) over {members} target(s) = {verdict}"
    return _firing(rule, step, f"{what}; layers that moved first: {moved}")


def targets_firing(
    rule: Rule,
    step: int,
    members: int,
    hits: Sequence[TargetHit],
    verdict: Callable[[str], str],
) -> str:
    """A boolean aggregation fired: the verdict on each of the first reported targets."""
    parts = [
        f"{h.target}: {verdict(h.target)}" + _since(h, " since step {}") for h in hits[:_SHOWN]
    ]
    more = f" and {len(hits) - _SHOWN} more" if len(hits) > _SHOWN else ""
    text = (
        f"{rule.quantity} on {len(hits)} of {members} target(s) ({_scope(rule)}): "
        + "; ".join(parts)
        + more
    )
    return _firing(rule, step, text)


def _firing(rule: Rule, step: int, text: str) -> str:
    return f"[{rule.severity.value}] rule {rule.name!r}: {text} (step {step})"


def repeat_message(rule: Rule, step: int, command_kind: str) -> str:
    return f"[repeat] rule {rule.name!r} still firing at step {step}: {command_kind} ordered again"


def resolved_message(
    rule: Rule,
    step: int,
    value: float | None,
    hits: Sequence[TargetHit],
    fired_step: int | None,
    first_step: int | None,
) -> str:
    shown = ", ".join(f"{h.target} = {_fmt(h.value)}" for h in hits[:_SHOWN])
    value_text = f" {rule.aggregation.value} = {_fmt(value)};" if value is not None else ""
    return (
        f"[resolved] rule {rule.name!r}: {rule.quantity} back within bounds at step {step};"
        f"{value_text} {shown or 'targets not reported at this step'}"
        f" (fired at step {fired_step}, first step {first_step})"
    )


__all__ = [
    "TargetHit",
    "Transition",
    "TransitionKind",
    "aggregate_firing",
    "repeat_message",
    "resolved_message",
    "targets_firing",
]
