"""Alert rules on ingest: the glue between the pure engine, the database and the delivery
worker.

Per ingest request (``Alerting.on_ingest``, inside the ingest transaction):

1. load the run's rules whose quantity appears in the batch, with a row lock
   (``SELECT ... FOR UPDATE`` on PostgreSQL, so two workers ingesting into one run take turns
   on a rule's state; SQLite serialises writers already) -- one query per batch;
2. evaluate each with the batch's rank-0 samples of its quantity (the engine orders them by
   step and ignores replays), and write back the state only when it changed -- one UPDATE
   per (rule, run) per batch, never a query per point;
3. for each transition: an ``alerts`` row (firing creates, resolved closes it), an ``alert``
   event whose payload is ``Transition.to_dict()`` (the dashboard's markers and tables read
   those), the command the engine ordered (MSign, a learning-rate backoff, a rollback to
   before the alert's first step, QK-Clip; its rate limit lives in the state), and one
   pending ``webhook_deliveries`` row per enabled webhook of the project;
4. after the commit, ``after_commit`` wakes the delivery worker: ingest never waits on a
   webhook.

The whole evaluation runs in a SAVEPOINT: should it fail, the points are still stored and
the failure is logged (a monitor must not lose data because a rule broke). A run's rules are
installed when it is registered (``storage.alerts.install_run_rules``).
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from dataclasses import dataclass, field
from itertools import groupby
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, bindparam, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from rankguard.server import storage
from rankguard.server.alerts import runbook
from rankguard.server.alerts.engine import evaluate_steps, flush
from rankguard.server.alerts.rules import Rule, RuleError
from rankguard.server.alerts.transitions import Transition, TransitionKind
from rankguard.server.commands import InvalidCommand
from rankguard.server.config import Settings
from rankguard.server.db import utcnow
from rankguard.server.models import Alert, AlertRule, Delivery, Project, Run, Webhook
from rankguard.server.notify import payloads
from rankguard.server.storage.alerts import RULES_TABLE
from rankguard.server.storage.commands import RunNotRunning, enqueue_command, open_command
from rankguard.server.vocab import (
    AlertSeverity,
    AlertState,
    CommandKind,
    DeliveryOutcome,
    EventKind,
    WebhookFormat,
)

if TYPE_CHECKING:
    from rankguard.server.exposition import Metrics
    from rankguard.server.notify.worker import DeliveryWorker

logger = logging.getLogger("rankguard.server.alerts")

Fired = list[tuple[AlertRule, Transition]]


@dataclass
class IngestOutcome:
    """What an ingest's evaluation left for after the commit."""

    transitions: int = 0
    deliveries: int = 0
    commands: list[str] = field(default_factory=list)


_NOTHING = IngestOutcome()


def _rank0_by_step(
    points: storage.ColumnarPoints, quantities: set[str]
) -> dict[str, dict[int, dict[str, float]]]:
    """The batch's rank-0 samples of ``quantities`` as {quantity: {step: {target: value}}},
    the first value of a (quantity, target, step) kept, as storage keeps the first.

    Rank 0 only: under DDP rank 0 ships the weight quantities; other ranks' copies of a
    (target, step) would be a second opinion on the same sample. The batch is walked in runs
    of equal (quantity, step), as the probe writes them: each run becomes one dict at C speed
    instead of a Python statement per point (this is the hot path of ingest).
    """
    grouped: dict[str, dict[int, dict[str, float]]] = {q: {} for q in quantities}
    quantity, step, target, value = points.quantity, points.step, points.target, points.value
    if points.rank.count(0) != len(points.rank):
        keep = [i for i, r in enumerate(points.rank) if r == 0]
        quantity, step = [quantity[i] for i in keep], [step[i] for i in keep]
        target, value = [target[i] for i in keep], [value[i] for i in keep]
    start = 0
    for (q, s), group in groupby(zip(quantity, step, strict=True)):
        end = start + len(list(group))
        by_step = grouped.get(q)
        if by_step is not None:
            # Reversed, so that the first of repeated targets is the one the dict keeps.
            fresh = dict(zip(reversed(target[start:end]), reversed(value[start:end]), strict=True))
            held = by_step.get(s)
            by_step[s] = fresh if held is None else {**fresh, **held}
        start = end
    return grouped


def _locked_rules(session: Session, run: Run, which: ColumnElement[bool]) -> list[AlertRule]:
    """The run's rules that ``which`` selects, row-locked (``SELECT ... FOR UPDATE`` on
    PostgreSQL): two workers evaluating one run take turns on a rule's state."""
    return list(
        session.scalars(
            select(AlertRule)
            .where(AlertRule.run_id == run.id, which)
            .order_by(AlertRule.id)
            .with_for_update()
        )
    )


def _completed(rule: Rule, transitions: list[Transition], run: Run) -> list[Transition]:
    """The engine's transitions with their suggested action in full for this run (the default
    runbook when the rule has none, the run's id filled in)."""
    action = runbook.suggested_action(rule, run.id)
    return [dataclasses.replace(t, suggested_action=action) for t in transitions]


