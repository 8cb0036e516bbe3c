"""Projects, tokens and runs: keyword-only functions over a ``Session`` the caller owns (and
commits). Runs are the unit everything else hangs off: ``register_run`` is idempotent on the
client's id and safe when several ranks of one job register at once."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import CursorResult, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rankguard.server import auth
from rankguard.server.db import utcnow
from rankguard.server.models import Event, Histogram, Project, Run, Scope, Series, Token
from rankguard.server.storage.alerts import install_run_rules
from rankguard.server.storage.errors import ConflictError
from rankguard.server.vocab import RunStatus

# --- projects and tokens ----------------------------------------------------------------


def get_project(*, session: Session, name: str) -> Project | None:
    return session.scalars(select(Project).where(Project.name == name)).one_or_none()


def project_by_id(*, session: Session, project_id: int) -> Project | None:
    return session.get(Project, project_id)


def ensure_project(*, session: Session, name: str) -> Project:
    project = get_project(session=session, name=name)
    if project is None:
        project = Project(name=name)
        session.add(project)
        session.flush()
    return project


def list_projects(*, session: Session) -> list[Project]:
    return list(session.scalars(select(Project).order_by(Project.id)))


def create_token(
    *,
    session: Session,
    project: Project | None,
    name: str,
    scopes: Sequence[Scope],
    run_id: str | None = None,
) -> tuple[Token, str]:
    """A new token; returns it and its secret (the only time the secret exists). A job
    token may be bound to ``run_id`` now, or later by its first registration."""
    secret = auth.generate_token()
    token = Token(
        project_id=None if project is None else project.id,
        name=name,
        prefix=auth.token_prefix(secret),
        token_hash=auth.hash_token(secret),
        scopes=sorted({Scope(s).value for s in scopes}),
        run_id=run_id,
    )
    session.add(token)
    session.flush()
    return token, secret


def token_run(*, session: Session, token_id: int) -> str | None:
    """The run a (job) token is bound to, read afresh (another rank may just have bound it)."""
    return session.scalar(select(Token.run_id).where(Token.id == token_id))


def bind_token(*, session: Session, token_id: int, run_id: str) -> bool:
    """Binds an unbound job token to ``run_id``; False when it was bound meanwhile."""
    result = session.execute(
        update(Token)
        .where(Token.id == token_id, Token.run_id.is_(None))
        .values(run_id=run_id)
        .execution_options(synchronize_session=False)
    )
    return int(cast("CursorResult[Any]", result).rowcount or 0) == 1


def find_token(*, session: Session, secret: str) -> Token | None:
    token = session.scalars(
        select(Token).where(Token.token_hash == auth.hash_token(secret))
    ).one_or_none()
    if token is None or token.revoked_at is not None:
        return None
    return token


def list_tokens(*, session: Session) -> list[tuple[Token, str | None]]:
    rows = session.execute(
        select(Token, Project.name)
        .outerjoin(Project, Token.project_id == Project.id)
        .order_by(Token.id)
    )
    return [(tok, pname) for tok, pname in rows]


def get_token(*, session: Session, token_id: int) -> Token | None:
    return session.get(Token, token_id)


def revoke_token(*, session: Session, token_id: int) -> Token | None:
    token = session.get(Token, token_id)
    if token is not None and token.revoked_at is None:
        token.revoked_at = utcnow()
    return token


def ensure_admin_token(*, session: Session, secret: str | None) -> str | None:
    """Make sure an admin token exists. With ``secret`` (from RANKGUARD_ADMIN_TOKEN) that one
    is stored if missing; without, one is generated on the first start only and returned so
    the caller can print it once. Returns the generated secret or None."""
    if secret is not None:
        known = session.scalars(
            select(Token.id).where(Token.token_hash == auth.hash_token(secret))
        ).first()
        # A revoked RANKGUARD_ADMIN_TOKEN stays revoked: restarting must not revive it.
        if known is None:
            session.add(
                Token(
                    project_id=None,
                    name="admin (RANKGUARD_ADMIN_TOKEN)",
                    prefix=auth.token_prefix(secret),
                    token_hash=auth.hash_token(secret),
                    scopes=[Scope.ADMIN.value],
                )
            )
            session.flush()
        return None
    has_admin = session.scalars(
        select(Token.id).where(Token.project_id.is_(None), Token.revoked_at.is_(None)).limit(1)
    ).first()
    if has_admin is not None:
        return None
    _, generated = create_token(session=session, project=None, name="admin", scopes=[Scope.ADMIN])
    return generated


# --- runs -------------------------------------------------------------------------------


def register_run(
    *,
    session: Session,
    project: Project,
    run_id: uuid.UUID | None,
    name: str,
    config: dict[str, Any],
    world_size: int,
    parameters: list[dict[str, Any]],
) -> tuple[Run, bool]:
    """Create a run, or return the existing one when the client's ``run_id`` is known.
    Returns (run, created). Safe when several ranks of one job register it at once."""

    def known() -> Run | None:
        existing = session.get(Run, str(run_id)) if run_id is not None else None
        if existing is not None and existing.project_id != project.id:
            raise ConflictError(f"run id {run_id} is already registered in another project")
        return existing

    existing = known()
    if existing is not None:
        return existing, False
    run = Run(
        id=str(run_id or uuid.uuid4()),
        project_id=project.id,
        name=name,
        config=config,
        world_size=world_size,
        parameters=parameters,
        status=RunStatus.RUNNING.value,
    )
    try:
        with session.begin_nested():  # a concurrent registration of the same id wins the race
            session.add(run)
            session.flush()
            install_run_rules(session=session, run=run)
    except IntegrityError:
        existing = known()
        if existing is None:
            raise
        return existing, False
    return run, True


def get_run(*, session: Session, run_id: str, project_id: int | None) -> Run | None:
    """The run, or None when it does not exist or belongs to a project the caller can't see."""
    run = session.get(Run, run_id)
    if run is None or (project_id is not None and run.project_id != project_id):
        return None
    return run


def project_names(*, session: Session, ids: set[int]) -> dict[int, str]:
    if not ids:
        return {}
    return dict(session.execute(select(Project.id, Project.name).where(Project.id.in_(ids))).all())


def list_runs(
    *,
    session: Session,
    project_id: int | None,
    status: RunStatus | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[Run], int]:
    query = select(Run)
    if project_id is not None:
        query = query.where(Run.project_id == project_id)
    if status is not None:
        query = query.where(Run.status == status.value)
    count = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    runs = session.scalars(
        query.order_by(Run.created_at.desc(), Run.id).limit(limit).offset(offset)
    )
    return list(runs), count


def finish_run(*, session: Session, run: Run, status: RunStatus) -> Run:
    if run.status == RunStatus.RUNNING.value:
        run.status = status.value
        run.finished_at = utcnow()
    elif run.status != status.value:
        raise ConflictError(f"run {run.id} is already {run.status}; cannot mark it {status.value}")
    return run


def content_marks(*, session: Session, run_id: str) -> tuple[int | None, int, int | None]:
    """(newest event id, number of series, newest histogram step) of a run: with the run's
    status and ``last_step`` (new points move it) these change whenever anything stored for
    the run changes. Indexed aggregates only."""
    max_event = session.scalar(select(func.max(Event.id)).where(Event.run_id == run_id))
    series_ids = select(Series.id).where(Series.run_id == run_id).scalar_subquery()
    n_series = session.scalar(select(func.count()).where(Series.run_id == run_id)) or 0
    max_hist = session.scalar(
        select(func.max(Histogram.step)).where(Histogram.series_id.in_(series_ids))
    )
    return max_event, int(n_series), max_hist
