"""POST /runs/{run_id}/points: the columnar ingest hot path.

The body is parsed and validated by pydantic-core straight from bytes (no per-point model,
no stdlib ``json`` pass); the database work runs in the threadpool as one transaction."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from rankguard.server.alerts.service import Alerting
from rankguard.server.auth import Principal
from rankguard.server.db import Database
from rankguard.server.deps import DbDep, IngestPrincipal, SeriesCache, SeriesCacheDep, run_or_404
from rankguard.server.middleware import WireRoute
from rankguard.server.schemas import IngestResult, PointsBatch
from rankguard.server.storage.points import ColumnarPoints, insert_points

router = APIRouter(route_class=WireRoute, prefix="/runs", tags=["points"])

_BODY_SCHEMA = PointsBatch.model_json_schema()


def _body_error(error: Any) -> dict[str, Any]:
    """A pydantic error with its loc under "body"; raw bytes input (a body that is not even
    UTF-8) is shown as text, since the 422 itself must be JSON."""
    out = {**error, "loc": ("body", *error["loc"])}
    if isinstance(out.get("input"), bytes):
        out["input"] = out["input"][:200].decode("utf-8", errors="replace")
    return out


def parse_points(body: bytes) -> ColumnarPoints:
    """Validate a columnar batch; errors are 422s whose ``loc`` names the field (and index)."""
    try:
        batch = PointsBatch.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError(
            [_body_error(e) for e in exc.errors(include_url=False)]
        ) from None
    n = len(batch.step)
    columns: dict[str, list[Any] | None] = {
        "quantity": batch.quantity,
        "target": batch.target,
        "rank": batch.rank,
        "wall_time": batch.wall_time,
        "value": batch.value,
    }
    errors = [
        {
            "loc": ("body", field),
            "msg": f"{field} has {len(col)} items but step has {n}; "
            "all arrays of a batch must have the same length",
            "type": "length_mismatch",
            "input": len(col),
        }
        for field, col in columns.items()
        if col is not None and len(col) != n
    ]
    if errors:
        raise RequestValidationError(errors)
    now = time.time()
    return ColumnarPoints(
        quantity=batch.quantity,
        target=batch.target,
        rank=batch.rank if batch.rank is not None else [0] * n,
        step=batch.step,
        wall_time=batch.wall_time if batch.wall_time is not None else [now] * n,
        value=batch.value,
    )


def _ingest(
    db: Database,
    cache: SeriesCache,
    principal: Principal,
    run_id: str,
    points: ColumnarPoints,
    alerts: Alerting,
) -> IngestResult:
    with db.write() as session:
        run = run_or_404(session, principal, run_id)
        inserted, new_ids = insert_points(
            session=session, run_id=run_id, points=points, known=cache.for_run(run_id)
        )
        # Alert rules see the batch in the same transaction (state and points commit together).
        outcome = alerts.on_ingest(session=session, run=run, points=points)
    cache.add(run_id, new_ids)  # after the commit: a rollback leaves no stale id behind
    alerts.after_commit(outcome, inserted=inserted)  # wakes the webhook worker; never waits
    return IngestResult(received=len(points.step), inserted=inserted)


@router.post(
    "/{run_id}/points",
    response_model=IngestResult,
    openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": _BODY_SCHEMA}}}
    },
    responses={
        404: {"description": "Run not found"},
        413: {"description": "body (or its gzip-decompressed form) over max_body_bytes"},
    },
)
async def create_points(
    run_id: str,
    request: Request,
    db: DbDep,
    cache: SeriesCacheDep,
    principal: IngestPrincipal,
) -> IngestResult:
    """Ingest a columnar batch of points (gzip allowed); a replay inserts nothing."""
    points = parse_points(await request.body())
    alerts: Alerting = request.app.state.alerting
    return await run_in_threadpool(_ingest, db, cache, principal, run_id, points, alerts)
