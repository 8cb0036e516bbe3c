"""The calibration procedure: the quietest-first search on synthetic runs, and (slow) that the
frozen pack is what the procedure gives on the committed development recordings."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from benchmarks import calibration  # noqa: E402
from benchmarks.detectors import rule_first_firing  # noqa: E402
from rankguard.server.alerts import Condition, Rule  # noqa: E402


def run(peak: float, at: int = 50) -> dict[str, Any]:
    """A healthy-looking series of one quantity that peaks at ``peak`` at step ``at``."""
    return {"points": {"q": [["t", s, peak if s == at else 1.0] for s in range(0, 100, 5)]}}


def fires(rule: Rule, record: dict[str, Any]) -> bool:
    return rule_first_firing(rule, record["points"].get(rule.quantity, ())) is not None


def test_the_bound_sits_a_margin_above_the_highest_healthy_peak(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    knob = calibration.Knob("threshold", 1.0, 1000.0)
    monkeypatch.setitem(calibration.KNOBS, "hi", knob)
    rule = Rule(name="hi", quantity="q", condition=Condition.ABOVE, threshold=5.0)
    (out,), notes = calibration.calibrate([rule], [run(10.0), run(20.0)], fires)
    grid = knob.grid()
    edge = notes["hi"]["edge"]
    assert edge >= 20.0 and edge / calibration.GRID_RATIO < 20.0  # the first quiet grid value
    assert out.threshold == pytest.approx(
        edge * calibration.GRID_RATIO**calibration.MARGIN_STEPS, rel=1e-3
    )
    assert grid.index(edge) >= 0
    # a peak that no grid value keeps quiet turns the rule off, and says so
    (off,), notes = calibration.calibrate([rule], [run(5000.0)], fires)
    assert not off.enabled and notes["hi"]["value"] is None


def test_below_bounds_and_counts_search_the_other_way(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    low = calibration.Knob("threshold", 0.01, 1.0, quiet_up=False)
    monkeypatch.setitem(calibration.KNOBS, "lo", low)
    rule = Rule(name="lo", quantity="q", condition=Condition.BELOW, threshold=0.5)
    (out,), notes = calibration.calibrate([rule], [run(0.2)], fires)
    assert notes["lo"]["edge"] < 0.2 and out.threshold < notes["lo"]["edge"]
    count = calibration.Knob("consecutive", 1.0, 50.0, integer=True)
    monkeypatch.setitem(calibration.KNOBS, "n", count)
    long = Rule(name="n", quantity="q", condition=Condition.ABOVE, threshold=0.5, consecutive=1)
    # always above the bound: only a run of more samples than the run has (20) stays quiet
    (out,), notes = calibration.calibrate([long], [run(1.0)], fires)
    assert out.enabled and notes["n"]["edge"] == 21.0 and out.consecutive > 21


def test_quiet_peers_keep_only_rules_silent_on_every_healthy_run() -> None:
    loud = Rule(name="loud", quantity="q", condition=Condition.ABOVE, threshold=2.0)
    calm = Rule(name="calm", quantity="q", condition=Condition.ABOVE, threshold=50.0)
    assert [r.name for r in calibration.quiet_peers([loud, calm], [run(10.0)], fires)] == ["calm"]


@pytest.mark.slow
def test_the_frozen_pack_is_the_procedure_on_every_family() -> None:
    """pack.default_rules() carries exactly what calibration.py gives on the development
    recordings of every family (benchmarks/results/runs, seeds 0, 1, 3-6)."""
    from benchmarks.early_warning import CALIBRATION_SEEDS, fires_on, load_records
    from rankguard.server.alerts.pack import PACK_PEERS, core_rules, default_rules
    from rankguard.server.alerts.peers import peer_rules

    dev = load_records(CALIBRATION_SEEDS)
    healthy = [r for r in dev.values() if r["role"] == "healthy"]
    assert len({r["family"] for r in healthy}) >= 7
    rules, _ = calibration.calibrate(core_rules(), healthy, fires_on)
    joined = calibration.quiet_peers(peer_rules(), healthy, fires_on)
    assert [r.name for r in joined] == list(PACK_PEERS)
    assert [r.to_dict() for r in [*rules, *joined]] == [r.to_dict() for r in default_rules()]
