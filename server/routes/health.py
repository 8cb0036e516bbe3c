"""Liveness and readiness probes (outside /api/v1, for orchestrators)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from sqlalchemy import text

from rankguard.server.deps import DbDep
from rankguard.server.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def read_healthz() -> Health:
    """The process is alive."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"description": "DB unreachable"}})
def read_readyz(db: DbDep) -> Health:
    """The database answers a query."""
    try:
        with db.read() as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:  # any driver error means "not ready", never a 500
        raise HTTPException(status_code=503, detail=f"database unreachable: {exc}") from exc
    return Health(status="ok")
