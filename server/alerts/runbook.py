"""The text of an alert's suggested action: the one part of the alert path that knows the
HTTP API and the dashboard, kept out of the pure engine (which reports a rule's own runbook
as it is). The service completes it per run (:func:`suggested_action`)."""

from __future__ import annotations

from rankguard.server.alerts.rules import Rule

MSIGN_HOWTO = (
    "To order MSign (W <- ||W||_F/sqrt(r) * U V^T on the selected weights, which restores "
    "their stable rank): press 'MSign' on the run's dashboard page, or "
    'POST /api/v1/runs/{run_id}/commands {"kind": "msign", "args": {"targets": "all_2d", '
    '"engine": "svd"}} with an operate-scope token; the probe applies it at the next step '
    "boundary and acknowledges it."
)


def default_runbook(rule: Rule) -> str:
    """A generic runbook for rules that carry none of their own."""
    head = rule.description or f"{rule.quantity} tripped rule {rule.name!r}."
    return f"{head} Look at the named targets on the run's dashboard. {MSIGN_HOWTO}"


def suggested_action(rule: Rule, run_id: str) -> str:
    """What an alert of ``rule`` on run ``run_id`` suggests: the rule's runbook (or the
    default one) with ``{run_id}`` filled in."""
    return (rule.runbook or default_runbook(rule)).replace("{run_id}", run_id)


__all__ = ["MSIGN_HOWTO", "default_runbook", "suggested_action"]
