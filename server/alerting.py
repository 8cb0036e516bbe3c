"""Alert rules on ingest: the glue between the pure engine (``alert_engine``), the database
and the delivery worker.

Per ingest request (``Alerting.on_ingest``, inside the ingest transaction):

1. load the run's rules whose quantity appears in the batch, with a row lock
   (``SELECT ... FOR UPDATE`` on PostgreSQL, so two workers ingesting into one run take turns
   on a rule's state; SQLite serialises writers already) -- one query per batch;
2. evaluate each with the batch's rank-0 samples of its quantity (the engine orders them by
   step and ignores replays), and write back the state only when it changed -- one UPDATE
   per (rule, run) per batch, never a query per point;
3. for each transition: an ``alerts`` row (firing creates, resolved closes it), an ``alert``
   event whose payload is ``Transition.to_dict()`` (the dashboard's markers and tables read
   those), the command the engine ordered (MSign or a learning-rate backoff; its rate limit
   lives in the state), and one
   pending ``webhook_deliveries`` row per enabled webhook of the project;
4. after the commit, ``after_commit`` wakes the delivery worker: ingest never waits on a
   webhook.

The whole evaluation runs in a SAVEPOINT: should it fail, the points are still stored and
the failure is logged (a monitor must not lose data because a rule broke).

Rules are rows of ``alert_rules``: ``run_id`` NULL is a project rule (a template), otherwise
the rule of one run with its engine state. Every new run gets its rules at creation (a mapper
event on ``Run`` inserts them in the same transaction, whichever code path creates the run):
the project's rules when it has any, else the default pack (``rule_pack.default_rules``),
specialised with the run's parameter names (``rule_pack.specialise``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import (
    ColumnElement,
    Connection,
    Table,
    bindparam,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.orm.attributes import set_committed_value

from rankguard.server import notifications, rule_pack, storage
from rankguard.server.alert_engine import (
    Rule,
    RuleError,
    Transition,
    TransitionKind,
    evaluate_steps,
    is_firing,
    new_state,
)
from rankguard.server.alert_engine import flush as flush_buffered
from rankguard.server.config import Settings
from rankguard.server.db import utcnow
from rankguard.server.models import (
    Alert,
    AlertRule,
    AlertState,
    Delivery,
    DeliveryOutcome,
    Project,
    Run,
    RunStatus,
    Webhook,
)

if TYPE_CHECKING:
    from rankguard.server.delivery import DeliveryWorker
    from rankguard.server.exposition import Metrics

logger = logging.getLogger("rankguard.server.alerting")

# The Core table, for the statements that bypass the ORM (installation at run creation, the
# one-statement state UPDATE on ingest).
_RULES_TABLE = cast(Table, AlertRule.__table__)
SEVERITY_ORDER = {"info": 0, "warning": 1, "critical": 2}
# Fields whose edit does not change what the condition computes: the state is kept.
_STATE_NEUTRAL = frozenset(
    {"enabled", "notify", "msign", "lr_backoff", "description", "runbook", "severity", "name"}
)


# --- rules: installation at run creation ---------------------------------------------------


def run_rule_rows(
    project_rules: Sequence[Mapping[str, Any]], parameter_names: Sequence[str]
) -> list[Rule]:
    """The rules a new run gets: the project's (rule dicts) if any, else the default pack;
    either way specialised with the run's parameter names."""
    if project_rules:
        rules = [Rule.from_dict(r) for r in project_rules]
    else:
        rules = rule_pack.default_rules()
    return rule_pack.specialise(rules, parameter_names)


@event.listens_for(Run, "after_insert")
def _install_run_rules(_mapper: Mapper[Run], connection: Connection, run: Run) -> None:
    table = _RULES_TABLE
    project_rules = [
        row[0]
        for row in connection.execute(
            select(table.c.rule)
            .where(table.c.project_id == run.project_id, table.c.run_id.is_(None))
            .order_by(table.c.id)
        )
    ]
    names = [str(p.get("name", "")) for p in (run.parameters or []) if isinstance(p, Mapping)]
    try:
        rules = run_rule_rows(project_rules, names)
    except RuleError:  # a stored project rule no longer validates: fall back to the pack
        logger.exception(
            "project %s has an invalid rule; run %s gets the defaults", run.project_id, run.id
        )
        rules = run_rule_rows([], names)
    now = utcnow()
    rows = [
        {
            "project_id": run.project_id,
            "run_id": run.id,
            "name": r.name,
            "quantity": r.quantity,
            "rule": r.to_dict(),
            "state": None,
            "created_at": now,
            "updated_at": now,
        }
        for r in rules
    ]
    if rows:
        connection.execute(insert(table), rows)


