"""Outbound alert notifications as request bodies: ``notice_from_transition`` turns an engine
``Transition`` plus the run's context into an ``AlertNotice``; ``render`` formats it as the raw
body of one of three payload formats (generic JSON, Slack, Alertmanager). Nothing here touches
the network or the database: ``signing`` signs a body, ``delivery`` sends it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from rankguard.server.alerts.transitions import Transition
from rankguard.server.vocab import AlertSeverity, AlertState, WebhookFormat, values
from rankguard.server.wire import encode_float

# Alertmanager's zero time: what it sends as endsAt of an alert that has not ended.
ZERO_TIME = "0001-01-01T00:00:00Z"


@dataclass(frozen=True)
class NoticeTarget:
    target: str
    value: float
    since: int | None


@dataclass(frozen=True)
class AlertNotice:
    """Everything a payload needs about one alert; independent of the engine and the database."""

    alert_id: str
    status: str  # an AlertState value: "firing" | "resolved"
    rule: str
    quantity: str
    severity: str
    run_id: str
    first_step: int
    step: int
    message: str
    suggested_action: str
    targets: tuple[NoticeTarget, ...] = ()
    run_name: str | None = None
    project: str | None = None
    starts_at: datetime | None = None
    ends_at: datetime | None = None
    links: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in values(AlertState):
            raise ValueError(f"status={self.status!r} is not valid; use 'firing' or 'resolved'")


def notice_from_transition(
    transition: Transition,
    *,
    alert_id: str,
    run_id: str,
    run_name: str | None = None,
    project: str | None = None,
    starts_at: datetime | None = None,
    ends_at: datetime | None = None,
    base_url: str | None = None,
) -> AlertNotice:
    """Build a notice from a transition whose suggested action is complete for the run
    (``alerts.runbook.suggested_action``); ``base_url`` (the dashboard's, e.g.
    ``https://rg.example``) adds links: the incident page of this alert episode first (what
    fired, the targets by onset, the series around it, the commands and the outcome)."""
    links: dict[str, str] = {}
    if base_url:
        root = base_url.rstrip("/")
        links = {
            "incident": f"{root}/incidents/{alert_id}",
            "run": f"{root}/runs/{run_id}",
            "alert": f"{root}/runs/{run_id}/alerts/{alert_id}",
            "commands": f"{root}/api/v1/runs/{run_id}/commands",
        }
    return AlertNotice(
        alert_id=alert_id,
        status=transition.kind.value,
        rule=transition.rule,
        quantity=transition.quantity,
        severity=transition.severity.value,
        run_id=run_id,
        run_name=run_name,
        project=project,
        first_step=transition.first_step,
        step=transition.step,
        message=transition.message,
        suggested_action=transition.suggested_action,
        targets=tuple(NoticeTarget(t.target, t.value, t.since) for t in transition.targets),
        starts_at=starts_at,
        ends_at=ends_at,
        links=links,
    )


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _value_text(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(encode_float(value))


# -- payload formats ------------------------------------------------------------------------


def generic_payload(notice: AlertNotice) -> dict[str, Any]:
    """rankguard's own JSON payload."""
    return {
        "version": 1,
        "alert_id": notice.alert_id,
        "status": notice.status,
        "rule": notice.rule,
        "quantity": notice.quantity,
        "severity": notice.severity,
        "run": {"id": notice.run_id, "name": notice.run_name, "project": notice.project},
        "first_step": notice.first_step,
        "step": notice.step,
        "targets": [
            {"target": t.target, "value": encode_float(t.value), "since": t.since}
            for t in notice.targets
        ],
        "message": notice.message,
        "suggested_action": notice.suggested_action,
        "starts_at": _iso(notice.starts_at),
        "ends_at": _iso(notice.ends_at),
        "links": dict(notice.links),
    }


_SLACK_EMOJI = {
    AlertSeverity.INFO.value: ":information_source:",
    AlertSeverity.WARNING.value: ":warning:",
    AlertSeverity.CRITICAL.value: ":rotating_light:",
}


def slack_payload(notice: AlertNotice) -> dict[str, Any]:
    """A Slack incoming-webhook body: ``text`` (fallback, notifications) plus Block Kit blocks."""
    run = notice.run_name or notice.run_id
    if notice.status == AlertState.FIRING:
        icon = _SLACK_EMOJI.get(notice.severity, ":warning:")
        title = f"{icon} [{notice.severity.upper()}] {notice.rule} firing on run {run}"
    else:
        title = f":white_check_mark: [RESOLVED] {notice.rule} on run {run}"
    lines = [
        f"• `{t.target}` = {_value_text(t.value)}"
        + (f" (since step {t.since})" if t.since is not None else "")
        for t in notice.targets[:10]
    ]
    if len(notice.targets) > 10:
        lines.append(f"• … and {len(notice.targets) - 10} more")
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": title[:150], "emoji": True}},
        {"type": "section", "text": {"type": "mrkdwn", "text": notice.message[:3000]}},
        {
            "type": "section",
            "fields": [
                {"type": "mrkdwn", "text": f"*Quantity*\n{notice.quantity}"},
                {"type": "mrkdwn", "text": f"*First step*\n{notice.first_step}"},
                {"type": "mrkdwn", "text": f"*Step*\n{notice.step}"},
                {"type": "mrkdwn", "text": f"*AlertSeverity*\n{notice.severity}"},
            ],
        },
    ]
    if lines:
        text = "*Targets (earliest first)*\n" + "\n".join(lines)
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": text[:3000]}})
    if notice.status == AlertState.FIRING:
        action = f"*Suggested action*\n{notice.suggested_action}"
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": action[:3000]}})
    if notice.links:
        links = " | ".join(f"<{url}|{name}>" for name, url in notice.links.items())
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": links}]})
    return {"text": f"{title}: {notice.message}", "blocks": blocks}


