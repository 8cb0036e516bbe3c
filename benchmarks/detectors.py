"""The detectors the lead-time benchmark compares, each returning its first firing step.

One implementation: every detector is a rule of rankguard's alert engine
(``rankguard.server.alerts``), run offline over recorded series in step order, exactly as the
server runs it on ingest.

- The peers' detectors (``rankguard.server.alerts.peers``: OLMo-core, Megatron-LM, Lightning,
  llm-foundry, W&B, CUSUM, and rankguard's stall / gradual-divergence rules) see what their
  trainers see: the loss and the global pre-clip gradient norm of **every** step
  (:func:`peer_first_firings`).
- rankguard's pack sees what the probe sends: its sampled points, and the loss of every step
  (:func:`rule_first_firings`).

A non-finite value trips every rule (the engine's policy; every trainer also checks for NaN).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rankguard.server.alerts import Rule, TransitionKind, evaluate, flush

__all__ = [
    "PER_STEP_SERIES",
    "peer_first_firings",
    "per_step_samples",
    "rule_first_firing",
    "rule_first_firings",
]

# The recorded per-step series a peer rule reads, by the rule's quantity.
PER_STEP_SERIES = {"loss": "losses", "grad_norm": "grad_norms"}


def rule_first_firing(rule: Rule, samples: Iterable[Sequence[Any]]) -> int | None:
    """First step at which ``rule`` fires over ``samples`` ((target, step, value) of its
    quantity), evaluated in step order as a live run would feed the engine, then flushed."""
    ordered = sorted(((str(t), int(s), v) for t, s, v in samples), key=lambda x: x[1])
    state, transitions = evaluate(rule, None, ordered)
    _, tail = flush(rule, state)
    for transition in [*transitions, *tail]:
        if transition.kind is TransitionKind.FIRING:
            return transition.step
    return None


def rule_first_firings(
    rules: Sequence[Rule], points: Mapping[str, Sequence[Sequence[Any]]]
) -> dict[str, int | None]:
    """``{rule.name: first firing step}`` for each enabled rule over ``{quantity: samples}``."""
    return {
        rule.name: rule_first_firing(rule, points.get(rule.quantity, ()))
        for rule in rules
        if rule.enabled
    }


def per_step_samples(values: Sequence[float], target: str = "global") -> list[list[Any]]:
    """A per-step series as engine samples: step i holds ``values[i]``."""
    return [[target, i, float(v)] for i, v in enumerate(values)]


def peer_first_firings(rules: Sequence[Rule], record: Mapping[str, Any]) -> dict[str, int | None]:
    """First firing of each peer rule over the recorded per-step loss / gradient norm."""
    points = {q: per_step_samples(record[key]) for q, key in PER_STEP_SERIES.items()}
    unknown = {r.quantity for r in rules} - set(points)
    if unknown:
        raise ValueError(f"no per-step series for {sorted(unknown)}; known: {sorted(points)}")
    return rule_first_firings(rules, points)
