"""The dashboard's pages and the JSON they draw from.

The HTML pages are public shells that carry no run data: their script asks for a token once
(kept in ``sessionStorage``, sent as ``Authorization: Bearer``; never in a URL) and fetches
the data below, which follows the API's scopes (read to view, operate to act). In
``--no-auth`` mode the first fetch succeeds without a token and none is asked for.

plotly.js is served from the installed ``plotly`` package (never a CDN: clusters are often
offline), under a versioned URL so browsers may cache it for good.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Annotated, Any

import plotly
from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from rankguard.dashboard import data
from rankguard.server import storage
from rankguard.server.deps import DbDep, ReadPrincipal, run_or_404
from rankguard.server.routes.runs import run_public
from rankguard.server.wire import WireJSONResponse

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
TEMPLATES_DIR = HERE / "templates"
PLOTLY_JS = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
PLOTLY_URL = f"/dashboard/static/plotly-{plotly.__version__}.min.js"
STATIC_URL = "/dashboard/static"
STATIC_TYPES = {".js": "text/javascript", ".css": "text/css"}

templates = Environment(
    loader=FileSystemLoader(TEMPLATES_DIR), autoescape=select_autoescape(["html"])
)


class PayloadCache:
    """The last few figure payloads by ETag (the run's data fingerprint): reloads and other
    viewers of an unchanged run cost no rebuild. A large run's payload is ~10 MB; 8 entries
    bound the memory. Any new point, event or histogram changes the fingerprint."""

    def __init__(self, entries: int = 8) -> None:
        self._items: OrderedDict[str, str] = OrderedDict()
        self._entries = entries
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            return None

    def put(self, key: str, body: str) -> None:
        with self._lock:
            self._items[key] = body
            self._items.move_to_end(key)
            while len(self._items) > self._entries:
                self._items.popitem(last=False)


def _payload_cache(request: Request) -> PayloadCache:
    """One cache per app (a test process may run several apps on different databases)."""
    state = request.app.state
    cache: PayloadCache | None = getattr(state, "dashboard_payload_cache", None)
    if cache is None:
        cache = state.dashboard_payload_cache = PayloadCache()
    return cache


pages = APIRouter(tags=["dashboard"], include_in_schema=False)
api = APIRouter(prefix="/api/v1", tags=["dashboard"])


def render_page(name: str, **context: Any) -> HTMLResponse:
    html = templates.get_template(name).render(
        plotly_url=PLOTLY_URL, static_url=STATIC_URL, **context
    )
    # The shell holds no data, but keep it out of shared caches and frames anyway.
    return HTMLResponse(
        html,
        headers={
            "Cache-Control": "no-cache",
            "X-Frame-Options": "DENY",
            "Referrer-Policy": "no-referrer",
        },
    )


@pages.get("/", response_class=HTMLResponse)
def runs_page() -> HTMLResponse:
    return render_page("runs.html", title="rankguard: runs")


@pages.get("/runs/{run_id}", response_class=HTMLResponse)
def run_page(run_id: str) -> HTMLResponse:
    return render_page(
        "run.html", title="rankguard: run", run_id=run_id, figure_ids=data.FIGURE_IDS
    )


@pages.get(PLOTLY_URL)
def plotly_js() -> FileResponse:
    return FileResponse(
        PLOTLY_JS,
        media_type="text/javascript",
        headers={"Cache-Control": "public, max-age=31536000, immutable"},
    )


@pages.get(STATIC_URL + "/{name}")
def static_file(name: str) -> FileResponse:
    """Only plain files directly in dashboard/static with a known type (no traversal)."""
    path = STATIC_DIR / name
    media = STATIC_TYPES.get(path.suffix)
    if media is None or "/" in name or name.startswith(".") or not path.is_file():
        raise HTTPException(404, detail=f"no dashboard file {name!r}")
    return FileResponse(path, media_type=media, headers={"Cache-Control": "no-cache"})


@api.get("/dashboard/runs")
def read_run_summaries(
    db: DbDep,
    principal: ReadPrincipal,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> Response:
    """The runs list: status, last step, last loss and firing alerts per run, newest first."""
    with db.read() as session:
        runs, count = storage.list_runs(
            session=session, project_id=principal.project_id, limit=limit
        )
        names = storage.project_names(session=session, ids={r.project_id for r in runs})
        rows = data.run_summaries(session, runs, names)
    return WireJSONResponse({"data": rows, "count": count})


@api.get("/runs/{run_id}/figures")
def read_run_figures(
    run_id: str,
    request: Request,
    db: DbDep,
    principal: ReadPrincipal,
    cosine_target: Annotated[str | None, Query(max_length=255)] = None,
) -> Response:
    """Everything the run page draws: the run, each figure as Plotly JSON (ids in
    ``data.FIGURE_IDS``), the alerts with their suggested actions and the event timeline.
    The ETag is a fingerprint of the run's data: a poll that changes nothing costs a 304."""
    with db.read() as session:
        run = run_or_404(session, principal, run_id)
        etag = '"' + data.fingerprint(session, run) + (cosine_target or "") + '"'
        headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        # The fingerprint covers the run's status and last step too, so a cached payload is
        # exactly what a rebuild would give. Access was checked above (run_or_404).
        cache = _payload_cache(request)
        key = f"{run.id}|{etag}"
        cached = cache.get(key)
        if cached is None:
            events = storage.list_events(session=session, run_id=run_id, limit=10_000)
            figures = data.build_figures(session, run, events, cosine_target=cosine_target)
            names = storage.project_names(session=session, ids={run.project_id})
            meta = {
                "run": run_public(run, names[run.project_id]).model_dump(mode="json"),
                "alerts": data.alert_rows(events, run_id),
                "timeline": data.timeline_rows(events),
                "cosine_targets": data.cosine_targets(session, run_id),
                "cosine_target": cosine_target,
            }
            # The wire's JSON (NaN/Inf as strings) for the small part (a config may hold NaN).
            body = bytes(WireJSONResponse(meta).body).decode("utf-8")
            # Splice the figures in as text: their JSON is built already (megabytes long).
            cached = body[:-1] + ',"figures":' + data.figure_payload(figures) + "}"
            cache.put(key, cached)
    return Response(cached, media_type="application/json", headers=headers)


router = APIRouter()
router.include_router(pages)
router.include_router(api)
