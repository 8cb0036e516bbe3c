"""Composition root: ``create_app(settings)`` builds the FastAPI app. The lifespan opens the
engine, upgrades the schema, loads the key that seals webhook secrets, bootstraps the default
project and admin token, and keeps the database and caches on ``app.state``."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy import exc as sa_exc

from rankguard.dashboard import routes as dashboard_routes
from rankguard.server import exposition, storage
from rankguard.server.alerts.service import Alerting
from rankguard.server.config import Settings
from rankguard.server.db import Database, WriteBusyError, make_engine, upgrade_schema
from rankguard.server.deps import SeriesCache
from rankguard.server.guard import RequestGuard
from rankguard.server.middleware import BodyLimitMiddleware, WireJSONResponse
from rankguard.server.notify.trial import TrialSender
from rankguard.server.notify.worker import DeliveryWorker
from rankguard.server.routes import (
    alert_rules,
    alerts,
    commands,
    events,
    health,
    histograms,
    inbound,
    margins,
    points,
    projects,
    runs,
    series,
    tokens,
    webhooks,
)
from rankguard.server.secretbox import SecretBox, load_key, seal_plain_secrets

API_PREFIX = "/api/v1"
logger = logging.getLogger("rankguard.server")


def bootstrap(db: Database, settings: Settings, box: SecretBox) -> str | None:
    """Default project and admin token, webhook secrets of earlier versions sealed; returns a
    newly generated admin secret, if any."""
    admin = settings.admin_token.get_secret_value() if settings.admin_token else None
    with db.write() as session:
        storage.ensure_project(session=session, name=settings.default_project)
        sealed = seal_plain_secrets(session=session, box=box)
        if sealed:
            logger.warning("encrypted %d webhook secret(s) stored in clear", sealed)
        return storage.ensure_admin_token(session=session, secret=admin)


_ENUM_REPR = re.compile(r"<\w+\.\w+: ('[^']*')>")


def _add_validation_error_handler(app: FastAPI) -> None:
    """FastAPI's 422, with a discriminated union's tag errors (an unknown command ``kind``)
    pointed at the tag field rather than at the whole body."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        errors = []
        for error in exc.errors():
            if error.get("type") in ("union_tag_invalid", "union_tag_not_found"):
                ctx = error.get("ctx") or {}
                tag = str(ctx.get("discriminator", "")).strip("'")
                expected = _ENUM_REPR.sub(r"\1", str(ctx.get("expected_tags", "")))
                message = f"{tag}: " + (
                    f"{ctx['tag']!r} is not one of {expected}" if "tag" in ctx else "missing"
                )
                error = {**error, "loc": (*error["loc"], tag), "msg": message}
            errors.append(error)
        return await request_validation_exception_handler(
            request, RequestValidationError(errors, body=exc.body)
        )


def _add_database_error_handlers(app: FastAPI, *, retry_after_s: int) -> None:
    """A busy or unreachable database answers 503 with ``Retry-After``, never a 500."""
    retry_after = {"Retry-After": str(retry_after_s)}

    @app.exception_handler(sa_exc.TimeoutError)
    async def _pool_exhausted(_: Request, exc: sa_exc.TimeoutError) -> JSONResponse:
        return JSONResponse(
            {"detail": "all database connections are busy; retry shortly"},
            status_code=503,
            headers=retry_after,
        )

    @app.exception_handler(WriteBusyError)
    async def _write_busy(_: Request, exc: WriteBusyError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers=retry_after)

    @app.exception_handler(sa_exc.OperationalError)
    async def _db_unavailable(_: Request, exc: sa_exc.OperationalError) -> JSONResponse:
        logger.warning("database operational error: %s", exc.orig)
        return JSONResponse(
            {"detail": f"database unavailable: {type(exc.orig).__name__}; retry shortly"},
            status_code=503,
            headers=retry_after,
        )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings)
        db = Database(engine, lock_timeout_s=settings.pool_timeout_s)
        worker: DeliveryWorker | None = None
        trials = TrialSender(
            workers=settings.webhook_test_workers, queue=settings.webhook_test_queue
        )
        try:
            if settings.migrate_on_start:
                upgrade_schema(engine)
            box = SecretBox(load_key(settings))
            generated = bootstrap(db, settings, box)
            if generated is not None:
                # Printed once: only its hash is stored, so it cannot be shown again.
                print(
                    f"rankguard: admin token (shown once, store it now): {generated}",
                    file=sys.stderr,
                    flush=True,
                )
            app.state.db = db
            app.state.series_cache = SeriesCache()
            app.state.secrets = box
            app.state.webhook_trials = trials
            # Alerting: webhooks go out from a background worker, never from the request.
            worker = DeliveryWorker(db, settings, box=box)
            worker.start()
            app.state.alerting = Alerting(settings, worker=worker, metrics=app.state.metrics)
            yield
        finally:
            if worker is not None:
                worker.stop()
            trials.close()
            db.dispose()

    app = FastAPI(
        title="rankguard",
        version="0.1.0",
        summary="Spectral-health series from training probes; commands back to them.",
        lifespan=lifespan,
        default_response_class=WireJSONResponse,
    )
    app.state.settings = settings
    app.state.metrics = exposition.Metrics(lambda: getattr(app.state, "db", None))
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    # Before the body is read: a foreign Host, a cross-site write or a non-JSON body.
    app.add_middleware(
        RequestGuard,
        hosts=settings.trusted_hosts(),
        origins=frozenset(h.lower() for h in settings.allowed_hosts if h != "*"),
    )
    # Outermost: times every request, including those the body limit refuses.
    app.add_middleware(
        exposition.MetricsMiddleware,
        metrics=app.state.metrics,
        templates=lambda: exposition.route_templates(app),
    )

    _add_database_error_handlers(app, retry_after_s=settings.retry_after_s)
    _add_validation_error_handler(app)
    app.include_router(health.router)
    app.include_router(exposition.router)  # /metrics: see exposition.py about its token
    for module in (projects, tokens, runs, points, histograms, series, events, commands):
        app.include_router(module.router, prefix=API_PREFIX)
    for module in (alert_rules, alerts, margins, webhooks, inbound):
        app.include_router(module.router, prefix=API_PREFIX)
    app.include_router(dashboard_routes.router)
    return app
