"""``python -m benchmarks.demo``: records the demo's unprotected twin into the package.

``rankguard demo`` prints, beside its own run, what the same scenario and seed do without
rankguard. That comes from the lead-time benchmark's recordings (``benchmarks/results/runs``,
made by ``python -m benchmarks.early_warning record``), which do not ship in the wheel: this
script summarises them into ``probe/demo/twin.json`` (failure step and kind, final loss, and
the healthy control's final loss, per recorded seed), which does. The demo itself lives in
``rankguard.probe.demo``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.early_warning import RUNS, load_run, run_path
from rankguard.probe.demo import run as demo
from rankguard.probe.demo.failure import classify, smoothed_final_loss
from rankguard.probe.demo.scenario import DEMO

OUT = Path(demo.__file__).with_name(demo.TWIN_FILE)


def twins(folder: Path = RUNS) -> dict[str, Any]:
    """The twin summary of every seed with both recordings in ``folder``."""
    assert DEMO.control is not None
    seeds: dict[str, Any] = {}
    for path in sorted(folder.glob(f"{DEMO.name}_seed*.json.gz")):
        seed = int(path.name.removeprefix(f"{DEMO.name}_seed").split(".")[0])
        control_path = run_path(DEMO.control, seed, folder)
        if not control_path.exists():
            continue
        run, control = load_run(path), load_run(control_path)
        failure = classify(run["losses"], control["losses"])
        final = smoothed_final_loss(run["losses"])
        seeds[str(seed)] = {
            "failure_step": None if failure is None else failure.step,
            "failure_kind": None if failure is None else failure.kind.value,
            "final_loss": final if final == final and abs(final) != float("inf") else "Infinity",
            "control_final_loss": smoothed_final_loss(control["losses"]),
        }
    return {
        "scenario": DEMO.name,
        "control": DEMO.control,
        "source": "benchmarks/results/runs (python -m benchmarks.early_warning record)",
        "seeds": dict(sorted(seeds.items(), key=lambda kv: int(kv[0]))),
    }


def main() -> None:
    OUT.write_text(json.dumps(twins(), indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
