"""Claim (issue 7): with the default rules ordering their remedies automatically, >= 80% of
the failing runs avoid failure.

Each failing scenario of ``benchmarks/scenarios/catalog.py`` is trained again with the probe
attached (as in ``benchmarks/early_warning.py``) and the alert engine running in-process: after
every probe batch the new points go through the rules of ``default_rules(remediate=True)``
(specialised to the run's weight names); a ``firing`` (or ``repeat``) transition that carries
a command is pushed into the probe's ``MemoryTransport``, and the probe applies it at the next
step, as a live run would get it from the server. The commands are MSign (the spectral and
attention rules) and a learning-rate halving (``scale_lr``, the update-ratio rule);
``--msign-only`` turns the backoff off, to measure MSign alone. Healthy scenarios can be run
the same way to see what the remedies do to a run that did not need them (``--scenarios``).

Outcome per run, under the one failure definition (``rankguard.probe.demo.failure``):
explosion (incl. non-finite), silent degradation (final trailing-25 loss > 1.15x the healthy
control's, same seed), or none; plus the final loss relative to the control. The controls and
the unprotected runs are the recordings of ``early_warning record`` (run that first)::

    python -m benchmarks.early_warning record --seeds 15,16,17,18 --workers 2
    python -m benchmarks.rescue run --seeds 15,16,17,18 --workers 2 --scenarios <all nine>
    python -m benchmarks.rescue report --seeds 15,16,17,18 --tag heldout_1518 --plots
    python -m benchmarks.rescue run --seeds 15,16,17,18 --workers 2 --scenarios <all nine> \
        --msign-only
    python -m benchmarks.rescue report --seeds 15,16,17,18 --tag heldout_1518_msign_only \
        --msign-only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from benchmarks.early_warning import (  # noqa: E402
    HELDOUT_SEEDS,
    RESULTS,
    RUNS,
    ProbeCallback,
    load_run,
    run_jobs,
    run_path,
    save_run,
)

RESCUE_RUNS = RESULTS / "rescue_runs"
MSIGN_ONLY_RUNS = RESULTS / "rescue_runs_msign_only"


class AlertLoop:
    """The server's alert loop in-process: rules over each new probe batch, commands pushed
    back."""

    def __init__(self, rules: Sequence[Any]) -> None:
        self.rules = list(rules)
        self.states: dict[str, Any] = {rule.name: None for rule in self.rules}
        self.alerts: list[dict[str, Any]] = []  # every firing transition, with its command
        self.orders: list[dict[str, Any]] = []  # commands pushed (id, kind, step, rule)

    def __call__(self, step: int, batches: Sequence[Mapping[str, Any]], transport: Any) -> None:
        from rankguard.probe.wire import iter_points
        from rankguard.server.alerts import TransitionKind, evaluate

        by_quantity: dict[str, list[tuple[str, int, float]]] = {}
        for p in iter_points(batches):
            by_quantity.setdefault(p.quantity, []).append((p.target, p.step, p.value))
        for rule in self.rules:
            samples = by_quantity.get(rule.quantity)
            if not samples:
                continue
            self.states[rule.name], transitions = evaluate(rule, self.states[rule.name], samples)
            for t in transitions:
                if t.kind is TransitionKind.RESOLVED:
                    continue
                self.alerts.append(
                    {
                        "rule": t.rule,
                        "step": t.step,
                        "command": t.command is not None,
                        "suppressed": t.command_suppressed,
                    }
                )
                if t.command is not None:
                    # one id per order: a repeated order of the same alert is a new command
                    command = {"id": f"{t.rule}-{t.episode}-{t.step}", **t.command}
                    transport.push_command(command)
                    self.orders.append(
                        {"id": command["id"], "kind": command["kind"], "step": step, "rule": t.rule}
                    )


def rules_for(names: Sequence[str], *, msign_only: bool = False) -> list[Any]:
    """The default pack with its actions on, specialised to the run's weight names: MSign on
    every 2-D weight once per stable-rank (or SA) collapse, on the attention weights every 10
    steps while the attention-logit divergence fires, on every 2-D weight every 10 steps while
    the representations are collapsed, and the LR halved at every sample while the update
    ratio is too high (``alerts.pack``); ``msign_only`` leaves the LR alone."""
    from rankguard.server.alerts.pack import default_rules, specialise

    rules = specialise(default_rules(remediate=True), names)
    if msign_only:  # every rule whose action lowers the learning rate is off
        rules = [r.replace(enabled=False) if r.lr_backoff.enabled else r for r in rules]
    return rules


def rescue_run(scenario_name: str, seed: int, *, msign_only: bool = False) -> dict[str, Any]:
    """Trains one scenario/seed with automatic remedies; returns its curves, alerts and the
    commands it got."""
    import torch

    from benchmarks.scenarios import catalog
    from rankguard.probe.demo.train import train

    torch.set_num_threads(1)
    scenario = catalog.get(scenario_name)
    loop: AlertLoop | None = None
    cb = ProbeCallback(f"{scenario_name}-seed{seed}-rescue")

    def on_batch(step: int, batches: Sequence[Mapping[str, Any]], transport: Any) -> None:
        nonlocal loop
        if loop is None:
            names = [t.name for t in cb.probe.targets]
            loop = AlertLoop(rules_for(names, msign_only=msign_only))
        loop(step, batches, transport)

    cb.on_batch = on_batch
    result = train(scenario, seed, callbacks=[cb])
    cb.close()
    acks = [
        {"id": cid, "state": ack.get("state"), "step": ack.get("step")}
        for cid, ack in cb.transport.acks
    ]
    return {
        "scenario": scenario_name,
        "seed": seed,
        "role": scenario.role,
        "control": scenario.control,
        "steps_run": result.steps_run,
        "wall_time_s": round(result.wall_time_s, 2),
        "losses": result.losses,
        "grad_norms": result.grad_norms,
        "attn_logit_max": result.attn_logit_max,
        "alerts": [] if loop is None else loop.alerts,
        "orders": [] if loop is None else loop.orders,
        "acks": acks,
        "points": {},  # not kept: the lead-time recordings hold the unprotected series
    }


def _job(job: tuple[str, int, str, bool]) -> str:
    scenario, seed, folder, msign_only = job
    t0 = time.perf_counter()
    record = rescue_run(scenario, seed, msign_only=msign_only)
    save_run(record, run_path(scenario, seed, Path(folder)))
    kinds = [o["kind"] for o in record["orders"]]
    return (
        f"{scenario} seed {seed}: {record['steps_run']} steps, {kinds.count('msign')} MSign, "
        f"{kinds.count('scale_lr')} LR halvings, {time.perf_counter() - t0:.0f} s"
    )


def run_all(
    scenarios: Sequence[str],
    seeds: Sequence[int],
    *,
    workers: int,
    force: bool,
    folder: Path,
    msign_only: bool = False,
) -> None:
    jobs = [
        (name, seed, str(folder), msign_only)
        for seed in seeds
        for name in scenarios
        if force or not run_path(name, seed, folder).exists()
    ]
    print(f"rescue: {len(jobs)} runs with {workers} worker(s)", flush=True)
    run_jobs(_job, jobs, workers=workers)


def outcome(losses: Sequence[float], control_losses: Sequence[float]) -> dict[str, Any]:
    """Failure kind (or None), final trailing-25 loss and its ratio to the control's."""
    from rankguard.probe.demo.failure import classify, smoothed_final_loss

    fail = classify(losses, control_losses)
    final = smoothed_final_loss(losses)
    ref = smoothed_final_loss(control_losses)
    return {
        "failure": None if fail is None else fail.kind.value,
        "failure_step": None if fail is None else fail.step,
        "final_loss": final if math.isfinite(final) else None,
        "control_final_loss": ref,
        "ratio_to_control": final / ref if math.isfinite(final) else None,
    }


