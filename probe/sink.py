"""Where a sampled step's encoded batches go when they do not go to a server: the ``Sink``
protocol, its null and in-memory implementations, and the JSON Lines file (docs/contract.md
"Local sink / spill file"; the encoding itself is :mod:`.wire`)."""

from __future__ import annotations

import contextlib
import errno
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
    """Receives encoded batches. ``write`` should not block for long; it raises when the
    batch could not be kept (the transports count it as dropped and say why in their close
    report, so nothing is lost silently)."""

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
    field); later lines omit it.

    A line is written whole or not at all: when the disk refuses part of it (full, quota,
    file size limit) the part is cut off again and ``write`` raises the ``OSError``, so the
    file stays a sequence of complete lines and later lines still parse. A file that ends
    mid-line (its last writer was killed while writing) gets that line terminated before
    the first new one, so the torn line stays one unreadable line instead of spoiling the
    next. ``write`` after ``close`` raises ``OSError`` too.
    """

    def __init__(
        self, path: str | os.PathLike[str], registration: Mapping[str, Any] | None = None
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)  # fail at construction, not later
        self._registration = dict(registration) if registration is not None else None
        self._lock = threading.Lock()
        self._fd: int | None = None  # opened at the first write: no empty files for empty runs
        self._closed = False

    def write(self, batch: Batch) -> None:
        with self._lock:
            if self._closed:
                raise OSError(f"{self.path}: the sink is closed")
            if self._registration is not None and "run" not in batch:
                batch = {"v": batch.get("v", FORMAT_VERSION), "run": self._registration, **batch}
            # allow_nan=False: a raw NaN here is a bug in the encoder, not valid JSON
            line = json.dumps(batch, allow_nan=False, separators=(",", ":")) + "\n"
            if self._fd is None:
                self._fd = self._open()
            _append_whole(self._fd, line.encode())
            self._registration = None  # only once the line holding it is on disk

    def _open(self) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if _ends_mid_line(self.path):
                _append_whole(fd, b"\n")
        except OSError:
            os.close(fd)
            raise
        return fd

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                if self._fd is not None:
                    os.close(self._fd)


def _ends_mid_line(path: Path) -> bool:
    """Whether a regular file's last byte is not a newline (a writer died mid-line)."""
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return False
            f.seek(size - 1)
            return f.read(1) != b"\n"
    except OSError:  # not seekable (a device): nothing to repair
        return False


def _append_whole(fd: int, data: bytes) -> None:
    """Appends all of ``data`` to ``fd`` or, when the disk refuses part of it, cuts the
    file back to where it was and raises the ``OSError``."""
    start = os.fstat(fd).st_size
    written = 0
    try:
        while written < len(data):
            n = os.write(fd, data[written:])
            if n == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            written += n
    except OSError:
        if written:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
        raise


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[Batch]:
    """The batches of a sink file, in order."""
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
