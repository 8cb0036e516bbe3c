"""/runs: register (idempotent on the client's id), list, read, finish.

Registering a new run with a project token answers a ``job_token``: the secret of a token
bound to that run alone, which the job uses from then on. A job token registers only its own
run: the one it was minted for, or (minted without a run) the first run it creates."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from sqlalchemy.orm import Session

from rankguard.server.alerts.service import Alerting
from rankguard.server.auth import Principal
from rankguard.server.deps import (
    DbDep,
    IngestPrincipal,
    ReadOrIngestPrincipal,
    ReadPrincipal,
    SettingsDep,
    run_or_404,
)
from rankguard.server.middleware import WireRoute
from rankguard.server.models import Project, Scope
from rankguard.server.presenters import run_public
from rankguard.server.schemas import RunCreate, RunFinish, RunPublic, RunRegistered, RunsPublic
from rankguard.server.storage import runs as run_store
from rankguard.server.storage.errors import ConflictError
from rankguard.server.vocab import RunStatus

router = APIRouter(route_class=WireRoute, prefix="/runs", tags=["runs"])


@router.post(
    "",
    response_model=RunRegistered,
    status_code=status.HTTP_201_CREATED,
    responses={200: {"model": RunRegistered, "description": "the run was already registered"}},
)
def create_run(
    body: RunCreate,
    response: Response,
    db: DbDep,
    settings: SettingsDep,
    principal: IngestPrincipal,
) -> RunRegistered:
    """Register a run; with a client-supplied ``id`` a repeat returns the same run (200).
    A new run registered with a project token comes with its ``job_token`` (shown once)."""
    run_id = body.id
    if principal.run_bound and principal.run_id is not None:
        if run_id is not None and str(run_id) != principal.run_id:
            raise HTTPException(403, detail=_bound_elsewhere(principal.run_id))
        run_id = uuid.UUID(principal.run_id)
    with db.write() as session:
        project = _project_for_new_run(session, principal, body.project, settings.default_project)
        try:
            run, created = run_store.register_run(
                session=session,
                project=project,
                run_id=run_id,
                name=body.name,
                config=body.config,
                world_size=body.world_size,
                parameters=[p.model_dump() for p in body.parameters],
            )
        except ConflictError as exc:
            raise HTTPException(409, detail=str(exc)) from exc
        job_token = None
        if principal.run_bound:
            _bind_job_token(session, principal, run.id, created=created)
        elif created and principal.token_id is not None and not settings.no_auth:
            _, job_token = run_store.create_token(
                session=session,
                project=project,
                name=f"job: {run.name}"[:128],
                scopes=[Scope.JOB],
                run_id=run.id,
            )
        if not created:
            response.status_code = status.HTTP_200_OK
        public = run_public(run, project.name).model_dump()
        return RunRegistered(**public, job_token=job_token)


def _bound_elsewhere(run_id: str) -> str:
    return f"this job token is bound to run {run_id}; it registers no other run"


def _bind_job_token(session: Session, principal: Principal, run_id: str, *, created: bool) -> None:
    """A job token registers its own run only. Unbound, it is bound to the run it creates
    (several ranks of one job may race to create it: all of them hold the same token)."""
    assert principal.token_id is not None
    bound = run_store.token_run(session=session, token_id=principal.token_id)
    if bound is None and created:
        if run_store.bind_token(session=session, token_id=principal.token_id, run_id=run_id):
            return
        bound = run_store.token_run(session=session, token_id=principal.token_id)
    if bound != run_id:
        # Raising rolls the transaction back: a run created here is not kept.
        raise HTTPException(
            403,
            detail=_bound_elsewhere(bound)
            if bound
            else "an unbound job token binds only to a run it creates; this run exists",
        )


def _project_for_new_run(
    session: Session, principal: Principal, requested: str | None, default: str
) -> Project:
    """The named project, else the token's, else (unbound token, --no-auth) the default one.
    Unbound tokens create a named project on first use; bound ones stay in theirs."""
    if requested is None and principal.project_id is not None:
        project = run_store.project_by_id(session=session, project_id=principal.project_id)
        if project is None:  # the token outlived its project (cascade makes this rare)
            raise HTTPException(403, detail="the token's project no longer exists")
        return project
    name = default if requested is None else requested
    project = run_store.get_project(session=session, name=name)
    if project is None and principal.project_id is None:
        project = run_store.ensure_project(session=session, name=name)
    if project is None or not principal.can_access(project.id):
        raise HTTPException(403, detail=f"project={name!r}: the token is bound to another project")
    return project


@router.get("", response_model=RunsPublic)
def read_runs(
    db: DbDep,
    principal: ReadPrincipal,
    project: str | None = None,
    run_status: Annotated[RunStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> RunsPublic:
    """List runs (newest first) of the projects the token can see."""
    with db.read() as session:
        project_id = principal.project_id
        if project is not None:
            found = run_store.get_project(session=session, name=project)
            if found is None or not principal.can_access(found.id):
                return RunsPublic(data=[], count=0)
            project_id = found.id
        runs, count = run_store.list_runs(
            session=session, project_id=project_id, status=run_status, limit=limit, offset=offset
        )
        names = run_store.project_names(session=session, ids={r.project_id for r in runs})
        return RunsPublic(data=[run_public(r, names[r.project_id]) for r in runs], count=count)


@router.get("/{run_id}", response_model=RunPublic)
def read_run(run_id: str, db: DbDep, principal: ReadOrIngestPrincipal) -> RunPublic:
    """Get a run by ID."""
    with db.read() as session:
        run = run_or_404(session, principal, run_id)
        names = run_store.project_names(session=session, ids={run.project_id})
        return run_public(run, names[run.project_id])


@router.post("/{run_id}/finish", response_model=RunPublic)
def finish_run(
    run_id: str,
    request: Request,
    db: DbDep,
    principal: IngestPrincipal,
    body: RunFinish | None = None,
) -> RunPublic:
    """Mark a run finished or failed (repeating the same status is a no-op). The alert rules
    then judge the steps they were still holding back for late batches."""
    target = body.status if body is not None else RunStatus.FINISHED
    alerts: Alerting = request.app.state.alerting
    outcome = None
    with db.write() as session:
        run = run_or_404(session, principal, run_id)
        was_running = run.status == RunStatus.RUNNING.value
        try:
            run_store.finish_run(session=session, run=run, status=RunStatus(target))
        except ConflictError as exc:
            raise HTTPException(409, detail=str(exc)) from exc
        if was_running:
            outcome = alerts.on_finish(session=session, run=run)
        names = run_store.project_names(session=session, ids={run.project_id})
        public = run_public(run, names[run.project_id])
    if outcome is not None:
        alerts.after_commit(outcome)
    return public
