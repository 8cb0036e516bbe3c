"""The JSON the fleet pages draw from: the runs list (``/dashboard/runs``), the compare view
(``/dashboard/compare``) and one incident (``/dashboard/incidents/{alert_id}``). Thin: each
parses its query, checks access and hands over to ``fleet``, ``compare`` or ``incident``.
Read scope; a token sees its own project's runs only (404 for another's, never 403)."""

from __future__ import annotations

import time
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import Response
from sqlalchemy.orm import Session

from rankguard.dashboard import compare, fleet, incident
from rankguard.server.deps import DbDep, ReadPrincipal, alert_or_404, run_or_404
from rankguard.server.middleware import WireJSONResponse
from rankguard.server.schemas import ProjectName
from rankguard.server.storage.fleet import RunFilter, project_choices, tag_names
from rankguard.server.vocab import RunStatus

api = APIRouter(prefix="/api/v1", tags=["dashboard"])

Text = Annotated[str | None, Query(max_length=255)]


# The tag filter's choices: every run's config is read to list them (a probe's config names
# every target), so a list is reused for this long.
TAGS_MAX_AGE_S = 30.0


def _tags(request: Request, session: Session, project_id: int | None) -> list[str]:
    state = request.app.state
    cached: dict[int | None, tuple[float, list[str]]] = getattr(state, "dashboard_tags", {})
    hit = cached.get(project_id)
    now = time.monotonic()
    if hit is not None and now - hit[0] < TAGS_MAX_AGE_S:
        return hit[1]
    tags = tag_names(session, project_id)
    state.dashboard_tags = {**cached, project_id: (now, tags)}
    return tags


def _margin_cache(request: Request) -> fleet.MarginCache:
    """One cache per app (a test process may run several apps on different databases)."""
    state = request.app.state
    cache: fleet.MarginCache | None = getattr(state, "dashboard_margin_cache", None)
    if cache is None:
        cache = state.dashboard_margin_cache = fleet.MarginCache()
    return cache


@api.get("/dashboard/runs")
def read_runs(
    request: Request,
    db: DbDep,
    principal: ReadPrincipal,
    q: Text = None,
    project: ProjectName | None = None,
    status: RunStatus | None = None,
    firing: bool | None = None,
    tag: Text = None,
    sort: Literal["risk", "started", "name", "last_step", "status", "firing"] = "started",
    order: Literal["asc", "desc"] | None = None,
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> Response:
    """A page of runs: status, last step and loss, alerts firing, the health badge and the
    rule nearest to firing with its margin, a loss sparkline. ``sort=risk`` puts the runs
    nearest to trouble first; other sorts default to descending (newest, largest first),
    except ``name`` (A to Z)."""
    if order is None:
        order = "asc" if sort in ("risk", "name") else "desc"
    filters = RunFilter(
        project_id=principal.project_id, project=project, search=q or None, status=status,
        firing=firing, tag=tag or None,
    )  # fmt: skip
    with db.read() as session:
        result = fleet.runs_page(
            session, _margin_cache(request), filters, sort=sort, descending=order == "desc",
            limit=limit, offset=(page - 1) * limit,
        )  # fmt: skip
        projects = project_choices(session, principal.project_id)
        tags = _tags(request, session, principal.project_id)
    return WireJSONResponse(
        {
            "data": result.rows,
            "count": result.count,
            "page": page,
            "limit": limit,
            "sort": sort,
            "order": order,
            "projects": projects,
            "tags": tags,
        }
    )


@api.get("/dashboard/compare")
def read_compare(
    db: DbDep,
    principal: ReadPrincipal,
    runs: Annotated[str, Query(max_length=400, description="1 to 6 run ids, comma-separated")],
    quantity: Annotated[str, Query(max_length=64)] = compare.DEFAULT_QUANTITY,
    target: Text = None,
    agg: Literal["min", "mean", "max"] | None = None,
) -> Response:
    """Two to six runs overlaid, aligned by step: ``quantity`` for one ``target`` or
    aggregated over its targets (``agg``; default the quantity's danger direction), and the
    loss, with each run's alerts and commands marked."""
    ids = [r for r in dict.fromkeys(x.strip() for x in runs.split(",")) if r]
    if not 1 <= len(ids) <= compare.MAX_RUNS:
        raise HTTPException(
            422, detail=f"runs: {len(ids)} run ids given; give 1 to {compare.MAX_RUNS}"
        )
    with db.read() as session:
        found = [run_or_404(session, principal, run_id) for run_id in ids]
        body = compare.payload(session, found, quantity=quantity, target=target, agg=agg)
    return WireJSONResponse(body)


@api.get("/dashboard/incidents/{alert_id}")
def read_incident(alert_id: str, db: DbDep, principal: ReadPrincipal) -> Response:
    """One alert episode: what fired, the targets by how early they moved, the series
    involved at full step resolution around it, the commands that followed with before and
    after figures, the recovery events and the outcome."""
    with db.read() as session:
        alert = alert_or_404(session, principal, alert_id)
        run = run_or_404(session, principal, alert.run_id)
        body = incident.payload(session, run, alert)
    return WireJSONResponse(body)
