"""The lead-time benchmark's summaries, tables and plots (``early_warning.analyse`` makes the runs).

Judged per architecture family (``arch``: "gpt", "llama"), as the issue's targets are:

- **lead** = failure step - first firing step (negative: late; None: never fired);
- **≥ 2x** per failing run: rankguard's pack leads the failure and by at least twice the best
  peer detector's lead (a peer that never fires, or fires at or after the failure, has lead
  <= 0, so any positive lead of ours counts). The best peer is taken over every peer detector,
  and again over only those that meet the false-alert target on that architecture's healthy
  runs (≤ 1 per 10): a detector that fires on every run "leads" every failure;
- **false alert** = a detector firing at all on a healthy run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

OURS = {
    "rankguard_pack": "rankguard pack",
    "rankguard_pack_lofo": "rankguard pack, LOFO",
    "rankguard_precursors": "rankguard precursors",
}
PEERS = {
    "peer:olmo_loss_spike": "OLMo 6σ",
    "peer:olmo_grad_norm_spike": "OLMo 6σ grads",
    "peer:megatron_spiky_loss": "Megatron loss",
    "peer:megatron_large_grads": "Megatron grads",
    "peer:lightning_spike_detection": "Lightning",
    "peer:llmfoundry_kill_loss_spike": "llm-foundry",
    "peer:wandb_loss_zscore": "W&B z",
    "peer:loss_cusum": "CUSUM",
    "trainscope_cusum": "trainscope CUSUM",
    "trainscope_kurtosis": "trainscope kurtosis",
    "trainscope_grad_norm": "trainscope gnorm",
    "trainscope_layer_grad": "trainscope layer grads",
}
# rankguard's own loss rules (no peer ships them): shown beside the peers, never counted as one
OWN_LOSS = {
    "peer:loss_stall": "stall (rankguard)",
    "peer:loss_gradual_divergence": "divergence (rankguard)",
}
FALSE_ALERT_TARGET = 0.1  # at most 1 false alert per 10 healthy runs


def _median(values: Sequence[float]) -> float | None:
    if not values:
        return None
    s = sorted(values)
    mid = len(s) // 2
    return float(s[mid]) if len(s) % 2 else (s[mid - 1] + s[mid]) / 2.0


def _false_alerts(healthy: Sequence[Mapping[str, Any]], det: str) -> int:
    return sum(1 for r in healthy if r["first_firing"].get(det) is not None)


def headline(
    failing: Sequence[Mapping[str, Any]], peers: Sequence[str], ours: str
) -> dict[str, Any]:
    """Per failing run: our lead, the best lead among ``peers`` (and which), and the verdict."""
    rows = []
    for r in failing:
        mine = r["lead_time"].get(ours)
        leads = [(r["lead_time"][p], p) for p in peers if r["lead_time"].get(p) is not None]
        best, who = max(leads, default=(None, None))
        win = mine is not None and mine > 0 and (best is None or mine >= 2 * max(best, 0))
        rows.append(
            {
                "run": f"{r['scenario']}/{r['seed']}",
                "ours": mine,
                "best_peer": best,
                "best_peer_detector": who,
                "at_least_2x": win,
            }
        )
    return {"of": len(rows), "at_least_2x": sum(w["at_least_2x"] for w in rows), "runs": rows}


def summarise(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per architecture: per-detector counts and leads, false alerts, and the headlines."""
    out: dict[str, Any] = {}
    for arch in sorted({r["arch"] for r in runs}):
        mine = [r for r in runs if r["arch"] == arch]
        failing = [r for r in mine if r["role"] == "failing" and r["failure"]["step"] is not None]
        healthy = [r for r in mine if r["role"] == "healthy"]
        scoped = [r for r in mine if r["trainscope_recorded"]]
        detectors: dict[str, Any] = {}
        for det in [*OURS, *PEERS, *OWN_LOSS]:
            pool_f = [r for r in failing if not det.startswith("trainscope") or r in scoped]
            pool_h = [r for r in healthy if not det.startswith("trainscope") or r in scoped]
            leads = [r["lead_time"][det] for r in pool_f if r["lead_time"].get(det) is not None]
            detectors[det] = {
                "failing_runs": len(pool_f),
                "fired_before_failure": sum(1 for v in leads if v > 0),
                "median_lead": _median(leads),
                "healthy_runs": len(pool_h),
                "false_alerts": _false_alerts(pool_h, det),
            }
        quiet_peers = [
            p
            for p in PEERS
            if detectors[p]["healthy_runs"]
            and detectors[p]["false_alerts"] <= FALSE_ALERT_TARGET * detectors[p]["healthy_runs"]
        ]
        out[arch] = {
            "failing_runs": len(failing),
            "healthy_runs": len(healthy),
            "detectors": detectors,
            "peers_meeting_false_alert_target": quiet_peers,
            "headline": {
                ours: {
                    "vs_every_peer": headline(failing, list(PEERS), ours),
                    "vs_quiet_peers": headline(failing, quiet_peers, ours),
                }
                for ours in OURS
            },
        }
    return out