def report(
    seeds: Sequence[int], scenarios: Sequence[str] | None = None, folder: Path = RESCUE_RUNS
) -> dict[str, Any]:
    from benchmarks.scenarios import catalog

    names = scenarios or [s.name for s in catalog.SCENARIOS.values()]
    runs = []
    for name in names:
        scenario = catalog.get(name)
        for seed in seeds:
            path = run_path(name, seed, folder)
            if not path.exists():
                continue
            rescued = load_run(path)
            control_name = scenario.control or name
            control = load_run(run_path(control_name, seed, RUNS))
            unprotected = load_run(run_path(name, seed, RUNS))
            runs.append(
                {
                    "scenario": name,
                    "seed": seed,
                    "role": scenario.role,
                    "unprotected": outcome(unprotected["losses"], control["losses"]),
                    "rescued": outcome(rescued["losses"], control["losses"]),
                    "msign_steps": _order_steps(rescued, "msign"),
                    "lr_backoff_steps": _order_steps(rescued, "scale_lr"),
                    "applied": sum(1 for a in rescued["acks"] if a["state"] == "applied"),
                    "alerts": rescued["alerts"],
                }
            )
    return {"seeds": list(seeds), "runs": runs, "summary": summarise(runs)}


def _order_steps(record: Mapping[str, Any], kind: str) -> list[int]:
    # recordings from before the learning-rate backoff ordered MSign only and kept no kind
    return [o["step"] for o in record["orders"] if o.get("kind", "msign") == kind]


