"""How the default pack's bounds are calibrated, as a procedure: so that a family can be scored by
a pack calibrated without it (leave-one-family-out), and the frozen pack is the same procedure
run on every family's development seeds.

For each rule with a calibrated knob (:data:`KNOBS`), over the healthy development runs of the
families given: the most sensitive value of the knob at which the rule fires on none of them
(bisection over a geometric grid, each candidate run through the alert engine over the
recorded probe points), then :data:`MARGIN_STEPS` grid steps further towards quiet (the grid's
ratio is 1.05, so 4 steps is ~1.22x; for bounds near 1, on the distance to 1). A rule that no
value of its grid keeps quiet is turned off (``enabled=False``) and reported so.

The peers' detectors (``rankguard.server.alerts.peers``) are not calibrated: they keep their
published defaults. The pack takes those that fire on no healthy development run
(:func:`quiet_peers`); the issue's "keep 0 false alerts on the healthy controls".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rankguard.server.alerts import Rule

GRID_RATIO = 1.05
MARGIN_STEPS = 4


@dataclass(frozen=True)
class Knob:
    """A rule field the procedure sets. ``quiet_up``: larger values fire less (an "above"
    bound); otherwise smaller values do. ``offset``: the grid is geometric in
    (value - offset), for bounds whose meaning is the distance to 1 (a ratio to the best, a
    stable rank of 1). ``integer``: a count (consecutive samples)."""

    field: str
    lo: float
    hi: float
    quiet_up: bool = True
    offset: float = 0.0
    integer: bool = False

    def grid(self) -> list[float]:
        n = int(math.log((self.hi - self.offset) / (self.lo - self.offset), GRID_RATIO)) + 1
        values = [self.offset + (self.lo - self.offset) * GRID_RATIO**i for i in range(n + 1)]
        if self.integer:
            values = sorted({float(round(v)) for v in values})
        # ordered from the most sensitive to the quietest
        return values if self.quiet_up else values[::-1]


# Rule name -> the knob the procedure sets (the rest of each rule is as pack.py writes it).
KNOBS: dict[str, Knob] = {
    "sa_sign_diversity_collapse": Knob("threshold", 1e-4, 0.5, quiet_up=False),
    "stable_rank_collapse": Knob("threshold", 0.02, 0.95, quiet_up=False),
    "representation_collapse": Knob("threshold", 1.0005, 3.0, quiet_up=False, offset=1.0),
    "jacobian_alignment_gain_above_one": Knob("threshold", 1.05, 1e5, offset=1.0),
    "attention_logit_high": Knob("threshold", 1.0, 1e5),
    "update_ratio_high": Knob("threshold", 1e-3, 10.0),
    "update_ratio_rise": Knob("threshold", 1.05, 1e3, offset=1.0),
    "grad_norm_spike": Knob("threshold", 1.5, 1e3, offset=1.0),
    "loss_gradual_divergence": Knob("threshold", 1.005, 3.0, offset=1.0),
    "loss_stall": Knob("consecutive", 10.0, 400.0, integer=True),
}

Fires = Callable[[Rule, Mapping[str, Any]], bool]


def _set(rule: Rule, knob: Knob, value: float) -> Rule:
    change: dict[str, Any] = {knob.field: int(value) if knob.integer else value}
    if knob.field == "threshold" and rule.clear_threshold is not None:
        # keep the hysteresis: the clear bound moves with the trip bound, in proportion
        ratio = (rule.clear_threshold - knob.offset) / (rule.threshold - knob.offset)  # type: ignore[operator]
        change["clear_threshold"] = float(f"{knob.offset + (value - knob.offset) * ratio:.4g}")
    return rule.replace(**change)


def quietest_first_sensitive(
    rule: Rule, knob: Knob, healthy: Sequence[Mapping[str, Any]], fires: Fires
) -> int | None:
    """Index into ``knob.grid()`` of the most sensitive value at which ``rule`` fires on no
    healthy run (firing is monotone along the grid), or None if none is quiet."""
    grid = knob.grid()

    def quiet(i: int) -> bool:
        candidate = _set(rule, knob, grid[i])
        return not any(fires(candidate, record) for record in healthy)

    if not quiet(len(grid) - 1):
        return None
    lo, hi = 0, len(grid) - 1  # invariant: grid[hi] is quiet
    if quiet(lo):
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if quiet(mid):
            hi = mid
        else:
            lo = mid
    return hi


def calibrate(
    rules: Sequence[Rule], healthy: Sequence[Mapping[str, Any]], fires: Fires
) -> tuple[list[Rule], dict[str, Any]]:
    """The pack with each knob set by the procedure on ``healthy`` runs, and what it chose."""
    out: list[Rule] = []
    notes: dict[str, Any] = {}
    for rule in rules:
        knob = KNOBS.get(rule.name)
        if knob is None or not rule.enabled:
            out.append(rule)
            continue
        index = quietest_first_sensitive(rule, knob, healthy, fires)
        if index is None:
            out.append(rule.replace(enabled=False))
            notes[rule.name] = {"field": knob.field, "value": None, "why": "no quiet value"}
            continue
        grid = knob.grid()
        value = grid[min(index + MARGIN_STEPS, len(grid) - 1)]
        value = float(int(value)) if knob.integer else float(f"{value:.4g}")
        out.append(_set(rule, knob, value))
        notes[rule.name] = {"field": knob.field, "value": value, "edge": grid[index]}
    return out, notes


def quiet_peers(
    peers: Sequence[Rule], healthy: Sequence[Mapping[str, Any]], fires: Fires
) -> list[Rule]:
    """The peer rules that fire on no healthy run."""
    return [r for r in peers if not any(fires(r, record) for record in healthy)]