class Alerting:
    """The ingest hook, kept on ``app.state.alerting``."""

    def __init__(
        self,
        settings: Settings,
        *,
        worker: DeliveryWorker | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.worker = worker
        self.metrics = metrics
        # Parsed rules keyed by row id and the dict they came from: Rule.from_dict validates
        # every field, which is worth skipping on each batch.
        self._rules: dict[int, tuple[dict[str, Any], Rule]] = {}

    def _rule(self, row: AlertRule) -> Rule:
        cached = self._rules.get(row.id)
        if cached is not None and cached[0] == row.rule:
            return cached[1]
        rule = Rule.from_dict(row.rule)
        if len(self._rules) > 100_000:
            self._rules.clear()
        self._rules[row.id] = (row.rule, rule)
        return rule

    def on_ingest(
        self, *, session: Session, run: Run, points: storage.ColumnarPoints
    ) -> IngestOutcome:
        """Evaluate the run's rules on a stored batch (inside the ingest transaction)."""
        if not self.settings.alerts_enabled or not points.step:
            return _NOTHING
        rows = _locked_rules(session, run, AlertRule.quantity.in_(set(points.quantity)))
        if not rows:
            return _NOTHING
        try:
            with session.begin_nested():
                return self._evaluate(session=session, run=run, rows=rows, points=points)
        except Exception:
            logger.exception("alert evaluation failed for run %s; the points are stored", run.id)
            return _NOTHING

    def on_finish(self, *, session: Session, run: Run) -> IngestOutcome:
        """A run just finished: evaluate the steps its rules still hold back for late batches
        (the engine waits for a newer step before judging one, and no newer step will come).
        Alerts and notifications follow as on ingest; no command is queued for a finished run."""
        if not self.settings.alerts_enabled:
            return _NOTHING
        rows = _locked_rules(session, run, AlertRule.state.is_not(None))
        fired: Fired = []
        try:
            with session.begin_nested():
                for row in rows:
                    try:
                        rule = self._rule(row)
                        state, transitions = flush(rule, row.state)
                    except RuleError:
                        logger.exception("rule %s (%s) of run %s skipped", row.id, row.name, run.id)
                        continue
                    row.state = state
                    fired.extend((row, t) for t in _completed(rule, transitions, run))
                return self._record(session=session, run=run, fired=fired) if fired else _NOTHING
        except Exception:
            logger.exception("alert flush failed for run %s; the run is finished", run.id)
            return _NOTHING

    def _evaluate(
        self,
        *,
        session: Session,
        run: Run,
        rows: list[AlertRule],
        points: storage.ColumnarPoints,
    ) -> IngestOutcome:
        samples = _rank0_by_step(points, {row.quantity for row in rows})
        fired: Fired = []
        changed: list[dict[str, Any]] = []
        for row in rows:
            by_step = samples[row.quantity]
            if not by_step:
                continue
            try:
                rule = self._rule(row)
                state, transitions = evaluate_steps(rule, row.state, by_step)
            except RuleError:
                logger.exception("rule %s (%s) of run %s skipped", row.id, row.name, run.id)
                continue
            if state != row.state:
                changed.append({"row_id": row.id, "new_state": state})
                # The row in the session shows the new state without being marked dirty: the
                # UPDATE below writes it (one statement for all rules, no unit-of-work pass).
                set_committed_value(row, "state", state)
            if transitions:
                fired.extend((row, t) for t in _completed(rule, transitions, run))
        if changed:
            table = RULES_TABLE
            session.execute(
                update(table)
                .where(table.c.id == bindparam("row_id"))
                .values(state=bindparam("new_state")),
                changed,
            )
        if not fired:
            return IngestOutcome()
        return self._record(session=session, run=run, fired=fired)

    def _record(self, *, session: Session, run: Run, fired: Fired) -> IngestOutcome:
        """Each transition: its alert row and command, its event, its notifications."""
        outcome = IngestOutcome(transitions=len(fired))
        webhooks: list[Webhook] | None = None  # loaded at the first notification
        for row, tr in fired:
            alert = self._apply(session=session, run=run, row=row, tr=tr, outcome=outcome)
            if tr.kind is TransitionKind.REPEAT:
                continue  # a repeated order: its command's ack is the event, no notification
            payload = {**tr.to_dict(), "alert_id": alert.id if alert else None}
            if alert is not None and alert.command_id and tr.kind is TransitionKind.FIRING:
                payload["command_id"] = alert.command_id
            kind = EventKind.ALERT.value
            storage.create_event(
                session=session, run_id=run.id, kind=kind, step=tr.step, payload=payload
            )
            if alert is None or not tr.notify:
                continue
            if webhooks is None:
                webhooks = list(
                    session.scalars(
                        select(Webhook)
                        .where(Webhook.project_id == run.project_id, Webhook.enabled.is_(True))
                        .order_by(Webhook.id)
                    )
                )
            outcome.deliveries += self._notify(session, run, tr, alert, webhooks)
        return outcome

    def _notify(
        self, session: Session, run: Run, tr: Transition, alert: Alert, webhooks: list[Webhook]
    ) -> int:
        """One pending delivery per webhook that wants this severity; returns how many. The
        bodies are rendered now, in the ingest transaction, so the worker only sends them."""
        wanted = [
            h for h in webhooks if tr.severity.order >= AlertSeverity.order_of(h.min_severity)
        ]
        if not wanted:
            return 0
        project = session.get(Project, run.project_id)
        notice = payloads.notice_from_transition(
            tr,
            alert_id=alert.id,
            run_id=run.id,
            run_name=run.name,
            project=project.name if project is not None else None,
            starts_at=alert.created_at,
            ends_at=alert.resolved_at,
            base_url=self.settings.public_base_url,
        )
        for hook in wanted:
            options: dict[str, Any] = {}
            if hook.format == WebhookFormat.ALERTMANAGER.value:
                options["external_url"] = self.settings.public_base_url or ""
            body = payloads.render(hook.format, notice, **options)
            session.add(
                Delivery(
                    webhook_id=hook.id,
                    alert_id=alert.id,
                    status=tr.kind.value,
                    format=hook.format,
                    body=body.decode(),
                    outcome=DeliveryOutcome.PENDING.value,
                    attempts=[],
                )
            )
        return len(wanted)

    def _apply(
        self,
        *,
        session: Session,
        run: Run,
        row: AlertRule,
        tr: Transition,
        outcome: IngestOutcome,
    ) -> Alert | None:
        """Create (firing) or close (resolved) the alert row; queue the ordered command."""
        if tr.kind is TransitionKind.FIRING:
            alert = Alert(
                id=str(uuid.uuid4()),
                run_id=run.id,
                rule_id=row.id,
                rule_name=tr.rule,
                episode=tr.episode,
                quantity=tr.quantity,
                severity=tr.severity.value,
                state=AlertState.FIRING.value,
                first_step=tr.first_step,
                fired_step=tr.step,
                targets=[t.to_dict() for t in tr.targets],
                message=tr.message,
                suggested_action=tr.suggested_action,
                command_suppressed=tr.command_suppressed,
                created_at=utcnow(),
            )
            session.add(alert)
            self._queue_command(session=session, run=run, alert=alert, tr=tr, outcome=outcome)
            session.flush()
            return alert
        episode = session.scalars(
            select(Alert).where(Alert.rule_id == row.id, Alert.episode == tr.episode)
        ).one_or_none()
        if episode is None:  # closed by a rule edit, or its rows were removed
            return None
        if tr.kind is TransitionKind.REPEAT:
            self._queue_command(session=session, run=run, alert=episode, tr=tr, outcome=outcome)
            return episode
        if episode.state == AlertState.FIRING.value:
            episode.state = AlertState.RESOLVED.value
            episode.resolved_step = tr.step
            episode.resolved_at = utcnow()
            episode.resolved_message = tr.message
        return episode

    def _queue_command(
        self, *, session: Session, run: Run, alert: Alert, tr: Transition, outcome: IngestOutcome
    ) -> None:
        """Queues the command a transition ordered (none for a finished run)."""
        if tr.command is None:
            return
        args = dict(tr.command["args"])
        if tr.command["kind"] == CommandKind.ROLLBACK.value:
            # restore a state from before the trouble began; one incident per alert, so the
            # probe caps this alert's rollbacks together
            args.setdefault("before_step", tr.first_step)
            args.setdefault("incident", f"alert:{alert.id}")
            # One fault trips several rules at once (a NaN loss trips every loss rule): the
            # rollback still open already restores a state from before it; a second one
            # would throw away the steps trained since the first restore.
            pending = open_command(session=session, run_id=run.id, kind=CommandKind.ROLLBACK.value)
            if pending is not None:
                alert.command_id = pending.id
                return
        try:
            command = enqueue_command(
                session=session,
                run_id=run.id,
                kind=str(tr.command["kind"]),
                args=args,
                created_by=f"alert:{alert.id}",
                ttl_s=self.settings.command_ttl_s,
            )
        except RunNotRunning:
            return
        except InvalidCommand as exc:  # the rule validated it; the contract's bounds won
            logger.warning(
                "alert %s (rule %s) ordered an invalid command: %s", alert.id, tr.rule, exc
            )
            return
        alert.command_id = command.id
        outcome.commands.append(command.id)

    def after_commit(self, outcome: IngestOutcome, *, inserted: int = 0) -> None:
        """After the ingest commit: count the points, wake the delivery worker."""
        if self.metrics is not None and inserted:
            self.metrics.points_ingested.inc(inserted)
        if outcome.deliveries and self.worker is not None:
            self.worker.wake()
