"""/runs/{run_id}/histograms: ingest (idempotent on series and step) and read."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.exceptions import RequestValidationError

from rankguard.server.deps import DbDep, IngestPrincipal, ReadPrincipal, SeriesCacheDep, run_or_404
from rankguard.server.middleware import WireRoute
from rankguard.server.schemas import (
    MAX_STEP,
    HistogramPublic,
    HistogramsBatch,
    HistogramsPublic,
    IngestResult,
)
from rankguard.server.storage import histograms as histogram_store
from rankguard.server.storage.points import match_series

router = APIRouter(route_class=WireRoute, prefix="/runs", tags=["histograms"])


@router.post("/{run_id}/histograms", response_model=IngestResult)
def create_histograms(
    run_id: str,
    body: HistogramsBatch,
    db: DbDep,
    cache: SeriesCacheDep,
    principal: IngestPrincipal,
) -> IngestResult:
    """Ingest histograms (edges has one more item than counts); a replay inserts nothing."""
    errors = [
        {
            "loc": ("body", "histograms", i, "edges"),
            "msg": f"edges has {len(h.edges)} items, counts has {len(h.counts)}; "
            "edges must have exactly one more",
            "type": "length_mismatch",
            "input": len(h.edges),
        }
        for i, h in enumerate(body.histograms)
        if len(h.edges) != len(h.counts) + 1
    ]
    if errors:
        raise RequestValidationError(errors)
    with db.write() as session:
        run_or_404(session, principal, run_id)
        inserted, new_ids = histogram_store.insert_histograms(
            session=session, run_id=run_id, histograms=body.histograms, known=cache.for_run(run_id)
        )
    cache.add(run_id, new_ids)
    return IngestResult(received=len(body.histograms), inserted=inserted)


@router.get("/{run_id}/histograms", response_model=HistogramsPublic)
def read_histograms(
    run_id: str,
    db: DbDep,
    principal: ReadPrincipal,
    quantity: Annotated[str, Query(min_length=1, max_length=255, description="fnmatch glob")],
    target: Annotated[str, Query(min_length=1, max_length=255, description="fnmatch glob")] = "*",
    step_min: Annotated[int | None, Query(ge=0, le=MAX_STEP)] = None,
    step_max: Annotated[int | None, Query(ge=0, le=MAX_STEP)] = None,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000,
) -> HistogramsPublic:
    """Histograms of the matching series, ordered by series then step."""
    with db.read() as session:
        run_or_404(session, principal, run_id)
        series = match_series(session=session, run_id=run_id, quantity=quantity, target=target)
        rows = histogram_store.read_histograms(
            session=session, series=series, step_min=step_min, step_max=step_max, limit=limit
        )
    return HistogramsPublic(histograms=[HistogramPublic(**r) for r in rows])
