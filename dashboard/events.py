"""A run's events as the dashboard shows them: markers on the figures (``marker_events``),
the alerts table with what tripped and the suggested action (``alert_rows``) and the
timeline of every event (``timeline_rows``). Pure: events in, rows out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rankguard.server.models import Event


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return str(value)


def _generic(kind: str, payload: Mapping[str, Any]) -> str:
    """Any event kind: its message, else its scalar fields as key=value."""
    if payload.get("message") or payload.get("label"):
        return str(payload.get("message") or payload.get("label"))
    fields = [
        f"{k}={_value(v)}" for k, v in payload.items() if not isinstance(v, (dict, type(None)))
    ]
    return f"{kind}: " + ", ".join(fields[:8]) if fields else kind


def _rollback(payload: Mapping[str, Any]) -> str:
    """The recovery's rollback (``restored_step``, ``skipped`` [start, end], ``lr_factor``,
    ``loss_before``, ``loss_after``)."""
    parts = [f"rolled back to step {payload.get('restored_step', '?')}"]
    skipped = payload.get("skipped")
    if isinstance(skipped, (list, tuple)) and len(skipped) == 2:
        parts.append(f"skipped data steps {skipped[0]}–{skipped[1]}")
    if payload.get("lr_factor") is not None:
        parts.append(f"LR × {_value(payload['lr_factor'])}")
    if payload.get("loss_before") is not None or payload.get("loss_after") is not None:
        before = _value(payload.get("loss_before", "?"))
        after = _value(payload.get("loss_after", "?"))
        parts.append(f"loss {before} → {after}")
    return "; ".join(parts)


def _skip_step(payload: Mapping[str, Any]) -> str:
    why = payload.get("reason") or payload.get("message") or ""
    return "skipped the optimizer step" + (f": {why}" if why else "")


def _unavailable(payload: Mapping[str, Any]) -> str:
    what = payload.get("quantity") or "a quantity"
    where = payload.get("target")
    why = payload.get("reason") or payload.get("message") or ""
    text = f"{what} unavailable" + (f" for {where}" if where else "")
    return text + (f": {why}" if why else "")


# Kinds told in their own words; every other kind is told generically (``_generic``).
DESCRIBE: dict[str, Any] = {
    "rollback": _rollback,
    "skip_step": _skip_step,
    "quantity_unavailable": _unavailable,
}


def _summary(kind: str, payload: Mapping[str, Any]) -> str:
    if kind == "alert":
        rule = payload.get("rule")
        message = payload.get("message") or payload.get("label") or ""
        head = f"{rule}: " if rule else ""
        return f"{head}{message}".strip() or "alert"
    if kind.startswith("command_") or kind == "intervention":
        what = payload.get("kind") or payload.get("command") or kind
        args = payload.get("args")
        parts = [str(what)]
        if isinstance(args, Mapping):
            parts += [f"{k}={v}" for k, v in args.items()]
        if payload.get("error"):
            parts.append(f"error: {payload['error']}")
        return " ".join(parts)
    describe = DESCRIBE.get(kind)
    if describe is not None:
        return str(describe(payload))
    return _generic(kind, payload)


def summary(event: Event) -> str:
    """One line telling what an event says."""
    return _summary(event.kind, event.payload if isinstance(event.payload, Mapping) else {})


def marker_kind(event: Event) -> str | None:
    """How an event is drawn on the figures: 'alert', 'intervention', another kind, or None
    (events without a step, e.g. a command being queued, are only in the timeline)."""
    if event.step is None or event.kind == "command_queued":
        return None
    if event.kind == "alert":
        return "alert-resolved" if event.payload.get("kind") == "resolved" else "alert"
    if event.kind in ("intervention", "command_applied"):
        return "intervention"
    return event.kind


def marker_events(events: Sequence[Event]) -> list[dict[str, Any]]:
    out = []
    for e in events:
        kind = marker_kind(e)
        if kind is not None:
            out.append(
                {"step": int(e.step or 0), "kind": kind, "label": _summary(e.kind, e.payload)}
            )
    return out


def alert_rows(events: Sequence[Event], run_id: str) -> list[dict[str, Any]]:
    """One row per alert event, newest first, with what tripped and the suggested action.
    The payload follows ``alert_engine.Transition.to_dict`` where the server writes one."""
    rows = []
    for e in events:
        if e.kind != "alert":
            continue
        p = e.payload
        targets = p.get("targets") or []
        names = [t.get("target", "") if isinstance(t, Mapping) else str(t) for t in targets]
        action = str(p.get("suggested_action") or "").replace("{run_id}", run_id)
        rows.append(
            {
                "id": e.id,
                "step": e.step,
                "state": "resolved" if p.get("kind") == "resolved" else "firing",
                "rule": p.get("rule") or "",
                "severity": p.get("severity") or "",
                "message": p.get("message") or p.get("label") or "",
                "targets": [n for n in names if n],
                "suggested_action": action,
                "alert_id": p.get("alert_id"),
                "created_at": e.created_at.isoformat(),
            }
        )
    rows.reverse()
    return rows


def timeline_rows(events: Sequence[Event]) -> list[dict[str, Any]]:
    """Every event in step order (stepless ones by time), for the alert/intervention table."""
    rows = [
        {
            "id": e.id,
            "step": e.step,
            "kind": e.kind,
            "marker": marker_kind(e) or "",
            "summary": _summary(e.kind, e.payload),
            "suggested_action": str(e.payload.get("suggested_action") or ""),
            "created_at": e.created_at.isoformat(),
        }
        for e in events
    ]
    return rows
