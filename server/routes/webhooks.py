"""/webhooks: a project's outbound alert webhooks (format json | slack | alertmanager, an
optional HMAC secret that is write-only and encrypted at rest) and their delivery log. Reads
need the read scope, edits the operate scope. A URL whose address is private, loopback,
link-local or otherwise not public is refused unless RANKGUARD_WEBHOOK_ALLOW names it
(``notify/egress.py``; checked again at every send)."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from sqlalchemy.orm import Session

from rankguard.server.auth import Principal
from rankguard.server.config import Settings
from rankguard.server.db import Database
from rankguard.server.deps import (
    DbDep,
    OperatePrincipal,
    ReadPrincipal,
    RowId,
    SettingsDep,
    scoped_project,
    unprocessable,
    webhook_or_404,
)
from rankguard.server.middleware import WireRoute
from rankguard.server.models import Webhook
from rankguard.server.notify import delivery, egress, payloads
from rankguard.server.notify.trial import TrialsBusy, TrialSender
from rankguard.server.schemas import (
    DeliveriesPublic,
    DeliveryPublic,
    ProjectName,
    WebhookCreate,
    WebhookPublic,
    WebhooksPublic,
    WebhookTestResult,
    WebhookUpdate,
)
from rankguard.server.secretbox import SecretBox, SecretUnavailable
from rankguard.server.storage import webhooks as webhook_store
from rankguard.server.storage.runs import project_names
from rankguard.server.vocab import AlertSeverity, DeliveryOutcome, WebhookFormat

router = APIRouter(route_class=WireRoute, prefix="/webhooks", tags=["webhooks"])


def _public(hook: Webhook, project: str) -> WebhookPublic:
    return WebhookPublic(
        id=hook.id,
        project=project,
        name=hook.name,
        url=hook.url,
        format=WebhookFormat(hook.format),
        has_secret=hook.secret is not None,
        enabled=hook.enabled,
        min_severity=AlertSeverity(hook.min_severity),
        created_at=hook.created_at,
        updated_at=hook.updated_at,
    )


def _name(session: Session, hook: Webhook) -> str:
    return project_names(session=session, ids={hook.project_id})[hook.project_id]


def _box(request: Request) -> SecretBox:
    box: SecretBox = request.app.state.secrets
    return box


def _checked_url(url: str | None, settings: Settings) -> str | None:
    reason = None if url is None else egress.check_url(url, settings.webhook_allow)
    if reason is not None:
        raise unprocessable("url", reason, url)
    return url


@router.get("", response_model=WebhooksPublic)
def read_webhooks(
    db: DbDep, settings: SettingsDep, principal: ReadPrincipal, project: ProjectName | None = None
) -> WebhooksPublic:
    """A project's webhooks (secrets are never returned)."""
    with db.read() as session:
        found = scoped_project(session, principal, project, settings.default_project)
        hooks = webhook_store.list_webhooks(session=session, project_id=found.id)
        data = [_public(h, found.name) for h in hooks]
    return WebhooksPublic(data=data, count=len(data))


@router.post("", response_model=WebhookPublic, status_code=status.HTTP_201_CREATED)
def create_webhook(
    body: WebhookCreate,
    request: Request,
    db: DbDep,
    settings: SettingsDep,
    principal: OperatePrincipal,
) -> WebhookPublic:
    """Add a webhook: every alert of the project at or above ``min_severity`` is POSTed to
    it, firing and resolved, in ``format``; with a ``secret`` each body is signed
    (X-Rankguard-Timestamp, X-Rankguard-Signature: sha256=HMAC(secret, "<ts>." + body))."""
    url = _checked_url(body.url, settings)
    assert url is not None
    secret = None if body.secret is None else _box(request).seal(body.secret)
    with db.write() as session:
        project = scoped_project(session, principal, body.project, settings.default_project)
        hook = webhook_store.create_webhook(
            session=session,
            project_id=project.id,
            name=body.name,
            url=url,
            format=body.format.value,
            secret=secret,
            enabled=body.enabled,
            min_severity=body.min_severity.value,
        )
        return _public(hook, project.name)


@router.get("/{webhook_id}", response_model=WebhookPublic)
def read_webhook(webhook_id: RowId, db: DbDep, principal: ReadPrincipal) -> WebhookPublic:
    """Get a webhook by ID."""
    with db.read() as session:
        hook = webhook_or_404(session, principal, webhook_id)
        return _public(hook, _name(session, hook))


