"""/runs/{run_id}/commands: the operator queues (operate scope), the probe claims and
acknowledges (ingest scope). States: queued -> delivered -> applied | failed | expired;
queued -> cancelled."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status
from fastapi.exceptions import RequestValidationError

from rankguard.server.commands import CommandCreate, InvalidCommand
from rankguard.server.deps import (
    DbDep,
    IngestPrincipal,
    OperatePrincipal,
    ReadOrIngestPrincipal,
    SettingsDep,
    command_or_404,
    run_or_404,
)
from rankguard.server.middleware import WireRoute
from rankguard.server.models import Command
from rankguard.server.schemas import (
    CommandAck,
    CommandClaim,
    CommandPublic,
    CommandsPublic,
)
from rankguard.server.storage import commands as command_store
from rankguard.server.storage.errors import ConflictError
from rankguard.server.vocab import CommandState

router = APIRouter(route_class=WireRoute, prefix="/runs", tags=["commands"])


def _public(commands: list[Command]) -> CommandsPublic:
    data = [CommandPublic.model_validate(c) for c in commands]
    return CommandsPublic(data=data, count=len(data))


@router.post(
    "/{run_id}/commands", response_model=CommandPublic, status_code=status.HTTP_201_CREATED
)
def create_command(
    run_id: str,
    body: CommandCreate,
    db: DbDep,
    settings: SettingsDep,
    principal: OperatePrincipal,
) -> CommandPublic:
    """Queue a command for the run's probe; it is applied at the next step boundary."""
    with db.write() as session:
        run_or_404(session, principal, run_id)
        try:
            command = command_store.enqueue_command(
                session=session,
                run_id=run_id,
                kind=body.kind.value,
                args=body.args.model_dump(mode="json", exclude_unset=True),
                created_by=principal.label,
                ttl_s=body.ttl_s or settings.command_ttl_s,
            )
        except command_store.RunNotRunning as exc:
            raise HTTPException(409, detail=str(exc)) from exc
        except InvalidCommand as exc:
            errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors]
            raise RequestValidationError(errors) from None
        return CommandPublic.model_validate(command)


@router.get("/{run_id}/commands", response_model=CommandsPublic)
def read_commands(
    run_id: str,
    db: DbDep,
    principal: ReadOrIngestPrincipal,
    state: CommandState | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> CommandsPublic:
    """List a run's commands, oldest first (expired ones are marked as such first)."""
    with db.write() as session:
        run_or_404(session, principal, run_id)
        command_store.expire_commands(session=session, run_id=run_id)
        return _public(
            command_store.list_commands(session=session, run_id=run_id, state=state, limit=limit)
        )


@router.post("/{run_id}/commands/claim", response_model=CommandsPublic)
def claim_commands(
    run_id: str, db: DbDep, principal: IngestPrincipal, body: CommandClaim | None = None
) -> CommandsPublic:
    """Probe side: take the queued commands (now ``delivered``), oldest first."""
    limit = body.limit if body is not None else CommandClaim().limit
    with db.write() as session:
        run_or_404(session, principal, run_id)
        return _public(command_store.claim_commands(session=session, run_id=run_id, limit=limit))


@router.get("/{run_id}/commands/{command_id}", response_model=CommandPublic)
def read_command(
    run_id: str, command_id: str, db: DbDep, principal: ReadOrIngestPrincipal
) -> CommandPublic:
    """Get a command by ID."""
    with db.write() as session:
        run_or_404(session, principal, run_id)
        command_store.expire_commands(session=session, run_id=run_id)
        command = command_or_404(session, run_id, command_id)
        return CommandPublic.model_validate(command)


@router.post("/{run_id}/commands/{command_id}/cancel", response_model=CommandPublic)
def cancel_command(
    run_id: str, command_id: str, db: DbDep, principal: OperatePrincipal
) -> CommandPublic:
    """Cancel a queued command (409 once delivered: the probe may already be applying it)."""
    with db.write() as session:
        run_or_404(session, principal, run_id)
        command = command_or_404(session, run_id, command_id)
        try:
            command_store.cancel_command(session=session, command=command)
        except ConflictError as exc:
            raise HTTPException(409, detail=str(exc)) from exc
        return CommandPublic.model_validate(command)


@router.post("/{run_id}/commands/{command_id}/ack", response_model=CommandPublic)
def ack_command(
    run_id: str, command_id: str, body: CommandAck, db: DbDep, principal: IngestPrincipal
) -> CommandPublic:
    """Probe side: report a delivered command applied or failed (repeat acks are no-ops)."""
    with db.write() as session:
        run_or_404(session, principal, run_id)
        command = command_or_404(session, run_id, command_id)
        try:
            command_store.ack_command(
                session=session,
                command=command,
                state=CommandState(body.state),
                step=body.step,
                result=body.result,
                error=body.error,
            )
        except ConflictError as exc:
            raise HTTPException(409, detail=str(exc)) from exc
        return CommandPublic.model_validate(command)
