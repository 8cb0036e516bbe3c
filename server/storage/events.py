"""Events: the run's timeline (alerts, commands queued and acknowledged, operators' notes),
written by the other storage functions and by ``POST /runs/{id}/events``."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from rankguard.server.models import Event


def create_event(
    *, session: Session, run_id: str, kind: str, step: int | None, payload: dict[str, Any]
) -> Event:
    event = Event(run_id=run_id, kind=kind, step=step, payload=payload)
    session.add(event)
    session.flush()
    return event


def list_events(
    *,
    session: Session,
    run_id: str,
    kind: str | None = None,
    step_min: int | None = None,
    step_max: int | None = None,
    limit: int = 1000,
) -> list[Event]:
    query = select(Event).where(Event.run_id == run_id)
    if kind is not None:
        query = query.where(Event.kind == kind)
    if step_min is not None:
        query = query.where(Event.step >= step_min)
    if step_max is not None:
        query = query.where(Event.step <= step_max)
    return list(session.scalars(query.order_by(Event.id).limit(limit)))
