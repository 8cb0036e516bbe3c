"""Alert notifications: payloads (generic JSON, Slack, Alertmanager), signing and delivery.

Outbound: ``notice_from_transition`` turns an engine ``Transition`` plus the run's context into
an ``AlertNotice``; ``render`` formats it as the raw body of one of three payload formats;
``deliver`` POSTs the body with an injected ``httpx.Client``, retrying connection errors, 5xx
and 429 with exponential backoff and jitter (honouring ``Retry-After``), and returns one
``DeliveryAttempt`` per try for the caller to store. Nothing here touches the database.

Signing: with a per-webhook secret every request carries

    X-Rankguard-Timestamp: <unix seconds>
    X-Rankguard-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>." + raw body)>

The timestamp is inside the signed string, so a receiver that rejects timestamps older than a
few minutes (``verify_signature(..., tolerance_s=300)``) cannot be fed a captured request
again later. Each retry is signed afresh with its own timestamp.

Inbound: ``parse_inbound`` reads an Alertmanager or Grafana (unified or legacy) webhook payload
into ``InboundAlert`` rows; ``inbound_command`` turns a firing one that names a run
(label ``rankguard_run`` or ``run``) and asks for MSign (label or annotation
``rankguard_action=msign``) into a command body.
"""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import json
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any

import httpx

from rankguard.server.alert_engine import (
    MSIGN_ENGINES,
    MSIGN_GROUPS,
    Transition,
    encode_float,
)

SIGNATURE_HEADER = "X-Rankguard-Signature"
TIMESTAMP_HEADER = "X-Rankguard-Timestamp"
USER_AGENT = "rankguard-webhook/1"
# Alertmanager's zero time: what it sends as endsAt of an alert that has not ended.
ZERO_TIME = "0001-01-01T00:00:00Z"


class PayloadFormat(str, Enum):
    JSON = "json"
    SLACK = "slack"
    ALERTMANAGER = "alertmanager"


@dataclass(frozen=True)
class NoticeTarget:
    target: str
    value: float
    since: int | None


@dataclass(frozen=True)
class AlertNotice:
    """Everything a payload needs about one alert; independent of the engine and the database."""

    alert_id: str
    status: str  # "firing" | "resolved"
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
        if self.status not in ("firing", "resolved"):
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
    """Build a notice; ``base_url`` (the dashboard's, e.g. ``https://rg.example``) adds links."""
    links: dict[str, str] = {}
    if base_url:
        root = base_url.rstrip("/")
        links = {
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
        suggested_action=transition.suggested_action.replace("{run_id}", run_id),
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


# -- payload formats --------------------------------------------------------------------------


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
    "info": ":information_source:",
    "warning": ":warning:",
    "critical": ":rotating_light:",
}


def slack_payload(notice: AlertNotice) -> dict[str, Any]:
    """A Slack incoming-webhook body: ``text`` (fallback, notifications) plus Block Kit blocks."""
    run = notice.run_name or notice.run_id
    if notice.status == "firing":
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
                {"type": "mrkdwn", "text": f"*Severity*\n{notice.severity}"},
            ],
        },
    ]
    if lines:
        text = "*Targets (earliest first)*\n" + "\n".join(lines)
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": text[:3000]}})
    if notice.status == "firing":
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
                "endsAt": (_iso(n.ends_at) or ZERO_TIME) if n.status == "resolved" else ZERO_TIME,
                "generatorURL": n.links.get("alert") or n.links.get("run", ""),
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
    status = "firing" if any(a["status"] == "firing" for a in alerts) else "resolved"
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


def render(fmt: PayloadFormat | str, notice: AlertNotice, **options: Any) -> bytes:
    """The raw request body of ``notice`` in format ``fmt`` (UTF-8 JSON, no NaN literals)."""
    try:
        fmt = PayloadFormat(fmt)
    except ValueError:
        valid = ", ".join(repr(f.value) for f in PayloadFormat)
        raise ValueError(f"format={fmt!r} is not valid; use one of {valid}") from None
    if fmt is PayloadFormat.JSON:
        payload = generic_payload(notice)
    elif fmt is PayloadFormat.SLACK:
        payload = slack_payload(notice)
    else:
        payload = alertmanager_payload(notice, **options)
    return json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()


# -- signing ----------------------------------------------------------------------------------