def _cell(step: int | None, fail: int | None) -> str:
    if step is None:
        return "–"
    return f"@{step}" if fail is None else f"{fail - step:+d} (@{step})"


def markdown_tables(result: Mapping[str, Any]) -> str:
    """The lead-time table (failing runs), the false-alert table (healthy runs) and the
    per-architecture headline, as Markdown."""
    runs = result["runs"]
    cols = {**OURS, **PEERS, **OWN_LOSS}
    lines = [
        "| run (family) | failure (step) | " + " | ".join(cols.values()) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for r in runs:
        if r["role"] != "failing":
            continue
        f = r["failure"]
        fail = "none" if f["kind"] is None else f"{f['kind']} ({f['step']})"
        cells = [_cell(r["first_firing"].get(c), f["step"]) for c in cols]
        name = f"{r['scenario']} / {r['seed']} ({r['family']})"
        lines.append(f"| {name} | {fail} | " + " | ".join(cells) + " |")
    summary = result["summary"]
    archs = sorted(summary)
    lines += [
        "",
        "| detector | " + " | ".join(f"false alerts, {a}" for a in archs) + " | healthy runs that "
        "fired (step) |",
        "|---|" + "---|" * len(archs) + "---|",
    ]
    for det, label in cols.items():
        counts = []
        for a in archs:
            d = summary[a]["detectors"][det]
            counts.append(f"{d['false_alerts']}/{d['healthy_runs']}")
        which = [
            f"{r['scenario']}/{r['seed']} (@{r['first_firing'][det]})"
            for r in runs
            if r["role"] == "healthy" and r["first_firing"].get(det) is not None
        ]
        lines.append(f"| {label} | " + " | ".join(counts) + f" | {', '.join(which) or '–'} |")
    lines.append("")
    for a in archs:
        s = summary[a]
        for ours, label in OURS.items():
            h = s["headline"][ours]
            lines.append(
                f"- {a}: {label} >= 2x the best peer's lead on "
                f"{h['vs_every_peer']['at_least_2x']}/{h['vs_every_peer']['of']} failing runs "
                f"(every peer), {h['vs_quiet_peers']['at_least_2x']}/{h['vs_quiet_peers']['of']} "
                "(peers meeting the false-alert target); false alerts "
                f"{s['detectors'][ours]['false_alerts']}/{s['detectors'][ours]['healthy_runs']}"
            )
    return "\n".join(lines)


def plot_runs(result: Mapping[str, Any], load: Any, out: Path) -> list[Path]:
    """One PNG per scenario: each seed's loss, and below it every detector's first firing
    (one row per detector, a marker per seed; the dotted line is the failure step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = {**OURS, **PEERS, **OWN_LOSS}
    paths = []
    by_scenario: dict[str, list[Mapping[str, Any]]] = {}
    for r in result["runs"]:
        by_scenario.setdefault(r["scenario"], []).append(r)
    for name, rows in by_scenario.items():
        fig, (ax_loss, ax_det) = plt.subplots(
            2, 1, figsize=(9, 8), sharex=True, gridspec_kw={"height_ratios": [1, 1.6]}
        )
        for i, r in enumerate(rows):
            color = f"C{i}"
            losses = [v if math.isfinite(v) else math.nan for v in load(name, r["seed"])]
            ax_loss.plot(losses, color=color, lw=0.8, label=f"seed {r['seed']}")
            fail = r["failure"]["step"]
            for ax in (ax_loss, ax_det):
                if fail is not None:
                    ax.axvline(fail, color=color, ls=":", lw=1.2)
            for y, det in enumerate(cols):
                step = r["first_firing"].get(det)
                if step is not None:
                    ax_det.plot(step, y + 0.15 * (i - 0.5), "o", color=color, ms=4)
        ax_loss.set_ylabel("loss")
        ax_loss.set_yscale("log")
        ax_loss.legend(fontsize=7)
        ax_loss.set_title(f"{name}: first firing of every detector (dotted: failure)", fontsize=9)
        ax_det.set_yticks(range(len(cols)), list(cols.values()), fontsize=7)
        ax_det.invert_yaxis()
        ax_det.grid(axis="y", lw=0.3)
        ax_det.set_xlabel("step")
        fig.tight_layout()
        path = out / f"lead_time_{name}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths
