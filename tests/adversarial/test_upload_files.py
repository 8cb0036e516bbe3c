"""Issue 18, failure 6: ``rankguard upload`` sent nothing when one line of a spill file was
garbled, and spun for its whole ``--timeout`` on a truncated last line (what a kill
mid-write leaves) before reporting success. The real console script uploads to a real
local HTTP server."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

from helpers.hostile_server import Answer, HostileServer, hostile_server

from rankguard.probe.sink import FileSink

RANKGUARD = Path(sys.executable).with_name("rankguard")


def write_spill(path: Path, lines: int = 100) -> None:
    sink = FileSink(path, registration={"id": str(uuid.uuid4()), "name": "uploaded"})
    for step in range(lines):
        points = {"quantity": ["loss"], "target": ["global"], "rank": [0], "step": [step]}
        sink.write({"v": 1, "points": points | {"wall_time": [0.0], "value": [1.0]}})
    sink.close()


def upload(path: Path, server: HostileServer, timeout: float = 30) -> tuple[int, str, float]:
    start = time.monotonic()
    done = subprocess.run(
        [str(RANKGUARD), "upload", str(path), "--server", server.url, "--timeout", str(timeout)],
        capture_output=True,
        text=True,
        timeout=timeout + 60,
        check=False,
    )
    return done.returncode, done.stderr, time.monotonic() - start


def test_a_bad_line_is_skipped_and_reported(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    write_spill(path)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[51] = b'{"v": 1, "points": {"step": [5\x00garbled\n'  # line 52: step 51's batch
    path.write_bytes(b"".join(lines))
    with hostile_server() as server:
        code, stderr, _ = upload(path, server)
        steps = sorted(server.steps())
    assert steps == [s for s in range(100) if s != 51]
    assert code == 1
    assert "line 52" in stderr and "every sample was delivered" not in stderr, stderr


def test_a_truncated_tail_stops_the_upload_and_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    write_spill(path)
    path.write_bytes(path.read_bytes()[:-20])  # killed mid-write of the last line
    with hostile_server() as server:
        code, stderr, seconds = upload(path, server, timeout=20)
        steps = sorted(server.steps())
    assert steps == list(range(99))
    assert seconds < 10, f"spun for {seconds:.0f} s"
    assert code == 1
    assert "line 100 of the spill file was cut short" in stderr, stderr
    assert "every sample was delivered" not in stderr


def test_a_refused_token_ends_the_upload_at_once(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    write_spill(path, lines=3)
    with hostile_server() as server:
        server.answer("/api/v1/runs", Answer(401, {"detail": "invalid token"}))
        code, stderr, seconds = upload(path, server, timeout=20)
    assert code == 1
    assert seconds < 10, f"spun for {seconds:.0f} s"
    assert "401" in stderr and "3 batch(es) not delivered" in stderr, stderr
