"""ORM rows as the API's public schemas, where the row alone does not say everything (a
run's project is a name on the wire, an id in the table). Shared by the API routes and the
dashboard, which must not import each other."""

from __future__ import annotations

from rankguard.server.models import Run
from rankguard.server.schemas import RunPublic
from rankguard.server.vocab import RunStatus


def run_public(run: Run, project: str) -> RunPublic:
    return RunPublic(
        id=run.id,
        name=run.name,
        project=project,
        config=run.config,
        parameters=run.parameters,
        world_size=run.world_size,
        status=RunStatus(run.status),
        created_at=run.created_at,
        finished_at=run.finished_at,
        last_step=run.last_step,
    )
