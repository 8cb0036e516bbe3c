"""Issue 18, failure 2 (the probe's side): a job token is bound to its run. When the run's
registration reply carries a ``job_token``, the transport uses it for every later call of
that run — points, histograms, claims, acks — and registers with the token it was given.
Here at the seam, against a local HTTP server that mints tokens as the real one does."""

from __future__ import annotations

import itertools
import threading
import uuid
from pathlib import Path
from typing import Any

from helpers.hostile_server import Answer, HostileServer, Request, hostile_server

from rankguard.probe.http_transport import HttpTransport

GIVEN = "Bearer rg_project-token"


def minting(server: HostileServer) -> list[str]:
    """Makes ``server`` answer each registration with a fresh job token; returns them."""
    minted: list[str] = []
    counter = itertools.count()

    def register(request: Request) -> Answer:
        token = f"rg_job_{next(counter)}_{uuid.uuid4().hex}"
        minted.append(token)
        return Answer(201, {**request.json(), "job_token": token})

    server.answer("/api/v1/runs", register)
    return minted


def transport_to(server: HostileServer, tmp_path: Path, **options: Any) -> HttpTransport:
    return HttpTransport(
        server.url,
        token="rg_project-token",
        registration={"id": str(uuid.uuid4()), "name": "job"},
        spill_path=tmp_path / "spill.jsonl",
        poll_interval=0.02,
        retry_interval=0.05,
        **options,
    )


def batch(step: int) -> dict[str, Any]:
    points = {"quantity": ["loss"], "target": ["global"], "rank": [0], "step": [step]}
    histogram = {"quantity": "sa_cosine", "target": "w", "rank": 0, "step": step}
    return {
        "v": 1,
        "points": points | {"wall_time": [0.0], "value": [1.0]},
        "histograms": [histogram | {"edges": [0.0, 1.0], "counts": [1.0]}],
    }


def test_every_call_after_registration_uses_the_job_token(tmp_path: Path) -> None:
    with hostile_server() as server:
        minted = minting(server)
        transport = transport_to(server, tmp_path)
        transport.send(batch(0))
        server.wait_for(lambda: len(server.seen("/commands/claim")) >= 2)
        transport.ack("c1", {"state": "applied", "step": 0})
        assert transport.close(timeout=10).delivered_all
        requests = list(server.requests)
    (job,) = minted
    assert [r.headers["Authorization"] for r in requests if r.path.endswith("/runs")] == [GIVEN]
    later = [r for r in requests if not r.path.endswith("/runs")]
    kinds = {r.path.rsplit("/", 1)[-1] for r in later}
    assert kinds == {"points", "histograms", "claim", "ack"}
    assert {r.headers["Authorization"] for r in later} == {f"Bearer {job}"}


def test_a_reply_without_a_job_token_keeps_the_given_token(tmp_path: Path) -> None:
    with hostile_server() as server:  # the default answer echoes the registration
        transport = transport_to(server, tmp_path)
        transport.send(batch(0))
        assert transport.close(timeout=10).delivered_all
        assert {r.headers["Authorization"] for r in server.requests} == {GIVEN}


def test_a_refused_job_token_registers_again_and_takes_the_new_one(tmp_path: Path) -> None:
    refuse = threading.Event()
    with hostile_server() as server:
        minted = minting(server)

        def points(request: Request) -> Answer | None:
            first = minted[0] if minted else ""
            if refuse.is_set() and request.headers["Authorization"] == f"Bearer {first}":
                return Answer(401, {"detail": "invalid token"})  # the server forgot it
            return None

        server.answer("/points", points)
        transport = transport_to(server, tmp_path)
        transport.send(batch(0))
        server.wait_for(lambda: len(server.steps()) == 1)
        refuse.set()
        transport.send(batch(1))
        server.wait_for(lambda: len(server.steps()) == 2)
        report = transport.close(timeout=10)
    assert report.delivered_all, str(report)
    assert len(minted) == 2
    last = server.seen("/points")[-1]
    assert last.headers["Authorization"] == f"Bearer {minted[1]}"