def summarise(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    failing = [r for r in runs if r["role"] == "failing"]
    counts: dict[str, int] = {"explosion": 0, "silent_degradation": 0, "none": 0}
    for r in failing:
        counts[r["rescued"]["failure"] or "none"] += 1
    failed_unprotected = [r for r in failing if r["unprotected"]["failure"] is not None]
    avoided = [r for r in failed_unprotected if r["rescued"]["failure"] is None]
    return {
        "failing_runs": len(failing),
        "failed_unprotected": len(failed_unprotected),
        "avoided_failure": len(avoided),
        "avoided_fraction": len(avoided) / len(failed_unprotected) if failed_unprotected else None,
        "rescued_outcomes": counts,
        "healthy_runs_with_orders": sum(
            1
            for r in runs
            if r["role"] == "healthy" and (r["msign_steps"] or r["lr_backoff_steps"])
        ),
        "healthy_runs": sum(1 for r in runs if r["role"] == "healthy"),
    }


def markdown_table(result: Mapping[str, Any]) -> str:
    def fmt(o: Mapping[str, Any]) -> str:
        kind = o["failure"] or "ok"
        ratio = "NaN" if o["ratio_to_control"] is None else f"{o['ratio_to_control']:.2f}x"
        return f"{kind} ({ratio})"

    lines = [
        "| scenario / seed | unprotected (final loss / control) | with auto-remedies | MSigns "
        "| LR halvings |",
        "|---|---|---|---|---|",
    ]

    def orders(steps: Sequence[int]) -> str:
        return f"{len(steps)}, from step {steps[0]}" if steps else "–"

    for r in result["runs"]:
        lines.append(
            f"| {r['scenario']} / {r['seed']} | {fmt(r['unprotected'])} | {fmt(r['rescued'])} "
            f"| {orders(r['msign_steps'])} | {orders(r['lr_backoff_steps'])} |"
        )
    s = result["summary"]
    lines += [
        "",
        f"Failing runs: {s['failing_runs']}; failed unprotected: {s['failed_unprotected']}; "
        f"avoided failure with auto-remedies: {s['avoided_failure']}"
        + (f" ({s['avoided_fraction']:.0%})" if s["avoided_fraction"] is not None else "")
        + f"; outcomes with auto-remedies: {s['rescued_outcomes']}; healthy runs that got a "
        f"command: {s['healthy_runs_with_orders']}/{s['healthy_runs']}.",
    ]
    return "\n".join(lines)


def plot(result: Mapping[str, Any], out: Path = RESULTS, folder: Path = RESCUE_RUNS) -> list[Path]:
    """One PNG per scenario: unprotected vs auto-remedied loss (each seed) and the control;
    vertical lines: MSign (solid) and LR halvings (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.scenarios import catalog

    paths = []
    by_scenario: dict[str, list[Mapping[str, Any]]] = {}
    for r in result["runs"]:
        by_scenario.setdefault(r["scenario"], []).append(r)
    for name, rows in by_scenario.items():
        control_name = catalog.get(name).control or name
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for i, r in enumerate(rows):
            color = f"C{i}"
            seed = r["seed"]
            ctrl = load_run(run_path(control_name, seed, RUNS))["losses"]
            unp = load_run(run_path(name, seed, RUNS))["losses"]
            res = load_run(run_path(name, seed, folder))["losses"]
            ax.plot(_smooth(ctrl), color="0.6", lw=0.8)
            ax.plot(_smooth(unp), color=color, lw=0.8, ls=":")
            ax.plot(_smooth(res), color=color, lw=1.0, label=f"seed {seed}")
            for s in r["msign_steps"]:
                ax.axvline(s, color=color, lw=0.5, alpha=0.5)
            for s in r["lr_backoff_steps"]:
                ax.axvline(s, color=color, lw=0.5, alpha=0.5, ls="--")
        ax.set_ylim(1.5, 6.0)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (trailing mean of 10)")
        ax.set_title(
            f"{name}: remedied (solid), unprotected (dotted), control (grey);\n"
            "vertical lines: MSign (solid), LR halving (dashed)",
            fontsize=9,
        )
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"rescue_{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def _smooth(values: Sequence[float], window: int = 10) -> list[float]:
    out = []
    for i in range(len(values)):
        tail = [v for v in values[max(0, i - window + 1) : i + 1] if math.isfinite(v)]
        out.append(sum(tail) / len(tail) if tail else math.nan)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    from benchmarks.scenarios import catalog

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train the scenarios with automatic remedies")
    run.add_argument("--seeds", default=",".join(map(str, HELDOUT_SEEDS)))
    run.add_argument("--scenarios", default=None, help="comma-separated; default: the failing")
    run.add_argument("--workers", type=int, default=2)
    run.add_argument("--force", action="store_true")
    run.add_argument("--msign-only", action="store_true", help="no learning-rate backoff")
    rep = sub.add_parser("report", help="tabulate the outcomes")
    rep.add_argument("--seeds", default=",".join(map(str, HELDOUT_SEEDS)))
    rep.add_argument("--tag", default="heldout_1518", help="results file: rescue_<tag>.json")
    rep.add_argument("--plots", action="store_true")
    rep.add_argument("--msign-only", action="store_true", help="report the MSign-only runs")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.command == "run":
        names = (
            [s.name for s in catalog.failing()]
            if args.scenarios is None
            else args.scenarios.split(",")
        )
        folder = MSIGN_ONLY_RUNS if args.msign_only else RESCUE_RUNS
        run_all(
            names,
            seeds,
            workers=args.workers,
            force=args.force,
            folder=folder,
            msign_only=args.msign_only,
        )
        return
    folder = MSIGN_ONLY_RUNS if args.msign_only else RESCUE_RUNS
    result = report(seeds, folder=folder)
    path = RESULTS / f"rescue_{args.tag}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown_table(result))
    print(f"\nwrote {path.relative_to(_ROOT)}")
    if args.plots and not args.msign_only:
        for p in plot(result, folder=folder):
            print(f"wrote {p.relative_to(_ROOT)}")


if __name__ == "__main__":
    main()
