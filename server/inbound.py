"""Inbound alert webhooks: ``parse_inbound`` reads an Alertmanager or Grafana (unified or
legacy) webhook payload into ``InboundAlert`` rows, and ``decide`` says what one of them
orders: an MSign command when it is firing, names a run (label ``rankguard_run`` or ``run``)
and asks for MSign (label or annotation ``rankguard_action=msign``), else why it orders
nothing. The route (``routes/inbound.py``) checks the run and queues the command.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rankguard.server.notify.payloads import fingerprint
from rankguard.server.vocab import AlertState, CommandKind, MSignEngine, TargetGroup, values


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
    def key(self) -> str:
        """The same for every re-send of this alert: its fingerprint, or its labels'."""
        return self.fingerprint or fingerprint(dict(self.labels))

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


_LEGACY_GRAFANA_STATUS = {"alerting": AlertState.FIRING.value, "ok": AlertState.RESOLVED.value}


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
            if status not in values(AlertState):
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
    if alert.status != AlertState.FIRING or not alert.wants_msign or not alert.run_id:
        return None

    def pick(key: str, default: str) -> str:
        return (alert.labels.get(key) or alert.annotations.get(key) or default).strip()

    engines, groups = values(MSignEngine), values(TargetGroup)
    engine = pick("rankguard_engine", MSignEngine.SVD.value)
    if engine not in engines:
        raise InboundPayloadError(f"rankguard_engine={engine!r} is not valid; use one of {engines}")
    raw_targets = pick("rankguard_targets", TargetGroup.ALL_2D.value)
    targets: str | list[str]
    if raw_targets in groups:
        targets = raw_targets
    else:
        targets = [t.strip() for t in raw_targets.split(",") if t.strip()]
        if not targets:
            raise InboundPayloadError(
                f"rankguard_targets={raw_targets!r} is not valid; use one of {groups} "
                "or comma-separated globs"
            )
    args = {"targets": targets, "engine": engine}
    return {"run_id": alert.run_id, "kind": CommandKind.MSIGN.value, "args": args}


def decide(alert: InboundAlert) -> tuple[dict[str, Any] | None, str]:
    """``(command body, "")`` when the alert orders a command, else ``(None, why not)``."""
    try:
        body = inbound_command(alert)
    except InboundPayloadError as exc:
        return None, str(exc)
    if body is not None:
        return body, ""
    if alert.status != AlertState.FIRING:
        return None, f"status is {alert.status!r}"
    if not alert.run_id:
        return None, "no run label (rankguard_run or run)"
    return None, "no rankguard_action=msign label or annotation"


__all__ = [
    "InboundAlert",
    "InboundPayloadError",
    "decide",
    "inbound_command",
    "parse_inbound",
]
