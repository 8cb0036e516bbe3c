"""HttpTransport against an in-process fake server (httpx.MockTransport): spill, replay,
ordering, no duplicates, commands and acks, and what close() reports. The real server
process is exercised in tests/e2e."""

from __future__ import annotations

import gzip
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rankguard.probe.http_transport import HttpTransport
from rankguard.probe.sink import read_jsonl
from rankguard.probe.transport import MemoryTransport, NullTransport


class FakeServer:
    """Just enough of the API: run registration, points (idempotent), claim and ack."""

    def __init__(self) -> None:
        self.up = True
        self.status_override: int | None = None
        self.runs: dict[str, dict[str, Any]] = {}
        self.points: dict[tuple[str, str, int], Any] = {}
        self.arrival_order: list[int] = []
        self.queued_commands: list[dict[str, Any]] = []
        self.acks: list[tuple[str, dict[str, Any]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.lock = threading.Lock()

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.gate.wait()
        if not self.up:
            raise httpx.ConnectError("connection refused", request=request)
        if self.status_override is not None:
            return httpx.Response(self.status_override, json={"detail": "nope"})
        body = json.loads(gzip.decompress(request.content)) if request.content else {}
        path = request.url.path
        with self.lock:
            if path == "/api/v1/runs":
                self.runs[body["id"]] = body
                return httpx.Response(201, json=body)
            run_id = path.split("/")[4]
            if run_id not in self.runs:
                return httpx.Response(404, json={"detail": "Run not found"})
            if path.endswith("/points"):
                for quantity, target, step, value in zip(
                    body["quantity"], body["target"], body["step"], body["value"], strict=True
                ):
                    key = (quantity, target, step)
                    if key not in self.points:
                        self.points[key] = value
                        self.arrival_order.append(step)
                return httpx.Response(200, json={"accepted": len(body["step"])})
            if path.endswith("/commands/claim"):
                claimed, self.queued_commands = self.queued_commands, []
                return httpx.Response(200, json=claimed)
            if path.endswith("/ack"):
                self.acks.append((path.split("/")[-2], body))
                return httpx.Response(200, json={})
        return httpx.Response(404, json={"detail": "Not found"})


def batch(step: int, n: int = 3) -> dict[str, Any]:
    return {
        "v": 1,
        "points": {
            "quantity": ["stable_rank"] * n,
            "target": [f"h.{i}.weight" for i in range(n)],
            "rank": [0] * n,
            "step": [step] * n,
            "wall_time": [0.0] * n,
            "value": [1.0] * (n - 1) + ["NaN"],
        },
        "histograms": [],
    }


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


@pytest.fixture
def make_transport(server: FakeServer, tmp_path: Path) -> Iterator[Any]:
    made: list[HttpTransport] = []

    def make(**kwargs: Any) -> HttpTransport:
        client = httpx.Client(
            transport=httpx.MockTransport(server.handler), base_url="http://rankguard.test"
        )
        options: dict[str, Any] = {
            "token": "t0k",
            "registration": {"id": str(uuid.uuid4()), "name": "unit"},
            "spill_path": tmp_path / "spill.jsonl",
            "client": client,
            "poll_interval": 0.05,
            "retry_interval": 0.05,
        }
        options.update(kwargs)
        transport = HttpTransport("http://rankguard.test", **options)
        made.append(transport)
        return transport

    yield make
    for transport in made:
        transport.close(timeout=5)


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    """Polls until predicate() holds; a deadlock detector, not a speed assertion."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def test_delivers_every_point_once(server: FakeServer, make_transport: Any) -> None:
    transport = make_transport()
    for step in range(10):
        transport.send(batch(step))
    report = transport.close(timeout=10)
    assert report.delivered_all
    assert len(server.points) == 30
    assert server.points[("stable_rank", "h.2.weight", 0)] == "NaN"
    stats = transport.stats()
    assert stats.sent_points == 30
    assert stats.spilled_batches == 0


def test_server_down_spills_then_replays_in_order_without_duplicates(
    server: FakeServer, make_transport: Any, tmp_path: Path
) -> None:
    server.up = False
    transport = make_transport()
    for step in range(5):
        transport.send(batch(step))
    wait_for(lambda: transport.stats().spilled_batches == 5)
    assert server.points == {}
    server.up = True
    for step in range(5, 8):
        transport.send(batch(step))
    wait_for(lambda: len(server.points) == 24)
    report = transport.close(timeout=10)
    assert report.delivered_all
    assert server.arrival_order == sorted(server.arrival_order)
    stats = transport.stats()
    assert stats.replayed_batches >= 5
    assert stats.dropped_batches == 0


def test_send_never_waits_for_a_hung_server(server: FakeServer, make_transport: Any) -> None:
    server.gate.clear()  # every request hangs until released
    transport = make_transport(max_queue=4)
    done = threading.Event()

    def produce() -> None:
        for step in range(50):
            transport.send(batch(step))
        done.set()

    producer = threading.Thread(target=produce)
    producer.start()
    producer.join(timeout=30)
    assert done.is_set(), "send() blocked on a hung server"
    # The queue is full: the rest went to the spill file, nothing was dropped.
    assert transport.stats().spilled_batches > 0
    assert transport.stats().dropped_batches == 0
    server.gate.set()
    report = transport.close(timeout=15)
    assert report.delivered_all
    assert len(server.points) == 150


def test_close_reports_what_it_could_not_deliver(
    server: FakeServer, make_transport: Any, tmp_path: Path
) -> None:
    server.up = False
    transport = make_transport()
    for step in range(3):
        transport.send(batch(step))
    report = transport.close(timeout=2)
    assert not report.delivered_all
    assert report.undelivered_batches == 3
    assert "rankguard upload" in str(report)
    lines = list(read_jsonl(tmp_path / "spill.jsonl"))
    assert lines[0]["run"]["name"] == "unit"
    assert sorted({s for line in lines for s in line["points"]["step"]}) == [0, 1, 2]


def test_a_restarted_job_replays_what_its_last_life_left(
    server: FakeServer, make_transport: Any
) -> None:
    run = {"id": str(uuid.uuid4()), "name": "resumed"}
    server.up = False
    first = make_transport(registration=run)
    first.send(batch(0))
    first.close(timeout=1)
    server.up = True
    second = make_transport(registration=run)
    second.send(batch(1))
    assert second.close(timeout=10).delivered_all
    assert {key[2] for key in server.points} == {0, 1}


def test_wrong_token_keeps_the_data(server: FakeServer, make_transport: Any) -> None:
    server.status_override = 401
    transport = make_transport()
    transport.send(batch(0))
    report = transport.close(timeout=2)
    assert report.undelivered_batches == 1
    assert transport.stats().failed_requests >= 1


def test_commands_reach_the_inbox_and_acks_reach_the_server(
    server: FakeServer, make_transport: Any
) -> None:
    server.queued_commands = [{"id": "c1", "kind": "msign", "args": {}}]
    transport = make_transport()
    received: list[dict[str, Any]] = []
    wait_for(lambda: bool(received.extend(transport.take_commands()) or received))
    assert received == [{"id": "c1", "kind": "msign", "args": {}}]
    transport.ack("c1", {"state": "applied", "step": 7, "result": {"x": float("nan")}})
    wait_for(lambda: bool(server.acks))
    assert server.acks[0][0] == "c1"
    assert server.acks[0][1]["result"]["x"] == "NaN"
    assert transport.stats().acks_sent == 1


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="max_queue"):
        HttpTransport(
            "http://x", token=None, registration={"id": "r"}, spill_path="/tmp/x", max_queue=0
        )


def test_null_and_memory_transports_follow_the_protocol() -> None:
    null = NullTransport()
    null.send(batch(0))
    assert null.take_commands() == []
    assert null.close().delivered_all
    memory = MemoryTransport()
    memory.send(batch(0))
    memory.push_command({"id": "c", "kind": "undo"})
    assert memory.take_commands() == [{"id": "c", "kind": "undo"}]
    assert memory.take_commands() == []
    memory.ack("c", {"state": "applied"})
    assert memory.stats().sent_points == 3
    assert memory.acks == [("c", {"state": "applied"})]
