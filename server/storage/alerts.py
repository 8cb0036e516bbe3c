"""Rows of ``alert_rules`` and ``alerts``: the rules a new run gets, rule CRUD, alert reads,
and the one definition of "alerts firing" (``firing_counts``: rows in state ``firing``), which
``/metrics`` and the dashboard's runs list both use.

Rules are rows of ``alert_rules``: ``run_id`` NULL is a project rule (a template), otherwise
the rule of one run with its engine state. ``storage.runs.register_run`` calls
``install_run_rules`` when it creates a run, in the same transaction: the project's rules
when it has any, else the default pack (``pack.default_rules``), specialised with the run's
parameter names (``pack.specialise``), with the actions of the profile the run's probe asked
for turned on (``alerts.profiles``: ``auto_recover`` in its configuration). Alerts are one
row per firing episode of a rule, closed when it resolves.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, cast

from sqlalchemy import Table, func, insert, select
from sqlalchemy.orm import Session

from rankguard.server.alerts import pack
from rankguard.server.alerts.profiles import apply_profile, profile_of
from rankguard.server.alerts.rules import ACTION_FIELDS, Rule, RuleError
from rankguard.server.alerts.state import is_firing, new_state
from rankguard.server.db import utcnow
from rankguard.server.models import Alert, AlertRule, Run
from rankguard.server.vocab import AlertState

logger = logging.getLogger("rankguard.server.alerts")

# The Core table, for the statements that bypass the ORM (installation at run creation, the
# one-statement state UPDATE on ingest).
RULES_TABLE = cast(Table, AlertRule.__table__)
# Fields whose edit does not change what the condition computes: the state is kept.
_STATE_NEUTRAL = frozenset(
    {"enabled", "notify", *ACTION_FIELDS, "description", "runbook", "severity", "name"}
)


# --- rules: installation at run creation ---------------------------------------------------


def _rules_for_run(
    project_rules: Sequence[Mapping[str, Any]], parameter_names: Sequence[str]
) -> list[Rule]:
    """The rules a new run gets: the project's (rule dicts) if any, else the default pack;
    either way specialised with the run's parameter names."""
    rules = [Rule.from_dict(r) for r in project_rules] if project_rules else pack.default_rules()
    return pack.specialise(rules, parameter_names)


def install_run_rules(*, session: Session, run: Run) -> None:
    """Give a run that was just created its rules (one INSERT, in the caller's transaction)."""
    table = RULES_TABLE
    project_rules = [
        row[0]
        for row in session.execute(
            select(table.c.rule)
            .where(table.c.project_id == run.project_id, table.c.run_id.is_(None))
            .order_by(table.c.id)
        )
    ]
    names = [str(p.get("name", "")) for p in (run.parameters or []) if isinstance(p, Mapping)]
    try:
        rules = apply_profile(_rules_for_run(project_rules, names), profile_of(run.config))
    except RuleError:  # a stored project rule no longer validates: fall back to the pack
        logger.exception(
            "project %s has an invalid rule; run %s gets the defaults", run.project_id, run.id
        )
        rules = apply_profile(_rules_for_run([], names), profile_of(run.config))
    now = utcnow()
    rows = [
        {
            "project_id": run.project_id,
            "run_id": run.id,
            "name": r.name,
            "quantity": r.quantity,
            "rule": r.to_dict(),
            "state": None,
            "created_at": now,
            "updated_at": now,
        }
        for r in rules
    ]
    if rows:
        session.execute(insert(table), rows)


# --- rules: CRUD ---------------------------------------------------------------------------


def list_rules(
    *, session: Session, project_id: int | None, run_id: str | None, project_level: bool
) -> list[AlertRule]:
    query = select(AlertRule)
    if project_id is not None:
        query = query.where(AlertRule.project_id == project_id)
    if run_id is not None:
        query = query.where(AlertRule.run_id == run_id)
    elif project_level:
        query = query.where(AlertRule.run_id.is_(None))
    return list(session.scalars(query.order_by(AlertRule.id)))