# --- rules: CRUD ---------------------------------------------------------------------------


def list_rules(
    *, session: Session, project_id: int | None, run_id: str | None, project_level: bool
) -> list[AlertRule]:
    query = select(AlertRule)
    if project_id is not None:
        query = query.where(AlertRule.project_id == project_id)
    if run_id is not None:
        query = query.where(AlertRule.run_id == run_id)
    elif project_level:
        query = query.where(AlertRule.run_id.is_(None))
    return list(session.scalars(query.order_by(AlertRule.id)))


def get_rule(*, session: Session, rule_id: int, project_id: int | None) -> AlertRule | None:
    row = session.get(AlertRule, rule_id)
    if row is None or (project_id is not None and row.project_id != project_id):
        return None
    return row


def create_rule(*, session: Session, project_id: int, run_id: str | None, rule: Rule) -> AlertRule:
    now = utcnow()
    row = AlertRule(
        project_id=project_id,
        run_id=run_id,
        name=rule.name,
        quantity=rule.quantity,
        rule=rule.to_dict(),
        state=None,
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    session.flush()
    return row


def update_rule(*, session: Session, row: AlertRule, rule: Rule) -> AlertRule:
    """Replace a rule. When its condition changed the engine state restarts (keeping the
    episode count and the MSign rate-limit history), and a firing alert is closed."""
    old = row.rule
    new = rule.to_dict()
    changed = {k for k in new if new.get(k) != old.get(k)}
    if changed - _STATE_NEUTRAL and row.state is not None:
        if is_firing(row.state):
            _close_alert_on_edit(session=session, row=row)
        fresh = new_state()
        fresh["alert"]["episode"] = row.state["alert"]["episode"]
        fresh["msign_steps"] = list(row.state.get("msign_steps", []))
        row.state = fresh
    row.rule = new
    row.name = rule.name
    row.quantity = rule.quantity
    row.updated_at = utcnow()
    return row


def _close_alert_on_edit(*, session: Session, row: AlertRule) -> None:
    alert = session.scalars(
        select(Alert).where(Alert.rule_id == row.id, Alert.state == AlertState.FIRING.value)
    ).first()
    if alert is not None:
        alert.state = AlertState.RESOLVED.value
        alert.resolved_at = utcnow()
        alert.resolved_message = "closed: the rule's condition was edited (its state restarted)"


def rule_firing(row: AlertRule) -> bool:
    return is_firing(row.state)


# --- alerts --------------------------------------------------------------------------------


def list_alerts(
    *,
    session: Session,
    run_id: str | None = None,
    project_id: int | None = None,
    state: AlertState | None = None,
    limit: int = 1000,
) -> list[Alert]:
    query = select(Alert)
    if run_id is not None:
        query = query.where(Alert.run_id == run_id)
    if project_id is not None:
        query = query.join(Run, Run.id == Alert.run_id).where(Run.project_id == project_id)
    if state is not None:
        query = query.where(Alert.state == state.value)
    return list(session.scalars(query.order_by(Alert.created_at.desc(), Alert.id).limit(limit)))


def get_alert(*, session: Session, alert_id: str, project_id: int | None) -> Alert | None:
    alert = session.get(Alert, alert_id)
    if alert is None:
        return None
    if project_id is not None:
        run = session.get(Run, alert.run_id)
        if run is None or run.project_id != project_id:
            return None
    return alert


# --- evaluation on ingest ------------------------------------------------------------------


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
        fired: list[tuple[AlertRule, Transition]] = []
        try:
            with session.begin_nested():
                for row in rows:
                    try:
                        state, transitions = flush_buffered(self._rule(row), row.state)
                    except RuleError:
                        logger.exception("rule %s (%s) of run %s skipped", row.id, row.name, run.id)
                        continue
                    row.state = state
                    fired.extend((row, t) for t in transitions)
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
        fired: list[tuple[AlertRule, Transition]] = []
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
            fired.extend((row, t) for t in transitions)
        if changed:
            table = _RULES_TABLE
            session.execute(
                update(table)
                .where(table.c.id == bindparam("row_id"))
                .values(state=bindparam("new_state")),
                changed,
            )
        if not fired:
            return IngestOutcome()
        return self._record(session=session, run=run, fired=fired)

    def _record(
        self, *, session: Session, run: Run, fired: list[tuple[AlertRule, Transition]]
    ) -> IngestOutcome:
        outcome = IngestOutcome(transitions=len(fired))
        webhooks: list[Webhook] | None = None
        project_name: str | None = None
        for row, tr in fired:
            alert = self._apply(session=session, run=run, row=row, tr=tr, outcome=outcome)
            if tr.kind is TransitionKind.REPEAT:
                continue  # a repeated order: its command's ack is the event, no notification
            payload = {**tr.to_dict(), "alert_id": alert.id if alert else None}
            if alert is not None and alert.command_id and tr.kind is TransitionKind.FIRING:
                payload["command_id"] = alert.command_id
            payload["suggested_action"] = str(payload["suggested_action"]).replace(
                "{run_id}", run.id
            )
            storage.create_event(
                session=session, run_id=run.id, kind="alert", step=tr.step, payload=payload
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
                project = session.get(Project, run.project_id)
                project_name = project.name if project is not None else None
            for hook in webhooks:
                if SEVERITY_ORDER.get(tr.severity.value, 0) < SEVERITY_ORDER.get(
                    hook.min_severity, 0
                ):
                    continue
                notice = notifications.notice_from_transition(
                    tr,
                    alert_id=alert.id,
                    run_id=run.id,
                    run_name=run.name,
                    project=project_name,
                    starts_at=alert.created_at,
                    ends_at=alert.resolved_at,
                    base_url=self.settings.public_base_url,
                )
                options: dict[str, Any] = {}
                if hook.format == notifications.PayloadFormat.ALERTMANAGER.value:
                    options["external_url"] = self.settings.public_base_url or ""
                body = notifications.render(hook.format, notice, **options)
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
                outcome.deliveries += 1
        return outcome

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
        now = utcnow()
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
                suggested_action=tr.suggested_action.replace("{run_id}", run.id),
                command_suppressed=tr.command_suppressed,
                created_at=now,
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
            episode.resolved_at = now
            episode.resolved_message = tr.message
        return episode

    def _queue_command(
        self, *, session: Session, run: Run, alert: Alert, tr: Transition, outcome: IngestOutcome
    ) -> None:
        """Queues the command a transition ordered (none for a finished run)."""
        if tr.command is None or run.status != RunStatus.RUNNING.value:
            return
        command = storage.enqueue_command(
            session=session,
            run_id=run.id,
            kind=str(tr.command["kind"]),
            args=dict(tr.command["args"]),
            created_by=f"alert:{alert.id}",
            ttl_s=self.settings.command_ttl_s,
        )
        alert.command_id = command.id
        outcome.commands.append(command.id)

    def after_commit(self, outcome: IngestOutcome, *, inserted: int = 0) -> None:
        """After the ingest commit: count the points, wake the delivery worker."""
        if self.metrics is not None and inserted:
            self.metrics.points_ingested.inc(inserted)
        if outcome.deliveries and self.worker is not None:
            self.worker.wake()


def firing_counts(*, session: Session, run_ids: Sequence[str]) -> dict[tuple[str, str], int]:
    """(run_id, severity) -> number of firing alerts, for the given runs."""
    if not run_ids:
        return {}
    rows = session.execute(
        select(Alert.run_id, Alert.severity, func.count())
        .where(Alert.run_id.in_(list(run_ids)), Alert.state == AlertState.FIRING.value)
        .group_by(Alert.run_id, Alert.severity)
    )
    return {(r, s): int(n) for r, s, n in rows}
