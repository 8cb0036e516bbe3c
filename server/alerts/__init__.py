"""Alert rules evaluated on ingest.

The pure engine (standard library only, so a worker, a benchmark or a test drives it without a
framework; its state is a JSON-safe dict the caller stores)::

    rules.py        Rule, its conditions, aggregations and actions, validated at construction
    state.py        the (rule, run) state, its copy for evaluation and its migration
    checks.py       the per-sample check and latch, and the fused fast path tied to them
    buffer.py       samples grouped by step, merged into the pending buffer, step readiness
    engine.py       evaluate / evaluate_steps / flush: steps judged in order
    transitions.py  Transition, TargetHit and their messages
    pack.py         the default rules every new run gets
    margin.py       how far a rule is from firing, in its own terms (per condition)

Around it: ``runbook.py`` (suggested-action text, which knows the HTTP API), ``storage.alerts``
(rule rows: CRUD, installation at run registration, alert reads) and ``service.py`` (the
ingest hook: evaluation in the ingest transaction, alerts, events, commands, webhooks).

Public API::

    rule = Rule(name=..., quantity=..., condition=Condition.BELOW, threshold=0.1, ...)
    state = new_state()                                   # or None
    state, transitions = evaluate(rule, state, samples)   # samples: (target, step, value)
    state, transitions = evaluate_steps(rule, state, {step: {target: value}})  # pre-grouped
    state, transitions = flush(rule, state)               # run finished: evaluate what waits

``evaluate`` never mutates the state it is given and never raises on data (NaN, ±Inf, replays,
out-of-order steps, unknown targets); it raises ``RuleError`` only for a malformed state or a
malformed sample (a step that is not an integer, a value that is not a number).
"""

from rankguard.server.alerts.engine import (
    DEFAULT_MAX_PENDING_STEPS,
    evaluate,
    evaluate_steps,
    flush,
)
from rankguard.server.alerts.rules import (
    BOOLEAN_AGGREGATIONS,
    Aggregation,
    Condition,
    LRBackoffAction,
    MSignAction,
    QKClipAction,
    RollbackAction,
    Rule,
    RuleError,
)
from rankguard.server.alerts.state import STATE_VERSION, is_firing, new_state
from rankguard.server.alerts.transitions import TargetHit, Transition, TransitionKind

__all__ = [
    "BOOLEAN_AGGREGATIONS",
    "DEFAULT_MAX_PENDING_STEPS",
    "STATE_VERSION",
    "Aggregation",
    "Condition",
    "LRBackoffAction",
    "MSignAction",
    "QKClipAction",
    "RollbackAction",
    "Rule",
    "RuleError",
    "TargetHit",
    "Transition",
    "TransitionKind",
    "evaluate",
    "evaluate_steps",
    "flush",
    "is_firing",
    "new_state",
]