def fingerprint(labels: Mapping[str, str]) -> str:
    """A stable 16-hex-digit id of a label set (the length Alertmanager uses)."""
    canonical = "\x00".join(f"{k}\x01{labels[k]}" for k in sorted(labels))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _am_labels(notice: AlertNotice) -> dict[str, str]:
    labels = {
        "alertname": notice.rule,
        "severity": notice.severity,
        "run": notice.run_id,
        "quantity": notice.quantity,
    }
    if notice.project:
        labels["project"] = notice.project
    return labels


def alertmanager_payload(
    notices: Sequence[AlertNotice] | AlertNotice,
    *,
    receiver: str = "rankguard",
    external_url: str = "",
) -> dict[str, Any]:
    """The body Alertmanager's webhook receiver sends (version "4"), one group of alerts.

    Labels carry only bounded values (rule, severity, run, quantity, project); step, targets
    and values go into annotations, as Alertmanager's grouping expects.
    """
    items = [notices] if isinstance(notices, AlertNotice) else list(notices)
    if not items:
        raise ValueError("notices=[] is not valid; give at least one notice")
    alerts: list[dict[str, Any]] = []
    for n in items:
        labels = _am_labels(n)
        targets = ", ".join(f"{t.target}={_value_text(t.value)}" for t in n.targets[:10])
        alerts.append(
            {
                "status": n.status,
                "labels": labels,
                "annotations": {
                    "summary": f"{n.rule} {n.status} on run {n.run_name or n.run_id}",
                    "description": n.message,
                    "runbook": n.suggested_action,
                    "first_step": str(n.first_step),
                    "step": str(n.step),
                    "targets": targets,
                },
                "startsAt": _iso(n.starts_at) or ZERO_TIME,
                "endsAt": (_iso(n.ends_at) or ZERO_TIME)
                if n.status == AlertState.RESOLVED
                else ZERO_TIME,
                "generatorURL": n.links.get("incident") or n.links.get("run", ""),
                "fingerprint": fingerprint(labels),
            }
        )
    all_labels: list[dict[str, str]] = [a["labels"] for a in alerts]
    common_labels = {
        k: v for k, v in all_labels[0].items() if all(lab.get(k) == v for lab in all_labels)
    }
    all_ann: list[dict[str, str]] = [a["annotations"] for a in alerts]
    common_ann = {k: v for k, v in all_ann[0].items() if all(a.get(k) == v for a in all_ann)}
    group_labels = {k: common_labels[k] for k in ("alertname", "run") if k in common_labels}
    firing = any(a["status"] == AlertState.FIRING for a in alerts)
    status = (AlertState.FIRING if firing else AlertState.RESOLVED).value
    group_key = "{}:{" + ", ".join(f'{k}="{v}"' for k, v in sorted(group_labels.items())) + "}"
    return {
        "version": "4",
        "groupKey": group_key,
        "truncatedAlerts": 0,
        "status": status,
        "receiver": receiver,
        "groupLabels": group_labels,
        "commonLabels": common_labels,
        "commonAnnotations": common_ann,
        "externalURL": external_url,
        "alerts": alerts,
    }


def render(fmt: WebhookFormat | str, notice: AlertNotice, **options: Any) -> bytes:
    """The raw request body of ``notice`` in format ``fmt`` (UTF-8 JSON, no NaN literals)."""
    try:
        fmt = WebhookFormat(fmt)
    except ValueError:
        valid = ", ".join(repr(v) for v in values(WebhookFormat))
        raise ValueError(f"format={fmt!r} is not valid; use one of {valid}") from None
    if fmt is WebhookFormat.JSON:
        payload = generic_payload(notice)
    elif fmt is WebhookFormat.SLACK:
        payload = slack_payload(notice)
    else:
        payload = alertmanager_payload(notice, **options)
    return json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()


__all__ = [
    "ZERO_TIME",
    "AlertNotice",
    "NoticeTarget",
    "alertmanager_payload",
    "fingerprint",
    "generic_payload",
    "notice_from_transition",
    "render",
    "slack_payload",
]
