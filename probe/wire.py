"""The probe's side of the wire format (docs/contract.md "Local sink / spill file"): a sampled
step's batch as plain JSON, and the probe's one NaN/±Inf codec.

A batch is ``{"v": 1, "run": {...}?, "points": {columnar}, "histograms": [...]}``; ``run``
(the registration) is only on the first line of a file. Non-finite floats travel as the
strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``.

Pure functions, standard library only: the sink, the HTTP transport and ``rankguard upload``
share them, and none of them needs torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FORMAT_VERSION",
    "Batch",
    "Point",
    "decode_float",
    "encode_batch",
    "encode_float",
    "encode_histogram",
    "encode_json",
    "encode_points",
    "iter_points",
    "merge_batches",
    "point_count",
]

FORMAT_VERSION = 1

Batch = dict[str, Any]


@dataclass(frozen=True)
class Point:
    quantity: str
    target: str
    step: int
    value: float
    rank: int = 0
    wall_time: float | None = None


def encode_float(x: float) -> float | str:
    """A float as JSON can carry it: non-finite values become "NaN"/"Infinity"/"-Infinity"."""
    x = float(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return x


def decode_float(x: float | int | str) -> float:
    """Inverse of :func:`encode_float`."""
    if isinstance(x, str):
        if x in ("NaN", "Infinity", "-Infinity"):
            return float(x.replace("Infinity", "inf"))
        raise ValueError(f"value: expected a number, 'NaN', 'Infinity' or '-Infinity', got {x!r}")
    return float(x)


def encode_json(body: Any) -> str:
    """Strict, compact JSON; a stray non-finite float anywhere in ``body`` (e.g. in an ack's
    result) travels as :func:`encode_float`'s string instead of failing."""
    try:
        return json.dumps(body, allow_nan=False, separators=(",", ":"))
    except ValueError:
        return json.dumps(_finite_or_string(body), allow_nan=False, separators=(",", ":"))


def _finite_or_string(obj: Any) -> Any:
    if isinstance(obj, float):
        return encode_float(obj)
    if isinstance(obj, dict):
        return {key: _finite_or_string(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_string(value) for value in obj]
    return obj


def encode_points(points: Sequence[Point]) -> dict[str, list[Any]]:
    """Columnar form: one list per field, all the same length."""
    return {
        "quantity": [p.quantity for p in points],
        "target": [p.target for p in points],
        "rank": [p.rank for p in points],
        "step": [p.step for p in points],
        "wall_time": [p.wall_time for p in points],
        "value": [encode_float(p.value) for p in points],
    }


def encode_histogram(
    quantity: str,
    target: str,
    step: int,
    edges: Sequence[float],
    counts: Sequence[float],
    rank: int = 0,
) -> dict[str, Any]:
    return {
        "quantity": quantity,
        "target": target,
        "rank": rank,
        "step": step,
        "edges": [encode_float(e) for e in edges],
        "counts": [encode_float(c) for c in counts],
    }


def encode_batch(
    points: Sequence[Point],
    histograms: Sequence[Mapping[str, Any]] = (),
    run: Mapping[str, Any] | None = None,
    events: Sequence[Mapping[str, Any]] = (),
) -> Batch:
    """One batch; ``events``: ``{"kind", "step", "payload"}`` each (the probe's own events:
    rollbacks, skipped updates...; docs/contract.md), posted after the points."""
    batch: Batch = {"v": FORMAT_VERSION}
    if run is not None:
        batch["run"] = dict(run)
    batch["points"] = encode_points(points)
    batch["histograms"] = list(histograms)
    if events:
        batch["events"] = [_finite_or_string(dict(e)) for e in events]
    return batch


def iter_points(batches: Iterable[Mapping[str, Any]]) -> Iterator[Point]:
    """Decodes the columnar points of batches back to :class:`Point` (values as floats)."""
    for b in batches:
        cols = b.get("points", {})
        for i in range(len(cols.get("value", []))):
            yield Point(
                quantity=cols["quantity"][i],
                target=cols["target"][i],
                step=int(cols["step"][i]),
                value=decode_float(cols["value"][i]),
                rank=int(cols.get("rank", [0] * (i + 1))[i]),
                wall_time=cols.get("wall_time", [None] * (i + 1))[i],
            )


def point_count(batch: Batch) -> int:
    """The number of points in an encoded batch."""
    points = batch.get("points") or {}
    return len(points.get("step", ()))


def merge_batches(batches: list[Batch]) -> Batch:
    """Concatenates the columnar points and histograms of several batches into one."""
    if len(batches) == 1:
        return batches[0]
    columns: dict[str, list[Any]] = {}
    histograms: list[Any] = []
    events: list[Any] = []
    for batch in batches:
        for name, column in (batch.get("points") or {}).items():
            columns.setdefault(name, []).extend(column)
        histograms.extend(batch.get("histograms") or [])
        events.extend(batch.get("events") or [])
    merged: Batch = {"points": columns, "histograms": histograms}
    if events:
        merged["events"] = events
    return merged
