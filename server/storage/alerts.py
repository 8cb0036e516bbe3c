"""Alert reads: the ``alerts`` table (one row per firing episode of a rule, closed when it
resolves), and the one definition of "alerts firing" (``firing_counts``: rows in state
``firing``), which ``/metrics`` and the dashboard's runs list both use."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from rankguard.server.models import Alert, AlertState, Run


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
