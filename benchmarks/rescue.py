"""Claim (issue 19): with the auto-recover profile, >= 90% of the failing runs avoid failure
and end within 1.10x their healthy control's loss, and no healthy run gets any command.

Every scenario of ``benchmarks/scenarios/catalog.py`` is trained with the probe attached
(``every=5``) and ``auto_recover=True`` against a real ``rankguard serve`` (SQLite, a port of
its own): the run registers, the server installs its rules with the auto-recover profile's
actions on (``server/alerts/profiles.py``), and every server command travels over HTTP with the
probe's default command poll (1 s), so a rule's order lands 1-6 steps after its alert, as in
production. The in-process half (skip-step, the holding learning-rate backoff, QK-Clip,
rollback to a known-good snapshot) acts at the step. A rollback rewinds the training loop to
the restored step; the batches after it are skipped (``train()``'s rollback support).

Outcome per run (``rankguard.probe.demo.failure``, the one definition) on the trajectory of
the model that exists at the end (the steps a rollback undid are not part of it); the loss of
every batch in the order it was computed is kept too, and the report says where the undone
steps exploded. Healthy controls and unprotected twins: ``early_warning record``'s recordings
when present, else ``baseline`` (plain training, no probe).

Calibration is a procedure (``calibrate``): the profile's thresholds are the maxima over the
healthy runs of the development seeds, times a margin, from step ``warmup`` on; everything else
is a stated default. Leave-one-family-out: the same procedure without one family's runs; a
family whose left-out profile differs from the full one is run again with it (``--lofo``)::

    python -m benchmarks.rescue calibrate --seeds 0,1,3,4,5,6
    python -m benchmarks.rescue baseline --seeds 23,24,25 --workers 2
    python -m benchmarks.rescue run --seeds 23,24,25 --workers 2
    python -m benchmarks.rescue run --seeds 23,24,25 --workers 2 --lofo
    python -m benchmarks.rescue report --seeds 23,24,25 --tag auto_232425 --plots
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from benchmarks.early_warning import (  # noqa: E402
    CALIBRATION_SEEDS,
    RESULTS,
    load_run,
    run_jobs,
    run_path,
    save_run,
)

AUTO_RUNS = RESULTS / "rescue_auto"  # <tag>/<scenario>_seed<k>.json.gz; tag "main" or a family
BASELINE_RUNS = RESULTS / "rescue_baseline"
PROFILE_PATH = RESULTS / "rescue_profile.json"
HELDOUT_SEEDS = (23, 24, 25)
PROBE_EVERY = 5
WARMUP = 50  # = failure.EXPLOSION_WARMUP: the first steps are learning, healthy runs spike there
WINDOW = 64  # = RecoveryConfig.window


# --- families -----------------------------------------------------------------------------


def families() -> dict[str, list[str]]:
    """``{family: scenario names}``: the catalog's ``family`` when it has one, else a failing
    scenario with its control (a control shared by two failing scenarios joins both in one)."""
    from benchmarks.scenarios import catalog

    out: dict[str, list[str]] = {}
    for s in catalog.SCENARIOS.values():
        family = getattr(s, "family", None) or (s.control if s.role == "failing" else s.name)
        out.setdefault(str(family), []).append(s.name)
    return out


def family_of(name: str) -> str:
    return next(f for f, names in families().items() if name in names)


# --- calibration --------------------------------------------------------------------------


def _median_ratios(values: Sequence[float], start: int) -> list[float]:
    """value / median of the previous <= WINDOW finite values, from ``start`` on (the guard's
    statistic)."""
    out: list[float] = []
    for i in range(start, len(values)):
        tail = [v for v in values[max(0, i - WINDOW) : i] if math.isfinite(v)]
        if tail and math.isfinite(values[i]):
            out.append(values[i] / statistics.median(tail))
    return out


def healthy_maxima(record: Mapping[str, Any]) -> dict[str, float]:
    """What a healthy run's checks would see at most after the warm-up."""
    losses = [float(v) for v in record["losses"]]
    grads = [float(v) for v in record["grad_norms"]]
    by_step: dict[int, list[float]] = {}
    for _, step, value in record["points"].get("update_ratio", []):
        if step >= WARMUP and math.isfinite(value) and value > 0:
            by_step.setdefault(step, []).append(value)
    gmeans = [math.exp(sum(map(math.log, v)) / len(v)) for v in by_step.values()]
    return {
        "loss_ratio": max(_median_ratios(losses, WARMUP), default=1.0),
        "grad_ratio": max(_median_ratios(grads, WARMUP), default=1.0),
        "update_ratio": max(gmeans, default=0.0),
    }


