"""Prometheus ``/metrics``: the app's own ``CollectorRegistry`` (never the global one, so two
apps in one process -- tests -- do not collide).

- ``RunCollector`` reads the database at scrape time: per ACTIVE (running) run the latest
  sample of each quantity aggregated over its targets (``rankguard_run_quantity``), the k
  worst targets (``rankguard_run_quantity_top``), ``rankguard_run_last_step`` and the firing
  alerts per severity; plus the counters whose truth is in the database, so they agree across
  server processes and survive restarts (alerts fired, commands per kind and state,
  notifications per format and outcome).
  Per ACTIVE run and rule, how far the rule is from firing (``alerts.margin``): in the
  rule's own terms (``rankguard_run_rule_margin``) and as a fraction of its bound
  (``rankguard_run_rule_margin_relative``, comparable across rules); a rule that cannot be
  assessed yet has no sample.
- ``Metrics`` holds the in-process counters: points ingested, HTTP requests and their
  latency (``MetricsMiddleware``, labelled with the route *template*, never the raw path).

Label sets are bounded (docs/contract.md): active runs, quantities, aggregates, top-k targets;
never a step, a command id or free text.

``/metrics`` needs ``Authorization: Bearer <token>`` (Prometheus: ``authorization:
{credentials_file: ...}``): the static ``RANKGUARD_METRICS_TOKEN`` (what docker compose gives
Prometheus) or an API token with the ``metrics`` scope (admin implies it). A token bound to a
project sees only its project's runs and none of the server-wide counters.
``RANKGUARD_METRICS_OPEN=1`` (or ``--no-auth``) serves it to anyone.
"""

from __future__ import annotations

import hmac
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rankguard.server.alerts.margin import Margin
from rankguard.server.auth import expand_scopes
from rankguard.server.config import Settings
from rankguard.server.db import Database
from rankguard.server.models import Scope as TokenScope
from rankguard.server.storage.alerts import fired_counts, firing_counts
from rankguard.server.storage.commands import command_counts
from rankguard.server.storage.fleet import run_margins
from rankguard.server.storage.points import latest_samples
from rankguard.server.storage.runs import find_token, project_names
from rankguard.server.storage.webhooks import delivery_counts
from rankguard.server.vocab import AlertSeverity, CommandState

logger = logging.getLogger("rankguard.server.exposition")

TOP_K = 5
AGGREGATES = ("min", "mean", "max")
SEVERITIES = tuple(s.value for s in AlertSeverity)  # in order of AlertSeverity.order
# Quantities where a LOW value is the bad one (top-k picks the lowest).
LOW_IS_WORSE = frozenset({"stable_rank", "sa_sign_diversity", "representation_stable_rank"})
# Commands counted as having reached a state: every command was queued; delivered covers
# those that went on to be acked.
_DELIVERED_OR_LATER = (
    CommandState.DELIVERED.value,
    CommandState.APPLIED.value,
    CommandState.FAILED.value,
)


def aggregate(values: list[float]) -> dict[str, float]:
    """min/mean/max of one step's values over targets. NaN is data: ``mean`` is NaN when any
    value is, ``min``/``max`` skip NaN (so a finite collapse in one layer still shows) and are
    NaN only when every value is."""
    finite_or_inf = [v for v in values if not math.isnan(v)]
    if not finite_or_inf:
        return dict.fromkeys(AGGREGATES, math.nan)
    both_infinities = math.inf in finite_or_inf and -math.inf in finite_or_inf
    if len(finite_or_inf) < len(values) or both_infinities:
        mean = math.nan
    else:
        mean = math.fsum(finite_or_inf) / len(finite_or_inf)
    return {"min": min(finite_or_inf), "mean": mean, "max": max(finite_or_inf)}


def top_targets(quantity: str, by_target: dict[str, float], k: int = TOP_K) -> list[str]:
    """The k worst targets: lowest for LOW_IS_WORSE quantities, highest otherwise; NaN
    counts as the worst of all."""
    low = quantity in LOW_IS_WORSE

    def badness(item: tuple[str, float]) -> tuple[int, float, str]:
        target, v = item
        if math.isnan(v):
            return (0, 0.0, target)
        return (1, v if low else -v, target)

    return [t for t, _ in sorted(by_target.items(), key=badness)[:k]]


class RunCollector(Collector):
    """Gauges of the active runs and the database-backed counters, read at scrape time."""

    def __init__(self, get_db: Callable[[], Database | None], project: str | None = None) -> None:
        self._get_db = get_db
        self._project = project  # only this project's runs, and no server-wide counter

    def collect(self) -> Iterable[Metric]:
        db = self._get_db()
        if db is None:  # before the lifespan started
            return []
        try:
            with db.read() as session:
                latest = latest_samples(session)
                if self._project is not None:
                    latest = [row for row in latest if row[1] == self._project]
                running = sorted({row[0] for row in latest})
                firing = firing_counts(session=session, run_ids=running)
                if self._project is not None:
                    return _run_families(latest, firing)
                fired = fired_counts(session=session)
                commands = command_counts(session=session)
                notes = delivery_counts(session=session)
                margins = run_margins(session, running)
        except Exception:
            logger.exception("metrics scrape could not read the database")
            return []
        projects = {row[0]: row[1] for row in latest}
        return [
            *_run_families(latest, firing),
            *_margin_families(margins, projects),
            _fired_family(fired),
            _commands_family(commands),
            _notifications_family(notes),
        ]


