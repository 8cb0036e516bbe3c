"""Runs, projects, tokens and auth, on every backend."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

from server_helpers import Api, Project, bearer


def test_register_run_is_idempotent_on_client_id(project: Project) -> None:
    run_id = str(uuid.uuid4())
    body = {
        "id": run_id,
        "name": "gpt",
        "config": {"lr": 3e-3},
        "world_size": 2,
        "parameters": [{"name": "w", "shape": [4, 3]}],
    }
    first = project.api["ingest"].post("/runs", json=body)
    again = project.api["ingest"].post("/runs", json=body)
    assert (first.status_code, again.status_code) == (201, 200)
    # The job token is handed out once, to the registration that created the run.
    assert first.json().pop("job_token").startswith("rg_") and again.json()["job_token"] is None
    assert {**first.json(), "job_token": None} == again.json()
    run = first.json()
    assert run["id"] == run_id and run["project"] == project.name
    assert run["status"] == "running" and run["world_size"] == 2
    assert run["parameters"] == [{"name": "w", "shape": [4, 3]}]


def test_ranks_registering_one_run_at_once_all_get_it(project: Project) -> None:
    # every rank of a data-parallel job that ships registers the same run id, concurrently
    run_id = str(uuid.uuid4())
    body = {"id": run_id, "name": "ddp", "world_size": 8}
    barrier = threading.Barrier(8)

    def register(_: int) -> int:
        barrier.wait()
        return project.api["ingest"].post("/runs", json=body).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = sorted(pool.map(register, range(8)))
    assert codes == [200] * 7 + [201], codes
    rules = project.api["read"].get("/alert-rules", params={"run_id": run_id}).json()
    assert rules["count"] > 0 and len({r["name"] for r in rules["data"]}) == rules["count"]


def test_list_get_and_finish_run(project: Project) -> None:
    run_id = project.new_run(name="a")
    reader = project.api["read"]
    listed = reader.get("/runs").json()
    assert [r["id"] for r in listed["data"]] == [run_id] and listed["count"] == 1
    assert reader.get(f"/runs/{run_id}").json()["name"] == "a"
    done = project.api["ingest"].post(f"/runs/{run_id}/finish", json={"status": "failed"})
    assert done.status_code == 200 and done.json()["status"] == "failed"
    assert done.json()["finished_at"] is not None
    assert reader.get("/runs", params={"status": "running"}).json()["count"] == 0
    # a contradicting finish is a conflict, a repeat is a no-op
    assert (
        project.api["ingest"]
        .post(f"/runs/{run_id}/finish", json={"status": "finished"})
        .status_code
        == 409
    )
    assert (
        project.api["ingest"].post(f"/runs/{run_id}/finish", json={"status": "failed"}).status_code
        == 200
    )


def test_other_projects_runs_are_404(project: Project, other_project: Project) -> None:
    run_id = project.new_run()
    for api in other_project.api.values():
        assert api.get(f"/runs/{run_id}").status_code == 404
    outsider = other_project.api["ingest"]
    assert (
        outsider.post(
            f"/runs/{run_id}/points",
            json={"quantity": ["loss"], "target": ["g"], "step": [1], "value": [1.0]},
        ).status_code
        == 404
    )
    assert (
        other_project.api["operate"]
        .post(f"/runs/{run_id}/commands", json={"kind": "msign"})
        .status_code
        == 404
    )
    assert other_project.api["read"].get("/runs").json()["count"] == 0
    # a client-chosen id already taken by another project is a conflict, not a takeover
    taken = outsider.post("/runs", json={"id": run_id, "name": "steal"})
    assert taken.status_code == 409


def test_bound_token_cannot_register_in_another_project(
    project: Project, other_project: Project
) -> None:
    r = project.api["ingest"].post("/runs", json={"name": "x", "project": other_project.name})
    assert r.status_code == 403


def test_missing_or_wrong_token_is_401(client, project: Project) -> None:  # type: ignore[no-untyped-def]
    run_id = project.new_run()
    assert client.get(f"/api/v1/runs/{run_id}").status_code == 401
    r = client.get(f"/api/v1/runs/{run_id}", headers=bearer("rg_nope"))
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_wrong_scope_is_403(project: Project) -> None:
    run_id = project.new_run()
    assert project.api["ingest"].get("/runs").status_code == 403  # listing needs read
    assert project.api["read"].post("/runs", json={"name": "x"}).status_code == 403
    assert (
        project.api["read"].post(f"/runs/{run_id}/commands", json={"kind": "msign"}).status_code
        == 403
    )
    assert project.api["operate"].get("/runs").status_code == 200  # operate implies read
    assert project.api["operate"].get("/tokens").status_code == 403
    assert project.api["admin"].get(f"/runs/{run_id}").status_code == 200  # admin implies all


def test_revoked_token_is_refused(admin: Api, project: Project) -> None:
    tokens = admin.get("/tokens").json()["data"]
    mine = [t for t in tokens if t["project"] == project.name and t["name"] == "read"]
    assert len(mine) == 1 and "token" not in mine[0]
    assert project.tokens["read"].startswith(mine[0]["prefix"])
    assert admin.delete(f"/tokens/{mine[0]['id']}").json()["revoked_at"] is not None
    assert project.api["read"].get("/runs").status_code == 401


def test_project_admin_stays_in_its_project(project: Project, other_project: Project) -> None:
    padmin = project.api["admin"]
    assert padmin.post("/projects", json={"name": "newone"}).status_code == 403
    r = padmin.post(
        "/tokens", json={"name": "x", "project": other_project.name, "scopes": ["read"]}
    )
    assert r.status_code == 404
    assert {t["project"] for t in padmin.get("/tokens").json()["data"]} == {project.name}


def test_unknown_run_is_404(admin: Api) -> None:
    assert admin.get(f"/runs/{uuid.uuid4()}").status_code == 404
    assert admin.get(f"/runs/{uuid.uuid4()}").json() == {"detail": "Run not found"}


def test_health(client) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ok"}


def test_non_finite_numbers_in_free_form_objects_keep_their_meaning(project: Project) -> None:
    # Python's json writes NaN/Infinity tokens; a JSON column cannot hold them (PostgreSQL
    # refuses them, orjson would write null), so they are stored as the contract's strings.
    api = project.api["ingest"]
    body = '{"name": "nan", "config": {"lr": NaN, "clip": [Infinity, -Infinity], "ok": 1.5}}'
    created = api.post("/runs", content=body, headers={"Content-Type": "application/json"})
    assert created.status_code == 201, created.text
    config = {"lr": "NaN", "clip": ["Infinity", "-Infinity"], "ok": 1.5}
    assert created.json()["config"] == config
    assert api.get(f"/runs/{created.json()['id']}").json()["config"] == config
