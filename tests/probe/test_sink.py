"""The JSON Lines sink: file round trip, registration on the first line."""

from __future__ import annotations

import math

from rankguard.probe import Probe
from rankguard.probe.sink import FileSink, read_jsonl
from rankguard.probe.wire import Point, encode_batch, iter_points


def test_file_sink_round_trip(tmp_path) -> None:
    run = {"id": "abc", "name": "r", "config": {}, "world_size": 1, "parameters": []}
    sink = FileSink(tmp_path / "sub" / "r.jsonl", registration=run)
    first = [Point("loss", "global", 0, 1.0), Point("loss", "global", 1, math.inf)]
    sink.write(encode_batch(first))
    sink.write(encode_batch([Point("stable_rank", "w[q]", 1, 3.25)]))
    sink.close()
    sink.close()
    batches = list(read_jsonl(tmp_path / "sub" / "r.jsonl"))
    assert batches[0]["run"] == run and "run" not in batches[1]
    assert [(p.quantity, p.target, p.step, p.value) for p in iter_points(batches)] == [
        ("loss", "global", 0, 1.0),
        ("loss", "global", 1, math.inf),
        ("stable_rank", "w[q]", 1, 3.25),
    ]


def test_probe_writes_registration_and_points(tiny_gpt, tmp_path, train) -> None:
    probe = Probe(tiny_gpt, run="my run/1", every=2, log_dir=tmp_path, strict=True)
    train(tiny_gpt, probe, 3)
    probe.close()
    path = probe.sink_path
    assert path is not None and path.parent == tmp_path and path.name.startswith("my_run_1-")
    batches = list(read_jsonl(path))
    run = batches[0]["run"]
    assert run["id"] == probe.run_id and run["name"] == "my run/1" and run["world_size"] == 1
    assert {"name": "transformer.h.0.attn.c_attn.weight", "shape": [48, 16]} in run["parameters"]
    assert run["config"]["every"] == 2
    assert all("run" not in b for b in batches[1:])
    steps = {p.step for p in iter_points(batches) if p.quantity == "stable_rank"}
    assert steps == {0, 2}
    hist = [h for b in batches for h in b["histograms"]]
    assert hist and hist[0]["quantity"] == "sa_cosine" and len(hist[0]["edges"]) == 42
    assert sum(hist[0]["counts"]) > 0