def _run_families(latest: Sequence[Any], firing: Mapping[tuple[str, str], int]) -> list[Metric]:
    """The gauges of the running runs: each quantity aggregated over its targets, its worst
    targets, the last step, the alerts firing per severity."""
    quantity = GaugeMetricFamily(
        "rankguard_run_quantity",
        "Latest sample of a run's quantity aggregated over its targets (active runs).",
        labels=["project", "run", "quantity", "aggregate"],
    )
    top = GaugeMetricFamily(
        "rankguard_run_quantity_top",
        f"Latest value of the {TOP_K} worst targets of a run's quantity (active runs).",
        labels=["project", "run", "quantity", "target"],
    )
    last_step = GaugeMetricFamily(
        "rankguard_run_last_step",
        "Highest step ingested for the run.",
        labels=["project", "run"],
    )
    alerts_firing = GaugeMetricFamily(
        "rankguard_alerts_firing",
        "Alerts currently firing per run and severity (active runs).",
        labels=["project", "run", "severity"],
    )
    runs: dict[str, str] = {}
    values: dict[tuple[str, str], dict[str, float]] = {}
    for run_id, project, run_last, q, target, value, _step in latest:
        if run_id not in runs:
            runs[run_id] = project
            if run_last is not None:
                last_step.add_metric([project, run_id], float(run_last))
        if q is None or _step is None:
            continue  # a run without series, or a histogram-only series
        v = math.nan if value is None else float(value)  # SQLite keeps NaN as NULL
        by_target = values.setdefault((run_id, q), {})
        # Several ranks of one target: keep the worst-looking (NaN first) as the value.
        if target not in by_target or math.isnan(v):
            by_target[target] = v
    for (run_id, q), by_target in sorted(values.items()):
        project = runs[run_id]
        for agg, v in aggregate(list(by_target.values())).items():
            quantity.add_metric([project, run_id, q, agg], v)
        for target in top_targets(q, by_target):
            top.add_metric([project, run_id, q, target], by_target[target])
    for run_id, project in sorted(runs.items()):
        for severity in SEVERITIES:
            alerts_firing.add_metric(
                [project, run_id, severity], float(firing.get((run_id, severity), 0))
            )
    return [quantity, top, last_step, alerts_firing]


def _margin_families(
    margins: Mapping[str, Sequence[Margin]], projects: Mapping[str, str]
) -> list[Metric]:
    """Per active run and rule: the margin in the rule's own terms and relative to its bound.
    Labels: project, run, rule (a run has a handful of rules: bounded)."""
    own = GaugeMetricFamily(
        "rankguard_run_rule_margin",
        "Distance of the rule's value from its trip bound, in the rule's own units; < 0 trips "
        "(active runs, assessed rules).",
        labels=["project", "run", "rule"],
    )
    rel = GaugeMetricFamily(
        "rankguard_run_rule_margin_relative",
        "Rule margin as a fraction of its bound's size (comparable across rules; +Inf: the "
        "bound is 0 and the value is clear of it).",
        labels=["project", "run", "rule"],
    )
    for run_id in sorted(margins):
        project = projects.get(run_id, "")
        for m in margins[run_id]:
            if m.margin is None or m.relative is None:
                continue
            own.add_metric([project, run_id, m.rule], m.margin)
            rel.add_metric([project, run_id, m.rule], m.relative)
    return [own, rel]


def _fired_family(fired: Mapping[str, int]) -> Metric:
    family = CounterMetricFamily(
        "rankguard_alerts_fired",
        "Alerts that fired, per severity (from the database).",
        labels=["severity"],
    )
    for severity in sorted(set(SEVERITIES) | set(fired)):
        family.add_metric([severity], float(fired.get(severity, 0)))
    return family


def _commands_family(commands: Sequence[tuple[str, str, int]]) -> Metric:
    family = CounterMetricFamily(
        "rankguard_commands",
        "Commands that reached a state, per kind (from the database).",
        labels=["kind", "state"],
    )
    queued, delivered = CommandState.QUEUED.value, CommandState.DELIVERED.value
    reached: dict[tuple[str, str], int] = {}
    for kind, state, n in commands:
        reached[(kind, queued)] = reached.get((kind, queued), 0) + n
        if state in _DELIVERED_OR_LATER:
            reached[(kind, delivered)] = reached.get((kind, delivered), 0) + n
        if state not in (queued, delivered):
            reached[(kind, state)] = reached.get((kind, state), 0) + n
    for (kind, state), n in sorted(reached.items()):
        family.add_metric([kind, state], float(n))
    return family


