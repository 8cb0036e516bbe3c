"""The dashboard's pages and the JSON they draw from.

The HTML pages are public shells that carry no run data: their script asks for a token once
(kept in ``sessionStorage``, sent as ``Authorization: Bearer``; never in a URL) and fetches
the data below, which follows the API's scopes (read to view, operate to act). In
``--no-auth`` mode the first fetch succeeds without a token and none is asked for.

plotly.js is served locally (never a CDN: clusters are often offline), under a versioned URL
so browsers may cache it for good. The run page loads plotly.js's "cartesian" bundle (scatter,
heatmap and the other 2-D traces: every trace the builders emit), vendored in dashboard/static
from the npm package ``plotly.js-cartesian-dist-min`` at the version the installed ``plotly``
package bundles: 1.5 MB instead of 4.8 MB, and compiling the script is most of a cold page
load. Should the installed plotly move to another plotly.js version, the page falls back to
the package's full bundle until the vendored one is replaced.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import plotly
from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy.orm import Session

from rankguard.dashboard import page
from rankguard.dashboard.api import api as fleet_api
from rankguard.dashboard.events import alert_rows, timeline_rows
from rankguard.server.deps import DbDep, ReadPrincipal, run_or_404
from rankguard.server.middleware import WireJSONResponse
from rankguard.server.models import Run
from rankguard.server.presenters import run_public
from rankguard.server.storage.events import list_events
from rankguard.server.storage.runs import project_names

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
TEMPLATES_DIR = HERE / "templates"
PLOTLY_JS = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
PLOTLY_URL = f"/dashboard/static/plotly-{plotly.__version__}.min.js"
# The trace types in the cartesian bundle that the figure builders use.
CARTESIAN_TRACES = frozenset({"scatter", "heatmap"})
STATIC_URL = "/dashboard/static"
STATIC_TYPES = {".js": "text/javascript", ".css": "text/css"}


def plotly_js_version(path: Path) -> str | None:
    """The ``vX.Y.Z`` in a plotly.js bundle's licence header (its first 200 bytes)."""
    with path.open("rb") as f:
        head = f.read(200).decode("ascii", "replace")
    match = re.search(r"plotly\.js[^\n]*? v(\d+\.\d+\.\d+)", head)
    return match.group(1) if match else None


def _page_plotly() -> tuple[Path, str]:
    """(file, URL) of the plotly.js the run page loads: the vendored cartesian bundle when it
    is the same plotly.js version as the installed package's full bundle, else that one."""
    version = plotly_js_version(PLOTLY_JS)
    if version is not None:
        vendored = STATIC_DIR / f"plotly-cartesian-{version}.min.js"
        if vendored.is_file() and plotly_js_version(vendored) == version:
            return vendored, f"{STATIC_URL}/plotly-cartesian-{version}.min.js"
    return PLOTLY_JS, PLOTLY_URL


PAGE_PLOTLY_JS, PAGE_PLOTLY_URL = _page_plotly()

templates = Environment(
    loader=FileSystemLoader(TEMPLATES_DIR), autoescape=select_autoescape(["html"])
)


@dataclass(frozen=True)
class Payload:
    etag: str
    body: str
    built_at: float  # time.monotonic()
    build_s: float


class PayloadCache:
    """The last few figure payloads: reloads and other viewers of an unchanged run cost no
    rebuild. A large run's payload is a few MB; 8 entries bound the memory. Any new point,
    event or histogram changes the run's fingerprint (the ETag).

    While a run trains, its fingerprint moves with every batch of points, so each poll would
    rebuild. A build that took ``build_s`` >= ``throttle_min_build_s`` is therefore served
    for ``throttle_factor`` × build_s more after a change (a few seconds stale at most),
    which caps the server's dashboard work per run at ~1/throttle_factor of a core however
    many pages poll. One build per (run, view) at a time: concurrent requests wait for it."""

    THROTTLE_FACTOR = 4.0
    THROTTLE_MIN_BUILD_S = 0.2

    def __init__(
        self,
        entries: int = 8,
        *,
        throttle_factor: float = THROTTLE_FACTOR,
        throttle_min_build_s: float = THROTTLE_MIN_BUILD_S,
    ) -> None:
        self._items: OrderedDict[tuple[str, str], Payload] = OrderedDict()
        self._entries = entries
        self._factor = throttle_factor
        self._min_build_s = throttle_min_build_s
        self._lock = threading.Lock()
        self._building: dict[str, threading.Lock] = {}

    def get(self, view: str, etag: str) -> Payload | None:
        """The payload of exactly this data, else the view's newest one while still fresh."""
        now = time.monotonic()
        with self._lock:
            exact = self._items.get((view, etag))
            if exact is not None:
                self._items.move_to_end((view, etag))
                return exact
            newest = None
            for (v, _), item in self._items.items():
                if v == view and (newest is None or item.built_at > newest.built_at):
                    newest = item
            if newest is None or newest.build_s < self._min_build_s:
                return None
            if now - newest.built_at < self._factor * newest.build_s:
                return newest
            return None

    def put(self, view: str, payload: Payload) -> None:
        with self._lock:
            self._items[(view, payload.etag)] = payload
            self._items.move_to_end((view, payload.etag))
            while len(self._items) > self._entries:
                self._items.popitem(last=False)

    def build_lock(self, view: str) -> threading.Lock:
        with self._lock:
            return self._building.setdefault(view, threading.Lock())


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
        plotly_url=PAGE_PLOTLY_URL, static_url=STATIC_URL, **context
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
        "run.html", title="rankguard: run", run_id=run_id, figure_ids=page.FIGURE_IDS
    )


