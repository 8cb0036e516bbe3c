"""The JSON Lines sink: encoding of non-finite floats, columnar points, file round trip."""

from __future__ import annotations

import json
import math

import pytest

from rankguard.probe import Probe
from rankguard.probe.sink import (
    FileSink,
    Point,
    decode_float,
    encode_batch,
    encode_float,
    encode_histogram,
    iter_points,
    read_jsonl,
)


@pytest.mark.parametrize(
    ("value", "encoded"),
    [(1.5, 1.5), (math.nan, "NaN"), (math.inf, "Infinity"), (-math.inf, "-Infinity"), (0.0, 0.0)],
)
def test_float_encoding_round_trip(value: float, encoded: object) -> None:
    assert encode_float(value) == encoded or (math.isnan(value) and encode_float(value) == "NaN")
    back = decode_float(encode_float(value))
    assert back == value or (math.isnan(value) and math.isnan(back))


def test_decode_rejects_other_strings() -> None:
    with pytest.raises(ValueError, match="value"):
        decode_float("nan")


def test_batch_is_columnar() -> None:
    points = [Point("loss", "global", 3, math.nan, 0, 1.0), Point("stable_rank", "w", 3, 2.0)]
    batch = encode_batch(points, [encode_histogram("sa_cosine", "w", 3, [-1, 0, 1], [2, 3])])
    assert batch["v"] == 1 and "run" not in batch
    assert batch["points"] == {
        "quantity": ["loss", "stable_rank"],
        "target": ["global", "w"],
        "rank": [0, 0],
        "step": [3, 3],
        "wall_time": [1.0, None],
        "value": ["NaN", 2.0],
    }
    assert batch["histograms"][0]["counts"] == [2, 3]
    json.dumps(batch, allow_nan=False)  # valid strict JSON


def test_file_sink_round_trip(tmp_path) -> None:
    run = {"id": "abc", "name": "r", "config": {}, "world_size": 1, "parameters": []}
    sink = FileSink(tmp_path / "sub" / "r.jsonl", run=run)
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