def sign(body: bytes, secret: str, timestamp: int) -> str:
    """``sha256=<hex>`` of HMAC-SHA256(secret, ``f"{timestamp}."`` + body)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def signature_headers(body: bytes, secret: str, timestamp: int) -> dict[str, str]:
    return {TIMESTAMP_HEADER: str(timestamp), SIGNATURE_HEADER: sign(body, secret, timestamp)}


def verify_signature(
    body: bytes,
    secret: str,
    signature: str | None,
    timestamp: str | None,
    *,
    now: float | None = None,
    tolerance_s: float = 300.0,
) -> bool:
    """Receiver side: the signature matches and the timestamp is within ``tolerance_s`` of now."""
    if not signature or not timestamp:
        return False
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance_s:
        return False
    return hmac.compare_digest(sign(body, secret, ts), signature)


# -- delivery ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries: ``max_attempts`` tries and ``max_total_s`` seconds in all.

    The n-th retry waits ``min(max_delay_s, base_delay_s * 2**(n-1))`` scaled by a random factor
    in ``[1 - jitter, 1]`` (so many webhooks failing together do not retry in lockstep), or the
    server's ``Retry-After`` when it gives one (a longer ``Retry-After`` than ``max_delay_s``
    ends the delivery rather than retrying early).
    """

    max_attempts: int = 5
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    max_total_s: float = 60.0
    jitter: float = 0.5
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts={self.max_attempts!r} is not valid; use >= 1")
        for name in ("base_delay_s", "max_delay_s", "max_total_s", "timeout_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} is not valid; use >= 0")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter={self.jitter!r} is not valid; use a number in [0, 1]")

    def backoff(self, retry: int, rng: Callable[[], float]) -> float:
        delay = min(self.max_delay_s, self.base_delay_s * 2.0 ** (retry - 1))
        return float(delay * (1.0 - self.jitter * rng()))


@dataclass(frozen=True)
class DeliveryAttempt:
    """One try: what the caller stores in its delivery log."""

    attempt: int
    url: str
    started_at: float  # unix seconds
    duration_s: float
    status_code: int | None
    error: str | None
    outcome: str  # "delivered" | "retry" | "failed"
    delay_s: float | None  # wait before the next try (outcome "retry")

    def to_dict(self) -> dict[str, Any]:
        return {
            "attempt": self.attempt,
            "url": self.url,
            "started_at": self.started_at,
            "duration_s": self.duration_s,
            "status_code": self.status_code,
            "error": self.error,
            "outcome": self.outcome,
            "delay_s": self.delay_s,
        }


@dataclass(frozen=True)
class DeliveryResult:
    delivered: bool
    attempts: tuple[DeliveryAttempt, ...]


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return max(0.0, moment.timestamp() - now)


def _retryable_status(code: int) -> bool:
    return code == 429 or 500 <= code <= 599


def deliver(
    client: httpx.Client,
    url: str,
    body: bytes,
    *,
    secret: str | None = None,
    headers: Mapping[str, str] | None = None,
    policy: RetryPolicy | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.time,
    rng: Callable[[], float] = random.random,
) -> DeliveryResult:
    """POST ``body`` to ``url`` until a 2xx, a non-retryable answer or the policy's bounds.

    Retried: connection-level errors (``httpx.TransportError``), 5xx and 429. Not retried: other
    statuses (4xx mean the receiver refuses this body; 3xx are not followed). ``sleep``,
    ``clock`` and ``rng`` are injectable for tests.
    """
    policy = policy or RetryPolicy()
    attempts: list[DeliveryAttempt] = []
    begin = clock()
    for attempt in range(1, policy.max_attempts + 1):
        started = clock()
        request_headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        request_headers.update(headers or {})
        if secret:
            request_headers.update(signature_headers(body, secret, int(started)))
        status: int | None = None
        error: str | None = None
        retry_after: float | None = None
        retryable = False
        try:
            response = client.post(
                url, content=body, headers=request_headers, timeout=policy.timeout_s
            )
            status = response.status_code
            if 200 <= status <= 299:
                attempts.append(
                    DeliveryAttempt(
                        attempt, url, started, clock() - started, status, None, "delivered", None
                    )
                )
                return DeliveryResult(True, tuple(attempts))
            retryable = _retryable_status(status)
            error = f"HTTP {status}: {response.text[:200]}"
            retry_after = parse_retry_after(response.headers.get("Retry-After"), now=clock())
        except httpx.TransportError as exc:
            retryable = True
            error = f"{type(exc).__name__}: {exc}"
        except httpx.HTTPError as exc:  # e.g. an invalid URL: trying again will not help
            error = f"{type(exc).__name__}: {exc}"
        duration = clock() - started
        delay: float | None = None
        if retryable and attempt < policy.max_attempts:
            # Retry-After is honoured, never shortened: a wait beyond max_delay_s gives up.
            delay = policy.backoff(attempt, rng) if retry_after is None else retry_after
            if delay > policy.max_delay_s or clock() - begin + delay > policy.max_total_s:
                delay = None  # too long a wait, or past the total time budget
        if delay is None:
            attempts.append(
                DeliveryAttempt(attempt, url, started, duration, status, error, "failed", None)
            )
            return DeliveryResult(False, tuple(attempts))
        attempts.append(
            DeliveryAttempt(attempt, url, started, duration, status, error, "retry", delay)
        )
        sleep(delay)
    raise AssertionError("unreachable: the last attempt always returns")  # pragma: no cover


# -- inbound ----------------------------------------------------------------------------------


class InboundPayloadError(ValueError):
    """An inbound webhook body is not an Alertmanager or Grafana payload."""