@pages.get("/compare", response_class=HTMLResponse)
def compare_page() -> HTMLResponse:
    """The runs to overlay are in the query (``?runs=a,b&quantity=...``), read by the script."""
    return render_page("compare.html", title="rankguard: compare runs")


@pages.get("/incidents/{alert_id}", response_class=HTMLResponse)
def incident_page(alert_id: str) -> HTMLResponse:
    return render_page("incident.html", title="rankguard: incident", alert_id=alert_id)


@pages.get("/runs/{run_id}/incidents/latest", response_class=HTMLResponse)
def latest_incident_page(run_id: str) -> HTMLResponse:
    """The newest incident of a run (``?rule=`` one rule's): Grafana's links know the run and
    the rule, not the alert; the script finds it."""
    return render_page("incident.html", title="rankguard: incident", alert_id="", run_id=run_id)


@pages.get("/runs/{run_id}/alerts/{alert_id}", response_class=HTMLResponse)
def run_alert_page(run_id: str, alert_id: str) -> HTMLResponse:
    """Notifications sent before the incident page existed link here: the same page."""
    return incident_page(alert_id)


IMMUTABLE = {"Cache-Control": "public, max-age=31536000, immutable"}


@pages.get(PLOTLY_URL)
def plotly_js() -> FileResponse:
    return FileResponse(PLOTLY_JS, media_type="text/javascript", headers=IMMUTABLE)


if PAGE_PLOTLY_URL != PLOTLY_URL:
    # Registered before the generic static route, which would serve it uncacheable.
    @pages.get(PAGE_PLOTLY_URL)
    def page_plotly_js() -> FileResponse:
        return FileResponse(PAGE_PLOTLY_JS, media_type="text/javascript", headers=IMMUTABLE)


@pages.get(STATIC_URL + "/{name}")
def static_file(name: str) -> FileResponse:
    """Only plain files directly in dashboard/static with a known type (no traversal)."""
    path = STATIC_DIR / name
    media = STATIC_TYPES.get(path.suffix)
    if media is None or "/" in name or name.startswith(".") or not path.is_file():
        raise HTTPException(404, detail=f"no dashboard file {name!r}")
    return FileResponse(path, media_type=media, headers={"Cache-Control": "no-cache"})


@api.get("/runs/{run_id}/figures")
def read_run_figures(
    run_id: str,
    request: Request,
    db: DbDep,
    principal: ReadPrincipal,
    cosine_target: Annotated[str | None, Query(max_length=255)] = None,
) -> Response:
    """Everything the run page draws: the run, each figure as Plotly JSON (ids in
    ``page.FIGURE_IDS``), the alerts with their suggested actions and the event timeline.
    The ETag is a fingerprint of the run's data: a poll that changes nothing costs a 304."""
    with db.read() as session:
        run = run_or_404(session, principal, run_id)
        # A header is latin-1: the (free-text) target enters the ETag as a digest.
        view_key = hashlib.sha256(cosine_target.encode()).hexdigest()[:16] if cosine_target else ""
        etag = '"' + page.fingerprint(session, run) + view_key + '"'
        headers = {"Cache-Control": "private, no-cache"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={**headers, "ETag": etag})
        # The fingerprint covers the run's status and last step too, so a cached payload is
        # exactly what a rebuild would give (or a throttled, slightly older one: see
        # PayloadCache). Access was checked above (run_or_404).
        cache = _payload_cache(request)
        view = f"{run.id}|{cosine_target or ''}"
        payload = cache.get(view, etag)
        if payload is None:
            with cache.build_lock(view):
                payload = cache.get(view, etag)
                if payload is None:
                    started = time.perf_counter()
                    body = _build_payload(session, run, cosine_target)
                    payload = Payload(etag, body, time.monotonic(), time.perf_counter() - started)
                    cache.put(view, payload)
    headers["ETag"] = payload.etag
    if request.headers.get("if-none-match") == payload.etag:
        return Response(status_code=304, headers=headers)
    return Response(payload.body, media_type="application/json", headers=headers)


def _build_payload(session: Session, run: Run, cosine_target: str | None) -> str:
    events = list_events(session=session, run_id=run.id, limit=10_000)
    figures = page.build_figures(session, run, events, cosine_target=cosine_target)
    names = project_names(session=session, ids={run.project_id})
    meta = {
        "run": run_public(run, names[run.project_id]).model_dump(mode="json"),
        "alerts": alert_rows(events, run.id),
        "timeline": timeline_rows(events),
        "cosine_targets": page.cosine_targets(session, run.id),
        "cosine_target": cosine_target,
    }
    # The wire's JSON (NaN/Inf as strings) for the small part (a config may hold NaN).
    body = bytes(WireJSONResponse(meta).body).decode("utf-8")
    # Splice the figures in as text: their JSON is built already (megabytes long).
    return body[:-1] + ',"figures":' + page.figure_payload(figures) + "}"


router = APIRouter()
router.include_router(pages)
router.include_router(api)
router.include_router(fleet_api)
