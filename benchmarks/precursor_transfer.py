"""Does a precursor transfer across architectures and optimizers, and if not, is it the
quantity, its aggregation or its bound? (issue 20)

Over the recorded development runs (``benchmarks/results/runs``), per run one number per
statistic (failing runs only up to their failure step), reduced to its range per architecture
and role; a statistic separates healthy from failing where the ranges do not overlap::

    python -m benchmarks.precursor_transfer [--seeds 0,1,3,4,5,6]

Statistics (the probe's cadence is every 5 steps, Jacobian every 25):

- ``sa_*``: SA sign diversity D after step 50: the minimum over layers, the mean over layers,
  the largest fraction of layers under 0.1, the mean relative to its first 5 probes, the mean
  over the attention projections, and the smallest ratio of the mean to itself 25 steps earlier;
- ``stable_rank_vs_early``: the geometric mean over the early blocks relative to its first 5
  samples (what the rule reads), its minimum after step 50;
- ``repr_stable_rank``: the geometric mean of SR(Z) over the layers' inputs, minimum from step 10;
- ``jacobian_gain`` / ``_vs_early``: the largest a·M after step 50, absolute and relative to
  the mean of the first two Jacobian samples;
- ``logit`` / ``_vs_early``: the largest attention logit, absolute and relative to its first 5
  samples from step 50;
- ``update_ratio`` / ``_vs_early``: the geometric mean over the weights, its maximum from step
  20, absolute and relative to the mean of samples at steps 50-70.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

By = dict[int, list[float]]
_ATTENTION = ("attn", "q_proj", "k_proj", "v_proj", "o_proj")


def by_step(rows: Sequence[Sequence[Any]], keep: Callable[[str], bool] | None = None) -> By:
    out: By = {}
    for target, step, value in rows:
        if keep is None or keep(target):
            out.setdefault(int(step), []).append(float(value))
    return out


def gmean(values: Sequence[float]) -> float:
    good = [v for v in values if math.isfinite(v) and v > 0]
    return math.exp(sum(map(math.log, good)) / len(good)) if good else math.nan


def _extreme(pick: Callable[..., float], values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return pick(finite) if finite else math.nan


def sa_statistics(points: Mapping[str, Any], until: int) -> dict[str, float]:
    every = by_step(points.get("sa_sign_diversity", []))
    attn = by_step(points.get("sa_sign_diversity", []), lambda t: any(k in t for k in _ATTENTION))
    steps = [s for s in sorted(every) if 50 <= s < until]
    means = {s: statistics.fmean(v) for s, v in every.items()}
    early = statistics.fmean([means[s] for s in sorted(means)[:5]]) if means else math.nan
    attn_steps = [s for s in sorted(attn) if 50 <= s < until]
    return {
        "sa_min": _extreme(min, [min(every[s]) for s in steps]),
        "sa_mean": _extreme(min, [means[s] for s in steps]),
        "sa_share_under_0.1": _extreme(
            max, [sum(v < 0.1 for v in every[s]) / len(every[s]) for s in steps]
        ),
        "sa_mean_vs_early": _extreme(min, [means[s] / early for s in steps]) if early else math.nan,
        "sa_attention_mean": _extreme(min, [statistics.fmean(attn[s]) for s in attn_steps]),
        "sa_mean_25_step_drop": _extreme(
            min, [means[s] / means[s - 25] for s in steps if means.get(s - 25, 0) > 0]
        ),
    }


def statistics_of(record: Mapping[str, Any], until: int | None) -> dict[str, float]:
    from rankguard.server.alerts.pack import early_block_globs

    points, end = record["points"], until if until is not None else 10**9
    early = early_block_globs(record["weight_targets"])
    sr = by_step(points.get("stable_rank", []), lambda t: any(fnmatchcase(t, g) for g in early))
    sr_g = [(s, gmean(v)) for s, v in sorted(sr.items())]
    sr_base = statistics.fmean([v for _, v in sr_g[:5]]) if sr_g else math.nan
    rsr = by_step(points.get("representation_stable_rank", []))
    jac = by_step(points.get("jacobian_alignment_gain", []))
    jac_steps = sorted(jac)
    jac_base = statistics.fmean(max(jac[s]) for s in jac_steps[:2]) if jac_steps else math.nan
    logit = sorted((s, max(v)) for s, v in by_step(points.get("attention_logit_max", [])).items())
    logit_early = [v for s, v in logit if s >= 50][:5]
    logit_base = statistics.fmean(logit_early) if logit_early else math.nan
    ur = [(s, gmean(v)) for s, v in sorted(by_step(points.get("update_ratio", [])).items())]
    ur_early = [v for s, v in ur if 50 <= s <= 70]
    ur_base = statistics.fmean(ur_early) if ur_early else math.nan
    jac_late = [max(jac[s]) for s in jac_steps if 50 <= s < end]
    return {
        **sa_statistics(points, end),
        "stable_rank_vs_early": _extreme(min, [v / sr_base for s, v in sr_g if 50 <= s < end]),
        "repr_stable_rank": _extreme(min, [gmean(v) for s, v in rsr.items() if 10 <= s < end]),
        "jacobian_gain": _extreme(max, jac_late),
        "jacobian_gain_vs_early": _extreme(max, [v / jac_base for v in jac_late[1:]]),
        "logit": _extreme(max, [v for s, v in logit if s < end]),
        "logit_vs_early": _extreme(max, [v / logit_base for s, v in logit if s < end]),
        "update_ratio": _extreme(max, [v for s, v in ur if 20 <= s < end]),
        "update_ratio_vs_early": _extreme(max, [v / ur_base for s, v in ur if 75 <= s < end]),
    }


def table(seeds: Sequence[int]) -> str:
    from benchmarks.early_warning import failure_of, load_records

    records = load_records(seeds)
    ranges: dict[tuple[str, str], dict[str, list[float]]] = {}
    for (_, seed), record in records.items():
        control = records.get((record["control"], seed)) if record["control"] else None
        stats = statistics_of(record, failure_of(record, control)["step"])
        for key, value in stats.items():
            ranges.setdefault((record["arch"], record["role"]), {}).setdefault(key, []).append(
                value
            )
    columns = [(a, r) for a in ("gpt", "llama") for r in ("healthy", "failing")]
    counts = {c: len(next(iter(ranges.get(c, {"": []}).values()))) for c in columns}
    lines = [
        "| statistic | " + " | ".join(f"{a} {r} ({counts[(a, r)]})" for a, r in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for key in next(iter(ranges.values())):
        cells = []
        for column in columns:
            values = [v for v in ranges.get(column, {}).get(key, []) if math.isfinite(v)]
            cells.append(f"{min(values):.3g}–{max(values):.3g}" if values else "–")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    from benchmarks.early_warning import CALIBRATION_SEEDS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default=",".join(map(str, CALIBRATION_SEEDS)))
    args = parser.parse_args(argv)
    print(table([int(s) for s in args.seeds.split(",")]))


if __name__ == "__main__":
    main()
