"""Inbound alert webhooks: POST /inbound/alertmanager and /inbound/grafana (operate scope).

A firing alert that names a run (label ``rankguard_run`` or ``run``) and asks for MSign
(label or annotation ``rankguard_action: msign``) queues an MSign command for that run
(``server/inbound.py``). Alertmanager re-sends a firing alert at every
``repeat_interval``; a command already queued or delivered for the same alert (same
``created_by``) is not queued twice. Alerts that order nothing are listed as ignored, with
the reason, and never fail the request (a receiver that errors makes Alertmanager retry)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from rankguard.server import inbound
from rankguard.server.auth import Principal
from rankguard.server.commands import InvalidCommand
from rankguard.server.db import Database
from rankguard.server.deps import DbDep, OperatePrincipal, SettingsDep, unprocessable
from rankguard.server.middleware import WireRoute
from rankguard.server.schemas import CommandPublic, InboundIgnored, InboundResult
from rankguard.server.storage.commands import CommandStillOpen, RunNotRunning, enqueue_command
from rankguard.server.storage.runs import get_run

router = APIRouter(route_class=WireRoute, prefix="/inbound", tags=["inbound"])


def _handle(
    db: Database, principal: Principal, source: str, payload: Any, ttl_s: float
) -> InboundResult:
    try:
        alerts = inbound.parse_inbound(payload)
    except inbound.InboundPayloadError as exc:
        raise unprocessable("payload", str(exc), None) from exc
    queued: list[CommandPublic] = []
    ignored: list[InboundIgnored] = []
    with db.write() as session:
        for alert in alerts:
            body, reason = inbound.decide(alert)
            if body is None:
                ignored.append(InboundIgnored(alertname=alert.alertname, reason=reason))
                continue
            run = get_run(session=session, run_id=body["run_id"], project_id=principal.project_id)
            if run is None:
                ignored.append(
                    InboundIgnored(
                        alertname=alert.alertname, reason=f"run {body['run_id']!r} not found"
                    )
                )
                continue
            try:
                command = enqueue_command(
                    session=session,
                    run_id=run.id,
                    kind=body["kind"],
                    args=body["args"],
                    created_by=f"inbound:{source}:{alert.key}"[:255],
                    ttl_s=ttl_s,
                    dedupe=True,  # Alertmanager re-sends a firing alert every repeat_interval
                )
            except RunNotRunning as exc:
                reason = f"run is {exc.status}"
            except InvalidCommand as exc:
                reason = f"invalid command: {exc}"
            except CommandStillOpen as exc:
                reason = f"command {exc.command_id} for this alert is already queued"
            else:
                queued.append(CommandPublic.model_validate(command))
                continue
            ignored.append(InboundIgnored(alertname=alert.alertname, reason=reason))
    return InboundResult(received=len(alerts), commands=queued, ignored=ignored)


async def _payload(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError as exc:
        raise unprocessable("payload", f"body is not JSON: {exc}", None) from exc


@router.post("/alertmanager", response_model=InboundResult)
async def inbound_alertmanager(
    request: Request, db: DbDep, settings: SettingsDep, principal: OperatePrincipal
) -> InboundResult:
    """Alertmanager webhook receiver (payload version 4)."""
    payload = await _payload(request)
    return await run_in_threadpool(
        _handle, db, principal, "alertmanager", payload, settings.command_ttl_s
    )


@router.post("/grafana", response_model=InboundResult)
async def inbound_grafana(
    request: Request, db: DbDep, settings: SettingsDep, principal: OperatePrincipal
) -> InboundResult:
    """Grafana contact point (unified alerting webhook, or a legacy alert notification)."""
    payload = await _payload(request)
    return await run_in_threadpool(
        _handle, db, principal, "grafana", payload, settings.command_ttl_s
    )
