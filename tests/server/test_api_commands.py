"""The command queue: operator queues, probe claims and acks; states and scopes."""

from __future__ import annotations

import time

from server_helpers import Project


def test_queue_claim_ack_records_an_event(project: Project) -> None:
    run_id = project.new_run()
    op, probe = project.api["operate"], project.api["ingest"]
    r = op.post(
        f"/runs/{run_id}/commands", json={"kind": "msign", "args": {"targets": "attention"}}
    )
    assert r.status_code == 201
    cmd = r.json()
    assert cmd["state"] == "queued" and cmd["created_by"].startswith("token:")
    claimed = probe.post(f"/runs/{run_id}/commands/claim").json()
    assert [c["id"] for c in claimed["data"]] == [cmd["id"]]
    assert claimed["data"][0]["state"] == "delivered"
    assert probe.post(f"/runs/{run_id}/commands/claim").json()["count"] == 0  # once only
    ack = {"state": "applied", "step": 120, "result": {"stable_rank_before": 1.5}}
    done = probe.post(f"/runs/{run_id}/commands/{cmd['id']}/ack", json=ack)
    assert done.status_code == 200
    assert done.json()["state"] == "applied" and done.json()["applied_step"] == 120
    assert probe.post(f"/runs/{run_id}/commands/{cmd['id']}/ack", json=ack).status_code == 200
    refail = probe.post(f"/runs/{run_id}/commands/{cmd['id']}/ack", json={"state": "failed"})
    assert refail.status_code == 409
    events = project.api["read"].get(f"/runs/{run_id}/events").json()["data"]
    assert [e["kind"] for e in events] == ["command_queued", "command_applied"]
    assert events[1]["step"] == 120 and events[1]["payload"]["command_id"] == cmd["id"]


def test_cancel_only_while_queued(project: Project) -> None:
    run_id = project.new_run()
    op = project.api["operate"]
    a = op.post(f"/runs/{run_id}/commands", json={"kind": "undo"}).json()
    assert op.post(f"/runs/{run_id}/commands/{a['id']}/cancel").json()["state"] == "cancelled"
    b = op.post(f"/runs/{run_id}/commands", json={"kind": "pss"}).json()
    project.api["ingest"].post(f"/runs/{run_id}/commands/claim")
    assert op.post(f"/runs/{run_id}/commands/{b['id']}/cancel").status_code == 409
    states = {c["id"]: c["state"] for c in op.get(f"/runs/{run_id}/commands").json()["data"]}
    assert states == {a["id"]: "cancelled", b["id"]: "delivered"}


def test_expired_commands_are_not_delivered_but_late_acks_count(project: Project) -> None:
    run_id = project.new_run()
    op, probe = project.api["operate"], project.api["ingest"]
    c = op.post(f"/runs/{run_id}/commands", json={"kind": "msign", "ttl_s": 0.05}).json()
    time.sleep(0.1)
    assert probe.post(f"/runs/{run_id}/commands/claim").json()["count"] == 0
    assert op.get(f"/runs/{run_id}/commands/{c['id']}").json()["state"] == "expired"
    late = probe.post(
        f"/runs/{run_id}/commands/{c['id']}/ack", json={"state": "applied", "step": 3}
    )
    assert late.json()["state"] == "applied"


def test_command_scopes_and_validation(project: Project) -> None:
    run_id = project.new_run()
    assert (
        project.api["ingest"].post(f"/runs/{run_id}/commands", json={"kind": "msign"}).status_code
        == 403
    )
    assert project.api["read"].post(f"/runs/{run_id}/commands/claim").status_code == 403
    r = project.api["operate"].post(f"/runs/{run_id}/commands", json={"kind": "reboot"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "kind"]
    assert project.api["operate"].get(f"/runs/{run_id}/commands/nope").status_code == 404
    project.api["ingest"].post(f"/runs/{run_id}/finish")
    assert (
        project.api["operate"].post(f"/runs/{run_id}/commands", json={"kind": "msign"}).status_code
        == 409
    )
