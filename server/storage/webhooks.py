"""Outbound webhooks and their delivery log (``webhook_deliveries``, the outbox the ingest
transaction writes and ``delivery.DeliveryWorker`` drains).

A delivery goes pending -> sending -> delivered | failed. ``claim_deliveries`` takes pending
rows with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so several server processes share the
outbox without sending a row twice; rows left ``sending`` by a crash go back to pending at
the next start (``requeue_stale_deliveries``)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from rankguard.server.db import utcnow
from rankguard.server.models import Delivery, Webhook
from rankguard.server.vocab import DeliveryOutcome

# --- webhooks ---------------------------------------------------------------------------


def list_webhooks(*, session: Session, project_id: int) -> list[Webhook]:
    return list(
        session.scalars(
            select(Webhook).where(Webhook.project_id == project_id).order_by(Webhook.id)
        )
    )


def get_webhook(*, session: Session, webhook_id: int) -> Webhook | None:
    return session.get(Webhook, webhook_id)


def create_webhook(
    *,
    session: Session,
    project_id: int,
    name: str,
    url: str,
    format: str,
    secret: str | None,
    enabled: bool,
    min_severity: str,
) -> Webhook:
    now = utcnow()
    hook = Webhook(
        project_id=project_id,
        name=name,
        url=url,
        format=format,
        secret=secret,
        enabled=enabled,
        min_severity=min_severity,
        created_at=now,
        updated_at=now,
    )
    session.add(hook)
    session.flush()
    return hook


def update_webhook(
    *,
    session: Session,
    hook: Webhook,
    name: str | None = None,
    url: str | None = None,
    format: str | None = None,
    enabled: bool | None = None,
    min_severity: str | None = None,
    secret: str | None = None,
    clear_secret: bool = False,
) -> Webhook:
    """Change the fields given (None: unchanged); ``clear_secret`` removes the secret, a
    new ``secret`` (applied after it) sets one."""
    if name is not None:
        hook.name = name
    if url is not None:
        hook.url = url
    if format is not None:
        hook.format = format
    if enabled is not None:
        hook.enabled = enabled
    if min_severity is not None:
        hook.min_severity = min_severity
    if clear_secret:
        hook.secret = None
    if secret is not None:
        hook.secret = secret
    hook.updated_at = utcnow()
    return hook


def delete_webhook(*, session: Session, hook: Webhook) -> None:
    """Delete a webhook and (by cascade) its delivery log."""
    session.delete(hook)


# --- the delivery log -------------------------------------------------------------------


def list_deliveries(
    *, session: Session, webhook_id: int, outcome: DeliveryOutcome | None, limit: int
) -> list[Delivery]:
    """A webhook's deliveries, newest first."""
    query = select(Delivery).where(Delivery.webhook_id == webhook_id)
    if outcome is not None:
        query = query.where(Delivery.outcome == outcome.value)
    return list(session.scalars(query.order_by(Delivery.id.desc()).limit(limit)))


def alert_deliveries(*, session: Session, alert_id: str) -> list[Delivery]:
    """The deliveries of an alert's notifications, oldest first."""
    return list(
        session.scalars(select(Delivery).where(Delivery.alert_id == alert_id).order_by(Delivery.id))
    )


def delivery_counts(*, session: Session) -> list[tuple[str, str, int]]:
    """(format, outcome, number of deliveries) of the finished ones (delivered or failed)."""
    done = (DeliveryOutcome.DELIVERED.value, DeliveryOutcome.FAILED.value)
    rows = session.execute(
        select(Delivery.format, Delivery.outcome, func.count())
        .where(Delivery.outcome.in_(done))
        .group_by(Delivery.format, Delivery.outcome)
    )
    return [(fmt, outcome, int(n)) for fmt, outcome, n in rows]


def requeue_stale_deliveries(*, session: Session) -> None:
    """Deliveries left ``sending`` (by a process that stopped mid-send) become pending."""
    session.execute(
        update(Delivery)
        .where(Delivery.outcome == DeliveryOutcome.SENDING.value)
        .values(outcome=DeliveryOutcome.PENDING.value)
    )


ClaimedDelivery = tuple[int, int, str, str, str | None]


def claim_deliveries(
    *, session: Session, limit: int, busy: Collection[int] = ()
) -> list[ClaimedDelivery]:
    """Up to ``limit`` pending deliveries, now ``sending``: the oldest one of each webhook
    that is not ``busy`` (so one receiver never has two in flight, and gets them in order).
    Each is (delivery id, webhook id, body, webhook url, webhook secret as stored)."""
    query = (
        select(Delivery.id, Delivery.webhook_id, Delivery.body, Webhook.url, Webhook.secret)
        .join(Webhook, Webhook.id == Delivery.webhook_id)
        .where(Delivery.outcome == DeliveryOutcome.PENDING.value)
        .order_by(Delivery.id)
        # A window of the oldest rows: a receiver with a long backlog cannot fill it alone
        # for long, since only its oldest row is taken per claim.
        .limit(limit * 16)
        .with_for_update(skip_locked=True, of=Delivery)
    )
    if busy:
        query = query.where(Delivery.webhook_id.not_in(list(busy)))
    picked: dict[int, ClaimedDelivery] = {}
    for did, webhook_id, body, url, secret in session.execute(query):
        if webhook_id not in picked and len(picked) < limit:
            picked[webhook_id] = (did, webhook_id, body, url, secret)
    if not picked:
        return []
    session.execute(
        update(Delivery)
        .where(Delivery.id.in_([row[0] for row in picked.values()]))
        .values(outcome=DeliveryOutcome.SENDING.value)
    )
    return sorted(picked.values())


def record_delivery(*, session: Session, delivery_id: int, values: dict[str, Any]) -> None:
    """Write a delivery's outcome (and its attempts, status code, error, finish time)."""
    session.execute(update(Delivery).where(Delivery.id == delivery_id).values(**values))