def get_rule(*, session: Session, rule_id: int, project_id: int | None) -> AlertRule | None:
    row = session.get(AlertRule, rule_id)
    if row is None or (project_id is not None and row.project_id != project_id):
        return None
    return row


def create_rule(*, session: Session, project_id: int, run_id: str | None, rule: Rule) -> AlertRule:
    now = utcnow()
    row = AlertRule(
        project_id=project_id,
        run_id=run_id,
        name=rule.name,
        quantity=rule.quantity,
        rule=rule.to_dict(),
        state=None,
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    session.flush()
    return row


def update_rule(*, session: Session, row: AlertRule, rule: Rule) -> AlertRule:
    """Replace a rule. When its condition changed the engine state restarts (keeping the
    episode count and the MSign rate-limit history), and a firing alert is closed."""
    old = row.rule
    new = rule.to_dict()
    changed = {k for k in new if new.get(k) != old.get(k)}
    if changed - _STATE_NEUTRAL and row.state is not None:
        if is_firing(row.state):
            _close_alert_on_edit(session=session, row=row)
        fresh = new_state()
        fresh["alert"]["episode"] = row.state["alert"]["episode"]
        fresh["msign_steps"] = list(row.state.get("msign_steps", []))
        row.state = fresh
    row.rule = new
    row.name = rule.name
    row.quantity = rule.quantity
    row.updated_at = utcnow()
    return row


def _close_alert_on_edit(*, session: Session, row: AlertRule) -> None:
    alert = session.scalars(
        select(Alert).where(Alert.rule_id == row.id, Alert.state == AlertState.FIRING.value)
    ).first()
    if alert is not None:
        alert.state = AlertState.RESOLVED.value
        alert.resolved_at = utcnow()
        alert.resolved_message = "closed: the rule's condition was edited (its state restarted)"


def rule_firing(row: AlertRule) -> bool:
    return is_firing(row.state)


# --- alerts --------------------------------------------------------------------------------


def list_alerts(
    *,
    session: Session,
    run_id: str | None = None,
    project_id: int | None = None,
    state: AlertState | None = None,
    limit: int = 1000,
) -> list[Alert]:
    """Alerts of a run or of a project's runs, newest first."""
    query = select(Alert)
    if run_id is not None:
        query = query.where(Alert.run_id == run_id)
    if project_id is not None:
        query = query.join(Run, Run.id == Alert.run_id).where(Run.project_id == project_id)
    if state is not None:
        query = query.where(Alert.state == state.value)
    return list(session.scalars(query.order_by(Alert.created_at.desc(), Alert.id).limit(limit)))


def get_alert(*, session: Session, alert_id: str, project_id: int | None) -> Alert | None:
    """The alert, or None when it does not exist or its run is in another project."""
    alert = session.get(Alert, alert_id)
    if alert is None:
        return None
    if project_id is not None:
        run = session.get(Run, alert.run_id)
        if run is None or run.project_id != project_id:
            return None
    return alert


def firing_counts(*, session: Session, run_ids: Sequence[str]) -> dict[tuple[str, str], int]:
    """(run_id, severity) -> number of alerts firing now, for the given runs."""
    if not run_ids:
        return {}
    rows = session.execute(
        select(Alert.run_id, Alert.severity, func.count())
        .where(Alert.run_id.in_(list(run_ids)), Alert.state == AlertState.FIRING.value)
        .group_by(Alert.run_id, Alert.severity)
    )
    return {(r, s): int(n) for r, s, n in rows}


def fired_counts(*, session: Session) -> dict[str, int]:
    """severity -> number of alerts that ever fired (firing or resolved since), every run."""
    rows = session.execute(select(Alert.severity, func.count()).group_by(Alert.severity))
    return {s: int(n) for s, n in rows}
