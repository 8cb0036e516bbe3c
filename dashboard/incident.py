"""One incident (an alert episode, one row of ``alerts``): what fired, the targets ordered by
how early they moved, every series involved at full step resolution around it, the commands
that followed with the values just before and after each, the recovery events, and the
outcome (resolved / rolled back / failed, or ongoing).

The window: from a little before the trouble began (``first_step``) to a little after it
ended (resolved, or the run's last step), at most ``MAX_SPAN`` steps, every point in it (the
flight recorder's window included: it arrives as ordinary points).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.orm import Session

from rankguard.dashboard.events import marker_kind, summary
from rankguard.dashboard.figures.common import figure_json
from rankguard.dashboard.figures.lines import line_figure
from rankguard.server.exposition import LOW_IS_WORSE
from rankguard.server.models import Alert, Command, Event, Run
from rankguard.server.presenters import run_public
from rankguard.server.storage.alerts import get_rule
from rankguard.server.storage.events import list_events
from rankguard.server.storage.incidents import (
    around,
    following_commands,
    series_rows,
    window_points,
)
from rankguard.server.storage.points import SeriesRow
from rankguard.server.storage.runs import project_names
from rankguard.server.vocab import AlertState, RunStatus

MAX_SPAN = 5000  # steps of the window at most (every point of every series in it)
MAX_TARGETS = 24  # the alert's targets drawn at most (earliest movers first)
CONTEXT = ("loss", "grad_norm")  # global series drawn beside the alert's quantity
TARGETS_FIGURE = "fig-incident-targets"


def window(alert: Alert, run: Run) -> tuple[int, int]:
    """[lo, hi]: the episode (first step to resolution, or the run's last step) with a margin
    on each side of its own length (20 to 500 steps), at most MAX_SPAN steps."""
    end = alert.resolved_step if alert.resolved_step is not None else run.last_step
    end = max(int(end if end is not None else alert.fired_step), alert.fired_step)
    pad = min(500, max(20, alert.fired_step - alert.first_step))
    lo = max(0, alert.first_step - pad)
    return lo, min(end + pad, lo + MAX_SPAN)


def ordered_targets(targets: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The alert's targets by how early each started to trip (never-tripped ones last)."""
    rows = [dict(t) for t in targets if isinstance(t, Mapping)]
    rows.sort(key=lambda t: (t.get("since") is None, t.get("since") or 0, str(t.get("target"))))
    return rows


def outcome(
    alert: Alert, run: Run, events: Sequence[Event], commands: Sequence[Command]
) -> dict[str, str]:
    """How the episode ended: ``rolled back`` (a rollback during it), ``resolved``,
    ``failed`` (the run ended while it fired), or ``ongoing``."""
    end = alert.resolved_step if alert.resolved_step is not None else math.inf
    rollbacks = [e for e in events if e.kind == "rollback" and e.step is not None
                 and alert.first_step <= e.step <= end]  # fmt: skip
    failed = [c for c in commands if c.state in ("failed", "expired")]
    notes = [f"{c.kind} {c.id[:8]} {c.state}" for c in failed]
    if rollbacks:
        state = "rolled back"
        notes.insert(0, summary(rollbacks[-1]))
        if alert.state == AlertState.RESOLVED.value:
            notes.append(f"then resolved at step {alert.resolved_step}")
    elif alert.state == AlertState.RESOLVED.value:
        state = "resolved"
        notes.insert(0, alert.resolved_message or f"resolved at step {alert.resolved_step}")
    elif run.status != RunStatus.RUNNING.value:
        state = "failed"
        notes.insert(0, f"the run {run.status} while the alert was firing")
    else:
        state = "ongoing"
        notes.insert(0, "still firing")
    return {"state": state, "detail": "; ".join(notes)}


def _worst(quantity: str, values: Sequence[float]) -> float | None:
    """The alert's targets summarised in the danger direction (NaN first)."""
    if not values:
        return None
    if any(math.isnan(v) for v in values):
        return math.nan
    return min(values) if quantity in LOW_IS_WORSE else max(values)


def _before_after(
    session: Session, step: int, targets: Sequence[SeriesRow], context: Sequence[SeriesRow]
) -> list[dict[str, Any]]:
    """What a command at ``step`` changed: the worst of the alert's targets, and each context
    series, at their last sample at or before it and their first sample after it."""
    near = around(session, [*targets, *context], step)
    rows = []
    if targets:
        quantity = targets[0].quantity
        sides = [[near[s.id][i] for s in targets] for i in (0, 1)]
        values = [[x[1] for x in side if x is not None] for side in sides]
        steps = [[x[0] for x in side if x is not None] for side in sides]
        rows.append({
            "what": f"{quantity} ({'min' if quantity in LOW_IS_WORSE else 'max'} over "
                    f"{len(targets)} alert target(s))",
            "before": _worst(quantity, values[0]), "after": _worst(quantity, values[1]),
            "before_step": max(steps[0], default=None), "after_step": min(steps[1], default=None),
        })  # fmt: skip
    for s in context:
        before, after = near[s.id]
        rows.append({
            "what": s.quantity,
            "before": before[1] if before else None, "after": after[1] if after else None,
            "before_step": before[0] if before else None, "after_step": after[0] if after else None,
        })  # fmt: skip
    return rows


def _result_summary(result: Mapping[str, Any] | None) -> str:
    """The probe's acknowledgement in a line: an MSign/PSS rewrite's stable ranks before and
    after (median over matrices), else its scalar fields."""
    if not result:
        return ""
    matrices = result.get("matrices")
    if isinstance(matrices, list) and matrices:
        before = sorted(float(m.get("stable_rank_before", math.nan)) for m in matrices)
        after = sorted(float(m.get("stable_rank_after", math.nan)) for m in matrices)
        mid = len(before) // 2
        return (f"{len(matrices)} matrices; median stable rank {before[mid]:.4g} → "
                f"{after[mid]:.4g}")  # fmt: skip
    scalars = [f"{k}={v}" for k, v in result.items() if isinstance(v, (int, float, str))]
    return ", ".join(scalars[:8])


def _command_row(
    session: Session, c: Command, targets: Sequence[SeriesRow], context: Sequence[SeriesRow]
) -> dict[str, Any]:
    step = c.applied_step if c.state == "applied" else None
    return {
        "id": c.id,
        "kind": c.kind,
        "args": c.args,
        "state": c.state,
        "created_by": c.created_by,
        "ordered_by_alert": c.created_by.startswith("alert:"),
        "created_at": c.created_at.isoformat(),
        "applied_step": c.applied_step,
        "error": c.error,
        "result": _result_summary(c.result),
        "before_after": [] if step is None else _before_after(session, step, targets, context),
    }


def _event_row(e: Event) -> dict[str, Any]:
    return {"id": e.id, "step": e.step, "kind": e.kind, "summary": summary(e),
            "payload": e.payload, "created_at": e.created_at.isoformat()}  # fmt: skip


def _markers(alert: Alert, events: Sequence[Event]) -> list[dict[str, Any]]:
    marks = [{"step": alert.first_step, "kind": "onset", "label": "trouble began"}]
    for e in events:
        kind = marker_kind(e)
        if kind is not None:
            marks.append({"step": int(e.step or 0), "kind": kind, "label": summary(e)})
    return marks


def payload(session: Session, run: Run, alert: Alert) -> dict[str, Any]:
    """Everything the incident page shows."""
    lo, hi = window(alert, run)
    targets = ordered_targets(alert.targets)
    drawn = [str(t.get("target")) for t in targets[:MAX_TARGETS]]
    target_rows = series_rows(session, run.id, alert.quantity, drawn)
    context = [r for q in CONTEXT if q != alert.quantity
               for r in series_rows(session, run.id, q, ["global"])]  # fmt: skip
    events = list_events(session=session, run_id=run.id, step_min=lo, step_max=hi, limit=10_000)
    events.sort(key=lambda e: (e.step if e.step is not None else hi + 1, e.id))
    commands = following_commands(session, run.id, alert.id, alert.created_at, alert.resolved_at)
    markers = _markers(alert, events)
    figures = [
        line_figure(window_points(session, target_rows, lo, hi), markers,
                    quantity=alert.quantity, figure_id=TARGETS_FIGURE,
                    title=f"{alert.quantity} of the alert's targets, steps {lo}–{hi}",
                    y_title=alert.quantity, emphasise=drawn[0] if drawn else None),
    ]  # fmt: skip
    for row in context:
        figures.append(
            line_figure(window_points(session, [row], lo, hi), markers, quantity=row.quantity,
                        figure_id=f"fig-incident-{row.quantity.replace('_', '-')}",
                        title=f"{row.quantity}, steps {lo}–{hi}", y_title=row.quantity)
        )  # fmt: skip
    rule = None
    if alert.rule_id is not None:
        rule = get_rule(session=session, rule_id=alert.rule_id, project_id=None)
    fired = next((e.payload for e in events if e.kind == "alert"
                  and e.payload.get("alert_id") == alert.id
                  and e.payload.get("kind") == "firing"), {})  # fmt: skip
    names = project_names(session=session, ids={run.project_id})
    return {
        "alert": {
            "id": alert.id, "rule": alert.rule_name, "episode": alert.episode,
            "quantity": alert.quantity, "severity": alert.severity, "state": alert.state,
            "first_step": alert.first_step, "fired_step": alert.fired_step,
            "resolved_step": alert.resolved_step, "message": alert.message,
            "resolved_message": alert.resolved_message,
            "suggested_action": alert.suggested_action,
            "command_suppressed": alert.command_suppressed,
            "value": fired.get("value"), "bound": fired.get("bound"),
            "created_at": alert.created_at.isoformat(),
            "resolved_at": alert.resolved_at.isoformat() if alert.resolved_at else None,
            "rule_description": (rule.rule or {}).get("description", "") if rule else "",
        },
        "run": run_public(run, names[run.project_id]).model_dump(mode="json"),
        "window": [lo, hi],
        "targets": targets,
        "targets_drawn": len(target_rows),
        "commands": [_command_row(session, c, target_rows, context) for c in commands],
        "events": [_event_row(e) for e in events if e.kind not in ("command_queued",)],
        "outcome": outcome(alert, run, events, commands),
        "figures": [{"id": f.layout.meta["figure_id"], "figure": json.loads(figure_json(f))}
                    for f in figures],
    }  # fmt: skip
