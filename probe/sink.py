"""Where a sampled step's encoded batches go when they do not go to a server: the ``Sink``
protocol, its null and in-memory implementations, and the JSON Lines file (docs/contract.md
"Local sink / spill file"; the encoding itself is :mod:`.wire`)."""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .wire import FORMAT_VERSION, Batch

__all__ = [
    "FileSink",
    "MemorySink",
    "NullSink",
    "Sink",
    "read_jsonl",
    "safe_file_name",
]


@runtime_checkable
class Sink(Protocol):
    """Receives encoded batches. ``write`` must not raise into training (implementations
    count and log their errors) and should not block for long."""

    def write(self, batch: Batch) -> None: ...

    def close(self) -> None: ...


class NullSink:
    def write(self, batch: Batch) -> None:
        return None

    def close(self) -> None:
        return None


class MemorySink:
    """Keeps every batch in a list (tests)."""

    def __init__(self) -> None:
        self.batches: list[Batch] = []
        self.closed = False

    def write(self, batch: Batch) -> None:
        self.batches.append(batch)

    def close(self) -> None:
        self.closed = True


def safe_file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "run"


class FileSink:
    """Appends one JSON line per batch to ``path`` (created with its folder). The run
    ``registration`` goes on the first line written by this sink (as the batch's ``run``
    field); later lines omit it."""

    def __init__(
        self, path: str | os.PathLike[str], registration: Mapping[str, Any] | None = None
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)  # fail at construction, not later
        self._registration = dict(registration) if registration is not None else None
        self._lock = threading.Lock()
        self._file: Any = None  # opened at the first write: no empty files for empty runs
        self._closed = False

    def write(self, batch: Batch) -> None:
        with self._lock:
            if self._closed:
                return
            if self._registration is not None and "run" not in batch:
                batch = {"v": batch.get("v", FORMAT_VERSION), "run": self._registration, **batch}
            self._registration = None
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


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[Batch]:
    """The batches of a sink file, in order."""
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