@dataclass(frozen=True)
class InboundAlert:
    alertname: str
    status: str  # "firing" | "resolved" (legacy Grafana states are mapped; others kept as is)
    labels: Mapping[str, str]
    annotations: Mapping[str, str] = field(default_factory=dict)
    fingerprint: str | None = None

    @property
    def run_id(self) -> str | None:
        return self.labels.get("rankguard_run") or self.labels.get("run") or None

    @property
    def wants_msign(self) -> bool:
        action = self.labels.get("rankguard_action") or self.annotations.get("rankguard_action")
        return (action or "").strip().lower() == "msign"


def _str_map(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InboundPayloadError(f"{where}={value!r} is not valid; use an object of strings")
    return {str(k): str(v) for k, v in value.items()}


_LEGACY_GRAFANA_STATUS = {"alerting": "firing", "ok": "resolved"}


def parse_inbound(payload: Any) -> list[InboundAlert]:
    """Alerts in an Alertmanager (v4) or Grafana webhook body (unified alerting, or legacy).

    Alertmanager and Grafana unified alerting share the shape ``{"alerts": [{"status",
    "labels", "annotations", ...}], ...}``; the alert's own labels are merged over the
    payload's ``commonLabels``. Legacy Grafana (``{"ruleName", "state", "tags"}``) gives one
    alert named by ``ruleName`` with ``tags`` as labels.
    """
    if not isinstance(payload, Mapping):
        raise InboundPayloadError(f"payload={type(payload).__name__} is not valid; use an object")
    if "alerts" in payload:
        raw_alerts = payload["alerts"]
        if not isinstance(raw_alerts, list):
            raise InboundPayloadError(f"alerts={raw_alerts!r} is not valid; use a list")
        common = _str_map(payload.get("commonLabels"), "commonLabels")
        common_ann = _str_map(payload.get("commonAnnotations"), "commonAnnotations")
        out = []
        for i, raw in enumerate(raw_alerts):
            if not isinstance(raw, Mapping):
                raise InboundPayloadError(f"alerts[{i}]={raw!r} is not valid; use an object")
            labels = {**common, **_str_map(raw.get("labels"), f"alerts[{i}].labels")}
            annotations = {
                **common_ann,
                **_str_map(raw.get("annotations"), f"alerts[{i}].annotations"),
            }
            status = str(raw.get("status") or payload.get("status") or "")
            if status not in ("firing", "resolved"):
                raise InboundPayloadError(
                    f"alerts[{i}].status={status!r} is not valid; use 'firing' or 'resolved'"
                )
            name = labels.get("alertname")
            if not name:
                raise InboundPayloadError(f"alerts[{i}].labels.alertname is missing")
            out.append(
                InboundAlert(name, status, labels, annotations, raw.get("fingerprint") or None)
            )
        return out
    if "ruleName" in payload and "state" in payload:
        state = str(payload["state"])
        labels = _str_map(payload.get("tags"), "tags")
        labels.setdefault("alertname", str(payload["ruleName"]))
        annotations = {"message": str(payload.get("message") or "")}
        status = _LEGACY_GRAFANA_STATUS.get(state, state)
        return [InboundAlert(str(payload["ruleName"]), status, labels, annotations, None)]
    raise InboundPayloadError(
        "payload is not valid: expected an Alertmanager/Grafana body with 'alerts', or a "
        "legacy Grafana body with 'ruleName' and 'state'"
    )


def inbound_command(alert: InboundAlert) -> dict[str, Any] | None:
    """The command body a firing inbound alert orders, or None when it orders nothing.

    Optional labels/annotations ``rankguard_targets`` (``attention``, ``all_2d`` or comma-separated
    globs) and ``rankguard_engine`` (``svd``, ``newton_schulz``) shape the MSign command.
    """
    if alert.status != "firing" or not alert.wants_msign or not alert.run_id:
        return None

    def pick(key: str, default: str) -> str:
        return (alert.labels.get(key) or alert.annotations.get(key) or default).strip()

    engine = pick("rankguard_engine", "svd")
    if engine not in MSIGN_ENGINES:
        raise InboundPayloadError(
            f"rankguard_engine={engine!r} is not valid; use one of {MSIGN_ENGINES}"
        )
    raw_targets = pick("rankguard_targets", "all_2d")
    targets: str | list[str]
    if raw_targets in MSIGN_GROUPS:
        targets = raw_targets
    else:
        targets = [t.strip() for t in raw_targets.split(",") if t.strip()]
        if not targets:
            raise InboundPayloadError(
                f"rankguard_targets={raw_targets!r} is not valid; use one of {MSIGN_GROUPS} "
                "or comma-separated globs"
            )
    return {"run_id": alert.run_id, "kind": "msign", "args": {"targets": targets, "engine": engine}}


__all__ = [
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "AlertNotice",
    "DeliveryAttempt",
    "DeliveryResult",
    "InboundAlert",
    "InboundPayloadError",
    "NoticeTarget",
    "PayloadFormat",
    "RetryPolicy",
    "alertmanager_payload",
    "deliver",
    "fingerprint",
    "generic_payload",
    "inbound_command",
    "notice_from_transition",
    "parse_inbound",
    "parse_retry_after",
    "render",
    "sign",
    "signature_headers",
    "verify_signature",
]
