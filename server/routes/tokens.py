"""/tokens: admin only. The secret is returned once, at creation. A token with the ``job``
scope is a training job's: bound to ``run_id`` (or, minted without one, to the first run it
registers), it acts on that run alone."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from rankguard.server.deps import AdminPrincipal, DbDep, RowId, unprocessable
from rankguard.server.middleware import WireRoute
from rankguard.server.models import Scope, Token
from rankguard.server.schemas import TokenCreate, TokenCreated, TokenPublic, TokensPublic
from rankguard.server.storage import runs as run_store

router = APIRouter(route_class=WireRoute, prefix="/tokens", tags=["tokens"])


def _public(token: Token, project: str | None) -> TokenPublic:
    return TokenPublic(
        id=token.id,
        name=token.name,
        prefix=token.prefix,
        project=project,
        scopes=[Scope(s) for s in token.scopes],
        run_id=token.run_id,
        created_at=token.created_at,
        revoked_at=token.revoked_at,
    )


@router.get("", response_model=TokensPublic)
def read_tokens(db: DbDep, principal: AdminPrincipal) -> TokensPublic:
    """List tokens (prefixes only; secrets are never stored)."""
    with db.read() as session:
        rows = [
            _public(tok, pname)
            for tok, pname in run_store.list_tokens(session=session)
            if principal.project_id is None or tok.project_id == principal.project_id
        ]
    return TokensPublic(data=rows, count=len(rows))


@router.post("", response_model=TokenCreated, status_code=status.HTTP_201_CREATED)
def create_token(body: TokenCreate, db: DbDep, principal: AdminPrincipal) -> TokenCreated:
    """Create a token bound to a project; the response carries the secret, once."""
    with db.write() as session:
        project = run_store.get_project(session=session, name=body.project)
        if project is None or not principal.can_access(project.id):
            raise HTTPException(404, detail=f"project {body.project!r} not found")
        if body.run_id is not None:
            run = run_store.get_run(session=session, run_id=body.run_id, project_id=project.id)
            if run is None:
                raise unprocessable(
                    "run_id", f"no run {body.run_id!r} in project {body.project!r}", body.run_id
                )
        token, secret = run_store.create_token(
            session=session,
            project=project,
            name=body.name,
            scopes=body.scopes,
            run_id=body.run_id,
        )
        return TokenCreated(**_public(token, project.name).model_dump(), token=secret)


@router.delete("/{token_id}", response_model=TokenPublic)
def delete_token(token_id: RowId, db: DbDep, principal: AdminPrincipal) -> TokenPublic:
    """Revoke a token (kept for the record, refused from now on)."""
    with db.write() as session:
        token = run_store.get_token(session=session, token_id=token_id)
        if token is None or (
            principal.project_id is not None and token.project_id != principal.project_id
        ):
            raise HTTPException(404, detail="Token not found")
        run_store.revoke_token(session=session, token_id=token_id)
        names = run_store.project_names(
            session=session, ids={token.project_id} if token.project_id else set()
        )
        return _public(token, names.get(token.project_id) if token.project_id else None)
