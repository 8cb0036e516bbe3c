"""Failure 2: one job's token acted on every run of its project (forged points fired an
MSign rule on job 2's run, claimed and acked its commands, posted events, finished it).

A job now holds a token bound to its own run: the ``job_token`` of its registration, or one
minted for it. These tests play job 1 against job 2 with job 1's token."""

from __future__ import annotations

import uuid
from typing import Any

from server_helpers import Api, Project, points_body

# A rule that orders MSign on the first NaN loss (what job 1 forged into job 2's run).
NAN_MSIGN_RULE: dict[str, Any] = {
    "name": "loss_nan",
    "quantity": "loss",
    "condition": "non_finite",
    "consecutive": 1,
    "severity": "critical",
    "msign": {"enabled": True, "targets": "all_2d", "engine": "svd", "max_orders": 1},
}


HISTOGRAM = {"quantity": "q", "target": "t", "step": 1, "edges": [0, 1], "counts": [1]}


def register(project: Project, name: str) -> tuple[str, Api]:
    """A run registered as the probe does (project ingest token); the job's own client."""
    r = project.api["ingest"].post("/runs", json={"id": str(uuid.uuid4()), "name": name})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["job_token"], "the registration must hand the job its run-bound token"
    return body["id"], Api(project.api["ingest"].client, body["job_token"])


def test_a_jobs_token_cannot_touch_another_run(project: Project) -> None:
    rule = project.api["operate"].post("/alert-rules", json={"rule": NAN_MSIGN_RULE})
    assert rule.status_code == 201, rule.text
    run1, job1 = register(project, "job-1")
    run2, job2 = register(project, "job-2")
    queued = (
        project.api["operate"]
        .post(f"/runs/{run2}/commands", json={"kind": "scale_lr", "args": {"factor": 0.5}})
        .json()
    )
    assert job2.post(f"/runs/{run2}/commands/claim").json()["count"] == 1

    # Job 1 against job 2's run: every route answers as if the run did not exist.
    attacks = [
        job1.post(f"/runs/{run2}/points", json=points_body([1, 2], ["NaN", "NaN"])),
        job1.post(f"/runs/{run2}/commands/claim"),
        job1.post(f"/runs/{run2}/commands/{queued['id']}/ack", json={"state": "applied"}),
        job1.post(f"/runs/{run2}/events", json={"kind": "alert", "payload": {"fake": True}}),
        job1.post(f"/runs/{run2}/finish", json={"status": "failed"}),
        job1.get(f"/runs/{run2}"),
        job1.get(f"/runs/{run2}/commands"),
        job1.post(f"/runs/{run2}/histograms", json={"histograms": [HISTOGRAM]}),
    ]
    assert [r.status_code for r in attacks] == [404] * len(attacks)
    # ... nor re-register it to get hold of it.
    assert job1.post("/runs", json={"id": run2, "name": "x"}).status_code == 403

    read = project.api["read"]
    assert read.get(f"/runs/{run2}").json()["status"] == "running"
    assert read.get(f"/runs/{run2}/alerts").json()["data"] == []
    states = [c["state"] for c in read.get(f"/runs/{run2}/commands").json()["data"]]
    assert states == ["delivered"]  # not acked by job 1, and no MSign queued
    assert read.get(f"/runs/{run2}/events", params={"kind": "alert"}).json()["count"] == 0

    # Its own run: everything a probe does works.
    assert job1.post(f"/runs/{run1}/points", json=points_body([1], [2.5])).status_code == 200
    assert job1.post(f"/runs/{run1}/commands/claim").status_code == 200
    assert job1.post(f"/runs/{run1}/events", json={"kind": "note"}).status_code == 201
    assert job1.post("/runs", json={"id": run1, "name": "job-1"}).status_code == 200
    assert job1.post(f"/runs/{run1}/finish").json()["status"] == "finished"
    # The forged NaN would have fired the rule: sent by job 2 itself, it does.
    assert (
        job2.post(f"/runs/{run2}/points", json=points_body([1, 2], ["NaN"] * 2)).status_code == 200
    )
    assert len(read.get(f"/runs/{run2}/alerts").json()["data"]) == 1
    kinds = [c["kind"] for c in read.get(f"/runs/{run2}/commands").json()["data"]]
    assert kinds == ["scale_lr", "msign"]


def test_a_job_token_reads_and_manages_nothing(project: Project) -> None:
    run, job = register(project, "job")
    for path in ("/runs", f"/runs/{run}/series/index", f"/runs/{run}/events", "/webhooks"):
        assert job.get(path).status_code == 403, path
    order = {"kind": "msign", "args": {}}
    assert job.post(f"/runs/{run}/commands", json=order).status_code == 403
    mint = {"name": "x", "project": project.name, "scopes": ["admin"]}
    assert job.post("/tokens", json=mint).status_code == 403
    assert job.client.get("/metrics", headers=job.headers).status_code == 403


def test_minted_job_tokens_are_bound(admin: Api, project: Project) -> None:
    run_a = project.new_run()
    run_b = project.new_run()
    mint = {"name": "job", "project": project.name, "scopes": ["job"]}
    bound = admin.post("/tokens", json={**mint, "run_id": run_b})
    assert bound.status_code == 201 and bound.json()["run_id"] == run_b
    job_b = Api(admin.client, bound.json()["token"])
    assert job_b.post(f"/runs/{run_b}/points", json=points_body([1], [1.0])).status_code == 200
    assert job_b.post(f"/runs/{run_a}/points", json=points_body([1], [1.0])).status_code == 404
    # Registration with the token's run (the id may be left out) and no other.
    assert job_b.post("/runs", json={"name": "b"}).json()["id"] == run_b
    assert job_b.post("/runs", json={"id": run_a, "name": "a"}).status_code == 403

    # Unbound: bound by the first run it creates; an existing run cannot be taken over.
    job = Api(admin.client, admin.post("/tokens", json=mint).json()["token"])
    assert job.post("/runs", json={"id": run_a, "name": "steal"}).status_code == 403
    own = str(uuid.uuid4())
    created = job.post("/runs", json={"id": own, "name": "mine"})
    assert created.status_code == 201 and created.json()["job_token"] is None
    assert job.post("/runs", json={"id": own, "name": "mine"}).status_code == 200  # rank 1
    assert job.post("/runs", json={"name": "second"}).json()["id"] == own
    assert job.post(f"/runs/{run_a}/commands/claim").status_code == 404
    listed = {t["run_id"] for t in admin.get("/tokens").json()["data"] if t["name"] == "job"}
    assert {run_b, own} <= listed


def test_job_token_requests_are_validated(
    admin: Api, project: Project, other_project: Project
) -> None:
    theirs = other_project.new_run()
    base = {"name": "job", "project": project.name}
    cases = [
        {**base, "scopes": ["job", "read"]},  # job stands alone
        {**base, "scopes": ["ingest"], "run_id": project.new_run()},  # only job is run-bound
        {**base, "scopes": ["job"], "run_id": theirs},  # another project's run
        {**base, "scopes": ["job"], "run_id": "no-such-run"},
    ]
    for body in cases:
        r = admin.post("/tokens", json=body)
        assert r.status_code == 422, (body, r.text)
