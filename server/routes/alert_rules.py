"""/alert-rules: the rules of a project (templates copied into each new run) and of its
runs (each with its engine state). Reads need the read scope, edits the operate scope."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Response, status
from sqlalchemy.orm import Session

from rankguard.server.alerts import Rule, RuleError
from rankguard.server.alerts.rules import ACTION_FIELDS
from rankguard.server.auth import Principal
from rankguard.server.commands import InvalidCommand, validate_command
from rankguard.server.deps import (
    DbDep,
    OperatePrincipal,
    ReadPrincipal,
    RowId,
    SettingsDep,
    run_or_404,
    scoped_project,
    unprocessable,
)
from rankguard.server.middleware import WireRoute
from rankguard.server.models import AlertRule
from rankguard.server.schemas import (
    AlertRuleCreate,
    AlertRulePublic,
    AlertRulesPublic,
    AlertRuleUpdate,
    ProjectName,
)
from rankguard.server.storage import alerts as store
from rankguard.server.storage.runs import project_by_id, project_names

router = APIRouter(route_class=WireRoute, prefix="/alert-rules", tags=["alert rules"])

RULE_NOT_FOUND = "Alert rule not found"


def _public(row: AlertRule, project: str) -> AlertRulePublic:
    return AlertRulePublic(
        id=row.id,
        project=project,
        run_id=row.run_id,
        name=row.name,
        quantity=row.quantity,
        rule=row.rule,
        firing=store.rule_firing(row),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _rule_or_422(data: dict[str, Any]) -> Rule:
    """The rule, valid for the engine, whose actions order commands within the contract's
    bounds (the queue would refuse them at every firing otherwise)."""
    try:
        rule = Rule.from_dict(data)
    except (RuleError, TypeError) as exc:
        raise unprocessable("rule", str(exc), data) from exc
    for action in (rule.msign, rule.lr_backoff):
        order = action.command()
        try:
            validate_command(order["kind"], order["args"])
        except InvalidCommand as exc:
            raise unprocessable(f"rule.{action.field_name}", str(exc), order["args"]) from exc
    return rule


def _row_or_404(session: Session, principal: Principal, rule_id: int) -> AlertRule:
    row = store.get_rule(session=session, rule_id=rule_id, project_id=principal.project_id)
    if row is None:
        raise HTTPException(404, detail=RULE_NOT_FOUND)
    return row


@router.get("", response_model=AlertRulesPublic)
def read_alert_rules(
    db: DbDep,
    settings: SettingsDep,
    principal: ReadPrincipal,
    run_id: Annotated[str | None, Query(description="this run's rules")] = None,
    project: ProjectName | None = None,
) -> AlertRulesPublic:
    """A run's rules (``run_id``), or the project's rules (copied into each new run; when a
    project has none, new runs get the default pack)."""
    with db.read() as session:
        if run_id is not None:
            run = run_or_404(session, principal, run_id)
            found = project_by_id(session=session, project_id=run.project_id)
        else:
            found = scoped_project(session, principal, project, settings.default_project)
        assert found is not None
        rows = store.list_rules(
            session=session, project_id=found.id, run_id=run_id, project_level=run_id is None
        )
        data = [_public(r, found.name) for r in rows]
    return AlertRulesPublic(data=data, count=len(data))


@router.post("", response_model=AlertRulePublic, status_code=status.HTTP_201_CREATED)
def create_alert_rule(
    body: AlertRuleCreate, db: DbDep, settings: SettingsDep, principal: OperatePrincipal
) -> AlertRulePublic:
    """Add a rule to a run (``run_id``) or to the project (applies to runs created later)."""
    rule = _rule_or_422(body.rule)
    with db.write() as session:
        if body.run_id is not None:
            run = run_or_404(session, principal, body.run_id)
            project = project_by_id(session=session, project_id=run.project_id)
        else:
            project = scoped_project(session, principal, body.project, settings.default_project)
        assert project is not None
        row = store.create_rule(
            session=session, project_id=project.id, run_id=body.run_id, rule=rule
        )
        return _public(row, project.name)


@router.get("/{rule_id}", response_model=AlertRulePublic)
def read_alert_rule(rule_id: RowId, db: DbDep, principal: ReadPrincipal) -> AlertRulePublic:
    """Get a rule by ID."""
    with db.read() as session:
        row = _row_or_404(session, principal, rule_id)
        names = project_names(session=session, ids={row.project_id})
        return _public(row, names[row.project_id])


def _save(session: Session, row: AlertRule, rule: Rule) -> AlertRulePublic:
    store.update_rule(session=session, row=row, rule=rule)
    names = project_names(session=session, ids={row.project_id})
    return _public(row, names[row.project_id])


@router.put("/{rule_id}", response_model=AlertRulePublic)
def replace_alert_rule(
    rule_id: RowId, body: AlertRuleUpdate, db: DbDep, principal: OperatePrincipal
) -> AlertRulePublic:
    """Replace a rule; a changed condition restarts its state (episodes keep counting)."""
    rule = _rule_or_422(body.rule)
    with db.write() as session:
        return _save(session, _row_or_404(session, principal, rule_id), rule)


@router.patch("/{rule_id}", response_model=AlertRulePublic)
def update_alert_rule(
    rule_id: RowId, body: AlertRuleUpdate, db: DbDep, principal: OperatePrincipal
) -> AlertRulePublic:
    """Change some fields of a rule (e.g. ``{"rule": {"msign": {"enabled": true}}}``; the
    actions ``msign``, ``lr_backoff``, ``rollback`` and ``qk_clip`` are merged field by
    field)."""
    with db.write() as session:
        row = _row_or_404(session, principal, rule_id)
        changes = dict(body.rule)
        for action in ACTION_FIELDS:
            if isinstance(changes.get(action), dict):
                changes[action] = {**(row.rule.get(action) or {}), **changes[action]}
        rule = _rule_or_422({**row.rule, **changes})
        return _save(session, row, rule)


@router.delete("/{rule_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_alert_rule(rule_id: RowId, db: DbDep, principal: OperatePrincipal) -> Response:
    """Delete a rule (its past alerts stay, with ``rule_id`` null)."""
    with db.write() as session:
        session.delete(_row_or_404(session, principal, rule_id))
    return Response(status_code=status.HTTP_204_NO_CONTENT)
