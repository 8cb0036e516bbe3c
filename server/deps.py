"""FastAPI dependencies as ``Annotated`` aliases (the database, settings, the series-id cache,
the caller's principal with a required scope) and the routes' shared lookups: the
``*_or_404`` helpers (never 403, so a token cannot probe another project's ids), the project a
project-level request is about, and FastAPI's own 422 shape for errors found in a body."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Path, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from rankguard.server.auth import Principal, expand_scopes
from rankguard.server.config import Settings
from rankguard.server.db import Database
from rankguard.server.models import Alert, Command, Project, Run, Scope, Webhook
from rankguard.server.storage.alerts import get_alert
from rankguard.server.storage.commands import get_command
from rankguard.server.storage.points import SeriesKey
from rankguard.server.storage.runs import find_token, get_project, get_run, project_by_id
from rankguard.server.storage.webhooks import get_webhook


class SeriesCache:
    """(run_id, quantity, target, rank) -> series id, filled after commits only (a rolled
    back transaction never leaves an id here). Bounded by dropping everything when full:
    a miss costs one indexed query per run."""

    def __init__(self, max_entries: int = 1_000_000) -> None:
        self._by_run: dict[str, dict[SeriesKey, int]] = {}
        self._size = 0
        self._max = max_entries
        self._lock = threading.Lock()

    def for_run(self, run_id: str) -> dict[SeriesKey, int]:
        with self._lock:
            return dict(self._by_run.get(run_id, {}))

    def add(self, run_id: str, ids: dict[SeriesKey, int]) -> None:
        if not ids:
            return
        with self._lock:
            if self._size + len(ids) > self._max:
                self._by_run.clear()
                self._size = 0
            bucket = self._by_run.setdefault(run_id, {})
            before = len(bucket)
            bucket.update(ids)
            self._size += len(bucket) - before


def get_db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_series_cache(request: Request) -> SeriesCache:
    cache: SeriesCache = request.app.state.series_cache
    return cache


DbDep = Annotated[Database, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
SeriesCacheDep = Annotated[SeriesCache, Depends(get_series_cache)]

_bearer = HTTPBearer(auto_error=False, description="token with the scope the route names")


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail=detail,
        headers={"WWW-Authenticate": "Bearer"},
    )


def get_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    settings: Settings = request.app.state.settings
    if settings.no_auth:
        return Principal(None, None, frozenset(Scope) - {Scope.JOB}, label="no-auth")
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise _unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    db: Database = request.app.state.db
    with db.read() as session:
        token = find_token(session=session, secret=credentials.credentials)
        if token is None:
            raise _unauthorized("invalid or revoked token")
        return Principal(
            token_id=token.id,
            project_id=token.project_id,
            scopes=expand_scopes(frozenset(Scope(s) for s in token.scopes)),
            label=f"token:{token.prefix}",
            run_id=token.run_id,
        )


def require(scope: Scope) -> Callable[[Principal], Principal]:
    def check(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        if not principal.allows(scope):
            have = ", ".join(sorted(s.value for s in principal.scopes)) or "none"
            raise HTTPException(
                status_code=status.HTTP_403_FORBIDDEN,
                detail=f"this route needs the {scope.value!r} scope; the token has: {have}",
            )
        return principal

    return check


IngestPrincipal = Annotated[Principal, Depends(require(Scope.INGEST))]
ReadPrincipal = Annotated[Principal, Depends(require(Scope.READ))]
OperatePrincipal = Annotated[Principal, Depends(require(Scope.OPERATE))]
AdminPrincipal = Annotated[Principal, Depends(require(Scope.ADMIN))]


class AnyScope:
    """Passes when the principal holds at least one of ``scopes`` (e.g. read or ingest)."""

    def __init__(self, *scopes: Scope) -> None:
        self.scopes = scopes

    def __call__(self, principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        if not any(principal.allows(s) for s in self.scopes):
            need = " or ".join(repr(s.value) for s in self.scopes)
            raise HTTPException(status_code=403, detail=f"this route needs the {need} scope")
        return principal


ReadOrIngestPrincipal = Annotated[Principal, Depends(AnyScope(Scope.READ, Scope.INGEST))]


IngestOrOperatePrincipal = Annotated[Principal, Depends(AnyScope(Scope.INGEST, Scope.OPERATE))]

# Integer primary keys (32-bit on PostgreSQL): larger ids cannot exist.
RowId = Annotated[int, Path(ge=1, le=2**31 - 1)]

RUN_NOT_FOUND = "Run not found"
COMMAND_NOT_FOUND = "Command not found"
ALERT_NOT_FOUND = "Alert not found"
WEBHOOK_NOT_FOUND = "Webhook not found"


def run_or_404(session: Session, principal: Principal, run_id: str) -> Run:
    """The run if it exists in a project the principal can see, and is the job token's own
    run for a job token; else 404 (never 403, so a token cannot probe other run ids)."""
    run = get_run(session=session, run_id=run_id, project_id=principal.project_id)
    if run is None or not principal.can_access_run(run.id, run.project_id):
        raise HTTPException(status_code=status.HTTP_404_NOT_FOUND, detail=RUN_NOT_FOUND)
    return run


def command_or_404(session: Session, run_id: str, command_id: str) -> Command:
    """The command of that run (whose access the caller checked with ``run_or_404``)."""
    command = get_command(session=session, run_id=run_id, command_id=command_id)
    if command is None:
        raise HTTPException(status_code=status.HTTP_404_NOT_FOUND, detail=COMMAND_NOT_FOUND)
    return command


def alert_or_404(session: Session, principal: Principal, alert_id: str) -> Alert:
    """The alert, if it is in the caller's project; 404 otherwise (as for an unknown id)."""
    alert = get_alert(session=session, alert_id=alert_id, project_id=principal.project_id)
    if alert is None:
        raise HTTPException(status_code=status.HTTP_404_NOT_FOUND, detail=ALERT_NOT_FOUND)
    return alert


def webhook_or_404(session: Session, principal: Principal, webhook_id: int) -> Webhook:
    hook = get_webhook(session=session, webhook_id=webhook_id)
    if hook is None or not principal.can_access(hook.project_id):
        raise HTTPException(status_code=status.HTTP_404_NOT_FOUND, detail=WEBHOOK_NOT_FOUND)
    return hook


def scoped_project(
    session: Session, principal: Principal, name: str | None, default: str
) -> Project:
    """The project a project-level request is about: the named one (if the token may see
    it), else the token's, else (unbound token) the default project."""
    if name is None and principal.project_id is not None:
        project = project_by_id(session=session, project_id=principal.project_id)
    else:
        project = get_project(session=session, name=name or default)
    if project is None or not principal.can_access(project.id):
        raise HTTPException(404, detail=f"project {name or default!r} not found")
    return project


def unprocessable(field: str, message: str, value: Any) -> RequestValidationError:
    """A 422 in FastAPI's own shape (``detail`` a list with ``loc`` naming the field)."""
    return RequestValidationError(
        [{"loc": ("body", field), "msg": message, "type": "value_error", "input": value}]
    )
