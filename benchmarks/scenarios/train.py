"""``python -m benchmarks.scenarios.train NAME [NAME ...]``: trains catalog scenarios.

The training loop itself ships with the package (``rankguard.probe.demo.train``: the demo
trains it from an installed wheel); this is the catalog's command line.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rankguard.probe.demo.data import ByteCorpus
from rankguard.probe.demo.train import RunResult, summarize, train


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m benchmarks.scenarios.train NAME [NAME ...] --seeds 0,1,2 [--out runs.jsonl]``.

    Failing scenarios are run together with their control so silent degradation is judged.
    """
    import argparse
    import json

    from benchmarks.scenarios import catalog

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("names", nargs="+", help=f"scenarios: {sorted(catalog.SCENARIOS)}")
    parser.add_argument("--seeds", default=None, help="comma-separated; default: the scenario's")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--stop-after-explosion", type=int, default=None, help="steps to run past an explosion"
    )
    parser.add_argument("--out", default=None, help="append full curves as JSON lines here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    corpus = ByteCorpus.load()
    controls: dict[tuple[str, int], RunResult] = {}
    for name in args.names:
        scenario = catalog.get(name)
        seeds = (
            scenario.seeds if args.seeds is None else tuple(int(s) for s in args.seeds.split(","))
        )
        for seed in seeds:
            control = None
            if scenario.control is not None:
                key = (scenario.control, seed)
                if key not in controls:
                    controls[key] = train(catalog.get(scenario.control), seed, corpus=corpus)
                control = controls[key]
            result = train(
                scenario, seed, corpus=corpus, stop_after_explosion=args.stop_after_explosion
            )
            if scenario.role == "healthy":
                controls[(name, seed)] = result
            record = summarize(result, control)
            print(json.dumps(record), flush=True)
            if args.out is not None:
                with open(args.out, "a") as f:
                    f.write(json.dumps({"summary": record, "run": result.to_dict()}) + "\n")


if __name__ == "__main__":
    main()
