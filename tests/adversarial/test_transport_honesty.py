"""Issue 18, failure 5: the transport loses data it could have kept, and says it delivered
everything when it did not. The real HttpTransport talks real HTTP to a local server that
refuses, hangs or is absent; the spill file sits on a disk that fills up."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path
from typing import Any

from helpers.hostile_server import Answer, Request, hostile_server
from helpers.live_server import free_port

from rankguard.probe.http_transport import HttpTransport
from rankguard.probe.sink import FileSink
from rankguard.probe.transport import SinkTransport


def batch(step: int, n: int = 3, bins: int = 0) -> dict[str, Any]:
    histograms = []
    if bins:
        edges = [i * 0.7310585786300049 / bins for i in range(bins + 1)]  # ~18 digits each
        histograms = [
            {"quantity": "sa_cosine", "target": "w", "rank": 0, "step": step}
            | {"edges": edges, "counts": [float(i % 7) for i in range(bins)]}
        ]
    return {
        "v": 1,
        "points": {
            "quantity": ["stable_rank"] * n,
            "target": [f"h.{i}.weight" for i in range(n)],
            "rank": [0] * n,
            "step": [step] * n,
            "wall_time": [0.0] * n,
            "value": [1.0] * n,
        },
        "histograms": histograms,
    }


def transport_to(url: str, spill: Path, **options: Any) -> HttpTransport:
    settings: dict[str, Any] = {
        "token": "rg_t",
        "registration": {"id": str(uuid.uuid4()), "name": "adversarial"},
        "spill_path": spill,
        "poll_interval": 0.05,
        "retry_interval": 0.05,
    }
    settings.update(options)
    return HttpTransport(url, **settings)


def test_a_refused_merged_batch_loses_only_the_bad_batch(tmp_path: Path) -> None:
    registered = threading.Event()
    with hostile_server() as server:
        # hold the registration until all 50 batches are queued: they go out merged
        server.answer("/api/v1/runs", lambda r: Answer(201, r.json(), hang=registered))
        server.answer(
            "/points",
            lambda r: Answer(422, {"detail": "bad step"}) if 13 in r.json()["step"] else None,
        )
        transport = transport_to(server.url, tmp_path / "spill.jsonl")
        for step in range(50):
            transport.send(batch(step))
        registered.set()
        report = transport.close(timeout=10)
    assert sorted(set(server.steps())) == [s for s in range(50) if s != 13]
    assert not report.delivered_all
    assert report.dropped_batches == 1
    assert "422" in str(report) and "every sample was delivered" not in str(report)


def test_histograms_count_toward_the_batch_size(tmp_path: Path) -> None:
    """Twenty batches of one 10k-bin histogram each fit a 2 MB body limit alone; merged
    without counting the bins they are 8 MB, and the server refuses them all."""
    limit = 2_000_000
    registered = threading.Event()

    def too_large(request: Request) -> Answer | None:
        return Answer(413, {"detail": "body too large"}) if len(request.body) > limit else None

    with hostile_server() as server:
        server.answer("/api/v1/runs", lambda r: Answer(201, r.json(), hang=registered))
        server.answer("/histograms", too_large)
        transport = transport_to(server.url, tmp_path / "spill.jsonl")
        for step in range(20):
            transport.send(batch(step, n=1, bins=10_000))
        registered.set()
        report = transport.close(timeout=20)
        stored = {
            h["step"]
            for r in server.seen("/histograms")
            if len(r.body) <= limit
            for h in r.json()["histograms"]
        }
        largest = max(len(r.body) for r in server.seen("/histograms"))
    assert stored == set(range(20))
    assert largest <= limit, "a merged request went past what max_batch_points allows"
    assert report.delivered_all, str(report)


def test_an_applied_commands_ack_survives_an_outage_and_a_restart(tmp_path: Path) -> None:
    spill = tmp_path / "spill.jsonl"
    run = {"id": str(uuid.uuid4()), "name": "adversarial"}
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    first = transport_to(down, spill, registration=run)
    first.ack("c1", {"state": "applied", "step": 7, "result": {"rank": 3}})
    report = first.close(timeout=0.5)
    assert not report.delivered_all and report.undelivered_acks == 1
    with hostile_server() as server:  # the job restarts; the server is back
        second = transport_to(server.url, spill, registration=run)
        assert second.close(timeout=10).delivered_all
        acks = server.seen("/commands/c1/ack")
    assert [a.json() for a in acks][:1] == [{"state": "applied", "step": 7, "result": {"rank": 3}}]


def test_the_batch_in_flight_at_close_is_kept(tmp_path: Path) -> None:
    release = threading.Event()
    with hostile_server() as server:
        server.answer("/points", Answer(200, {}, hang=release))  # the server hangs
        transport = transport_to(server.url, tmp_path / "spill.jsonl")
        transport.send(batch(0))
        server.wait_for(lambda: bool(server.seen("/points")))  # the batch is in flight
        report = transport.close(timeout=0.5)
        release.set()
    assert not report.delivered_all
    assert report.undelivered_batches == 1, str(report)
    lines = [json.loads(line) for line in (tmp_path / "spill.jsonl").read_text().splitlines()]
    assert [s for line in lines for s in line.get("points", {}).get("step", [])] == [0, 0, 0]


def test_a_full_disk_is_counted_and_reported(tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    transport = transport_to(down, Path("/dev/full"))  # every write: ENOSPC
    for step in range(10):
        transport.send(batch(step))
    report = transport.close(timeout=0.5)
    assert not report.delivered_all
    assert report.dropped_batches == 10, str(report)
    assert "No space left on device" in str(report)
    assert "every sample was delivered" not in str(report)


def test_an_offline_run_on_a_full_disk_says_what_it_lost() -> None:
    transport = SinkTransport(FileSink("/dev/full"))
    for step in range(4):
        transport.send(batch(step))  # must not raise
    report = transport.close()
    assert not report.delivered_all
    assert report.dropped_batches == 4, str(report)
    assert "No space left on device" in str(report)


_FILLING_DISK = textwrap.dedent(
    """
    import json, resource, signal, sys, uuid
    from pathlib import Path
    here = Path(sys.argv[3])
    sys.path[:0] = [str(here), str(here.parent)]  # this module and tests/helpers
    from test_transport_honesty import batch, transport_to

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a full file is EFBIG, not a kill
    spill = Path(sys.argv[1])
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    transport = transport_to(sys.argv[2], spill, max_queue=1)  # nothing listens: all spill
    resource.setrlimit(resource.RLIMIT_FSIZE, (3000, hard))  # the disk fills mid-line
    for step in range(20):
        transport.send(batch(step))
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space again
    for step in range(20, 23):
        transport.send(batch(step))
    report = transport.close(timeout=0.5)
    print(json.dumps({"dropped": report.dropped_batches, "text": str(report)}))
    """
)


def test_a_disk_that_fills_mid_line_leaves_a_readable_spill(tmp_path: Path) -> None:
    spill = tmp_path / "spill.jsonl"
    down = f"http://127.0.0.1:{free_port()}"
    done = subprocess.run(
        [sys.executable, "-c", _FILLING_DISK, str(spill), down, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["dropped"] > 0 and "File too large" in result["text"]
    lines = spill.read_text().splitlines()
    parsed = [json.loads(line) for line in lines]  # no torn line was left behind
    steps = sorted({s for line in parsed for s in line.get("points", {}).get("step", [])})
    assert steps[-3:] == [20, 21, 22]
    assert len(steps) + result["dropped"] == 23
    with hostile_server() as server:  # and the spill still replays
        registration = parsed[0]["run"]
        replay = transport_to(server.url, spill, registration=registration)
        assert replay.close(timeout=10).delivered_all
    assert sorted(set(server.steps())) == steps
