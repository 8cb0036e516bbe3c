"""Alerts: per run (/runs/{run_id}/alerts) and per project (/alerts), with the delivery log
of each alert's notifications."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from rankguard.server.deps import (
    DbDep,
    ReadPrincipal,
    SettingsDep,
    alert_or_404,
    run_or_404,
    scoped_project,
)
from rankguard.server.middleware import WireRoute
from rankguard.server.schemas import (
    AlertPublic,
    AlertsPublic,
    DeliveriesPublic,
    DeliveryPublic,
    ProjectName,
)
from rankguard.server.storage.alerts import list_alerts
from rankguard.server.storage.webhooks import alert_deliveries
from rankguard.server.vocab import AlertState

router = APIRouter(route_class=WireRoute, tags=["alerts"])

Limit = Annotated[int, Query(ge=1, le=10_000)]


@router.get("/runs/{run_id}/alerts", response_model=AlertsPublic)
def read_run_alerts(
    run_id: str,
    db: DbDep,
    principal: ReadPrincipal,
    state: AlertState | None = None,
    limit: Limit = 1000,
) -> AlertsPublic:
    """A run's alerts, newest first."""
    with db.read() as session:
        run_or_404(session, principal, run_id)
        rows = list_alerts(session=session, run_id=run_id, state=state, limit=limit)
        data = [AlertPublic.model_validate(a) for a in rows]
    return AlertsPublic(data=data, count=len(data))


@router.get("/alerts", response_model=AlertsPublic)
def read_project_alerts(
    db: DbDep,
    settings: SettingsDep,
    principal: ReadPrincipal,
    project: ProjectName | None = None,
    state: AlertState | None = None,
    limit: Limit = 1000,
) -> AlertsPublic:
    """The alerts of every run of a project, newest first."""
    with db.read() as session:
        found = scoped_project(session, principal, project, settings.default_project)
        rows = list_alerts(session=session, project_id=found.id, state=state, limit=limit)
        data = [AlertPublic.model_validate(a) for a in rows]
    return AlertsPublic(data=data, count=len(data))


@router.get("/alerts/{alert_id}", response_model=AlertPublic)
def read_alert(alert_id: str, db: DbDep, principal: ReadPrincipal) -> AlertPublic:
    """Get an alert by ID."""
    with db.read() as session:
        return AlertPublic.model_validate(alert_or_404(session, principal, alert_id))


@router.get("/alerts/{alert_id}/deliveries", response_model=DeliveriesPublic)
def read_alert_deliveries(alert_id: str, db: DbDep, principal: ReadPrincipal) -> DeliveriesPublic:
    """The webhook deliveries of an alert's notifications, with every attempt."""
    with db.read() as session:
        alert_or_404(session, principal, alert_id)
        rows = alert_deliveries(session=session, alert_id=alert_id)
        data = [DeliveryPublic.model_validate(d) for d in rows]
    return DeliveriesPublic(data=data, count=len(data))
