"""The spill file: an append-only JSON Lines file of batches the server has not taken yet,
and how far it has been delivered.

It has the local sink's format (docs/contract.md), so a run that never reached the server
can be sent later with ``rankguard upload PATH``. Ingest is idempotent on (series, step), so
a replay after a half-delivered batch never duplicates a point.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .sink import FileSink
from .wire import Batch

__all__ = ["SpillFile"]


class SpillFile:
    """The spill file: a :class:`FileSink` plus the byte offset up to which it was delivered.

    The offset lives in ``<path>.sent`` and is replaced atomically after each delivered line,
    so a crash between the two re-sends at most one batch (harmless: ingest is idempotent).
    An existing file is appended to, so a restarted job replays what its last life left.
    """

    def __init__(self, path: Path, registration: dict[str, Any]) -> None:
        self.path = path
        self._offset_path = path.with_name(path.name + ".sent")
        is_new = not path.exists() or path.stat().st_size == 0
        self._sink = FileSink(path, registration if is_new else None)

    def append(self, batch: Batch) -> None:
        self._sink.write(batch)

    def close(self) -> None:
        self._sink.close()

    def offset(self) -> int:
        try:
            return int(self._offset_path.read_text())
        except (FileNotFoundError, ValueError):
            return 0

    def _write_offset(self, offset: int) -> None:
        tmp = self._offset_path.with_name(self._offset_path.name + ".tmp")
        tmp.write_text(str(offset))
        os.replace(tmp, self._offset_path)

    def pending(self) -> Iterator[tuple[int, Batch]]:
        """Yields (end offset, batch) for each undelivered line, oldest first."""
        start = self.offset()
        size = self._size()
        if start >= size:
            return
        with self.path.open("rb") as f:
            f.seek(start)
            position = start
            while position < size:
                raw = f.readline()
                if not raw.endswith(b"\n"):  # a line still being written
                    return
                position += len(raw)
                yield position, json.loads(raw)

    def mark_delivered(self, offset: int) -> None:
        self._write_offset(offset)

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:  # the sink creates the file at its first write
            return 0

    def has_pending(self) -> bool:
        return self.offset() < self._size()

    def count_pending(self) -> int:
        return sum(1 for _ in self.pending())
