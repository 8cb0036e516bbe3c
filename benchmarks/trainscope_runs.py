"""trainscope (PyPI, MIT) attached to the lead-time benchmark's scenario runs, its detectors scored
like rankguard's: the first step each one fires, against the same failure steps.

Runs in its own virtual environment (trainscope pins nothing we use, but it is no dependency of
rankguard): ``benchmarks/setup_peers.sh`` builds ``benchmarks/.venv-peers`` (torch from the
same CPU wheel, then ``pip install trainscope wandb transformers``). Then, from the repo root::

    OMP_NUM_THREADS=1 benchmarks/.venv-peers/bin/python -m benchmarks.trainscope_runs \\
        --seeds 21,22 --workers 2

Each (scenario, seed) trains again with ``TrainScope(model, optimizer,
TrainScopeConfig()).attach()`` and ``scope.step(loss, batch_index=step)`` between backward and
``optimizer.step()``, as its README says; the training is the same as the recorded run's (the
loop is deterministic per scenario and seed, and trainscope only reads). Scored, with
trainscope's own rules (``trainscope.analysis.first_crossing_step``: median + 3 x 1.4826 MAD of
the first 40 samples, 3 consecutive samples above):

- ``trainscope_cusum``: its default detector (CUSUM on the loss, h 6, slack 1): the first step
  ``scope.step`` reports a spike;
- ``trainscope_kurtosis``: activation kurtosis of the first layer that has it (as its run
  signature takes it), over the steps it was measured (every 5 by default);
- ``trainscope_grad_norm``: the global gradient norm;
- ``trainscope_layer_grad``: each layer's gradient L2 norm, the earliest layer (its per-layer
  signal under the same rule; trainscope itself shows them in its UI without a detector).

Writes ``benchmarks/results/trainscope/<scenario>_seed<k>.json`` (first firings and the
trainscope version). Nothing of trainscope is committed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

OUT = _ROOT / "benchmarks" / "results" / "trainscope"
DETECTORS = (
    "trainscope_cusum",
    "trainscope_kurtosis",
    "trainscope_grad_norm",
    "trainscope_layer_grad",
)


class ScopeCallback:
    """Attaches trainscope at step 0 (the training loop builds the model) and steps it between
    backward and the optimizer step; remembers the first spike its detector reports."""

    def __init__(self, run_dir: str, run_name: str) -> None:
        self.run_dir, self.run_name = run_dir, run_name
        self.scope: Any = None
        self.first_spike: int | None = None

    def on_after_backward(self, step: int, model: Any, optimizer: Any, loss: Any) -> None:
        from trainscope import TrainScope
        from trainscope.core.config import TrainScopeConfig

        if self.scope is None:
            config = TrainScopeConfig(run_dir=self.run_dir, run_name=self.run_name)
            self.scope = TrainScope(model, optimizer, config=config).attach()
        spike = self.scope.step(float(loss), batch_index=step)
        if spike and self.first_spike is None:
            self.first_spike = int(spike["step"])

    def close(self) -> None:
        if self.scope is not None:
            self.scope.detach()


def _crossing(rows: list[dict[str, Any]], key: str) -> int | None:
    """trainscope's crossing rule over the rows that carry ``key``, as a training step."""
    from trainscope.analysis import first_crossing_step

    measured = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) is not None]
    index = first_crossing_step([v for _, v in measured])
    return None if index is None else measured[index][0]


def score(run_path: Path, first_spike: int | None) -> dict[str, int | None]:
    from trainscope.analysis import read_arrow_sync

    global_rows = read_arrow_sync(run_path / "global.arrow")
    layer_files = sorted((run_path / "layers").glob("*.arrow"))
    kurtosis: int | None = None
    layer_grad: list[int] = []
    for i, path in enumerate(layer_files):
        rows = read_arrow_sync(path)
        # the first of the first 5 files that has it (its run signature)
        if kurtosis is None and i < 5 and any(r.get("act_kurtosis") is not None for r in rows):
            kurtosis = _crossing(rows, "act_kurtosis")
            kurtosis = -1 if kurtosis is None else kurtosis
        step = _crossing(rows, "grad_l2_norm")
        if step is not None:
            layer_grad.append(step)
    return {
        "trainscope_cusum": first_spike,
        "trainscope_kurtosis": None if kurtosis in (None, -1) else kurtosis,
        "trainscope_grad_norm": _crossing(global_rows, "grad_norm_before_clip"),
        "trainscope_layer_grad": min(layer_grad) if layer_grad else None,
    }


def run_one(job: tuple[str, int]) -> str:
    from importlib.metadata import version

    import torch

    from benchmarks.early_warning import STOP_AFTER_EXPLOSION
    from benchmarks.scenarios import catalog
    from rankguard.probe.demo.train import train

    name, seed = job
    torch.set_num_threads(1)
    scenario = catalog.get(name)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cb = ScopeCallback(tmp, f"{name}-seed{seed}")
        stop = STOP_AFTER_EXPLOSION if scenario.role == "failing" else None
        result = train(scenario, seed, callbacks=[cb], stop_after_explosion=stop)
        cb.close()
        fired = score(Path(tmp) / cb.run_name, cb.first_spike)
    record = {
        "scenario": name,
        "seed": seed,
        "trainscope_version": version("trainscope"),
        "steps_run": result.steps_run,
        "final_loss": result.losses[-1] if math.isfinite(result.losses[-1]) else None,
        "wall_time_s": round(time.perf_counter() - t0, 1),
        "first_firing": fired,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}_seed{seed}.json").write_text(json.dumps(record, indent=1) + "\n")
    return f"{name} seed {seed}: {fired} ({record['wall_time_s']} s)"


def load(seeds: list[int], folder: Path = OUT) -> dict[tuple[str, int], dict[str, int | None]]:
    """``{(scenario, seed): first firings}`` of the recorded trainscope runs (torch-free)."""
    out = {}
    for path in sorted(folder.glob("*_seed*.json")):
        record = json.loads(path.read_text())
        if record["seed"] in seeds:
            out[(record["scenario"], record["seed"])] = record["first_firing"]
    return out


def main(argv: list[str] | None = None) -> None:
    from benchmarks.early_warning import run_jobs
    from benchmarks.scenarios import catalog

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", required=True)
    parser.add_argument("--scenarios", default=None, help="comma-separated; default: all")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    names = list(catalog.SCENARIOS) if args.scenarios is None else args.scenarios.split(",")
    jobs = [
        (name, int(seed))
        for seed in args.seeds.split(",")
        for name in names
        if args.force or not (OUT / f"{name}_seed{seed}.json").exists()
    ]
    print(f"trainscope: {len(jobs)} runs with {args.workers} worker(s)", flush=True)
    run_jobs(run_one, jobs, workers=args.workers)


if __name__ == "__main__":
    main()