def calibrate(maxima: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The profile's thresholds from healthy runs' maxima: loss spike 1.25x the largest loss
    ratio (up to 0.1), skip-step 2x the largest gradient ratio (up to an integer), the hot
    update ratio 1.5x the largest one (to 0.01; the default pack's margin)."""
    top = {k: max(m[k] for m in maxima) for k in ("loss_ratio", "grad_ratio", "update_ratio")}
    return {
        "loss_spike": math.ceil(1.25 * top["loss_ratio"] * 10 - 1e-9) / 10,
        "skip_factor": float(math.ceil(2 * top["grad_ratio"] - 1e-9)),
        "update_ratio_hot": max(0.01, round(1.5 * top["update_ratio"], 2)),
        "warmup": WARMUP,
    }


def calibrate_all(seeds: Sequence[int]) -> dict[str, Any]:
    """The full profile and one per left-out family, from the healthy recordings of ``seeds``."""
    from benchmarks.scenarios import catalog

    runs: dict[str, dict[str, float]] = {}
    for s in catalog.healthy():
        for seed in seeds:
            path = run_path(s.name, seed)
            if path.exists():
                runs[f"{s.name}/{seed}"] = healthy_maxima(load_run(path))
    fams = families()
    member = {key: family_of(key.split("/")[0]) for key in runs}
    lofo = {}
    for family in fams:
        kept = [m for key, m in runs.items() if member[key] != family]
        lofo[family] = calibrate(kept) if kept else None
    return {
        "seeds": list(seeds),
        "frozen": time.strftime("%Y-%m-%d %H:%M"),
        "profile": calibrate(list(runs.values())),
        "lofo": lofo,
        "maxima": runs,
    }


def load_profile(family: str | None = None) -> dict[str, float]:
    frozen = json.loads(PROFILE_PATH.read_text())
    profile = frozen["lofo"][family] if family is not None else frozen["profile"]
    return dict(profile)


# --- the runs -----------------------------------------------------------------------------


@contextmanager
def serve(folder: Path) -> Iterator[str]:
    """``rankguard serve --no-auth`` on a fresh SQLite file and a free port; its URL."""
    import socket
    import subprocess

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cmd = [
        str(Path(sys.executable).with_name("rankguard")),
        "serve",
        "--port",
        str(port),
        "--no-auth",
        "--log-level",
        "warning",
        "--no-access-log",
        "--database-url",
        f"sqlite:///{folder / 'rescue.db'}",
    ]
    with (folder / "server.log").open("ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            raise SystemExit(f"rescue: the server did not start; see {folder / 'server.log'}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class AutoRecover:
    """The probe with the auto-recover profile, attached at step 0 (before its update).
    ``on_step`` returns the training step to resume from after a rollback."""

    def __init__(self, url: str, run: str, profile: Mapping[str, float], log_dir: str) -> None:
        self.url, self.run, self.profile, self.log_dir = url, run, profile, log_dir
        self.probe: Any = None

    def on_before_step(self, step: int, model: Any, optimizer: Any) -> None:
        if self.probe is None:
            from rankguard.probe import Probe, RecoveryConfig

            recovery = RecoveryConfig.auto_recover(**self.profile)  # type: ignore[arg-type]
            self.probe = Probe(
                model,
                optimizer,
                run=self.run,
                server=self.url,
                every=PROBE_EVERY,
                jacobian_every=20 * PROBE_EVERY,  # the Jacobian feeds no remedy: kept rare
                auto_recover=True,
                recovery=recovery,
                log_dir=self.log_dir,
            )

    def on_step(self, step: int, model: Any, optimizer: Any, loss: Any) -> int | None:
        self.probe.step(loss)
        resume: int = self.probe.train_step
        return resume if resume != step + 1 else None


def rescue_run(scenario_name: str, seed: int, url: str, family: str | None) -> dict[str, Any]:
    """One scenario/seed with the auto-recover profile; its curves and what acted."""
    import httpx
    import torch

    from benchmarks.scenarios import catalog
    from rankguard.probe.demo.train import train

    torch.set_num_threads(1)
    scenario = catalog.get(scenario_name)
    with tempfile.TemporaryDirectory() as log_dir:
        cb = AutoRecover(url, f"{scenario_name}-seed{seed}", load_profile(family), log_dir)
        result = train(scenario, seed, callbacks=[cb])
        summary = cb.probe.recovery_summary()
        report = cb.probe.close(timeout=60)
    api = httpx.Client(base_url=f"{url}/api/v1", timeout=30)
    try:
        run_id = cb.probe.run_id
        commands = api.get(f"/runs/{run_id}/commands").json()["data"]
        events = api.get(f"/runs/{run_id}/events", params={"limit": 10_000}).json()["data"]
        alerts = api.get(f"/runs/{run_id}/alerts").json()["data"]
        api.post(f"/runs/{run_id}/finish", json={"status": "finished"})
    finally:
        api.close()
    return {
        "scenario": scenario_name,
        "seed": seed,
        "role": scenario.role,
        "control": scenario.control,
        "family": family_of(scenario_name),
        "profile": load_profile(family),
        "steps_run": result.steps_run,
        "wall_time_s": round(result.wall_time_s, 2),
        "losses": result.losses,
        "wall_losses": result.wall_losses,
        "grad_norms": result.grad_norms,
        "attn_logit_max": result.attn_logit_max,
        "rollbacks": [list(r) for r in result.rollbacks],
        "recovery": summary,
        "delivered_all": report.delivered_all,
        "commands": [
            {
                "kind": c["kind"],
                "state": c["state"],
                "applied_step": c["applied_step"],
                "created_by": c["created_by"],
                "acted": _acted(c),
            }
            for c in commands
        ],
        "events": [{"kind": e["kind"], "step": e["step"], "payload": e["payload"]} for e in events],
        "alerts": [{"rule": a["rule_name"], "step": a["fired_step"]} for a in alerts],
        "points": {},
    }


def _acted(command: Mapping[str, Any]) -> bool:
    """Whether an applied command changed the run (a rollback the probe had already done is
    acknowledged without acting)."""
    result = command.get("result") or {}
    if command.get("state") != "applied":
        return False
    if command["kind"] == "rollback":
        return bool(result.get("rolled_back"))
    if command["kind"] == "qk_clip":
        return bool(result.get("heads_clipped"))
    return True


def _run_job(job: tuple[str, int, str, str, str | None]) -> str:
    scenario, seed, url, folder, family = job
    t0 = time.perf_counter()
    record = rescue_run(scenario, seed, url, family)
    save_run(record, run_path(scenario, seed, Path(folder)))
    acted = remedies(record)
    return (
        f"{scenario} seed {seed}: {record['steps_run']} steps, "
        f"{len(record['rollbacks'])} rollbacks, acted {acted}, {time.perf_counter() - t0:.0f} s"
    )


def _baseline_job(job: tuple[str, int]) -> str:
    import torch

    from benchmarks.early_warning import STOP_AFTER_EXPLOSION
    from benchmarks.scenarios import catalog
    from rankguard.probe.demo.train import train

    torch.set_num_threads(1)
    name, seed = job
    scenario = catalog.get(name)
    stop = STOP_AFTER_EXPLOSION if scenario.role == "failing" else None
    result = train(scenario, seed, stop_after_explosion=stop)
    record = {
        "scenario": name,
        "seed": seed,
        "role": scenario.role,
        "control": scenario.control,
        "steps_run": result.steps_run,
        "wall_time_s": round(result.wall_time_s, 2),
        "losses": result.losses,
        "grad_norms": result.grad_norms,
        "attn_logit_max": result.attn_logit_max,
        "points": {},
    }
    save_run(record, run_path(name, seed, BASELINE_RUNS))
    return f"baseline {name} seed {seed}: {result.steps_run} steps, {result.wall_time_s:.0f} s"


def unprotected(name: str, seed: int) -> dict[str, Any]:
    """The unprotected run of ``name``/``seed``: the lead-time recording, else the baseline."""
    path = run_path(name, seed)
    return load_run(path if path.exists() else run_path(name, seed, BASELINE_RUNS))


# --- the report ---------------------------------------------------------------------------

REMEDIES = ("rollback", "skip_step", "lr_backoff", "qk_clip", "msign")


def remedies(record: Mapping[str, Any]) -> dict[str, int]:
    """How often each remedy acted in one run: in the process (the probe's events and
    counters) and from the server (commands that changed the run)."""
    events = [e for e in record["events"] if e["kind"] in ("rollback", "lr_backoff", "qk_clip")]
    acted = {r: 0 for r in REMEDIES}
    for e in events:
        if e["kind"] == "qk_clip" and not e["payload"].get("heads_clipped"):
            continue
        acted[e["kind"]] += 1
    acted["skip_step"] = int(record["recovery"].get("skipped_updates", 0))
    for c in record["commands"]:
        if c["acted"] and c["kind"] == "msign":
            acted["msign"] += 1
        elif c["acted"] and c["kind"] == "scale_lr":
            acted["lr_backoff"] += 1
    return acted


def outcome(losses: Sequence[float], control_losses: Sequence[float]) -> dict[str, Any]:
    """Failure kind (or None), final trailing-25 loss and its ratio to the control's."""
    from rankguard.probe.demo.failure import classify, smoothed_final_loss

    fail = classify(losses, control_losses)
    final = smoothed_final_loss(losses)
    ref = smoothed_final_loss(control_losses)
    return {
        "failure": None if fail is None else fail.kind.value,
        "failure_step": None if fail is None else fail.step,
        "ratio_to_control": final / ref if math.isfinite(final) else None,
    }


def report(seeds: Sequence[int], tag: str = "main") -> dict[str, Any]:
    from benchmarks.scenarios import catalog
    from rankguard.probe.demo.failure import find_explosion

    runs = []
    for scenario in catalog.SCENARIOS.values():
        family = family_of(scenario.name)
        for seed in seeds:
            path = run_path(scenario.name, seed, AUTO_RUNS / "main")
            # leave-one-family-out: the family's own runs where its left-out profile differs
            # from the full one; where it does not, the full profile's runs are its runs
            rerun = run_path(scenario.name, seed, AUTO_RUNS / family)
            if tag == "lofo" and rerun.exists():
                path = rerun
            if not path.exists():
                continue
            rescued = load_run_full(path)
            control = unprotected(scenario.control or scenario.name, seed)["losses"]
            wall = find_explosion(rescued["wall_losses"])
            runs.append(
                {
                    "scenario": scenario.name,
                    "family": family,
                    "seed": seed,
                    "role": scenario.role,
                    "unprotected": outcome(unprotected(scenario.name, seed)["losses"], control),
                    "rescued": outcome(rescued["losses"], control),
                    "undone_explosion_step": None if wall is None else wall.step,
                    "acted": remedies(rescued),
                    "server_commands": len(rescued["commands"]),
                    "command_latency_steps": command_latency(rescued),
                    "rollbacks": rescued["rollbacks"],
                    "profile": rescued.get("profile"),
                }
            )
    return {"seeds": list(seeds), "tag": tag, "runs": runs, "summary": summarise(runs)}


def command_latency(record: Mapping[str, Any]) -> list[int]:
    """Steps from an alert's firing to the step its command was applied, per firing alert
    that ordered one (the server's events: the product's real latency, over HTTP)."""
    fired: dict[str, int] = {}
    applied: dict[str, int] = {}
    for e in record["events"]:
        command = e["payload"].get("command_id")
        if e["kind"] == "alert" and e["payload"].get("kind") == "firing" and command:
            fired[command] = e["step"]
        elif e["kind"] == "command_applied" and command and e["step"] is not None:
            applied[command] = e["step"]
    return [applied[c] - step for c, step in fired.items() if c in applied]


def load_run_full(path: Path) -> dict[str, Any]:
    record = load_run(path)
    record["wall_losses"] = [float(v) for v in record.get("wall_losses", record["losses"])]
    return record


def summarise(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    failing = [r for r in runs if r["role"] == "failing" and r["unprotected"]["failure"]]
    avoided = [r for r in failing if r["rescued"]["failure"] is None]
    within = [r for r in avoided if (r["rescued"]["ratio_to_control"] or math.inf) <= 1.10]
    healthy = [r for r in runs if r["role"] == "healthy"]
    touched = [r for r in healthy if r["server_commands"] or any(r["acted"].values())]
    acted = {m: sum(1 for r in failing if r["acted"][m]) for m in REMEDIES}
    latency = sorted(x for r in runs for x in r["command_latency_steps"])
    return {
        "failed_unprotected": len(failing),
        "avoided_failure": len(avoided),
        "avoided_fraction": len(avoided) / len(failing) if failing else None,
        "avoided_within_1_10": len(within),
        "healthy_runs": len(healthy),
        "healthy_runs_touched": len(touched),
        "runs_where_remedy_acted": acted,
        "actions": {m: sum(r["acted"][m] for r in failing) for m in REMEDIES},
        "command_latency_steps": {
            "n": len(latency),
            "min": latency[0] if latency else None,
            "median": statistics.median(latency) if latency else None,
            "max": latency[-1] if latency else None,
        },
        "undone_explosions": sum(1 for r in failing if r["undone_explosion_step"] is not None),
    }


def markdown(result: Mapping[str, Any]) -> str:
    def fmt(o: Mapping[str, Any]) -> str:
        ratio = "NaN" if o["ratio_to_control"] is None else f"{o['ratio_to_control']:.2f}x"
        return f"{o['failure'] or 'ok'} ({ratio})"

    def acts(r: Mapping[str, Any]) -> str:
        done = [f"{k} {v}" for k, v in r["acted"].items() if v]
        return ", ".join(done) or "–"

    lines = [
        "| family | scenario / seed | unprotected | auto-recover | remedies that acted "
        "| rollbacks (step -> resumed) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        rb = ", ".join(f"{a}->{b}" for a, b in r["rollbacks"]) or "–"
        lines.append(
            f"| {r['family']} | {r['scenario']} / {r['seed']} | {fmt(r['unprotected'])} "
            f"| {fmt(r['rescued'])} | {acts(r)} | {rb} |"
        )
    s = result["summary"]
    frac = "" if s["avoided_fraction"] is None else f" ({s['avoided_fraction']:.0%})"
    lines += [
        "",
        f"Failed unprotected: {s['failed_unprotected']}; avoided failure: "
        f"{s['avoided_failure']}{frac}, of which within 1.10x the control: "
        f"{s['avoided_within_1_10']}; healthy runs with any command or in-process action: "
        f"{s['healthy_runs_touched']}/{s['healthy_runs']}; explosions on steps a rollback "
        f"undid: {s['undone_explosions']}; failing runs where each remedy acted: "
        f"{s['runs_where_remedy_acted']}; actions in all: {s['actions']}; alert -> command "
        f"applied, in steps: {s['command_latency_steps']}.",
    ]
    return "\n".join(lines)


def plot(result: Mapping[str, Any]) -> list[Path]:
    """One PNG per failing scenario: auto-recover (solid) vs unprotected (dotted) vs the
    control (grey); vertical lines at the rollbacks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.scenarios import catalog

    by: dict[str, list[Mapping[str, Any]]] = {}
    for r in result["runs"]:
        if r["role"] == "failing":
            by.setdefault(r["scenario"], []).append(r)
    paths = []
    for name, rows in by.items():
        control_name = catalog.get(name).control or name
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for i, r in enumerate(rows):
            color, seed = f"C{i}", r["seed"]
            folder = AUTO_RUNS / "main"
            ax.plot(_smooth(unprotected(control_name, seed)["losses"]), color="0.6", lw=0.8)
            ax.plot(_smooth(unprotected(name, seed)["losses"]), color=color, lw=0.8, ls=":")
            rescued = load_run(run_path(name, seed, folder))
            ax.plot(_smooth(rescued["losses"]), color=color, lw=1.0, label=f"seed {seed}")
            for _at, resumed in r["rollbacks"]:
                ax.axvline(resumed, color=color, lw=0.5, alpha=0.6, ls="--")
        ax.set_ylim(1.5, 6.0)
        ax.set_xlabel("training step")
        ax.set_ylabel("loss (trailing mean of 10)")
        ax.set_title(
            f"{name}: auto-recover (solid), unprotected (dotted), control (grey);\n"
            "dashed: the step a rollback resumed from",
            fontsize=9,
        )
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = RESULTS / f"rescue_{name}.png"
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


# --- the command line ---------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    from benchmarks.scenarios import catalog

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cal = sub.add_parser("calibrate", help="freeze the profile (and the left-out ones)")
    cal.add_argument("--seeds", default=",".join(map(str, CALIBRATION_SEEDS)))
    for name in ("baseline", "run"):
        p = sub.add_parser(name)
        p.add_argument("--seeds", default=",".join(map(str, HELDOUT_SEEDS)))
        p.add_argument("--scenarios", default=None, help="comma-separated; default: all")
        p.add_argument("--workers", type=int, default=2)
        p.add_argument("--force", action="store_true")
    sub.choices["run"].add_argument(
        "--lofo", action="store_true", help="the families whose left-out profile differs"
    )
    rep = sub.add_parser("report")
    rep.add_argument("--seeds", default=",".join(map(str, HELDOUT_SEEDS)))
    rep.add_argument("--tag", default="auto")
    rep.add_argument("--plots", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.command == "calibrate":
        frozen = calibrate_all(seeds)
        PROFILE_PATH.write_text(json.dumps(frozen, indent=1) + "\n")
        print(json.dumps({"profile": frozen["profile"], "lofo": frozen["lofo"]}, indent=1))
        return
    if args.command == "report":
        for tag in ("main", "lofo"):
            result = report(seeds, tag)
            if not result["runs"]:
                continue
            path = RESULTS / f"rescue_{args.tag}_{tag}.json"
            path.write_text(json.dumps(result, indent=1) + "\n")
            print(f"## {tag}\n\n{markdown(result)}\n\nwrote {path.relative_to(_ROOT)}\n")
            if args.plots and tag == "main":
                for p in plot(result):
                    print(f"wrote {p.relative_to(_ROOT)}")
        return
    names = [s.name for s in catalog.SCENARIOS.values()]
    if args.scenarios:
        names = args.scenarios.split(",")
    if args.command == "baseline":
        jobs = [
            (n, seed)
            for seed in seeds
            for n in names
            if args.force
            or not (run_path(n, seed).exists() or run_path(n, seed, BASELINE_RUNS).exists())
        ]
        print(f"baseline: {len(jobs)} runs", flush=True)
        run_jobs(_baseline_job, jobs, workers=args.workers)
        return
    plan: list[tuple[str, str | None]] = []  # (scenario, left-out family or None)
    frozen = json.loads(PROFILE_PATH.read_text())
    for n in names:
        family = family_of(n)
        if not args.lofo:
            plan.append((n, None))
        elif frozen["lofo"].get(family) not in (None, frozen["profile"]):
            plan.append((n, family))
    with tempfile.TemporaryDirectory() as tmp, serve(Path(tmp)) as url:
        jobs = []
        for n, family in plan:
            folder = AUTO_RUNS / ("main" if family is None else family)
            for seed in seeds:
                if args.force or not run_path(n, seed, folder).exists():
                    jobs.append((n, seed, url, str(folder), family))
        print(f"rescue: {len(jobs)} runs against {url}", flush=True)
        run_jobs(_run_job, jobs, workers=args.workers)


if __name__ == "__main__":
    main()
