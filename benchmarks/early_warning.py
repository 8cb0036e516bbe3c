"""Claim (issues 7, 20): rankguard's alerts fire well before the loss moves, earlier than the
detectors users already run, on more than one architecture, and stay quiet on healthy runs.

Every scenario of ``benchmarks/scenarios/catalog.py`` (families of a GPT and of a Llama, AdamW,
SGD with momentum and Lion, LR faults, post-LN, fp16 attention) is trained with a probe attached
(``every=5``, Jacobian every 25) and recorded: the probe's points and the per-step loss and
pre-clip gradient norm. Offline, over the recordings (``detectors.py``: every detector is a
rule of the server's alert engine):

- the peers' detectors with their published defaults (``server/alerts/peers.py``) over the
  per-step loss and gradient norm, as their trainers see them; trainscope's, recorded for real
  in its own environment (``trainscope_runs.py``);
- rankguard's default pack (``server/alerts/pack.py``) over what the probe sent.

Calibration (``calibration.py``) is a procedure over the healthy runs of the development seeds
(0, 1, 3-6 where recorded); the frozen pack is that procedure on every family, and each family is
also scored by the pack the procedure gives without it (leave-one-family-out). The headline is
on fresh seeds 21, 22 (``HELDOUT_SEEDS``), recorded after the pack was frozen::

    python -m benchmarks.early_warning record --seeds 0,1 --workers 2
    python -m benchmarks.early_warning record --seeds 21,22 --workers 2
    benchmarks/.venv-peers/bin/python -m benchmarks.trainscope_runs --seeds 21,22 --workers 2
    python -m benchmarks.early_warning analyse --seeds 21,22 --tag heldout_2122 --plots

Failure step (``failure_of``): an explosion's step from ``failure.find_explosion``; for a
silent degradation, the first step from which the trailing-25 mean loss stays above 1.15x the
healthy control's until the end (``degradation_step``). Scoring: ``lead_report.py``.

Recorded runs are cached as ``benchmarks/results/runs/<scenario>_seed<k>.json.gz``; ``record``
skips runs already there unless ``--force``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

RESULTS = _ROOT / "benchmarks" / "results"
RUNS = RESULTS / "runs"
CALIBRATION_SEEDS = (0, 1, 3, 4, 5, 6)
HELDOUT_SEEDS = (21, 22)
PROBE_EVERY = 5
JACOBIAN_EVERY = 25
STOP_AFTER_EXPLOSION = 15  # steps recorded past an explosion (enough to see the aftermath)
DEGRADATION_MARGIN = 0.15  # = failure.DEGRADATION_MARGIN, here for the per-step definition
SMOOTH = 25  # = failure.SMOOTH_WINDOW


# --- recording ---------------------------------------------------------------------------------


class ProbeCallback:
    """Attaches a rankguard probe to the scenario's model at step 0 (after its backward).

    ``train()`` builds the model itself, so the probe is created lazily; step 0's forward is
    therefore unobserved and the probe's first full sample is at step ``every``. ``on_batch``
    (optional) is called with each new probe batch: the rescue benchmark runs the alert engine
    there and pushes MSign commands into ``transport``.
    """

    def __init__(
        self,
        run: str,
        *,
        every: int = PROBE_EVERY,
        jacobian_every: int = JACOBIAN_EVERY,
        on_batch: Any = None,
    ) -> None:
        from rankguard.probe.transport import MemoryTransport

        self.run = run
        self.every = every
        self.jacobian_every = jacobian_every
        self.transport = MemoryTransport()
        self.probe: Any = None
        self.on_batch = on_batch
        self._seen = 0

    def on_before_step(self, step: int, model: Any, optimizer: Any) -> None:
        if self.probe is None:
            from rankguard.probe import Probe

            self.probe = Probe(
                model,
                optimizer,
                run=self.run,
                every=self.every,
                jacobian_every=self.jacobian_every,
                transport=self.transport,
            )

    def on_step(self, step: int, model: Any, optimizer: Any, loss: Any) -> None:
        if step == 0:
            return  # the probe was armed after this step's forward
        self.probe.step(loss, step=step)
        if self.on_batch is not None:
            new = self.transport.batches[self._seen :]
            self._seen = len(self.transport.batches)
            if new:
                self.on_batch(step, new, self.transport)

    def close(self) -> None:
        if self.probe is not None:
            self.probe.close()


def points_by_quantity(batches: Sequence[Mapping[str, Any]]) -> dict[str, list[list[Any]]]:
    """``{quantity: [[target, step, value], ...]}`` in emission order (values as floats)."""
    from rankguard.probe.wire import iter_points

    out: dict[str, list[list[Any]]] = {}
    for p in iter_points(batches):
        out.setdefault(p.quantity, []).append([p.target, p.step, p.value])
    return out


def run_path(scenario: str, seed: int, folder: Path = RUNS) -> Path:
    return folder / f"{scenario}_seed{seed}.json.gz"


def _encode(value: float) -> float | str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _decode(value: Any) -> float:
    return float(value) if isinstance(value, str) else value


def save_run(record: Mapping[str, Any], path: Path) -> None:
    """Writes ``record`` as gzip'd JSON; non-finite floats as the contract's strings."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def enc(obj: Any) -> Any:
        if isinstance(obj, float):
            return _encode(obj)
        if isinstance(obj, Mapping):
            return {k: enc(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [enc(v) for v in obj]
        return obj

    tmp = path.with_suffix(".tmp")
    with gzip.open(tmp, "wt") as f:
        json.dump(enc(record), f, allow_nan=False)
    tmp.replace(path)


def load_run(path: Path) -> dict[str, Any]:
    with gzip.open(path, "rt") as f:
        record = json.load(f)
    for key in ("losses", "grad_norms", "attn_logit_max"):
        record[key] = [_decode(v) for v in record[key]]
    record["points"] = {
        q: [[t, s, _decode(v)] for t, s, v in rows] for q, rows in record["points"].items()
    }
    return record


def record_run(scenario_name: str, seed: int) -> dict[str, Any]:
    """Trains one scenario/seed with the probe attached; returns its curves and probe points."""
    import torch

    from benchmarks.scenarios import catalog
    from rankguard.probe.demo.train import train

    torch.set_num_threads(1)
    scenario = catalog.get(scenario_name)
    cb = ProbeCallback(f"{scenario_name}-seed{seed}")
    stop = STOP_AFTER_EXPLOSION if scenario.role == "failing" else None
    result = train(scenario, seed, callbacks=[cb], stop_after_explosion=stop)
    cb.close()
    return {
        "scenario": scenario_name,
        "seed": seed,
        "family": scenario.family,
        "arch": scenario.arch,
        "role": scenario.role,
        "control": scenario.control,
        "steps_run": result.steps_run,
        "wall_time_s": round(result.wall_time_s, 2),
        "probe_every": cb.every,
        "jacobian_every": cb.jacobian_every,
        "weight_targets": [t.name for t in cb.probe.targets],
        "losses": result.losses,
        "grad_norms": result.grad_norms,
        "attn_logit_max": result.attn_logit_max,
        "points": points_by_quantity(cb.transport.batches),
    }


def _record_job(job: tuple[str, int, str]) -> str:
    scenario, seed, folder = job
    t0 = time.perf_counter()
    record = record_run(scenario, seed)
    save_run(record, run_path(scenario, seed, Path(folder)))
    return f"{scenario} seed {seed}: {record['steps_run']} steps, {time.perf_counter() - t0:.0f} s"


def record_all(
    scenarios: Sequence[str], seeds: Sequence[int], *, workers: int, force: bool, folder: Path
) -> None:
    from benchmarks.scenarios import catalog

    # Longest runs first (healthy and silent-degradation runs go the full 400 steps).
    order = sorted(scenarios, key=lambda n: catalog.get(n).expected is not None)
    jobs = [
        (name, seed, str(folder))
        for seed in seeds
        for name in order
        if force or not run_path(name, seed, folder).exists()
    ]
    print(f"recording {len(jobs)} runs with {workers} worker(s)", flush=True)
    run_jobs(_record_job, jobs, workers=workers)


def run_jobs(job: Callable[[Any], str], jobs: Sequence[Any], *, workers: int) -> None:
    """Runs ``job`` over ``jobs`` (in ``workers`` spawned processes when > 1), printing each
    job's one-line summary as it finishes."""
    if workers <= 1:
        for item in jobs:
            print(job(item), flush=True)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for line in pool.imap_unordered(job, jobs):
            print(line, flush=True)


# --- failure step ------------------------------------------------------------------------------


def trailing_mean(values: Sequence[float], window: int = SMOOTH) -> list[float]:
    """Mean of the last ``window`` values at each step (fewer at the start); inf if non-finite."""
    out: list[float] = []
    for i in range(len(values)):
        tail = values[max(0, i - window + 1) : i + 1]
        out.append(sum(tail) / len(tail) if all(math.isfinite(v) for v in tail) else math.inf)
    return out


def degradation_step(
    losses: Sequence[float],
    control_losses: Sequence[float],
    *,
    margin: float = DEGRADATION_MARGIN,
    window: int = SMOOTH,
    start: int = 50,
) -> int | None:
    """First step >= ``start`` from which the trailing mean stays > (1+margin) x the control's.

    "Stays" means through the last step both runs have; None if the run ends below the bound.
    """
    ours, ref = trailing_mean(losses, window), trailing_mean(control_losses, window)
    n = min(len(ours), len(ref))
    first: int | None = None
    for i in range(start, n):
        if ours[i] > (1.0 + margin) * ref[i]:
            if first is None:
                first = i
        else:
            first = None
    return first


def failure_of(record: Mapping[str, Any], control: Mapping[str, Any] | None) -> dict[str, Any]:
    """``{"kind", "step"}`` under the one definition (failure.py), with the per-step onset."""
    from rankguard.probe.demo.failure import classify

    losses = record["losses"]
    fail = classify(losses, None if control is None else control["losses"])
    if fail is None:
        return {"kind": None, "step": None}
    step = fail.step
    if fail.kind.value == "silent_degradation" and control is not None:
        onset = degradation_step(losses, control["losses"])
        step = onset if onset is not None else fail.step
    return {"kind": fail.kind.value, "step": step}


# --- analysis ----------------------------------------------------------------------------------

# rankguard's precursor rules: what the peers lack. The spectral/attention ones, and the
# update-to-weight ratio of one optimizer step (absolute, and relative to the run's own level).
SPECTRAL_RULES = (
    "sa_sign_diversity_collapse",
    "stable_rank_collapse",
    "jacobian_alignment_gain_above_one",
    "attention_logit_high",
    "attention_logit_divergence",
    "representation_collapse",
)
PRECURSOR_RULES = (*SPECTRAL_RULES, "update_ratio_high", "update_ratio_rise")
TRAINSCOPE = (
    "trainscope_cusum",
    "trainscope_kurtosis",
    "trainscope_grad_norm",
    "trainscope_layer_grad",
)


def _earliest(fired: Mapping[str, int | None], names: Sequence[str]) -> int | None:
    steps = [fired[n] for n in names if fired.get(n) is not None]
    return min(steps) if steps else None  # type: ignore[type-var]


def detect(
    record: Mapping[str, Any],
    pack: Sequence[Any],
    peers: Sequence[Any],
    trainscope: Mapping[str, int | None] | None,
) -> dict[str, int | None]:
    """First firing of every detector on one recorded run: the peers' rules over the per-step
    loss and gradient norm (``peer:<name>``), trainscope's detectors when recorded, and every
    rule of rankguard's pack over what the probe sent (``pack:<name>``), with the earliest of
    the pack (``rankguard_pack``) and of its precursors (``rankguard_precursors``)."""
    from benchmarks import detectors
    from rankguard.server.alerts.pack import specialise

    out: dict[str, int | None] = {}
    for name, step in detectors.peer_first_firings(peers, record).items():
        out[f"peer:{name}"] = step
    for name in TRAINSCOPE:
        out[name] = None if trainscope is None else trainscope.get(name)
    rules = specialise(pack, record["weight_targets"])
    pack_fired = detectors.rule_first_firings(rules, record["points"])
    for rule in pack:
        out[f"pack:{rule.name}"] = pack_fired.get(rule.name)
    out["rankguard_pack"] = _earliest(pack_fired, list(pack_fired))
    out["rankguard_precursors"] = _earliest(pack_fired, PRECURSOR_RULES)
    return out


def load_records(seeds: Sequence[int], folder: Path = RUNS) -> dict[tuple[str, int], Any]:
    from benchmarks.scenarios import catalog

    out = {}
    for name in catalog.SCENARIOS:
        for seed in seeds:
            path = run_path(name, seed, folder)
            if path.exists():
                record = out[(name, seed)] = load_run(path)
                # recordings from before the families carry neither label
                record.setdefault("family", catalog.get(name).family)
                record.setdefault("arch", catalog.get(name).arch)
    return out


def fires_on(rule: Any, record: Mapping[str, Any]) -> bool:
    """Whether ``rule`` fires at all on a recorded run (rankguard's view: the probe's points)."""
    from benchmarks import detectors
    from rankguard.server.alerts.pack import specialise

    (specialised,) = specialise([rule], record["weight_targets"])
    return (
        detectors.rule_first_firing(specialised, record["points"].get(rule.quantity, ()))
        is not None
    )


def packs(dev: Mapping[tuple[str, int], Any]) -> dict[str, Any]:
    """The frozen pack (``pack.default_rules()``), the same procedure re-run on every family's
    development runs (to check the pack is what the procedure gives) and, per family, the pack
    calibrated without that family (leave-one-family-out)."""
    from benchmarks.calibration import calibrate, quiet_peers
    from benchmarks.scenarios import catalog
    from rankguard.server.alerts.pack import core_rules, default_rules
    from rankguard.server.alerts.peers import peer_rules

    def pack_from(families: set[str]) -> tuple[list[Any], dict[str, Any]]:
        healthy = [r for r in dev.values() if r["role"] == "healthy" and r["family"] in families]
        rules, notes = calibrate(core_rules(), healthy, fires_on)
        joined = quiet_peers(peer_rules(), healthy, fires_on)
        notes["peers_joined"] = [r.name for r in joined]
        return [*rules, *joined], notes

    everything = set(catalog.families())
    redo, redo_notes = pack_from(everything)
    out: dict[str, Any] = {
        "frozen": default_rules(),
        "procedure_on_all": redo,
        "procedure_notes": redo_notes,
        "lofo": {},
        "lofo_notes": {},
    }
    for family in sorted(everything):
        out["lofo"][family], out["lofo_notes"][family] = pack_from(everything - {family})
    return out


def analyse(
    seeds: Sequence[int], dev_seeds: Sequence[int] = CALIBRATION_SEEDS, folder: Path = RUNS
) -> dict[str, Any]:
    """Per held-out run: failure step and the first firing of every detector, with the frozen
    pack and with the pack calibrated without the run's family; the summaries per
    architecture."""
    from benchmarks import trainscope_runs
    from rankguard.server.alerts.peers import peer_rules

    calibrated = packs(load_records(dev_seeds, folder))
    records = load_records(seeds, folder)
    scope = trainscope_runs.load(list(seeds))
    peers = peer_rules()
    runs: list[dict[str, Any]] = []
    for (name, seed), record in sorted(records.items()):
        control = records.get((record["control"], seed)) if record["control"] else None
        ts = scope.get((name, seed))
        fired = detect(record, calibrated["frozen"], peers, ts)
        lofo = detect(record, calibrated["lofo"][record["family"]], [], None)
        fired["rankguard_pack_lofo"] = lofo["rankguard_pack"]
        fired["rankguard_precursors_lofo"] = lofo["rankguard_precursors"]
        failure = failure_of(record, control)
        lead = {
            det: (None if step is None or failure["step"] is None else failure["step"] - step)
            for det, step in fired.items()
        }
        runs.append(
            {
                "scenario": name,
                "seed": seed,
                "family": record["family"],
                "arch": record["arch"],
                "role": record["role"],
                "steps_run": record["steps_run"],
                "failure": failure,
                "trainscope_recorded": ts is not None,
                "first_firing": fired,
                "lead_time": lead,
            }
        )
    from benchmarks.lead_report import summarise

    return {
        "seeds": list(seeds),
        "dev_seeds": list(dev_seeds),
        "packs": {
            "frozen": [r.to_dict() for r in calibrated["frozen"]],
            "procedure_notes": calibrated["procedure_notes"],
            "procedure_matches_frozen": _same_pack(
                calibrated["frozen"], calibrated["procedure_on_all"]
            ),
            "lofo_notes": calibrated["lofo_notes"],
        },
        "runs": runs,
        "summary": summarise(runs),
    }


def _same_pack(a: Sequence[Any], b: Sequence[Any]) -> list[str]:
    """Names of the rules where two packs differ (empty: the same)."""
    da = {r.name: r.to_dict() for r in a}
    db = {r.name: r.to_dict() for r in b}
    return sorted(n for n in set(da) | set(db) if da.get(n) != db.get(n))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="train and record the scenarios with the probe")
    rec.add_argument("--seeds", default="0,1,3,4,5,6")
    rec.add_argument("--scenarios", default=None, help="comma-separated; default: all")
    rec.add_argument("--workers", type=int, default=2)
    rec.add_argument("--force", action="store_true")
    ana = sub.add_parser("analyse", help="run the detectors over recorded runs")
    ana.add_argument("--seeds", default=",".join(map(str, HELDOUT_SEEDS)))
    ana.add_argument("--dev-seeds", default=",".join(map(str, CALIBRATION_SEEDS)))
    ana.add_argument("--tag", default="heldout_2122", help="results file: lead_time_<tag>.json")
    ana.add_argument("--plots", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.command == "record":
        from benchmarks.scenarios import catalog

        names = list(catalog.SCENARIOS) if args.scenarios is None else args.scenarios.split(",")
        record_all(names, seeds, workers=args.workers, force=args.force, folder=RUNS)
        return
    from benchmarks.lead_report import markdown_tables, plot_runs

    result = analyse(seeds, [int(s) for s in args.dev_seeds.split(",")])
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"lead_time_{args.tag}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown_tables(result))
    print(f"\nwrote {path.relative_to(_ROOT)}")
    if args.plots:

        def losses(name: str, seed: int) -> list[float]:
            return list(load_run(run_path(name, seed))["losses"])

        for p in plot_runs(result, losses, RESULTS):
            print(f"wrote {p.relative_to(_ROOT)}")


if __name__ == "__main__":
    main()
