"""Rule profiles: one switch that turns on the actions of a run's rules together.

``auto-recover`` (``Probe(..., auto_recover=True)``: the run's registration carries it, and
``storage.alerts.install_run_rules`` applies this profile to the rules the run gets) splits
the work between the training process and the server by how fast each remedy must act:

- in the process, at the step (the probe's half, ``RecoveryConfig.auto_recover``):
  skip-step, the learning-rate backoff on the update ratio, QK-Clip at tau = 100, and
  rollback on a non-finite loss, a loss spike or an update-ratio spike;
- on the server, from the rules (this half): MSign on every rule of the pack that carries an
  MSign action (the spectral collapses, the attention-logit divergence, the representation
  collapse), and ``rollback`` on the non-finite rules and on every rule over the loss (the
  peers' loss-spike detectors included): a backstop for what the probe's checks do not see,
  which the probe acknowledges without acting when it already rolled that incident back.

The absolute update-ratio rule's own learning-rate backoff stays off in this profile: the
probe backs off at the step the ratio is measured, and a second halving from the rule (1-6
steps later) would lower the rate twice for one excursion. The rule on the ratio's rise
against the run's own level orders the backoff (the probe has no such check): on SGD and Lion
a hot window stays under the absolute bound.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rankguard.server.alerts.pack import (
    LOSS_NON_FINITE,
    NON_FINITE_VALUES,
    REMEDIABLE,
    UPDATE_RATIO_HIGH,
    UPDATE_RATIO_RISE,
)
from rankguard.server.alerts.rules import Condition, Rule

AUTO_RECOVER = "auto-recover"
PROFILES = (AUTO_RECOVER,)

_ROLLBACK_RULES = frozenset({LOSS_NON_FINITE, NON_FINITE_VALUES})


def profile_of(config: Mapping[str, Any] | None) -> str | None:
    """The profile a run's registration asks for (its probe configuration), if any."""
    if isinstance(config, Mapping) and config.get("auto_recover") is True:
        return AUTO_RECOVER
    return None


def _rollback_applies(rule: Rule) -> bool:
    if rule.name in _ROLLBACK_RULES:
        return True
    return rule.quantity == "loss" and rule.condition is not Condition.BELOW


def auto_recover(rules: Sequence[Rule]) -> list[Rule]:
    """The rules with the auto-recover profile's actions on (at most one per rule)."""
    out = []
    for rule in rules:
        if rule.name == UPDATE_RATIO_HIGH:
            rule = rule.replace(lr_backoff={**rule.lr_backoff.to_dict(), "enabled": False})
        elif rule.name == UPDATE_RATIO_RISE:
            # a rise against the run's own level is a learning rate too high for this run:
            # its remedy is the backoff (the probe's in-process one judges the absolute
            # ratio only); MSign here rewrote healthy weights on a false alert
            rule = rule.replace(lr_backoff={**rule.lr_backoff.to_dict(), "enabled": True})
        elif rule.name in REMEDIABLE and not rule.action:
            # the pack's remediable rules carry their MSign policy (targets, repeats)
            rule = rule.replace(msign={**rule.msign.to_dict(), "enabled": True})
        elif _rollback_applies(rule) and not rule.action:
            rule = rule.replace(rollback={**rule.rollback.to_dict(), "enabled": True})
        out.append(rule)
    return out


def apply_profile(rules: Sequence[Rule], profile: str | None) -> list[Rule]:
    if profile is None:
        return list(rules)
    if profile == AUTO_RECOVER:
        return auto_recover(rules)
    raise ValueError(f"profile={profile!r} is not valid; use one of {PROFILES}")


__all__ = ["AUTO_RECOVER", "PROFILES", "apply_profile", "auto_recover", "profile_of"]
