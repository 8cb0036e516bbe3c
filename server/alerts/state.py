"""The engine's state for one (rule, run): a plain JSON-safe dict the caller stores (a JSONB
column), its schema, a cheap private copy for evaluation, and the migration from version 1.

State format (version 2)::

    {"v": 2,
     "watermark": last evaluated step | null,
     "stride": last difference between evaluated steps | null,
     "expected": [targets at the last evaluated step] | "*" (every target of "series"),
     "pending": [[step, target, encoded value], ...],          # buffered, not yet evaluated
     "series": {target: per-series state},
     "aggregate": per-series state of the aggregated series (value aggregations) | null,
     "alert": {"firing", "episode", "first_step", "fired_step", "targets", "cooldown_until"},
     "msign_steps": [steps at which the rule ordered its command]}

``msign_steps`` records every command the rule ordered (MSign or a learning-rate backoff; a
rule orders one kind), for the rate limit. Per-series state holds ``n`` (finite samples seen),
the latch (``run``, ``clean``, ``tripped``, ``since``) and only the statistics the condition
needs (``b_sum``/``b_n`` baseline, ``ema``, z-score ``window``; the history conditions'
``window``, ``m_n``/``m_max``, ``last``, ``cusum``, ``best``: history.py), so a row stays
O(targets x window) and small: ingest rewrites it on every batch. Non-finite values in
``pending`` are the contract's strings (``server/wire.py``), so the state has no NaN literal.

Version 1 (which also kept each series' ``last_step`` and ``value``, and every statistic) is
still read and returned migrated to version 2. Reset the state (``new_state()``) when a rule's
condition fields are edited.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rankguard.server.alerts.history import new_statistics
from rankguard.server.alerts.rules import HISTORY_CONDITIONS, Condition, Rule, RuleError
from rankguard.server.wire import decode_float, encode_float

STATE_VERSION = 2
# State "expected" value meaning: the targets at the last evaluated step are all of "series".
ALL_SERIES = "*"

# Buffered samples by step: {step: {target: value}}.
Buffer = dict[int, dict[str, float]]


def new_state() -> dict[str, Any]:
    """The state of a (rule, run) that has seen nothing yet."""
    return {
        "v": STATE_VERSION,
        "watermark": None,
        "stride": None,
        "expected": [],
        "pending": [],
        "series": {},
        "aggregate": None,
        "alert": {
            "firing": False,
            "episode": 0,
            "first_step": None,
            "fired_step": None,
            "targets": [],
            "cooldown_until": None,
        },
        "msign_steps": [],
    }


def new_series(condition: Condition) -> dict[str, Any]:
    """The per-series state of a target (or of the aggregate) before its first sample."""
    series: dict[str, Any] = {
        "n": 0,  # finite samples absorbed
        "run": 0,  # consecutive tripping samples
        "clean": 0,  # consecutive clean samples while tripped
        "tripped": False,
        "since": None,  # first step of the current crossing
    }
    # Only the statistics this condition reads: the state is rewritten on every batch, so
    # unused keys would cost JSON work on each ingest.
    if condition is Condition.DROP_FROM_BASELINE:
        series["b_sum"] = 0.0
        series["b_n"] = 0
    elif condition is Condition.RATIO_TO_EMA:
        series["ema"] = None
    elif condition is Condition.ZSCORE:
        series["window"] = []
    elif condition in HISTORY_CONDITIONS:
        series.update(new_statistics(condition))
    return series


def _copy_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """A private copy that evaluation may change, sharing what it only ever replaces.

    Evaluation mutates the top-level dict, ``alert`` and the per-series dicts in place; it
    replaces ``expected``, ``pending``, ``msign_steps``, ``alert["targets"]`` and each series'
    ``window`` by new lists and never edits them. So one level of copying per dict is enough,
    which costs a fraction of ``copy.deepcopy`` (the hot path of ingest: one call per rule and
    batch over O(targets) series).
    """
    new = dict(state)
    new["alert"] = dict(state["alert"])
    new["series"] = {t: dict(s) for t, s in state["series"].items()}
    if state["aggregate"] is not None:
        new["aggregate"] = dict(state["aggregate"])
    return new


def _migrate_v1(state: dict[str, Any], condition: Condition) -> dict[str, Any]:
    """Version 1 -> 2: series lose ``last_step``, ``value`` (never read) and the statistics
    their condition does not use; the rest is the same."""
    keep = set(new_series(condition))
    state["series"] = {
        t: {k: v for k, v in s.items() if k in keep} for t, s in state["series"].items()
    }
    if state["aggregate"] is not None:
        state["aggregate"] = {k: v for k, v in state["aggregate"].items() if k in keep}
    state["v"] = STATE_VERSION
    return state


def checked_state(state: Mapping[str, Any] | None, rule: Rule) -> dict[str, Any]:
    """A private, current-version copy of a stored state (``new_state()`` for None)."""
    if state is None:
        return new_state()
    version = state.get("v") if isinstance(state, Mapping) else state
    if version not in (1, STATE_VERSION) or isinstance(version, bool):
        raise RuleError(
            f"state version {version!r} is not valid; use a state from new_state() "
            f"(version {STATE_VERSION}; version 1 is read and migrated)"
        )
    try:
        new = _copy_state(state)  # TypeError if not a Mapping
        return new if version == STATE_VERSION else _migrate_v1(new, rule.condition)
    except (KeyError, TypeError, ValueError) as exc:
        raise RuleError(
            f"state is malformed ({type(exc).__name__}: {exc}); use a state from new_state()"
        ) from None


def read_pending(state: Mapping[str, Any]) -> Buffer:
    """The pending list as {step: {target: value}} (the stored form is a flat encoded list)."""
    buffer: Buffer = {}
    try:
        for step, target, value in state["pending"]:
            buffer.setdefault(int(step), {})[target] = decode_float(value)
    except (KeyError, TypeError, ValueError) as exc:
        raise RuleError(
            f"state is malformed (pending: {type(exc).__name__}: {exc}); "
            "use a state from new_state()"
        ) from None
    return buffer


def write_pending(state: dict[str, Any], buffer: Buffer) -> None:
    """Store what is still buffered, ordered by step and target."""
    state["pending"] = [
        [s, t, encode_float(v)] for s in sorted(buffer) for t, v in sorted(buffer[s].items())
    ]


def is_firing(state: Mapping[str, Any] | None) -> bool:
    """Whether the alert of this (rule, run) state is firing."""
    return bool(state and state["alert"]["firing"])


__all__ = [
    "ALL_SERIES",
    "STATE_VERSION",
    "Buffer",
    "checked_state",
    "is_firing",
    "new_series",
    "new_state",
    "read_pending",
    "write_pending",
]
