"""/runs/{run_id}/events: markers on a run's timeline (alerts, commands, user notes)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status

from rankguard.server.deps import DbDep, IngestOrOperatePrincipal, ReadPrincipal, run_or_404
from rankguard.server.middleware import WireRoute
from rankguard.server.schemas import MAX_STEP, EventCreate, EventPublic, EventsPublic
from rankguard.server.storage import events as event_store

router = APIRouter(route_class=WireRoute, prefix="/runs", tags=["events"])


@router.get("/{run_id}/events", response_model=EventsPublic)
def read_events(
    run_id: str,
    db: DbDep,
    principal: ReadPrincipal,
    kind: Annotated[str | None, Query(max_length=64)] = None,
    step_min: Annotated[int | None, Query(ge=0, le=MAX_STEP)] = None,
    step_max: Annotated[int | None, Query(ge=0, le=MAX_STEP)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> EventsPublic:
    """List a run's events in the order they were recorded."""
    with db.read() as session:
        run_or_404(session, principal, run_id)
        events = event_store.list_events(
            session=session,
            run_id=run_id,
            kind=kind,
            step_min=step_min,
            step_max=step_max,
            limit=limit,
        )
        data = [EventPublic.model_validate(e) for e in events]
    return EventsPublic(data=data, count=len(data))


@router.post("/{run_id}/events", response_model=EventPublic, status_code=status.HTTP_201_CREATED)
def create_event(
    run_id: str, body: EventCreate, db: DbDep, principal: IngestOrOperatePrincipal
) -> EventPublic:
    """Record an event on a run."""
    with db.write() as session:
        run_or_404(session, principal, run_id)
        event = event_store.create_event(
            session=session, run_id=run_id, kind=body.kind, step=body.step, payload=body.payload
        )
        return EventPublic.model_validate(event)
