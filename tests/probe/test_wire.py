"""The wire codec: non-finite floats as strings, columnar points, strict JSON, merging."""

from __future__ import annotations

import json
import math

import pytest

from rankguard.probe.wire import (
    MAX_COMMANDS_PER_POLL,
    Point,
    ack_batch,
    batch_size,
    decode_float,
    encode_batch,
    encode_float,
    encode_histogram,
    encode_json,
    merge_batches,
    parse_commands,
    parse_job_token,
    point_count,
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


def test_encode_json_turns_stray_non_finite_floats_into_strings() -> None:
    body = {"state": "applied", "result": {"x": math.nan, "ys": [1.0, -math.inf, (math.inf,)]}}
    assert json.loads(encode_json(body)) == {
        "state": "applied",
        "result": {"x": "NaN", "ys": [1.0, "-Infinity", ["Infinity"]]},
    }
    assert encode_json({"a": [1, 2.5]}) == '{"a":[1,2.5]}'


def test_merged_batches_keep_every_point_and_histogram_in_order() -> None:
    hist = encode_histogram("sa_cosine", "w", 1, [-1, 0, 1], [1, 1])
    first = encode_batch([Point("loss", "global", 0, 1.0)])
    second = encode_batch([Point("loss", "global", 1, 2.0), Point("x", "w", 1, 3.0)], [hist])
    merged = merge_batches([first, second])
    assert point_count(merged) == 3 == point_count(first) + point_count(second)
    assert merged["points"]["step"] == [0, 1, 1]
    assert merged["histograms"] == [hist]
    assert merge_batches([first]) is first


def test_histogram_bins_weigh_on_the_batch_size() -> None:
    hist = encode_histogram("sa_cosine", "w", 1, [0.0] * 1001, [1.0] * 1000)
    batch = encode_batch([Point("loss", "global", 0, 1.0)], [hist, hist])
    assert batch_size(batch) == 1 + 2 * 1001


def test_an_ack_is_a_batch_whose_non_finite_floats_travel_as_strings() -> None:
    line = ack_batch("c1", {"state": "applied", "result": {"sigma": math.inf}})
    assert json.loads(json.dumps(line, allow_nan=False)) == {
        "v": 1,
        "acks": [{"id": "c1", "ack": {"state": "applied", "result": {"sigma": "Infinity"}}}],
    }
    assert merge_batches([line, ack_batch("c2", {})])["acks"][1]["id"] == "c2"


def test_parse_commands_keeps_the_well_formed_and_says_what_it_left_out() -> None:
    body = json.dumps(
        {"data": [{"id": "a", "kind": "undo"}, "x", None, {"kind": "msign"}, {"id": 7, "kind": 1}]}
    ).encode()
    commands, problems = parse_commands(body)
    # a wrong kind is the runner's to ack as failed; no id means nothing to ack
    assert commands == [{"id": "a", "kind": "undo"}, {"id": 7, "kind": 1}]
    assert len(problems) == 3
    assert parse_commands(b'[{"id": "b", "kind": "undo"}]')[0] == [{"id": "b", "kind": "undo"}]


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"[" * 100_000, b"[" + b"1" * 5000 + b"]", b'{"data": "abc"}', b"7"],
)
def test_parse_commands_never_raises(body: bytes) -> None:
    commands, problems = parse_commands(body)
    assert commands == [] and problems


def test_parse_commands_takes_at_most_one_claims_worth() -> None:
    body = json.dumps({"data": [{"id": str(i), "kind": "undo"} for i in range(500)]}).encode()
    commands, problems = parse_commands(body)
    assert len(commands) == MAX_COMMANDS_PER_POLL and "500" in problems[0]


@pytest.mark.parametrize(
    ("body", "token", "problem"),
    [
        (b'{"id": "r", "job_token": "rg_job_0123456789"}', "rg_job_0123456789", False),
        (b'{"id": "r"}', None, False),
        (b'{"id": "r", "job_token": null}', None, False),
        (b"[1, 2]", None, False),
        (b"\xff", None, False),
        (b'{"job_token": 7}', None, True),
        (b'{"job_token": "short"}', None, True),
        (b'{"job_token": "rg_job_0123\\r\\nX-Evil: 1"}', None, True),
    ],
)
def test_parse_job_token(body: bytes, token: str | None, problem: bool) -> None:
    assert parse_job_token(body)[0] == token
    assert (parse_job_token(body)[1] is not None) is problem