def _notifications_family(notes: Sequence[tuple[str, str, int]]) -> Metric:
    family = CounterMetricFamily(
        "rankguard_notifications",
        "Webhook notifications sent, per payload format and outcome (from the database).",
        labels=["format", "outcome"],
    )
    for fmt, outcome, n in sorted(notes):
        family.add_metric([fmt, outcome], float(n))
    return family


class Metrics:
    """The app's registry and its in-process instruments."""

    def __init__(self, get_db: Callable[[], Database | None]) -> None:
        self._get_db = get_db
        self.registry = CollectorRegistry(auto_describe=False)
        self.points_ingested = Counter(
            "rankguard_points_ingested",
            "Points stored by ingest (replayed points are not counted).",
            registry=self.registry,
        )
        self.http_requests = Counter(
            "rankguard_http_requests",
            "HTTP requests by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "rankguard_http_request_duration_seconds",
            "HTTP request latency by method and route template.",
            ["method", "route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry,
        )
        self.registry.register(RunCollector(get_db))

    def exposition(self, project: str | None = None) -> bytes:
        """Everything, or (``project``) the gauges of that project's runs alone."""
        if project is None:
            return generate_latest(self.registry)
        scoped = CollectorRegistry(auto_describe=False)
        scoped.register(RunCollector(self._get_db, project))
        return generate_latest(scoped)


class MetricsMiddleware:
    """Counts requests and times them, labelled by the matched route's path template
    (``/api/v1/runs/{run_id}/points``); unmatched paths share the label ``unmatched``."""

    def __init__(self, app: ASGIApp, metrics: Metrics, templates: Callable[[], list[str]]) -> None:
        self.app = app
        self.metrics = metrics
        self._templates = templates
        self._table: list[tuple[re.Pattern[str], str]] | None = None

    def _template(self, scope: Scope) -> str:
        # The router's match is not visible from here (included routers and the body-limit
        # middleware work on copies of the scope), so match the path against the app's
        # route templates once more: a few dozen anchored regexes.
        if self._table is None:
            table: list[tuple[re.Pattern[str], str]] = []
            for template in sorted(set(self._templates()), key=lambda t: (t.count("{"), t)):
                regex = re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(template))
                table.append((re.compile(f"^{regex}$"), template))
            self._table = table
        path = str(scope.get("path", ""))
        for pattern, template in self._table:
            if pattern.match(path):
                return template
        return "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            label = self._template(scope)
            method = str(scope.get("method", "GET"))
            self.metrics.http_requests.labels(method, label, str(status)).inc()
            self.metrics.http_duration.labels(method, label).observe(time.perf_counter() - start)


router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    include_in_schema=True,
    response_class=Response,
    responses={401: {"description": "no or unknown token"}, 403: {"description": "no scope"}},
)
def metrics_endpoint(request: Request) -> Response:
    """Prometheus exposition (text format 0.0.4); needs a token with the ``metrics`` scope
    or RANKGUARD_METRICS_TOKEN, unless RANKGUARD_METRICS_OPEN is set."""
    settings: Settings = request.app.state.settings
    metrics: Metrics = request.app.state.metrics
    allowed, project = _metrics_access(request, settings)
    if not allowed:
        return Response(
            "metrics need 'Authorization: Bearer <token>' with the 'metrics' scope "
            "(or RANKGUARD_METRICS_TOKEN)\n",
            status_code=401 if project is None else 403,
            headers={"WWW-Authenticate": "Bearer"},
            media_type="text/plain",
        )
    return Response(metrics.exposition(project), media_type=CONTENT_TYPE_LATEST)


def _metrics_access(request: Request, settings: Settings) -> tuple[bool, str | None]:
    """(allowed, project the caller is limited to). Refused: project None is 401 (no or
    unknown token), a name is 403 (a valid token without the scope)."""
    if settings.metrics_open or settings.no_auth:
        return True, None
    given = request.headers.get("authorization", "")
    scheme, _, secret = given.partition(" ")
    if scheme.lower() != "bearer" or not secret:
        return False, None
    if settings.metrics_token is not None:
        expected = settings.metrics_token.get_secret_value().encode()
        if hmac.compare_digest(secret.encode(), expected):
            return True, None
    db: Database = request.app.state.db
    with db.read() as session:
        token = find_token(session=session, secret=secret)
        if token is None:
            return False, None
        scopes = expand_scopes(frozenset(TokenScope(s) for s in token.scopes))
        project = None
        if token.project_id is not None:
            project = project_names(session=session, ids={token.project_id}).get(token.project_id)
    if TokenScope.METRICS not in scopes:
        return False, project or "-"
    return True, project


def route_templates(app: Any) -> list[str]:
    """Every path template the app serves: the OpenAPI paths plus routes outside the schema
    mounted directly on the app."""
    templates = list(app.openapi().get("paths", {}))
    for route in app.router.routes:
        template = getattr(route, "path_format", None)
        if isinstance(template, str):
            templates.append(template)
    return templates
