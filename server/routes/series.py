"""GET /runs/{run_id}/series (downsampled reads) and /series/index (what exists)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from rankguard.server.deps import DbDep, ReadPrincipal, run_or_404
from rankguard.server.middleware import WireRoute
from rankguard.server.schemas import (
    MAX_STEP,
    SeriesData,
    SeriesIndex,
    SeriesIndexEntry,
    SeriesResponse,
)
from rankguard.server.storage.downsample import read_points
from rankguard.server.storage.points import match_series, series_index

router = APIRouter(route_class=WireRoute, prefix="/runs", tags=["series"])

MAX_SERIES_PER_READ = 1000


@router.get("/{run_id}/series/index", response_model=SeriesIndex)
def read_series_index(run_id: str, db: DbDep, principal: ReadPrincipal) -> SeriesIndex:
    """Every (quantity, target, rank) of the run with its point count and step range."""
    with db.read() as session:
        run_or_404(session, principal, run_id)
        rows = series_index(session=session, run_id=run_id)
    return SeriesIndex(series=[SeriesIndexEntry(**r) for r in rows])


@router.get("/{run_id}/series", response_model=SeriesResponse)
def read_series(
    run_id: str,
    db: DbDep,
    principal: ReadPrincipal,
    quantity: Annotated[str, Query(min_length=1, max_length=255, description="fnmatch glob")],
    target: Annotated[str, Query(min_length=1, max_length=255, description="fnmatch glob")] = "*",
    rank: Annotated[int | None, Query(ge=0, le=1_000_000)] = None,
    step_min: Annotated[int | None, Query(ge=0, le=MAX_STEP)] = None,
    step_max: Annotated[int | None, Query(ge=0, le=MAX_STEP)] = None,
    max_points: Annotated[int, Query(ge=2, le=1_000_000)] = 2000,
) -> SeriesResponse:
    """Points of the matching series; over ``max_points`` each step bucket keeps its min and
    max point (and its first NaN), so spikes survive downsampling."""
    with db.read() as session:
        run_or_404(session, principal, run_id)
        matched = match_series(
            session=session, run_id=run_id, quantity=quantity, target=target, rank=rank
        )
        if len(matched) > MAX_SERIES_PER_READ:
            raise HTTPException(
                400,
                detail=f"quantity={quantity!r}, target={target!r} match {len(matched)} series; "
                f"at most {MAX_SERIES_PER_READ} per request: narrow the globs",
            )
        out = []
        for s in matched:
            steps, values, walls, total, downsampled = read_points(
                session=session,
                series_id=s.id,
                step_min=step_min,
                step_max=step_max,
                max_points=max_points,
            )
            if total == 0:
                continue
            out.append(
                SeriesData(
                    quantity=s.quantity,
                    target=s.target,
                    rank=s.rank,
                    steps=steps,
                    values=values,
                    wall_times=walls,
                    total=total,
                    downsampled=downsampled,
                )
            )
    return SeriesResponse(series=out)
