"""The command queue of a run's probe: queue (``enqueue_command``, the one entry point for
operators, inbound alert webhooks and alert rules), expire, claim, acknowledge, cancel.

States: queued -> delivered -> applied | failed | expired; queued -> cancelled. Every
command is queued with an expiry (``ttl_s``); queueing and acknowledging each add an event
to the run's timeline."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, cast

from sqlalchemy import CursorResult, func, select, update
from sqlalchemy.orm import Session

from rankguard.server.commands import validate_command
from rankguard.server.db import utcnow
from rankguard.server.models import Command, Event, Run
from rankguard.server.storage.errors import ConflictError
from rankguard.server.vocab import CommandState, RunStatus

OPEN_STATES = (CommandState.QUEUED.value, CommandState.DELIVERED.value)


class RunNotRunning(ConflictError):
    """The run is finished or failed: no probe is left to apply a command."""

    def __init__(self, run_id: str, status: str) -> None:
        super().__init__(f"run {run_id} is {status}; nothing to command")
        self.status = status


class CommandStillOpen(ConflictError):
    """A command from the same ``created_by`` is still queued or delivered."""

    def __init__(self, command_id: str, created_by: str) -> None:
        super().__init__(f"command {command_id} from {created_by!r} is still queued or delivered")
        self.command_id = command_id


def enqueue_command(
    *,
    session: Session,
    run_id: str,
    kind: str,
    args: dict[str, Any],
    created_by: str,
    ttl_s: float,
    dedupe: bool = False,
) -> Command:
    """Queue a command for the run's probe. Raises InvalidCommand when its arguments are
    outside the contract's bounds, RunNotRunning unless the run is running, and with
    ``dedupe`` CommandStillOpen while a command from the same ``created_by`` is queued or
    delivered (an alert source that re-sends a firing alert orders once)."""
    args = validate_command(kind, args)
    run = session.get(Run, run_id)  # in the session's identity map already: no query
    if run is not None and run.status != RunStatus.RUNNING.value:
        raise RunNotRunning(run_id, run.status)
    if dedupe:
        open_one = session.scalars(
            select(Command.id).where(
                Command.run_id == run_id,
                Command.created_by == created_by,
                Command.state.in_(OPEN_STATES),
            )
        ).first()
        if open_one is not None:
            raise CommandStillOpen(open_one, created_by)
    now = utcnow()
    command = Command(
        id=str(uuid.uuid4()),
        run_id=run_id,
        kind=kind,
        args=args,
        state=CommandState.QUEUED.value,
        created_at=now,
        updated_at=now,
        expires_at=now + dt.timedelta(seconds=ttl_s),
        created_by=created_by,
    )
    session.add(command)
    session.flush()
    session.add(
        Event(
            run_id=run_id,
            kind="command_queued",
            step=None,
            payload={"command_id": command.id, "kind": kind, "created_by": created_by},
        )
    )
    return command


def open_command(*, session: Session, run_id: str, kind: str) -> Command | None:
    """The oldest queued or delivered command of ``kind`` for the run, if any."""
    return session.scalars(
        select(Command)
        .where(Command.run_id == run_id, Command.kind == kind, Command.state.in_(OPEN_STATES))
        .order_by(Command.created_at)
    ).first()


def expire_commands(*, session: Session, run_id: str) -> int:
    """queued/delivered commands past their ``expires_at`` become ``expired``."""
    now = utcnow()
    result = session.execute(
        update(Command)
        .where(Command.run_id == run_id, Command.state.in_(OPEN_STATES), Command.expires_at < now)
        .values(state=CommandState.EXPIRED.value, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return int(cast("CursorResult[Any]", result).rowcount or 0)


def list_commands(
    *, session: Session, run_id: str, state: CommandState | None = None, limit: int = 1000
) -> list[Command]:
    query = select(Command).where(Command.run_id == run_id)
    if state is not None:
        query = query.where(Command.state == state.value)
    return list(session.scalars(query.order_by(Command.created_at, Command.id).limit(limit)))


def get_command(*, session: Session, run_id: str, command_id: str) -> Command | None:
    command = session.get(Command, command_id)
    if command is None or command.run_id != run_id:
        return None
    return command


def claim_commands(*, session: Session, run_id: str, limit: int = 100) -> list[Command]:
    """Queued commands in creation order, now ``delivered`` (expired ones first removed)."""
    expire_commands(session=session, run_id=run_id)
    commands = list(
        session.scalars(
            select(Command)
            .where(Command.run_id == run_id, Command.state == CommandState.QUEUED.value)
            .order_by(Command.created_at, Command.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )
    now = utcnow()
    for command in commands:
        command.state = CommandState.DELIVERED.value
        command.updated_at = now
    return commands


def ack_command(
    *,
    session: Session,
    command: Command,
    state: CommandState,
    step: int | None,
    result: dict[str, Any] | None,
    error: str | None,
) -> Command:
    """Record what the probe did. Repeating the same ack is a no-op; a late ack of an
    expired command is recorded anyway, because the weights did change."""
    if command.state == state.value:
        return command
    if command.state not in (CommandState.DELIVERED.value, CommandState.EXPIRED.value):
        raise ConflictError(
            f"command {command.id} is {command.state}; only a delivered (or expired) command "
            f"can be acknowledged as {state.value}"
        )
    command.state = state.value
    command.updated_at = utcnow()
    command.applied_step = step
    command.result = result
    command.error = error
    session.add(
        Event(
            run_id=command.run_id,
            kind=f"command_{state.value}",
            step=step,
            payload={
                "command_id": command.id,
                "kind": command.kind,
                "result": result,
                "error": error,
            },
        )
    )
    return command


def cancel_command(*, session: Session, command: Command) -> Command:
    """Only a queued command can be cancelled: a delivered one may already be applied."""
    if command.state == CommandState.CANCELLED.value:
        return command
    if command.state != CommandState.QUEUED.value:
        raise ConflictError(
            f"command {command.id} is {command.state}; only a queued command can be cancelled"
        )
    command.state = CommandState.CANCELLED.value
    command.updated_at = utcnow()
    return command


def command_counts(*, session: Session) -> list[tuple[str, str, int]]:
    """(kind, state, number of commands) over every run."""
    rows = session.execute(
        select(Command.kind, Command.state, func.count()).group_by(Command.kind, Command.state)
    )
    return [(kind, state, int(n)) for kind, state, n in rows]
