"""The spill file: an append-only JSON Lines file of batches (and command acks) the server
has not taken yet, and how far it has been delivered.

It has the local sink's format (docs/contract.md), so a run that never reached the server
can be sent later with ``rankguard upload PATH``. Ingest is idempotent on (series, step), so
a replay after a half-delivered batch never duplicates a point.

A line that cannot be read back (garbled, or cut short because its writer was killed
mid-write) is handed to the reader as :class:`Unreadable`, so the reader can count it, say
why, and move past it: one bad line never blocks the lines after it.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .sink import FileSink
from .wire import Batch

__all__ = ["SpillFile", "Unreadable"]

_CUT_SHORT = "was cut short (what a writer killed mid-write leaves)"


@dataclass(frozen=True)
class Unreadable:
    """A spill line that is not a batch: its line number (1-based) and why. A line "cut
    short" is what a writer killed mid-write leaves."""

    line: int
    why: str

    @property
    def reason(self) -> str:
        return f"line {self.line} of the spill file {self.why}"


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
        # Lines that were on disk before this process opened the file: one of them ending
        # without a newline was cut short by a writer that died (ours only appends after).
        self._size_at_open = self._size()
        self._sink = FileSink(path, registration if is_new else None)

    def append(self, batch: Batch) -> None:
        """Appends one line; raises ``OSError`` when the disk refused it (nothing of it
        stays in the file) or the file is closed."""
        self._sink.write(batch)

    def close(self) -> None:
        self._sink.close()

    def offset(self) -> int:
        try:
            return int(self._offset_path.read_text())
        except (OSError, ValueError):
            return 0

    def _write_offset(self, offset: int) -> None:
        tmp = self._offset_path.with_name(self._offset_path.name + ".tmp")
        tmp.write_text(str(offset))
        os.replace(tmp, self._offset_path)

    def pending(self) -> Iterator[tuple[int, Batch | Unreadable]]:
        """Yields (end offset, batch or :class:`Unreadable`) for each undelivered line,
        oldest first; stops before a last line that is still being written."""
        start = self.offset()
        size = self._size()
        if start >= size:
            return
        with self.path.open("rb") as f:
            f.seek(start)
            position = start
            while position < size:
                raw = f.readline()
                begins, position = position, position + len(raw)
                if not raw.endswith(b"\n"):
                    if begins >= self._size_at_open:
                        return  # this process is writing it right now
                    yield position, Unreadable(self._line_number(begins), _CUT_SHORT)
                    continue
                if not raw.strip():
                    yield position, {}  # the newline that closed a torn line: nothing to send
                    continue
                try:
                    batch = json.loads(raw)
                except (ValueError, RecursionError) as exc:
                    torn = begins < self._size_at_open < position  # we closed it at open
                    why = _CUT_SHORT if torn else f"is not JSON ({type(exc).__name__})"
                    yield position, Unreadable(self._line_number(begins), why)
                    continue
                if isinstance(batch, dict):
                    yield position, batch
                else:
                    yield (
                        position,
                        Unreadable(
                            self._line_number(begins), f"is not a batch ({type(batch).__name__})"
                        ),
                    )

    def _line_number(self, offset: int) -> int:
        """The 1-based number of the line starting at ``offset`` (read only for bad lines)."""
        with self.path.open("rb") as f:
            return f.read(offset).count(b"\n") + 1

    def mark_delivered(self, offset: int) -> None:
        self._write_offset(offset)

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:  # the sink creates the file at its first write
            return 0

    def has_pending(self) -> bool:
        return self.offset() < self._size()

    def count_pending(self) -> Counter[str]:
        """Undelivered lines by kind: ``batches`` (data), ``acks``, ``unreadable``."""
        counts: Counter[str] = Counter()
        for _, item in self.pending():
            if isinstance(item, Unreadable):
                counts["unreadable"] += 1
            elif item.get("acks"):
                counts["acks"] += 1
            elif item:
                counts["batches"] += 1
        return counts