@router.patch("/{webhook_id}", response_model=WebhookPublic)
def update_webhook(
    webhook_id: RowId,
    body: WebhookUpdate,
    request: Request,
    db: DbDep,
    settings: SettingsDep,
    principal: OperatePrincipal,
) -> WebhookPublic:
    """Change a webhook; ``secret`` sets a new secret, ``clear_secret`` removes it."""
    url = _checked_url(body.url, settings)
    secret = None if body.secret is None else _box(request).seal(body.secret)
    with db.write() as session:
        hook = webhook_store.update_webhook(
            session=session,
            hook=webhook_or_404(session, principal, webhook_id),
            name=body.name,
            url=url,
            format=None if body.format is None else body.format.value,
            enabled=body.enabled,
            min_severity=None if body.min_severity is None else body.min_severity.value,
            secret=secret,
            clear_secret=body.clear_secret,
        )
        return _public(hook, _name(session, hook))


@router.delete("/{webhook_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_webhook(webhook_id: RowId, db: DbDep, principal: OperatePrincipal) -> Response:
    """Delete a webhook and its delivery log."""
    with db.write() as session:
        hook = webhook_or_404(session, principal, webhook_id)
        webhook_store.delete_webhook(session=session, hook=hook)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def sample_notice(project: str, base_url: str | None) -> payloads.AlertNotice:
    """A notice that says what it is: sent by ``POST /webhooks/{id}/test``, never by a rule."""
    links = {"dashboard": base_url.rstrip("/")} if base_url else {}
    return payloads.AlertNotice(
        alert_id="test",
        status="firing",
        rule="webhook_test",
        quantity="stable_rank",
        severity="info",
        run_id="test",
        first_step=0,
        step=0,
        message="rankguard test notification: this webhook is set up (no alert fired)",
        suggested_action="Nothing to do.",
        targets=(payloads.NoticeTarget("transformer.h.0.attn.c_attn.weight", 1.0, 0),),
        run_name="webhook-test",
        project=project,
        links=links,
    )


@router.post(
    "/{webhook_id}/test",
    response_model=WebhookTestResult,
    responses={429: {"description": "too many webhook tests in flight; retry shortly"}},
)
async def test_webhook(
    webhook_id: RowId,
    request: Request,
    db: DbDep,
    principal: OperatePrincipal,
    settings: SettingsDep,
) -> WebhookTestResult:
    """Send one sample notification now, in the webhook's format and signed with its secret,
    and say what the receiver answered: its status line, never its body (one try within
    ``webhook_timeout_s``, no retries, not in the delivery log)."""
    trials: TrialSender = request.app.state.webhook_trials

    def send() -> WebhookTestResult:
        return _send_test(db, principal, settings, _box(request), webhook_id)

    # The send runs on the trial threads, never the request pool: slow receivers cannot
    # stall the rest of the API. Waiting behind other tests counts against the budget too.
    budget = settings.webhook_timeout_s * (2 + settings.webhook_test_queue) + 1
    try:
        return await trials.run(send, timeout_s=budget)
    except TrialsBusy as exc:
        raise HTTPException(429, detail=str(exc), headers={"Retry-After": "5"}) from exc
    except asyncio.TimeoutError as exc:
        raise HTTPException(503, detail="webhook tests are backed up; retry shortly") from exc


def _send_test(
    db: Database, principal: Principal, settings: Settings, box: SecretBox, webhook_id: int
) -> WebhookTestResult:
    with db.read() as session:
        hook = webhook_or_404(session, principal, webhook_id)
        url, fmt, sealed, project = hook.url, hook.format, hook.secret, _name(session, hook)
    options = {}
    if fmt == WebhookFormat.ALERTMANAGER.value:
        options["external_url"] = settings.public_base_url or ""
    body = payloads.render(fmt, sample_notice(project, settings.public_base_url), **options)
    try:
        secret = box.open(sealed)
    except SecretUnavailable as exc:
        raise unprocessable("secret", str(exc), None) from exc
    once = delivery.RetryPolicy(
        max_attempts=1, max_total_s=settings.webhook_timeout_s, timeout_s=settings.webhook_timeout_s
    )
    with egress.guarded_client(settings.webhook_allow) as client:
        result = delivery.deliver(client, url, body, secret=secret, policy=once)
    attempt = result.attempts[-1]
    return WebhookTestResult(
        delivered=result.delivered,
        status_code=attempt.status_code,
        error=attempt.error,
        duration_s=attempt.duration_s,
        body=json.loads(body),
    )


@router.get("/{webhook_id}/deliveries", response_model=DeliveriesPublic)
def read_deliveries(
    webhook_id: RowId,
    db: DbDep,
    principal: ReadPrincipal,
    outcome: DeliveryOutcome | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> DeliveriesPublic:
    """The webhook's delivery log, newest first, each with its attempts."""
    with db.read() as session:
        webhook_or_404(session, principal, webhook_id)
        rows = webhook_store.list_deliveries(
            session=session, webhook_id=webhook_id, outcome=outcome, limit=limit
        )
        data = [DeliveryPublic.model_validate(d) for d in rows]
    return DeliveriesPublic(data=data, count=len(data))
