"""Where a sampled step's results go, and their JSON encoding (docs/contract.md "Local sink /
spill file"). The encoders are pure functions so the HTTP transport reuses them.

A batch is ``{"v": 1, "run": {...}?, "points": {columnar}, "histograms": [...]}``; ``run``
(the registration) is only on the first line of a file. Non-finite floats travel as the
strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "FORMAT_VERSION",
    "FileSink",
    "MemorySink",
    "NullSink",
    "Point",
    "Sink",
    "decode_float",
    "encode_batch",
    "encode_float",
    "encode_histogram",
    "encode_points",
    "iter_points",
    "read_jsonl",
    "safe_file_name",
]

FORMAT_VERSION = 1


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
) -> dict[str, Any]:
    batch: dict[str, Any] = {"v": FORMAT_VERSION}
    if run is not None:
        batch["run"] = dict(run)
    batch["points"] = encode_points(points)
    batch["histograms"] = list(histograms)
    return batch


@runtime_checkable
class Sink(Protocol):
    """Receives encoded batches. ``write`` must not raise into training (implementations
    count and log their errors) and should not block for long."""

    def write(self, batch: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class NullSink:
    def write(self, batch: dict[str, Any]) -> None:
        return None

    def close(self) -> None:
        return None


class MemorySink:
    """Keeps every batch in a list (tests)."""

    def __init__(self) -> None:
        self.batches: list[dict[str, Any]] = []
        self.closed = False

    def write(self, batch: dict[str, Any]) -> None:
        self.batches.append(batch)

    def close(self) -> None:
        self.closed = True


def safe_file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "run"


class FileSink:
    """Appends one JSON line per batch to ``path`` (created with its folder). The run
    registration goes on the first line written by this sink; later lines omit it."""

    def __init__(self, path: str | os.PathLike[str], run: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)  # fail at construction, not later
        self._run = dict(run) if run is not None else None
        self._lock = threading.Lock()
        self._file: Any = None  # opened at the first write: no empty files for empty runs
        self._closed = False

    def write(self, batch: dict[str, Any]) -> None:
        with self._lock:
            if self._closed:
                return
            if self._run is not None and "run" not in batch:
                batch = {"v": batch.get("v", FORMAT_VERSION), "run": self._run, **batch}
            self._run = None
            if self._file is None:
                self._file = self.path.open("a", encoding="utf-8")
            # allow_nan=False: a raw NaN here is a bug in the encoder, not valid JSON
            self._file.write(json.dumps(batch, allow_nan=False, separators=(",", ":")) + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                if self._file is not None:
                    self._file.close()


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The batches of a sink file, in order."""
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


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
