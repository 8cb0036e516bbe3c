"""Guards: a burst beyond the connection pool gets 503 + Retry-After, nothing is lost;
--no-auth is refused on public binds; the CLI parses its flags."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from server_helpers import ADMIN_TOKEN, TestClient, bearer, make_settings, points_body

from rankguard.server.cli import build_parser
from rankguard.server.config import Settings
from rankguard.server.main import create_app


def test_pool_exhaustion_is_503_with_retry_after(tmp_sqlite: str) -> None:
    settings = make_settings(tmp_sqlite, pool_size=1, max_overflow=0, pool_timeout_s=0.2)
    with TestClient(create_app(settings)) as client:
        run = client.post("/api/v1/runs", json={"name": "r"}, headers=bearer(ADMIN_TOKEN)).json()
        held = client.app.state.db.engine.connect()  # type: ignore[attr-defined]
        try:
            r = client.get("/api/v1/runs", headers=bearer(ADMIN_TOKEN))
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
        finally:
            held.close()
        ok = client.post(
            f"/api/v1/runs/{run['id']}/points",
            json=points_body([1], [1.0]),
            headers=bearer(ADMIN_TOKEN),
        )
        assert ok.status_code == 200
        assert client.get(f"/api/v1/runs/{run['id']}", headers=bearer(ADMIN_TOKEN)).json()["id"]


def test_no_auth_mode_uses_the_default_project(tmp_sqlite: str) -> None:
    with TestClient(create_app(make_settings(tmp_sqlite, no_auth=True))) as client:
        run = client.post("/api/v1/runs", json={"name": "open"})
        assert run.status_code == 201 and run.json()["project"] == "default"


def test_no_auth_needs_loopback_or_force() -> None:
    with pytest.raises(ValidationError, match="force_no_auth"):
        Settings(no_auth=True, host="0.0.0.0")
    assert Settings(no_auth=True, host="0.0.0.0", force_no_auth=True).no_auth
    assert Settings(no_auth=True, host="::1").no_auth


def test_in_memory_sqlite_is_refused(tmp_sqlite: str) -> None:
    with (
        pytest.raises(ValueError, match="in-memory"),
        TestClient(create_app(make_settings("sqlite://"))),
    ):
        pass


def test_cli_parses_serve_flags() -> None:
    args = build_parser().parse_args(
        ["serve", "--database-url", "postgresql+psycopg://u@h/db", "--port", "9000", "--no-auth"]
    )
    assert (args.database_url, args.port, args.no_auth, args.host) == (
        "postgresql+psycopg://u@h/db",
        9000,
        True,
        None,
    )
