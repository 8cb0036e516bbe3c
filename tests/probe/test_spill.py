"""The spill file and the sink under it: a line is written whole or not at all; a bad or
torn line is handed to the reader as Unreadable (with its line number) and never blocks the
lines after it; a file a killed writer left mid-line gets that line closed before the next."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from rankguard.probe.sink import FileSink
from rankguard.probe.spill import SpillFile, Unreadable

RUN = {"id": str(uuid.uuid4()), "name": "spill"}


def line(step: int) -> dict[str, object]:
    return {"v": 1, "points": {"step": [step], "value": [1.0]}}


def steps_of(items: list[object]) -> list[int]:
    return [
        s
        for item in items
        if isinstance(item, dict)
        for s in item.get("points", {}).get("step", [])
    ]


def test_bad_lines_are_named_and_skipped(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    sink = FileSink(path, registration=RUN)
    for step in range(4):
        sink.write(line(step))
    sink.close()
    raw = path.read_bytes().splitlines(keepends=True)
    raw[1] = b"{garbled\n"
    raw[2] = b"[1, 2]\n"
    path.write_bytes(b"".join(raw))
    items = [item for _, item in SpillFile(path, RUN).pending()]
    assert steps_of(items) == [0, 3]
    assert [(u.line, u.why) for u in items if isinstance(u, Unreadable)] == [
        (2, "is not JSON (JSONDecodeError)"),
        (3, "is not a batch (list)"),
    ]


def test_a_torn_tail_is_cut_short_and_the_next_life_starts_a_new_line(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    sink = FileSink(path, registration=RUN)
    for step in range(3):
        sink.write(line(step))
    sink.close()
    path.write_bytes(path.read_bytes()[:-5])  # killed mid-write
    reader = SpillFile(path, RUN)
    items = [item for _, item in reader.pending()]
    assert steps_of(items) == [0, 1] and isinstance(items[-1], Unreadable)
    assert items[-1].line == 3 and "cut short" in items[-1].why
    reader.append(line(3))  # the restarted job writes again
    items = [item for _, item in SpillFile(path, RUN).pending()]
    assert steps_of(items) == [0, 1, 3]
    assert [u.line for u in items if isinstance(u, Unreadable)] == [3]
    assert reader.count_pending() == {"batches": 3, "unreadable": 1}


def test_a_line_being_written_by_this_process_is_waited_for(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    spill = SpillFile(path, RUN)
    spill.append(line(0))
    with path.open("ab") as f:
        f.write(b'{"v": 1, "poi')  # this process's writer, mid-line
    assert steps_of([item for _, item in spill.pending()]) == [0]


def test_a_refused_write_leaves_no_part_of_the_line(tmp_path: Path) -> None:
    sink = FileSink("/dev/full", registration=RUN)
    with pytest.raises(OSError, match="No space left"):
        sink.write(line(0))
    sink.close()
    with pytest.raises(OSError, match="closed"):
        sink.write(line(1))


def test_the_registration_waits_for_a_line_that_made_it(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    sink = FileSink(path, registration=RUN)
    path.mkdir()  # the first write cannot open the file
    with pytest.raises(OSError):
        sink.write(line(0))
    path.rmdir()
    sink.write(line(1))
    sink.close()
    first = json.loads(path.read_text().splitlines()[0])
    assert first["run"] == RUN and first["points"]["step"] == [1]
